"""`laggard report` on data this test writes with the real sink (its own cluster name): the HTML
page embeds its PNG charts and names the straggler, its waste is the findings' cost times the
windows they fired, and headless Chromium renders it without console errors."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from laggard.commands.report import Episode, ReportData, duration_s, episodes, report
from laggard.settings import Settings
from tests.helpers.telemetry import STRAGGLER_RANK, write_recent_run

CHROMIUM = "/usr/bin/chromium"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_since_accepts_units_and_names_bad_input() -> None:
    assert [duration_s(s) for s in ("90s", "30m", "1h", "2d", "1w")] == [90, 1800, 3600, 172800, 604800]
    for bad in ("1y", "h", "-1h", "0m", "1h; DROP"):
        with pytest.raises(ValueError, match=r"--since .*expected a positive number and a unit"):
            duration_s(bad)


def test_episode_waste_is_cost_per_window_times_windows_fired() -> None:
    base = {"kind": "straggler", "cluster": "c", "job": "j", "rank": "3", "node": "n", "gpu": "1", "summary": "s",
            "cost_peer_gpu_s_wasted": 36.0, "cost_energy_wh_wasted": 1.5}
    rows = [{**base, "time": 100.0, "state": "firing"}, {**base, "time": 160.0, "state": "resolved"},
            {**base, "time": 200.0, "state": "firing"},
            {**base, "kind": "idle_allocated", "rank": None, "time": 100.0, "state": "firing",
             "cost_peer_gpu_s_wasted": None, "cost_energy_wh_wasted": None, "cost_gpu_s_idle": 40.0}]
    found = episodes(rows, data_end=230.0, window_s=10.0)
    by = {(e.kind, e.fired_at): e for e in found}
    assert by[("straggler", 100.0)] == Episode("straggler", "j", "3", "n", "1", "s", 100.0, 160.0, False, 6.0,
                                               216.0, 9.0)
    assert (by[("straggler", 200.0)].active, by[("straggler", 200.0)].windows) == (True, 3.0)
    assert by[("idle_allocated", 100.0)].gpu_s_wasted == 40.0 * 13

    data = ReportData("1h", None, None, 10.0, episodes=found)
    waste = {w["kind"]: (w["count"], w["gpu_h"], w["kwh"]) for w in data.waste_by_kind()}
    assert waste == {"idle_allocated": (1, 40.0 * 13 / 3600, 0.0),
                     "straggler": (2, (216.0 + 36.0 * 3) / 3600, (9.0 + 1.5 * 3) / 1000)}


@pytest.mark.stack
def test_report_page_embeds_charts_and_names_the_straggler(stack: Settings, unique: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = f"report-{unique}"
    run, _ = write_recent_run(stack, cluster, windows_ago=30)
    app = typer.Typer()
    app.command()(report)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["--since", "1h", "--cluster", cluster, "--job", "llm", "--out", str(out)])
    assert result.exit_code == 0, result.output

    page = (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["fleet_kpi.png", "rank_heatmap.png", "waste.png", "worst_jobs.png"]
    inlined = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]
    assert sorted(inlined) == sorted((out / name).read_bytes() for name in pngs)
    assert all(png.startswith(PNG_MAGIC) for png in inlined)
    assert "src=\"http" not in page and "<script" not in page  # self-contained, nothing to fetch
    straggler = next(f for f in run.findings if f.kind == "straggler")
    assert straggler.summary in page
    assert f"paced by rank {STRAGGLER_RANK} on node n0" in page
    # Fired at window 2 and still firing at the last window (5): 4 windows of per-window cost.
    gpu_h = 4 * straggler.cost["peer_gpu_s_wasted"] / 3600
    assert f"{gpu_h:.3f}" in page

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): screenshot check skipped")
    shot = tmp_path / "report.png"
    browser = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--window-size=1200,2600", f"--screenshot={shot}",
         "--enable-logging=stderr", "--v=0", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    console = [line for line in browser.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert browser.returncode == 0 and shot.exists(), browser.stderr[-2000:]
    assert console == []
    assert _has_colour(shot, (0x1F, 0x77, 0xB4)) and _has_colour(shot, (0xD6, 0x27, 0x28)), \
        "the screenshot shows no chart lines (utilization blue, effective red)"


def _has_colour(png: Path, rgb: tuple[int, int, int], min_pixels: int = 200) -> bool:
    """Whether the screenshot has at least `min_pixels` pixels of the chart colour `rgb` (±8 per channel)."""
    import matplotlib.image
    import numpy as np

    pixels = (matplotlib.image.imread(png)[..., :3] * 255).astype(int)
    close = np.all(np.abs(pixels - np.array(rgb)) <= 8, axis=-1)
    return int(close.sum()) >= min_pixels
