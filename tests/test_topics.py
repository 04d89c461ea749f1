"""laggard's topics on the real broker: created once with their partition counts, the worker's
table changelogs among them (compacted, partitioned like their source) and the shared silences and
alerts (compacted), every partition led."""

from __future__ import annotations

from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic

from laggard.commands.stack.process import wait_until
from laggard.kafka_config import client_config
from laggard.topics import (
    TopicsUnavailable,
    changelog_name,
    committed_offsets,
    ensure_topics,
    read_range,
    topic_partitions,
    worker_tables,
)


def own_topics(stack, unique, **overrides):
    return stack.model_copy(update={
        "worker_app_id": f"test-topics-{unique}", **{name: f"test-topics-{unique}.{name}" for name in (
            "topic_samples", "topic_deadletter", "topic_windows", "topic_findings", "topic_truth", "topic_fleet",
            "topic_silences", "topic_alerts")},
        **overrides})


def test_ensure_topics_creates_changelogs_ready_and_is_idempotent(stack, unique):
    settings = own_topics(stack, unique)
    wanted = topic_partitions(settings)
    assert sorted(ensure_topics(settings)) == sorted(wanted)
    assert ensure_topics(settings) == []

    admin = KafkaAdminClient(**client_config(settings))
    try:
        described = {t["name"]: t for t in admin.describe_topics(list(wanted))}
        assert {name: len(described[name]["partitions"]) for name in wanted} == wanted
        assert all(p["leader_id"] >= 0 for t in described.values() for p in t["partitions"])
        for name in [*(changelog_name(settings, table) for table in worker_tables(settings)),
                     settings.topic_silences, settings.topic_alerts]:
            config = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])["topic"][name]
            assert config["cleanup.policy"]["value"] == "compact", config
        assert wanted[settings.topic_silences] == wanted[settings.topic_alerts] == 1
    finally:
        admin.close()
    # The alert state table's source is the single-partition findings + ticks channel.
    assert wanted[changelog_name(settings, "alert-state")] == wanted[settings.topic_findings] == 1
    assert wanted[changelog_name(settings, "window-checkpoints")] == wanted[settings.topic_samples]


def test_topics_an_admin_creates_are_checked_and_the_missing_ones_named(stack, unique):
    """With topic_create off (no CREATE permission), ensure_topics creates nothing, names every
    missing topic with its partitions, and accepts the set once an admin has created it."""
    settings = own_topics(stack, unique, topic_create=False)
    wanted = topic_partitions(settings)
    try:
        ensure_topics(settings)
    except TopicsUnavailable as err:
        assert all(f"{name} ({n} partitions)" in str(err) for name, n in wanted.items()), err
    else:
        raise AssertionError("missing topics were not reported")
    admin = KafkaAdminClient(**client_config(settings))
    try:
        assert not set(wanted) & set(admin.list_topics())  # nothing created
        admin.create_topics([NewTopic(name, n, 1) for name, n in wanted.items()])
        # The broker lists new topics once their metadata has spread.
        assert wait_until(lambda: set(wanted) <= set(admin.list_topics()), 30, 0.2)
    finally:
        admin.close()
    assert ensure_topics(settings) == []


def test_a_replication_factor_the_cluster_cannot_give_is_one_clear_error(stack, unique):
    settings = own_topics(stack, unique, topic_replication_factor=3)  # the local stack has one broker
    try:
        ensure_topics(settings)
    except TopicsUnavailable as err:
        assert "3 replicas" in str(err) and "LAGGARD_TOPIC_REPLICATION_FACTOR" in str(err), err
    else:
        raise AssertionError("3 replicas on one broker were not refused")


def test_re_reads_and_resume_points_skip_what_retention_deleted(stack, unique):
    """A worker down longer than the retention comes back to a log that starts later: re-reading a
    range that begins before the log start returns what is left (not nothing, not a hang), and a
    group with no commit resumes at the log start."""
    topic = f"test-retention-{unique}"
    admin = KafkaAdminClient(**client_config(stack))
    producer = KafkaProducer(**client_config(stack))
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        for i in range(20):
            producer.send(topic, key=b"n", value=b"m%d" % i, partition=0)
        producer.flush()
        admin.delete_records({TopicPartition(topic, 0): 8})  # what retention would do
        records = read_range(stack, topic, 0, 3, 15)
        assert [offset for offset, _ in records] == list(range(8, 15))
        assert records[0][1] == b"m8"
        assert committed_offsets(stack, f"never-committed-{unique}", topic)[0] == 8
    finally:
        producer.close()
        admin.close()
