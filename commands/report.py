"""`laggard report --since 1h [--job J] [--cluster C] --out DIR`: what a period cost, as PNG charts
and one self-contained HTML page (the charts inlined as data URIs), from InfluxDB via InfluxQL.

Waste is estimated from findings: a detector writes a finding when it fires and when it resolves,
each with its cost *per window* (GPU-seconds and Wh lost). An episode's waste is that cost times
the windows from firing until it resolved, or until the last window of data in the period.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import typer

from laggard import logs
from laggard.agents.sink import InfluxSink, InfluxUnavailable
from laggard.redaction import redact
from laggard.rules.model import parse_duration
from laggard.settings import get_settings

# Per-window finding costs (fields `cost_*` of the `finding` measurement, see agents/detectors.py).
WASTE_GPU_S_FIELDS = ("cost_peer_gpu_s_wasted", "cost_fast_gpu_s_wasted", "cost_gpu_s_idle")
WASTE_WH_FIELDS = ("cost_energy_wh_wasted", "cost_energy_wh_idle")
WORST_JOBS = 10
# How long the report retries an InfluxDB that does not answer before it says so (in one line).
GIVE_UP_S = 2.0
CHART_COLORS = {"util": "#1f77b4", "effective": "#d62728", "idle": "#ff7f0e", "energy": "#2ca02c"}


def duration_s(since: str) -> int:
    """'90s', '30m', '1h', '2d', '1w' (the rules' duration syntax) -> seconds; else a clear error."""
    try:
        seconds = round(parse_duration(since))
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"--since {since!r}: expected a positive number and a unit s, m, h, d or w (e.g. 1h)")
    return seconds


