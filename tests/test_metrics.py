"""The worker's Prometheus /metrics: lag arithmetic, and a real worker's exposition (parsed with
prometheus_client's parser) agreeing with its /stats."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from agents.metrics import PartitionLag, lag_family, partition_lag
from collectors.publisher import Publisher
from laggard.pipeline_run import PipelineRun

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


def test_worker_metrics_agree_with_its_stats(stack, tmp_path) -> None:
    with PipelineRun(stack, prefix="test-metrics", state_root=tmp_path) as run:
        run.start_worker()
        with Publisher(stack, topic=run.settings.topic_samples) as publisher:
            for value in (b"{not json", b'{"v": 99}'):
                publisher.publish_raw(b"bad", value)
        run.published += 2
        run.publish_scenario(SCENARIO)
        stats = run.wait_until_quiet(timeout_s=180)
        reply = httpx.get(f"http://127.0.0.1:{run.settings.worker_web_port}/metrics", timeout=5)
        after = run.stats()

    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    metrics = samples_by_name(reply.text)
    assert after == stats  # nothing moved while scraping, so the two can be compared
    outcomes = metrics["laggard_node_samples_total"]
    assert outcomes == {(("outcome", "accepted"),): stats["accepted"], (("outcome", "rejected"),): 2,
                        (("outcome", "late"),): stats["late"]}
    assert metrics["laggard_dead_letters_total"][(("category", "sample_rejected"),)] == 2
    assert metrics["laggard_findings_total"][()] == stats["findings"] > 0
    assert metrics["laggard_windows_closed_total"][()] == stats["windows_closed"] > 0
    assert metrics["laggard_influx_points_written_total"][()] == stats["influx_points_written"] > 0
    assert metrics["laggard_gpus_tracked"][()] == 24 * 8
    lags = {dict(labels)["partition"]: value for labels, value in metrics["laggard_consumer_lag"].items()
            if dict(labels)["topic"] == run.settings.topic_samples}
    assert lags and set(lags.values()) == {0}  # all taken and committed
    assert metrics["process_resident_memory_bytes"][()] > 0
    assert "laggard_events_per_second" in metrics
