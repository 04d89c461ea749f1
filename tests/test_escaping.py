"""Labels cannot change the shape of a line-protocol point (issue #18: a job named "inj\\nfleet"
wrote a foreign point into `fleet` and lost its own window; a job ending in a backslash broke the
line), and a refused point is dead-lettered alone.

What InfluxDB 1.x keeps of a label is the safe form documented in agents/points.py: control
characters (and, in a tag, a final backslash) become U+FFFD, everything else round-trips. Checked here on
strings with a reference parser of 1.x line protocol, and against the real local InfluxDB."""

from __future__ import annotations

import itertools
import re
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laggard.agents.points import (
    UNWRITABLE,
    escape_field_string,
    escape_tag_value,
    finding_point,
    fleet_point,
    window_line,
)
from laggard.agents.sink import InfluxRejected, InfluxSink
from laggard.agents.stages import FleetKpi
from laggard.results import Finding, Labels, WindowResult
from laggard.settings import Settings

# Hostile characters for line protocol, plus any character at all (lone surrogates included:
# json.loads makes them from "\ud800").
label_text = st.text(
    st.one_of(st.sampled_from(list("\n\r\t\x00\x7f\x85\\,= \"'#\u2028é")), st.characters(exclude_categories=())),
    min_size=1, max_size=24,
)
T0 = 1_700_000_000.0


def stored_string(value: str) -> str:
    """The documented safe form of a string field (agents/points.py): control characters and lone
    surrogates replaced."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]", UNWRITABLE, value)


def stored(value: str) -> str:
    """The documented safe form of a tag value: a string field's, and no final backslash."""
    value = stored_string(value)
    return value[:-1] + UNWRITABLE if value.endswith("\\") else value


def parse_line(line: str) -> tuple[str, dict[str, str], str, str]:
    """(measurement, tags, fields, timestamp) as InfluxDB 1.x reads a line: `,`, `=` and space end
    a token unless the character before is a backslash, which is then dropped; other backslashes
    are literal (checked against InfluxDB 1.6.7)."""
    assert "\n" not in line and "\r" not in line
    key, rest = re.split(r"(?<!\\) ", line, maxsplit=1)
    fields, timestamp = rest.rsplit(" ", 1)
    measurement, *pairs = re.split(r"(?<!\\),", key)
    tags = dict(re.split(r"(?<!\\)=", pair) for pair in pairs)  # a pair with an unescaped '=' fails here
    return measurement, {k: re.sub(r"\\([,= ])", r"\1", v) for k, v in tags.items()}, fields, timestamp


def window(labels: Labels, start: float = T0) -> WindowResult:
    return WindowResult(
        scope="gpu", key="k", labels=labels, window_start=start, window_s=10.0, samples=10, gpus=1, allocated_gpus=1,
        idle_allocated_gpus=0, util_mean=50.0, util_min=40.0, util_max=60.0, util_p50=50.0, util_p95=58.0,
        effective_util=0.5, power_w_mean=300.0, idle_power_w=100.0, energy_wh=0.8, sm_clock_mhz_mean=1500.0,
        temp_c_mean=50.0, temp_c_max=55.0, throttled_share=0.0, throttle_share={"power_cap": 0.25}, xid_count=0,
    )


def finding(job: str, node: str, summary: str, start: float = T0) -> Finding:
    return Finding(kind="straggler", state="firing", cluster="c1", job=job, rank=3, node=node, gpu=1, model="H100",
                   window_start=start, window_end=start + 10, evidence={"score": 0.61, "note": "text is not a field"},
                   cost={"energy_wh_wasted": 2.5}, summary=summary)


def fleet(cluster: str, start: float = T0) -> FleetKpi:
    return FleetKpi(cluster=cluster, window_start=start, window_s=10.0, gpus=8, allocated_gpus=8, idle_allocated_gpus=0,
                    samples=80, util_mean=55.0, effective_util=0.5, power_w_mean=400.0, energy_wh=8.0, parts=1)


def expected_tags(**values: object) -> dict[str, str]:
    return {name: stored(str(v)) for name, v in values.items() if v is not None and v != ""}


@given(job=label_text, node=label_text, model=label_text, cluster=label_text)
def test_a_window_line_is_one_point_of_its_own_measurement_whatever_the_labels(
        job: str, node: str, model: str, cluster: str) -> None:
    line = window_line(window(Labels(cluster=cluster, node=node, gpu=1, job=job, rank=3, model=model)))
    measurement, tags, fields, timestamp = parse_line(line)
    assert measurement == "gpu_window"
    assert tags == expected_tags(cluster=cluster, node=node, gpu=1, model=model, job=job, rank=3)
    assert len(fields.split(",")) == 15 and timestamp == str(round(T0 * 1000))