def quote(value: str) -> str:
    """An InfluxQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Episode:
    """One finding from firing to resolved (or to the end of the data)."""

    kind: str
    job: str
    rank: str
    node: str
    gpu: str
    summary: str
    fired_at: float
    ended_at: float
    active: bool
    windows: float
    gpu_s_wasted: float
    energy_wh_wasted: float


def episodes(rows: list[dict[str, Any]], data_end: float, window_s: float) -> list[Episode]:
    """Pair firing/resolved finding rows (time-ordered, as `SELECT *` returns them) per fingerprint."""
    open_: dict[tuple, dict[str, Any]] = {}
    out: list[Episode] = []

    def close(row: dict[str, Any], ended_at: float, active: bool) -> None:
        windows = max(1.0, (ended_at - row["time"]) / window_s)
        out.append(Episode(
            kind=row["kind"], job=row.get("job") or "", rank=row.get("rank") or "", node=row.get("node") or "",
            gpu=row.get("gpu") or "", summary=row["summary"], fired_at=row["time"], ended_at=ended_at,
            active=active, windows=windows,
            gpu_s_wasted=windows * sum(row.get(f) or 0.0 for f in WASTE_GPU_S_FIELDS),
            energy_wh_wasted=windows * sum(row.get(f) or 0.0 for f in WASTE_WH_FIELDS),
        ))

    for row in sorted(rows, key=lambda r: r["time"]):
        key = tuple(row.get(tag) for tag in ("kind", "cluster", "job", "rank", "node", "gpu"))
        if row["state"] == "firing":
            open_.setdefault(key, row)
        elif key in open_:
            close(open_.pop(key), row["time"], active=False)
    for row in open_.values():
        close(row, max(data_end, row["time"]), active=True)
    return sorted(out, key=lambda e: -e.gpu_s_wasted)


@dataclass
class ReportData:
    since: str
    cluster: str | None
    job: str | None
    window_s: float
    fleet: list[dict[str, Any]] = field(default_factory=list)  # time, cluster, util (%), effective (%), idle
    jobs: list[dict[str, Any]] = field(default_factory=list)  # job, util, effective (%), windows
    ranks: list[dict[str, Any]] = field(default_factory=list)  # time, rank, util (only with a job)
    episodes: list[Episode] = field(default_factory=list)

    def worst_jobs(self) -> list[dict[str, Any]]:
        """The WORST_JOBS jobs with the lowest effective utilization, lowest first."""
        return sorted(self.jobs, key=lambda r: r["effective"])[:WORST_JOBS]

    def waste_by_kind(self) -> list[dict[str, Any]]:
        """Per finding kind: episodes, GPU-hours and kWh wasted."""
        return [{"kind": kind, "count": len(episodes), "gpu_h": sum(e.gpu_s_wasted for e in episodes) / 3600,
                 "kwh": sum(e.energy_wh_wasted for e in episodes) / 1000}
                for kind in sorted({e.kind for e in self.episodes})
                if (episodes := [e for e in self.episodes if e.kind == kind])]


def gather(sink: InfluxSink, since: str, cluster: str | None = None, job: str | None = None,
           window_s: float = 10.0) -> ReportData:
    """Everything the report shows, from four InfluxQL queries."""
    period = duration_s(since)
    step = max(1, round(window_s))
    bucket = step * max(1, period // 300 // step)  # whole windows, ~300 points per line at most
    where = f"time > now() - {period}s" + (f" AND \"cluster\" = {quote(cluster)}" if cluster else "")
    job_where = where + (f" AND \"job\" = {quote(job)}" if job else "")
    data = ReportData(since, cluster, job, window_s)
    data.fleet = [
        {**row, "effective": row["effective"] * 100}
        for row in sink.query(
            f"SELECT mean(\"util_mean\") AS util, mean(\"effective_util\") AS effective, "
            f"max(\"idle_allocated_gpus\") AS idle FROM \"fleet\" WHERE {where} "
            f"GROUP BY time({bucket}s), \"cluster\" fill(none)")
    ]
    data.jobs = [
        {**row, "effective": row["effective"] * 100}
        for row in sink.query(
            f"SELECT mean(\"util_mean\") AS util, mean(\"effective_util\") AS effective, count(\"util_mean\") AS windows "
            f"FROM \"gpu_window\" WHERE {job_where} GROUP BY \"job\"")
        if row.get("job")
    ]
    if job:
        # Ranks come from attribution; GPUs of the job without one have no row in the heatmap.
        data.ranks = [row for row in sink.query(f"SELECT mean(\"util_mean\") AS util FROM \"gpu_window\" "
                                                f"WHERE {job_where} GROUP BY time({bucket}s), \"rank\" fill(none)")
                      if row.get("rank")]
    last = sink.query(f"SELECT last(\"util_mean\") FROM \"gpu_window\" WHERE {job_where}")
    data_end = last[0]["time"] + window_s if last else 0.0
    data.episodes = episodes(sink.query(f"SELECT * FROM \"finding\" WHERE {job_where}"), data_end, window_s)
    return data


# --- charts -------------------------------------------------------------------------------------

def _figure(rows: int = 1, height: float = 3.2):  # noqa: ANN202 (matplotlib types)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, 1, figsize=(10, height * rows), squeeze=False, constrained_layout=True)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this period", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _times(rows: list[dict[str, Any]]) -> list[datetime]:
    return [datetime.fromtimestamp(r["time"], tz=timezone.utc) for r in rows]


def chart_fleet(data: ReportData, path: Path) -> Path:
    fig, axes = _figure(2)
    util_ax, idle_ax = axes[0][0], axes[1][0]
    clusters = sorted({r["cluster"] for r in data.fleet})
    for cluster in clusters:
        rows = [r for r in data.fleet if r["cluster"] == cluster]
        suffix = f" ({cluster})" if len(clusters) > 1 else ""
        util_ax.plot(_times(rows), [r["util"] for r in rows], color=CHART_COLORS["util"], label=f"utilization{suffix}")
        util_ax.plot(_times(rows), [r["effective"] for r in rows], color=CHART_COLORS["effective"],
                     label=f"effective utilization{suffix}")
        idle_ax.step(_times(rows), [r["idle"] for r in rows], color=CHART_COLORS["idle"], where="post",
                     label=f"allocated but idle{suffix}")
    if not data.fleet:
        _no_data(util_ax, "fleet KPI")
        _no_data(idle_ax, "fleet KPI")
    else:
        util_ax.set(ylabel="%", ylim=(0, 100), title="Fleet utilization vs effective utilization")
        idle_ax.set(ylabel="GPUs", title="Allocated-but-idle GPUs")
        util_ax.legend(loc="lower left")
        idle_ax.legend(loc="upper left")
    return _save(fig, path)


def chart_jobs(data: ReportData, path: Path) -> Path:
    worst = data.worst_jobs()
    fig, axes = _figure(1, height=max(2.5, 0.45 * len(worst) + 1.2))
    ax = axes[0][0]
    if not worst:
        _no_data(ax, "job windows")
        return _save(fig, path)
    names = [r["job"] for r in worst][::-1]
    ax.barh(names, [r["util"] for r in worst][::-1], color=CHART_COLORS["util"], alpha=0.35, label="utilization")
    ax.barh(names, [r["effective"] for r in worst][::-1], color=CHART_COLORS["effective"], height=0.5,
            label="effective utilization")
    ax.set(xlabel="%", xlim=(0, 100), title=f"Worst jobs by effective utilization (lowest {len(worst)})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(worst) < 4 else -0.1), ncol=2)
    return _save(fig, path)


def chart_waste(data: ReportData, path: Path) -> Path:
    fig, axes = _figure(1)
    ax = axes[0][0]
    waste = data.waste_by_kind()
    if not waste:
        _no_data(ax, "findings")
        return _save(fig, path)
    kinds = [w["kind"] for w in waste]
    gpu_h, kwh = [w["gpu_h"] for w in waste], [w["kwh"] for w in waste]
    x = range(len(kinds))
    ax.bar([i - 0.2 for i in x], gpu_h, width=0.4, color=CHART_COLORS["util"], label="GPU-hours")
    energy_ax = ax.twinx()
    energy_ax.bar([i + 0.2 for i in x], kwh, width=0.4, color=CHART_COLORS["energy"], label="kWh")
    ax.set_xticks(list(x), kinds)
    ax.set(ylabel="GPU-hours", title="Estimated waste by finding kind")
    energy_ax.set_ylabel("kWh")
    fig.legend(loc="outside lower center", ncol=2)
    return _save(fig, path)


def chart_ranks(data: ReportData, path: Path) -> Path:
    import numpy as np

    fig, axes = _figure(1, height=4.0)
    ax = axes[0][0]
    if not data.ranks:
        _no_data(ax, "rank windows")
        return _save(fig, path)
    ranks = sorted({r["rank"] for r in data.ranks}, key=int)
    times = sorted({r["time"] for r in data.ranks})
    grid = np.full((len(ranks), len(times)), np.nan)
    row_of = {rank: i for i, rank in enumerate(ranks)}
    column_of = {t: j for j, t in enumerate(times)}
    for r in data.ranks:
        grid[row_of[r["rank"]], column_of[r["time"]]] = r["util"]
    image = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=100, cmap="viridis", interpolation="nearest")
    if len(ranks) <= 32:
        ax.set_yticks(range(len(ranks)), ranks)
    ax.set(ylabel="rank", xlabel=f"window from {_utc(times[0])} UTC", title=f"Utilization by rank: job {data.job}")
    fig.colorbar(image, ax=ax, label="util %")
    return _save(fig, path)


# --- page ---------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>laggard report: {{ scope }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1050px; color: #222; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; white-space: nowrap; }
.kpi { display: flex; gap: 2em; } .kpi div { font-size: 1.4em; } .kpi small { display: block; font-size: 0.6em; color: #666; }
img { max-width: 100%; }
</style></head><body>
<h1>laggard report: {{ scope }}</h1>
<p>Period: the last {{ data.since }} (generated {{ generated }}). Window {{ data.window_s | round(1) }} s.</p>
<div class="kpi">
  <div>{{ "%.1f" | format(util) }} %<small>mean utilization</small></div>
  <div>{{ "%.1f" | format(effective) }} %<small>mean effective utilization</small></div>
  <div>{{ "%.2f" | format(gpu_h) }} GPU-h<small>estimated waste</small></div>
  <div>{{ "%.2f" | format(kwh) }} kWh<small>estimated energy wasted</small></div>
</div>
<h2>Fleet KPI</h2>
<img alt="fleet utilization vs effective utilization" src="{{ charts.fleet }}">
{% if charts.ranks %}<h2>Utilization by rank</h2>
<img alt="utilization by rank" src="{{ charts.ranks }}">{% endif %}
<h2>Worst jobs</h2>
<img alt="worst jobs" src="{{ charts.jobs }}">
<table><tr><th>job</th><th>effective util %</th><th>util %</th><th>GPU windows</th><th>straggler GPU-h</th></tr>
{% for j in worst %}<tr><td>{{ j.job }}</td><td class="num">{{ "%.1f" | format(j.effective) }}</td>
<td class="num">{{ "%.1f" | format(j.util) }}</td><td class="num">{{ j.windows }}</td>
<td class="num">{{ "%.3f" | format(j.straggler_gpu_h) }}</td></tr>{% endfor %}
</table>
<h2>Stragglers found</h2>
{% if stragglers %}<table><tr><th>since (UTC)</th><th>state</th><th>job</th><th>rank</th><th>node / GPU</th><th>summary</th>
<th>GPU-h</th><th>Wh</th></tr>
{% for e in stragglers %}<tr><td>{{ e.fired }}</td><td>{{ "active" if e.active else "resolved" }}</td><td>{{ e.job }}</td>
<td>{{ e.rank }}</td><td>{{ e.node }} / {{ e.gpu }}</td><td>{{ e.summary }}</td>
<td class="num">{{ "%.3f" | format(e.gpu_h) }}</td><td class="num">{{ "%.1f" | format(e.wh) }}</td></tr>{% endfor %}
</table>{% else %}<p>No straggler in this period.</p>{% endif %}
<h2>Estimated waste</h2>
<img alt="estimated waste by finding kind" src="{{ charts.waste }}">
<table><tr><th>kind</th><th>findings</th><th>GPU-hours</th><th>kWh</th></tr>
{% for w in waste %}<tr><td>{{ w.kind }}</td><td class="num">{{ w.count }}</td><td class="num">{{ "%.3f" | format(w.gpu_h) }}</td>
<td class="num">{{ "%.3f" | format(w.kwh) }}</td></tr>{% endfor %}
</table>
<p><small>Waste = each finding's cost per window (peer GPU-seconds waiting, idle GPU-seconds, Wh) times the
windows from firing until it resolved or the data ends.</small></p>
</body></html>
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def render(data: ReportData, out_dir: Path) -> Path:
    """Writes the PNGs and report.html into `out_dir`; returns the HTML path."""
    from jinja2.sandbox import SandboxedEnvironment

    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {"fleet": chart_fleet(data, out_dir / "fleet_kpi.png"), "jobs": chart_jobs(data, out_dir / "worst_jobs.png"),
            "waste": chart_waste(data, out_dir / "waste.png")}
    if data.job:
        pngs["ranks"] = chart_ranks(data, out_dir / "rank_heatmap.png")
    straggler_gpu_s: dict[str, float] = {}
    for e in data.episodes:
        if e.kind == "straggler":
            straggler_gpu_s[e.job] = straggler_gpu_s.get(e.job, 0.0) + e.gpu_s_wasted
    worst = [{**j, "straggler_gpu_h": straggler_gpu_s.get(j["job"], 0.0) / 3600} for j in data.worst_jobs()]
    waste = data.waste_by_kind()
    stragglers = [{**asdict(e), "fired": _utc(e.fired_at), "gpu_h": e.gpu_s_wasted / 3600, "wh": e.energy_wh_wasted}
                  for e in data.episodes if e.kind == "straggler"]
    scope = " / ".join(filter(None, [f"cluster {data.cluster}" if data.cluster else "all clusters",
                                     f"job {data.job}" if data.job else None]))
    html = SandboxedEnvironment(autoescape=True).from_string(PAGE).render(
        data=data, scope=scope, generated=_utc(datetime.now(timezone.utc).timestamp()) + " UTC",
        charts={name: _data_uri(path) for name, path in pngs.items()}, worst=worst, stragglers=stragglers,
        waste=waste, gpu_h=sum(w["gpu_h"] for w in waste), kwh=sum(w["kwh"] for w in waste),
        util=_mean([r["util"] for r in data.fleet]), effective=_mean([r["effective"] for r in data.fleet]),
    )
    page = out_dir / "report.html"
    page.write_text(html, encoding="utf-8")
    return page


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summary(data: ReportData, page: Path) -> dict[str, Any]:
    """What `report --json` prints: the page, the period, worst jobs, waste by kind and every finding."""
    return {"page": str(page), "since": data.since, "cluster": data.cluster, "job": data.job,
            "window_s": data.window_s, "findings": len(data.episodes), "jobs": len(data.jobs),
            "worst_jobs": data.worst_jobs(), "waste": data.waste_by_kind(),
            "episodes": [asdict(e) for e in data.episodes]}


def gather_or_exit(since: str, cluster: str | None, job: str | None) -> ReportData:
    """`gather` from the configured InfluxDB, retried for GIVE_UP_S (each retry logged at info, seen
    with -v); an InfluxDB that does not answer or refuses the queries is one line and exit 2."""
    settings = get_settings()
    sink = InfluxSink(settings, give_up_after_s=GIVE_UP_S)
    try:
        with logs.demoted(InfluxSink.__module__):
            return gather(sink, since, cluster=cluster, job=job, window_s=settings.window_s)
    except (httpx.HTTPError, InfluxUnavailable, OSError, ValueError) as err:
        typer.echo(redact(f"laggard report: cannot query InfluxDB at {sink.url} (LAGGARD_INFLUX_URL): "
                          f"{type(err).__name__}: {err}"), err=True)
        raise typer.Exit(2) from None
    finally:
        sink.close()


def report(
    since: str = typer.Option("1h", "--since", help="Period before now: 90s, 30m, 1h, 2d, 1w."),
    job: str | None = typer.Option(None, "--job", help="Only this job (adds a utilization-by-rank heatmap)."),
    cluster: str | None = typer.Option(None, "--cluster", help="Only this cluster (default: all)."),
    out: Path = typer.Option(Path("report"), "--out", help="Folder for the PNG charts and report.html."),
    as_json: bool = typer.Option(False, "--json", help="Print what the report found as JSON (page, worst jobs, "
                                                       "waste by kind, findings) instead of one line."),
) -> None:
    """Write PNG charts and one self-contained HTML page for the period: fleet KPI, worst jobs,
    stragglers found and the estimated waste in GPU-hours and energy."""
    try:
        duration_s(since)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--since") from None
    data = gather_or_exit(since, cluster, job)
    page = render(data, out)
    if as_json:
        logs.print_json(summary(data, page))
    else:
        typer.echo(f"report: {page} ({len(data.episodes)} findings, {len(data.jobs)} jobs)")
