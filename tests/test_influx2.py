"""The sink's InfluxDB 2.x path (influxdb-client, /api/v2/write, token/org/bucket) against a real
InfluxDB 2.7 server: a private instance on a free port in a temporary folder, set up the way
`laggard stack up --influx 2` does it. The binary is built when missing (`make influx2` builds it
before the tests; a cold build takes ~13 CPU-minutes, hence this module's long timeout)."""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from influxdb_client import InfluxDBClient

from laggard.agents.sink import InfluxSink
from laggard.commands.stack.build_influxd import ensure_influxd
from laggard.commands.stack.influx2 import InfluxDB2
from laggard.commands.stack.process import StackError, free_port, write_private
from laggard.settings import Settings
from tests.helpers.telemetry import STRAGGLER_RANK, write_recent_run
from tests.test_dashboards import TEMPLATE, template_queries

pytestmark = [pytest.mark.stack, pytest.mark.timeout(1800)]  # a private InfluxDB 2.7 server

FUTURE_S = 1_900_000_000  # 2030: after now, so Flux needs an explicit range stop to see it


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB2]:
    influx = InfluxDB2(tmp_path_factory.mktemp("influx2"), free_port(), org="laggard", bucket="laggard")
    influx.start()
    yield influx
    influx.stop()


@pytest.fixture(scope="module")
def settings(server: InfluxDB2) -> Settings:
    """What a user gets with LAGGARD_LOCAL_INFLUX_VERSION=2: URL and token of the local server."""
    return Settings(state_dir=server.home.parent, local_influx_version=2, influx2_port=server.port,
                    influx_version=None, influx_token=None, influx_org="laggard", influx_bucket="laggard")


def flux_rows(settings: Settings, flux: str) -> list[dict]:
    token = settings.influx_token.get_secret_value() if settings.influx_token else ""
    with InfluxDBClient(url=settings.influx_url, token=token, org=settings.influx_org) as client:
        return [record.values for table in client.query_api().query(flux) for record in table.records]


def flux_count(settings: Settings, measurement: str, field: str, cluster: str, stop: str = "now()") -> int:
    rows = flux_rows(settings, f"""
        from(bucket: "{settings.influx_bucket}")
          |> range(start: -30d, stop: {stop})
          |> filter(fn: (r) => r._measurement == "{measurement}" and r._field == "{field}" and r.cluster == "{cluster}")
          |> group() |> count()""")
    return rows[0]["_value"] if rows else 0


def influxql_count(sink: InfluxSink, measurement: str, field: str, cluster: str) -> int:
    rows = sink.query(f"SELECT count(\"{field}\") FROM \"{measurement}\" WHERE cluster = '{cluster}'")
    return rows[0]["count"] if rows else 0


def test_setup_keeps_a_private_token_and_settings_point_at_the_server(server: InfluxDB2, settings: Settings) -> None:
    assert stat.S_IMODE(server.token_path.stat().st_mode) == 0o600
    token = server.token()
    assert len(token) >= 32
    assert settings.influx_url == server.url
    assert settings.influx_token is not None and settings.influx_token.get_secret_value() == token
    assert token not in repr(settings)

    server.after_start()  # a second start: already set up, the token still opens the bucket
    assert server.token() == token
    sink = InfluxSink(settings, give_up_after_s=30)
    try:
        assert sink.version == 2  # detected from /ping's X-Influxdb-Version
    finally:
        sink.close()


def test_a_set_up_server_without_its_token_file_is_refused_with_the_fix(server: InfluxDB2) -> None:
    token = server.token()
    server.token_path.unlink()
    try:
        with pytest.raises(StackError, match=r"token file .* is missing.*--reset"):
            server.after_start()
    finally:
        write_private(server.token_path, token)
    server.after_start()


def test_a_build_without_its_tools_names_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StackError, match=r"missing tools on PATH:\n  `go`: .*\n  `cargo`: .*\n  `cc`: .*"):
        ensure_influxd("0.0.0-not-built")


def test_window_points_read_back_with_flux_and_influxql_and_a_replay_does_not_double(
        settings: Settings, unique: str) -> None:
    cluster = f"v2-{unique}"
    run, t0 = write_recent_run(settings, cluster)
    expected = {("gpu_window", "util_mean"): len(run.gpu_results), ("node_window", "gpus"): len(run.node_results),
                ("fleet", "effective_util"): len(run.fleet), ("finding", "summary"): len(run.findings)}
    assert {key: flux_count(settings, *key, cluster) for key in expected} == expected

    culprit = next(r for r in run.gpu_results if r.labels.rank == STRAGGLER_RANK and r.window_start == t0 + 30)
    [row] = flux_rows(settings, f"""
        from(bucket: "laggard")
          |> range(start: {int(t0)}, stop: {int(t0) + 3600})
          |> filter(fn: (r) => r._measurement == "gpu_window" and r.cluster == "{cluster}" and r.job == "llm"
                               and r.rank == "{STRAGGLER_RANK}" and r._field == "util_mean"
                               and r._time == time(v: {round(culprit.window_start * 1e9)}))""")
    assert row["_value"] == pytest.approx(culprit.util_mean)

    sink = InfluxSink(settings, give_up_after_s=30)
    try:
        assert {key: influxql_count(sink, *key, cluster) for key in expected} == expected  # v1 /query compatibility
        sink.write(run.points(), "ms")  # a replay: same series, same timestamps
        assert {key: flux_count(settings, *key, cluster) for key in expected} == expected
        assert {key: influxql_count(sink, *key, cluster) for key in expected} == expected
    finally:
        sink.close()