@given(job=label_text, node=label_text, summary=label_text, cluster=label_text)
def test_finding_and_fleet_points_escape_like_window_lines(job: str, node: str, summary: str, cluster: str) -> None:
    measurement, tags, fields, _ = parse_line(finding_point(finding(job, node, summary)))
    assert measurement == "finding"
    assert tags == expected_tags(kind="straggler", state="firing", cluster="c1", job=job, node=node, gpu=1, rank=3,
                                 model="H100")
    quoted = re.fullmatch(r'summary="((?:[^"\\]|\\.)*)",firing=1i,score=0\.61,cost_energy_wh_wasted=2\.5', fields)
    assert quoted is not None, fields
    assert re.sub(r"\\(.)", r"\1", quoted[1]) == stored_string(summary)
    measurement, tags, _, _ = parse_line(fleet_point(fleet(cluster)))
    assert measurement == "fleet" and tags == expected_tags(cluster=cluster)


def test_the_issue_labels_stay_in_their_own_point() -> None:
    for job, safe in (("inj\nfleet", "inj\ufffdfleet"), ("ends\\", "ends\ufffd"), ("a b,c=d\\e", "a b,c=d\\e")):
        line = window_line(window(Labels(cluster="c1", job=job, node="n1")))
        assert parse_line(line)[:2] == ("gpu_window", {"cluster": "c1", "node": "n1", "job": safe})
    assert escape_tag_value("") == "" and escape_field_string('say "hi"\\') == r'"say \"hi\"\\"'


# Against the real local InfluxDB 1.x, in a database of this module's own.

@pytest.fixture(scope="module")
def influx1(stack: Settings) -> Iterator[Settings]:
    settings = stack.model_copy(update={"influx_database": f"escaping_{uuid.uuid4().hex[:10]}"})
    if InfluxSink(settings).version != 1:
        pytest.skip("the local stack runs InfluxDB 2; these tests read a throwaway 1.x database")
    query = f"{settings.influx_url.rstrip('/')}/query"
    httpx.post(query, params={"q": f'CREATE DATABASE "{settings.influx_database}"'}).raise_for_status()
    yield settings
    httpx.post(query, params={"q": f'DROP DATABASE "{settings.influx_database}"'}).raise_for_status()


_starts = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job=label_text, node=label_text, summary=label_text)
def test_hostile_labels_round_trip_through_real_influxdb(influx1: Settings, job: str, node: str, summary: str) -> None:
    start = T0 + 10 * next(_starts)  # a fresh timestamp per example: no overwrite hides a lost point
    ms = round(start * 1000)
    sink = InfluxSink(influx1, give_up_after_s=30)
    try:
        sink.write([window_line(window(Labels(cluster=job, node=node, gpu=0, job=job), start)),
                    finding_point(finding(job, node, summary, start)), fleet_point(fleet(node, start))], "ms")
        [gpu_row] = sink.query(f'SELECT * FROM "gpu_window" WHERE time = {ms}ms')
        assert (gpu_row["cluster"], gpu_row["job"], gpu_row["node"], gpu_row["gpu"]) == (stored(job), stored(job),
                                                                                          stored(node), "0")
        assert gpu_row["util_mean"] == 50.0 and gpu_row["throttle_power_cap"] == 0.25
        [finding_row] = sink.query(f'SELECT * FROM "finding" WHERE time = {ms}ms')
        assert (finding_row["job"], finding_row["node"]) == (stored(job), stored(node))
        assert finding_row["summary"] == stored_string(summary)
        [fleet_row] = sink.query(f'SELECT * FROM "fleet" WHERE time = {ms}ms')
        assert fleet_row["cluster"] == stored(node) and fleet_row["gpus"] == 8.0
        assert {row["name"] for row in sink.query("SHOW MEASUREMENTS")} == {"gpu_window", "finding", "fleet"}
    finally:
        sink.close()


def test_a_refused_line_is_dead_lettered_alone_and_the_rest_written_once(influx1: Settings) -> None:
    sink = InfluxSink(influx1, give_up_after_s=30)
    t0 = int(time.time()) - 3600
    try:
        sink.write([f"typed,s=a v=1.5 {t0}"])  # v is a float from now on
        conflict, unparseable = f'typed,s=a v="text" {t0 + 5}', f"typed,s=a\\ v=2.5 {t0 + 6}"
        batch = ([f"typed,s=a v={i}.5 {t0 + 1 + i}" for i in range(4)] + [conflict, unparseable]
                 + [f"typed,s=a v=7.5 {t0 + 7}", f"typed,s=a v=9.5 {t0 + 7}"])  # the same point twice: the later wins
        with pytest.raises(InfluxRejected) as refused:
            sink.write(batch)
        assert refused.value.rejected == [conflict, unparseable] and refused.value.dropped == 2
        assert sink.points_written == 1 + 6
        rows = sink.query('SELECT "v" FROM "typed"')
        assert [(row["time"] - t0, row["v"]) for row in rows] == [(0, 1.5), (1, 0.5), (2, 1.5), (3, 2.5), (4, 3.5),
                                                                  (7, 9.5)]
    finally:
        sink.close()
