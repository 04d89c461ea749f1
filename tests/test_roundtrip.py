"""Foundation end to end: kafka-python produces, a Faust agent consumes and writes to InfluxDB,
the test reads the points back with InfluxQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from laggard.agents.sink import InfluxSink
from laggard.collectors.publisher import Publisher
from laggard.commands.stack.process import wait_until
from tests.helpers.samples import node_sample

ROOT = Path(__file__).resolve().parents[1]


def test_sample_flows_from_kafka_python_through_faust_into_influxdb(stack, unique, tmp_path):
    topic, measurement = f"roundtrip-{unique}", f"roundtrip_{unique}"
    sent = [node_sample(node=f"n{i}", gpus=4, util_gpu=10.0 + i) for i in range(3)]
    with Publisher(stack, topic=topic) as publisher:
        for sample in sent:
            publisher.publish(sample)
    assert publisher.stats.acked == 3

    env = {**os.environ, "ROUNDTRIP_TOPIC": topic, "ROUNDTRIP_MEASUREMENT": measurement}
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.roundtrip_app", "--datadir", str(tmp_path), "worker", "-l", "warn"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "worker.log").open("w"),
    )
    sink = InfluxSink(stack)
    query = f'SELECT "util_gpu", "node", "gpu" FROM "{measurement}"'
    try:
        assert wait_until(lambda: worker.poll() is not None or len(sink.query(query)) == 12, timeout_s=90), (
            f"{len(sink.query(query))} of 12 rows in InfluxDB\n" + (tmp_path / "worker.log").read_text()[-3000:])
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        worker.kill()
        worker.wait()
    rows = sink.query(query)
    by_node = {(r["node"], r["gpu"]): r["util_gpu"] for r in rows}
    assert by_node[("n2", "3")] == 12.0
    assert {r["time"] for r in rows} == {int(s.ts) for s in sent}
