"""laggard's own Kafka topics, created idempotently with the partition count from settings."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import TopicAlreadyExistsError

from laggard.kafka_config import client_config
from laggard.settings import Settings


def alert_ticks_name(settings: Settings) -> str:
    """The worker's alerting clock: ticks share a single-partition channel with the findings."""
    return f"{settings.topic_findings}.alert-ticks"


def topic_names(settings: Settings) -> list[str]:
    return [settings.topic_samples, settings.topic_deadletter, settings.topic_windows,
            settings.topic_findings, settings.topic_truth, settings.topic_fleet, alert_ticks_name(settings)]


def ensure_topics(settings: Settings, names: list[str] | None = None) -> list[str]:
    """Create the topics that do not exist yet; returns the names created."""
    admin = KafkaAdminClient(**client_config(settings), client_id="laggard-topics")
    try:
        existing = set(admin.list_topics())
        missing = [n for n in (names or topic_names(settings)) if n not in existing]
        if not missing:
            return []
        # Findings are few, and the alert lifecycle needs all of them in one place: 1 partition.
        partitions = {settings.topic_findings: 1, alert_ticks_name(settings): 1}
        try:
            admin.create_topics([NewTopic(n, partitions.get(n, settings.topic_partitions), 1) for n in missing])
        except TopicAlreadyExistsError:  # another process won the race
            pass
        return missing
    finally:
        admin.close()


def read_topic(settings: Settings, topic: str, timeout_s: float = 30) -> list[bytes]:
    """Every message now in `topic`, all partitions, without joining a consumer group."""
    return [record.value for record in read_records(settings, topic, timeout_s)]


def read_records(settings: Settings, topic: str, timeout_s: float = 30) -> list[ConsumerRecord]:
    """As read_topic, whole records (key, value, timestamp in ms, partition, offset)."""
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    end = consumer.end_offsets(partitions)
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    while (behind := any(consumer.position(tp) < end[tp] for tp in partitions)) and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records += batch
    consumer.close()
    if behind:
        raise TimeoutError(f"could not read all of {topic} within {timeout_s:.0f} s")
    return records


def read_range(settings: Settings, topic: str, partition: int, start: int, end: int,
               timeout_s: float = 120) -> list[tuple[int, bytes]]:
    """Messages at offsets [start, end) of one partition, as (offset, value)."""
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False)
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.seek(tp, start)
    records: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout_s
    while (position := consumer.position(tp)) < end and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records += [(r.offset, r.value) for r in batch if r.offset < end]
    consumer.close()
    if position < end:
        raise TimeoutError(f"could not re-read {topic}[{partition}] offsets {start}..{end} in {timeout_s:.0f} s")
    return records


def committed_offsets(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of `topic` (0 where nothing is committed)."""
    consumer = KafkaConsumer(**client_config(settings))
    partitions = sorted(consumer.partitions_for_topic(topic) or [])
    consumer.close()
    admin = KafkaAdminClient(**client_config(settings))
    try:
        committed = admin.list_group_offsets([group]).get(group, {})
    finally:
        admin.close()
    offsets = {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == topic}
    return {p: offsets.get(p, 0) for p in partitions}