def test_future_points_need_an_explicit_range_stop(settings: Settings, unique: str) -> None:
    cluster = f"future-{unique}"
    sink = InfluxSink(settings, give_up_after_s=30)
    try:
        sink.write([f"fleet,cluster={cluster} effective_util={i / 10} {FUTURE_S + 10 * i}" for i in range(5)])
    finally:
        sink.close()
    assert flux_count(settings, "fleet", "effective_util", cluster) == 0  # stop defaults to now()
    assert flux_count(settings, "fleet", "effective_util", cluster, stop=str(FUTURE_S + 3600)) == 5


_IMPORTS = re.compile(r'\A(?:\s*import "[^"]+"\n)*')


def with_dashboard_variables(flux: str, job: str) -> str:
    """The template's query with the `v` record the InfluxDB UI supplies (after any imports)."""
    imports = _IMPORTS.match(flux).group(0)
    option = f'option v = {{timeRangeStart: -1h, timeRangeStop: now(), windowPeriod: 10s, job: "{job}"}}\n'
    return imports + option + flux[len(imports):]


@pytest.fixture(scope="module")
def template_data(settings: Settings) -> Settings:
    """A run in the last hour, in the cluster the template's queries read (they do not filter on it)."""
    write_recent_run(settings, "template")
    return settings


@pytest.mark.parametrize(("name", "query", "columns"), template_queries())
def test_template_queries_run_and_find_the_written_run(template_data: Settings, name: str, query: str,
                                                       columns: list[str]) -> None:
    rows = flux_rows(template_data, with_dashboard_variables(query, job="llm"))
    assert rows, f"{name}: no rows"
    assert [c for c in columns if c not in rows[0]] == [], name


def applied_dashboard_views(settings: Settings) -> dict[str, dict]:
    """The template applied through InfluxDB's own /api/v2/templates/apply, then each of its cells'
    views as InfluxDB stores them (what its UI is given to draw), by cell name."""
    token = settings.influx_token.get_secret_value() if settings.influx_token else ""
    headers = {"Authorization": f"Token {token}"}
    with httpx.Client(base_url=settings.influx_url, headers=headers, timeout=30) as api:
        [org] = api.get("/api/v2/orgs", params={"org": settings.influx_org}).raise_for_status().json()["orgs"]
        template = {"contentType": "json", "contents": json.loads(TEMPLATE.read_text())}
        applied = api.post("/api/v2/templates/apply", json={"orgID": org["id"], "template": template})
        assert applied.status_code == 201, applied.text
        [board] = [d for d in applied.json()["summary"]["dashboards"] if d["name"].startswith("laggard:")]
        board_id = f"{int(board['id']):016x}"  # the summary gives the ID as a number, the API takes it in hex
        dashboard = api.get(f"/api/v2/dashboards/{board_id}", params={"include": "properties"}).raise_for_status()
        return {cell["name"]: cell["properties"] for cell in dashboard.json()["cells"]}


def test_the_template_applies_and_every_view_has_what_the_influxdb_ui_needs_to_draw_it(settings: Settings) -> None:
    """Found by opening the dashboard in the real InfluxDB 2.7.12 UI (built from influxdata/ui
    OSS-v2.7.12, not buildable in CI: that source is on GitHub only) in headless Chromium: a table
    stored without colours crashed the page ("An InfluxDB error has occurred"), a single stat's
    decimal places given as an object were dropped, a transposed table. This checks the stored
    views InfluxDB hands the UI, which is where each of those showed."""
    views = applied_dashboard_views(settings)
    charts = {c["name"]: c for obj in json.loads(TEMPLATE.read_text()) for c in obj["spec"].get("charts", [])}
    assert set(views) == set(charts)
    for name, view in views.items():
        assert view["colors"], f"{name}: no colours (the UI's charts index into them)"
        assert view["queries"][0]["text"] == charts[name]["queries"][0]["query"], name
    [table] = [v for v in views.values() if v["type"] == "table"]
    assert table["tableOptions"]["verticalTimeAxis"] is True
    [stat_] = [v for v in views.values() if v["type"] == "single-stat"]
    assert stat_["decimalPlaces"] == {"isEnforced": True, "digits": 1} and stat_["suffix"] == " Wh"
    [heatmap] = [v for v in views.values() if v["type"] == "heatmap"]
    assert (heatmap["xColumn"], heatmap["yColumn"]) == ("_time", "_value")  # colour = ranks in each band
    [scatter] = [v for v in views.values() if v["type"] == "scatter"]
    assert (scatter["xDomain"], scatter["yDomain"]) == ([0, 100], [0, 800])  # else two means sit on the corners
