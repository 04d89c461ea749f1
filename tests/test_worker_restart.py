"""A worker killed with SIGKILL mid-stream and started again: window results and findings are
neither lost nor doubled. Open windows are rebuilt from the per-partition checkpoint by re-reading
the input; the at-least-once repeats carry the same ids, so InfluxDB overwrites them and the
findings' idempotency keys make them harmless."""

from __future__ import annotations

import collections
import os
from pathlib import Path
import signal

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from agents.findings import Finding
from agents.sink import InfluxSink
from collectors.simulate import load_scenario
from laggard.kafka_config import client_config
from laggard.pipeline_run import PipelineRun
from laggard.stack.process import wait_until
from laggard.topics import read_topic
from tests.helpers.faults import expected_gpu_windows, scenario_for_run

DEMO = Path("collectors/scenarios/demo.yaml")


def _lag(run: PipelineRun) -> int:
    """Messages of the samples topic the worker group has not committed yet."""
    consumer = KafkaConsumer(**client_config(run.settings))
    topic = run.settings.topic_samples
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    end = consumer.end_offsets(partitions)
    consumer.close()
    admin = KafkaAdminClient(**client_config(run.settings))
    committed = admin.list_group_offsets([run.run_id]).get(run.run_id, {})
    admin.close()
    return sum(end[tp] - (committed[tp].offset if tp in committed else 0) for tp in partitions)


@pytest.mark.timeout(600)
def test_sigkill_mid_stream_loses_and_doubles_nothing(stack, tmp_path):
    with PipelineRun(stack, prefix="test-restart") as run:
        scenario = scenario_for_run(DEMO, run.run_id, tmp_path)
        run.start_worker(tmp_path / "first.log")
        run.publish_scenario(scenario)
        assert wait_until(lambda: run.stats().get("accepted", 0) >= run.published // 3, 120, 0.2)
        os.killpg(run.worker.pid, signal.SIGKILL)
        run.worker.wait()
        lag = _lag(run)
        assert lag > 0, (run.published, lag)  # it really died mid-stream, with input left to take

        run.start_worker(tmp_path / "second.log")
        # The restarted worker counts only what it took itself: settled = no input left, no work held.
        assert wait_until(lambda: _lag(run) == 0, 300, 0.5), (tmp_path / "second.log").read_text()[-3000:]
        run.wait_until_quiet(timeout_s=120, must_take=0)
        raw_findings = [Finding.model_validate_json(v) for v in read_topic(run.settings, run.settings.topic_findings)]

    # Every GPU window of the scenario is in InfluxDB exactly once (same series + time = overwrite).
    spec = load_scenario(scenario)
    expected = expected_gpu_windows(stack, scenario, run.start_ts)
    sink = InfluxSink(stack)
    rows = sink.query(f"SELECT count(\"util_mean\") FROM \"gpu_window\" WHERE \"cluster\" = '{spec.cluster}' "
                      f"AND time >= {int(run.start_ts) - 20}s AND time <= {int(run.start_ts + spec.duration_s) + 20}s")
    sink.close()
    assert rows and rows[0]["count"] == expected

    # Each finding transition once; repeats only as exact copies (same idempotency key).
    firing = collections.Counter((f.kind, f.fingerprint, f.window_start) for f in raw_findings if f.state == "firing")
    by_key = collections.defaultdict(set)
    for f in raw_findings:
        by_key[f.idempotency_key].add(f.model_dump_json())
    assert all(len(versions) == 1 for versions in by_key.values())
    starts_per_fingerprint = collections.Counter(fp for _kind, fp, _start in firing)
    assert all(n == 1 for n in starts_per_fingerprint.values()), starts_per_fingerprint
    stragglers = {(f.job, f.rank) for f in raw_findings if f.kind == "straggler" and f.state == "firing"}
    assert stragglers == {(t.job, t.rank) for t in run.truth if t.kind == "straggler"}
