"""The worker's Prometheus /metrics: lag arithmetic, and a real worker's exposition (parsed with
prometheus_client's parser) agreeing with its /stats, with bad samples and points InfluxDB refuses
counted and dead-lettered while the pipeline goes on."""

from __future__ import annotations

import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from laggard.agents.metrics import PartitionLag, lag_family, partition_lag
from laggard.agents.sink import InfluxSink
from laggard.collectors.publisher import Publisher
from laggard.commands.pipeline_run import PipelineRun
from laggard.topics import read_topic

SCENARIO = "tests/scenarios/small_eval.yaml"  # 24 nodes x 8 H100s


def samples_by_name(text: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label pairs: value}} from Prometheus text format."""
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_lag_is_highwater_minus_committed_else_after_last_read() -> None:
    assert partition_lag(highwater=120, committed=100, last_read=115) == 20
    assert partition_lag(highwater=120, committed=None, last_read=115) == 4
    assert partition_lag(highwater=120, committed=120, last_read=119) == 0
    assert partition_lag(highwater=None, committed=100, last_read=99) is None  # not fetched yet
    assert partition_lag(highwater=50, committed=None, last_read=None) is None  # nothing read yet


def test_lag_family_labels_topic_and_partition() -> None:
    family = lag_family([PartitionLag("gpu.samples", 3, 17)])
    (sample,) = family.samples
    assert (sample.name, sample.labels, sample.value) == ("laggard_consumer_lag",
                                                          {"topic": "gpu.samples", "partition": "3"}, 17)


def test_worker_metrics_agree_with_its_stats(stack, tmp_path, unique) -> None:
    database = f"test_metrics_{unique}".replace("-", "_")
    with PipelineRun(stack, prefix="test-metrics", state_root=tmp_path, overrides={"influx_database": database}) as run:
        # A database of its own where node_window's util_mean is already a string: InfluxDB drops
        # every node window point of this shard (7 days) as a field type conflict.
        httpx.post(f"{stack.influx_url}/query", data={"q": f'CREATE DATABASE "{database}"'}, timeout=10)
        conflict = f'node_window,cluster=conflict util_mean="text" {int(time.time()) - 60}'
        assert httpx.post(f"{stack.influx_url}/write", params={"db": database, "precision": "s"},
                          content=conflict, timeout=10).status_code == 204
        run.start_worker()
        with Publisher(stack, topic=run.settings.topic_samples) as publisher:
            for value in (b"{not json", b'{"v": 99}'):
                publisher.publish_raw(b"bad", value)
            # Junk between the stages (another producer, an older laggard): each stage dead-letters
            # it and goes on to the real messages behind it.
            for topic, value in (("windows", b'{"part": "x"}'), ("windows", b"[{}]"), ("fleet", b"{}"),
                                 ("findings", b'{"kind": "straggler"}')):
                publisher.publish_raw(b"junk", value, topic=getattr(run.settings, f"topic_{topic}"))
        run.published += 2
        run.publish_scenario(SCENARIO)
        stats = run.wait_until_quiet(timeout_s=180)
        reply = httpx.get(f"http://127.0.0.1:{run.settings.worker_web_port}/metrics", timeout=5)
        after = run.stats()
        letters = run.dead_letters()
        influx_letters = [d for d in letters if d["topic"] == "influxdb"]
        stage_letters = [d for d in letters if d["topic"] in
                         {run.settings.topic_windows, run.settings.topic_fleet, run.settings.topic_findings}]
        boards = read_topic(run.settings, run.settings.topic_alerts)
        sink = InfluxSink(run.settings, give_up_after_s=30)
        [gpu_windows] = sink.query('SELECT count("util_mean") FROM "gpu_window"')
        node_windows = sink.query('SELECT count("gpus") FROM "node_window"')
        sink.close()

    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    metrics = samples_by_name(reply.text)
    assert after == stats  # nothing moved while scraping, so the two can be compared
    outcomes = metrics["laggard_node_samples_total"]
    assert outcomes == {(("outcome", "accepted"),): stats["accepted"], (("outcome", "rejected"),): 2,
                        (("outcome", "late"),): stats["late"]}
    assert metrics["laggard_dead_letters_total"][(("category", "sample_rejected"),)] == 2
    assert metrics["laggard_dead_letters_total"][(("category", "stage_message_rejected"),)] == len(stage_letters) == 4
    assert all(d["reason"].startswith("not a laggard stage message: ") for d in stage_letters)
    assert stats["fleet_windows"] > 0 and any(json.loads(b)["alerts"] for b in boards)  # stages 3, 4 went on
    # Refused node windows: counted and dead-lettered, every other point written, nothing stopped.
    assert metrics["laggard_influx_points_rejected_total"][()] == stats["influx_rejected"] > 0
    assert metrics["laggard_dead_letters_total"][(("category", "influx_rejected"),)] == len(influx_letters) > 0
    assert all("field type conflict" in d["reason"] for d in influx_letters)
    written = node_windows[0]["count"] if node_windows else 0
    assert stats["influx_rejected"] + written == gpu_windows["count"] / 8  # each node window once
    assert metrics["laggard_findings_total"][()] == stats["findings"] > 0  # stage 2 went on after the junk
    assert metrics["laggard_windows_closed_total"][()] == stats["windows_closed"] > 0
    assert metrics["laggard_influx_points_written_total"][()] == stats["influx_points_written"] > 0
    assert metrics["laggard_gpus_tracked"][()] == 24 * 8
    lags = {dict(labels)["partition"]: value for labels, value in metrics["laggard_consumer_lag"].items()
            if dict(labels)["topic"] == run.settings.topic_samples}
    assert lags and set(lags.values()) == {0}  # all taken and committed
    assert metrics["process_resident_memory_bytes"][()] > 0
    assert "laggard_events_per_second" in metrics
