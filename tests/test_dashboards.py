"""The Grafana dashboard (InfluxQL) and the InfluxDB 2.x template (Flux) name only measurements,
tags and fields that the sink writes; the Grafana queries also run on the real InfluxDB."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from laggard.agents.sink import InfluxSink
from laggard.settings import Settings
from tests.helpers.telemetry import simulate

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana" / "dashboards" / "laggard.json"
TEMPLATE = ROOT / "deploy" / "influxdb" / "laggard-template.json"
Schema = dict[str, set[str]]  # measurement -> its tag and field names

_UNESCAPED_SPACE = re.compile(r"(?<!\\) ")
_FIELD = re.compile(r'((?:[^,=\\]|\\.)+)=("(?:[^"\\]|\\.)*"|[^,]*)')


def written_schema() -> Schema:
    """Measurements with their tag and field keys, from the line protocol of a run with every
    window scope, the fleet KPI and straggler, mixed-generation and idle findings."""
    schema: Schema = {}
    for point in simulate("schema", 1_790_000_000.0).points():
        line = point if isinstance(point, str) else point.to_line_protocol()
        head, rest = _UNESCAPED_SPACE.split(line, maxsplit=1)
        measurement, *tags = re.split(r"(?<!\\),", head)
        fields = rest.rsplit(" ", 1)[0]
        schema.setdefault(measurement, set()).update(t.split("=", 1)[0] for t in tags)
        schema[measurement].update(m.group(1) for m in _FIELD.finditer(fields))
    return schema


SCHEMA = written_schema()


def influxql_unknown(query: str, schema: Schema) -> list[str]:
    """Names in an InfluxQL query (double-quoted identifiers; aliases after AS excluded) that are
    not measurements the sink writes, or not tags/fields of the measurements it reads."""
    query = re.sub(r'\bAS\s+"[^"]*"', "", query, flags=re.IGNORECASE)
    measurements = re.findall(r'\bFROM\s+"([^"]+)"', query, flags=re.IGNORECASE)
    unknown = [f"measurement {m}" for m in measurements if m not in schema]
    names = set().union(*(schema.get(m, set()) for m in measurements))
    others = re.sub(r'\bFROM\s+"[^"]+"', "", query, flags=re.IGNORECASE)
    unknown += [f"field or tag {n}" for n in re.findall(r'"([^"]+)"', others) if n not in names]
    return unknown or ([] if measurements else ["no FROM measurement"])


def flux_unknown(query: str, schema: Schema) -> list[str]:
    """Measurements, fields and record columns (`r.name`) in a Flux query that the sink does not write."""
    measurements = re.findall(r'r\._measurement\s*==\s*"([^"]+)"', query)
    unknown = [f"measurement {m}" for m in measurements if m not in schema]
    names = set().union(*(schema.get(m, set()) for m in measurements))
    unknown += [f"field {f}" for f in re.findall(r'r\._field\s*==\s*"([^"]+)"', query) if f not in names]
    unknown += [f"column {c}" for c in re.findall(r"\br\.([A-Za-z]\w*)", query) if c not in names]
    unknown += [f"tag {t}" for t in re.findall(r'\btag:\s*"([^"]+)"', query) if t not in names]
    return unknown or ([] if measurements else ["no _measurement filter"])


def grafana_queries() -> list[tuple[str, str]]:
    board = json.loads(GRAFANA.read_text())
    queries = [(p["title"], t["query"]) for p in board["panels"] for t in p["targets"]]
    return queries + [(f"variable {v['name']}", v["query"]) for v in board["templating"]["list"]]


def template_queries() -> list[tuple[str, str, list[str]]]:
    """(chart name, Flux query, the columns the chart names) of the template's dashboards and variables."""
    out = []
    for obj in json.loads(TEMPLATE.read_text()):
        if obj["kind"] == "Variable":
            out.append((f"variable {obj['spec']['name']}", obj["spec"]["query"], []))
        for chart in obj["spec"].get("charts", []):
            columns = [chart[k] for k in ("xCol", "yCol") if k in chart] + chart.get("fillColumns", [])
            out += [(chart["name"], q["query"], columns) for q in chart["queries"]]
    return out


def test_the_schema_covers_every_measurement_and_the_cost_fields() -> None:
    assert set(SCHEMA) == {"gpu_window", "node_window", "fleet", "finding", "finding_active"}
    assert {"cost_peer_gpu_s_wasted", "cost_energy_wh_wasted", "cost_energy_wh_idle", "summary", "firing",
            "kind", "state"} <= SCHEMA["finding"]
    assert {"util_mean", "power_w_mean", "rank", "job"} <= SCHEMA["gpu_window"]


