"""laggard's topics on the real broker: created once with their partition counts, the worker's
table changelogs among them (compacted, partitioned like their source), every partition led."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from laggard.kafka_config import client_config
from laggard.topics import changelog_name, ensure_topics, topic_partitions, worker_tables


def test_ensure_topics_creates_changelogs_ready_and_is_idempotent(stack, unique):
    settings = stack.model_copy(update={
        "worker_app_id": f"test-topics-{unique}", **{name: f"test-topics-{unique}.{name}" for name in (
            "topic_samples", "topic_deadletter", "topic_windows", "topic_findings", "topic_truth", "topic_fleet")}})
    wanted = topic_partitions(settings)
    assert sorted(ensure_topics(settings)) == sorted(wanted)
    assert ensure_topics(settings) == []

    admin = KafkaAdminClient(**client_config(settings))
    try:
        described = {t["name"]: t for t in admin.describe_topics(list(wanted))}
        assert {name: len(described[name]["partitions"]) for name in wanted} == wanted
        assert all(p["leader_id"] >= 0 for t in described.values() for p in t["partitions"])
        for table in worker_tables(settings):
            name = changelog_name(settings, table)
            config = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])["topic"][name]
            assert config["cleanup.policy"]["value"] == "compact", config
    finally:
        admin.close()
    # The alert state table's source is the single-partition findings + ticks channel.
    assert wanted[changelog_name(settings, "alert-state")] == wanted[settings.topic_findings] == 1
    assert wanted[changelog_name(settings, "window-checkpoints")] == wanted[settings.topic_samples]
