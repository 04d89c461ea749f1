"""The InfluxDB sink against real InfluxDB: read back with InfluxQL, replays overwrite; and on a
private InfluxDB 1.x and 2.x, an outage loses nothing (the writer blocks and retries until it is
back) and a refused point fails alone, counted, while the rest of its batch is written."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from laggard.agents.sink import InfluxRejected, InfluxSink
from laggard.commands.stack.influx import InfluxDB
from laggard.commands.stack.influx2 import InfluxDB2
from laggard.commands.stack.process import ManagedService, free_port, wait_until
from laggard.settings import Settings
from tests.helpers.telemetry import STRAGGLER_RANK, write_recent_run

pytestmark = pytest.mark.stack


def _count(sink: InfluxSink, measurement: str, field: str, cluster: str) -> int:
    rows = sink.query(f"SELECT count(\"{field}\") FROM \"{measurement}\" WHERE cluster = '{cluster}'")
    return rows[0]["count"] if rows else 0


def test_points_are_read_back_and_a_replayed_window_does_not_double(stack: Settings, unique: str) -> None:
    cluster = f"sink-{unique}"
    run, t0 = write_recent_run(stack, cluster)
    sink = InfluxSink(stack, give_up_after_s=30)
    try:
        expected = {("gpu_window", "util_mean"): len(run.gpu_results), ("node_window", "gpus"): len(run.node_results),
                    ("fleet", "effective_util"): len(run.fleet), ("finding", "summary"): len(run.findings)}
        counts = {key: _count(sink, *key, cluster) for key in expected}
        assert counts == expected

        culprit = next(r for r in run.gpu_results if r.labels.rank == STRAGGLER_RANK and r.window_start == t0 + 30)
        [row] = sink.query(f"SELECT \"util_mean\", \"sm_clock_mhz_mean\", \"throttle_sw_thermal\" FROM \"gpu_window\" "
                           f"WHERE cluster = '{cluster}' AND job = 'llm' AND rank = '{STRAGGLER_RANK}' "
                           f"AND time = {round(culprit.window_start * 1000)}ms")
        assert row["time"] == culprit.window_start
        assert row["util_mean"] == pytest.approx(culprit.util_mean)
        assert row["sm_clock_mhz_mean"] == pytest.approx(1300.0)
        assert row["throttle_sw_thermal"] == 1.0
        [straggler] = sink.query(f"SELECT \"summary\", \"firing\", \"cost_peer_gpu_s_wasted\" FROM \"finding\" "
                                 f"WHERE cluster = '{cluster}' AND kind = 'straggler'")
        finding = next(f for f in run.findings if f.kind == "straggler")
        assert straggler["summary"] == finding.summary and straggler["firing"] == 1
        assert straggler["cost_peer_gpu_s_wasted"] == pytest.approx(finding.cost["peer_gpu_s_wasted"])

        sink.write(run.points(), "ms")  # a replay: same series, same timestamps
        assert {key: _count(sink, *key, cluster) for key in expected} == expected
    finally:
        sink.close()


@pytest.fixture(params=[1, 2], ids=["influxdb1", "influxdb2"])
def private_influx(request: pytest.FixtureRequest, tmp_path) -> Iterator[tuple[ManagedService, Settings]]:
    """A private InfluxDB of each major version, and settings that point a sink at it."""
    if request.param == 1:
        influx: ManagedService = InfluxDB(tmp_path, free_port(), "laggard")
        influx.start()
        settings = Settings(influx_url=influx.url, influx_version=1, influx_database="laggard")
    else:
        influx = InfluxDB2(tmp_path, free_port(), org="laggard", bucket="laggard")
        influx.start()
        settings = Settings(influx_url=influx.url, influx_version=2, influx_token=SecretStr(influx.token()),
                            influx_org="laggard", influx_bucket="laggard")
    yield influx, settings
    influx.stop()


def test_influxdb_down_then_back_loses_nothing(private_influx: tuple[ManagedService, Settings]) -> None:
    influx, settings = private_influx
    sink = InfluxSink(settings)  # no give-up: it retries until InfluxDB answers
    done = threading.Event()
    batches: list[int] = []
    errors: list[BaseException] = []
    t0 = int(time.time()) - 3600

    def writer() -> None:
        try:
            while not done.is_set():
                n = len(batches)
                sink.write([f"outage,batch={n % 4} v={n * 10 + i}i {t0 + n * 10 + i}" for i in range(10)])
                batches.append(n)
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: len(batches) >= 20, 30), "writes to the private InfluxDB did not start"
        influx.stop()
        assert wait_until(lambda: sink.write_failures >= 2, 30), "the writer never saw InfluxDB down"
        during_outage = len(batches)
        influx.start()
        assert wait_until(lambda: len(batches) >= during_outage + 20, 60), "writes did not resume"
    finally:
        done.set()
        thread.join(timeout=60)
    assert not errors and not thread.is_alive()
    rows = sink.query('SELECT "v" FROM "outage"')
    sink.close()
    assert sorted(row["v"] for row in rows) == list(range(len(batches) * 10))
    assert sink.points_written == len(batches) * 10


def test_a_refused_point_fails_alone_and_the_rest_of_its_batch_is_written(
        private_influx: tuple[ManagedService, Settings]) -> None:
    _influx, settings = private_influx
    sink = InfluxSink(settings, give_up_after_s=30)
    t0 = int(time.time()) - 3600
    try:
        sink.write([f"typed v=1.5 {t0}"])  # v is a float from now on
        batch = [f"typed v={i}.5 {t0 + 1 + i}" for i in range(5)] + [f'typed v="text" {t0 + 10}']
        with pytest.raises(InfluxRejected) as refused:
            sink.write(batch)
        assert refused.value.dropped == 1 and "conflict" in str(refused.value)
        assert sink.points_written == 1 + 5
        assert sorted(row["v"] for row in sink.query('SELECT "v" FROM "typed"')) == [0.5, 1.5, 1.5, 2.5, 3.5, 4.5]
    finally:
        sink.close()