def test_the_checkers_reject_unknown_names() -> None:
    assert influxql_unknown('SELECT mean("util_meen") FROM "fleet" WHERE $timeFilter', SCHEMA) == ["field or tag util_meen"]
    assert influxql_unknown('SELECT mean("util_mean") AS "u" FROM "fleets"', SCHEMA) == ["measurement fleets",
                                                                                      "field or tag util_mean"]
    assert influxql_unknown('SELECT last("summary") FROM "finding" GROUP BY "host"', SCHEMA) == ["field or tag host"]
    assert flux_unknown('filter(fn: (r) => r._measurement == "gpu_window" and r._field == "watts")', SCHEMA) == [
        "field watts"]
    assert flux_unknown('filter(fn: (r) => r._measurement == "finding" and r.severity == "x")', SCHEMA) == [
        "column severity"]


@pytest.mark.parametrize(("title", "query"), grafana_queries())
def test_grafana_queries_name_what_the_sink_writes(title: str, query: str) -> None:
    assert influxql_unknown(query, SCHEMA) == [], title


@pytest.mark.parametrize(("name", "query", "columns"), template_queries())
def test_template_queries_name_what_the_sink_writes(name: str, query: str, columns: list[str]) -> None:
    assert flux_unknown(query, SCHEMA) == [], name
    names = set().union(*SCHEMA.values()) | {"_time", "_value"}
    assert [c for c in columns if c not in names] == [], name


def test_grafana_dashboard_uses_the_provisioned_datasource_and_has_every_panel() -> None:
    board = json.loads(GRAFANA.read_text())
    uids = {t["datasource"]["uid"] for p in board["panels"] for t in p["targets"]}
    assert uids == {"laggard-influxdb"}  # deploy/grafana/provisioning/datasources/influxdb.yaml
    assert {p["type"] for p in board["panels"]} == {"timeseries", "heatmap", "table", "xychart"}
    assert [v["name"] for v in board["templating"]["list"]] == ["cluster", "job"]


def test_the_rank_heatmap_opens_on_one_job_not_all_of_them() -> None:
    board = json.loads(GRAFANA.read_text())
    [heatmap] = [p for p in board["panels"] if p["type"] == "heatmap"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", heatmap["targets"][0]["query"] + heatmap["title"])) & set(variables)
    assert "job" in used
    job = variables["job"]
    # No "All" to default to, one value at a time, and no saved value: Grafana selects the first job.
    assert job["includeAll"] is False and job["multi"] is False and not job.get("current")
    for panel in board["panels"]:  # what lists every job's findings does not narrow to that one job
        if panel["type"] in ("table", "timeseries") and "finding" in json.dumps(panel["targets"]):
            assert all("$job" not in t["query"] for t in panel["targets"]), panel["title"]


def test_the_power_panel_has_watts_on_its_own_axis_and_utilization_in_percent() -> None:
    board = json.loads(GRAFANA.read_text())
    [power] = [p for p in board["panels"] if p["type"] == "xychart"]
    assert power["options"]["dims"]["x"] == "util_mean"
    assert "unit" not in power["fieldConfig"]["defaults"]  # a default unit would put watts on the util axis
    units = {o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
             for o in power["fieldConfig"]["overrides"] if o["matcher"]["id"] == "byName"}
    assert units["util_mean"]["unit"] == "percent" and units["util_mean"]["max"] == 100
    assert units["power_w_mean"]["unit"] == "watt"
    columns = re.findall(r'AS "(\w+)"', power["targets"][0]["query"])
    assert set(units) <= set(columns)


def test_notification_links_name_this_dashboard_and_only_its_variables() -> None:
    from laggard.rules.loader import DEFAULT_RULES, load_rules
    from laggard.rules.receivers.text import DASHBOARD_VARIABLES

    board = json.loads(GRAFANA.read_text())
    assert load_rules(DEFAULT_RULES).external_url.endswith(f"/d/{board['uid']}")
    assert set(DASHBOARD_VARIABLES) <= {v["name"] for v in board["templating"]["list"]}


@pytest.mark.stack
@pytest.mark.parametrize(("title", "query"), grafana_queries())
def test_grafana_queries_run_on_influxdb(stack: Settings, title: str, query: str) -> None:
    concrete = (query.replace("$timeFilter", "time > now() - 1h").replace("$__interval", "10s")
                .replace("$cluster", ".*").replace("$job", ".*"))
    sink = InfluxSink(stack, give_up_after_s=30)
    try:
        sink.query(concrete)  # raises ValueError with InfluxDB's message on a bad query
    finally:
        sink.close()
