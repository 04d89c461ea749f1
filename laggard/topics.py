"""laggard's own Kafka topics, created idempotently with the partition count from settings."""

from __future__ import annotations

import time
from collections.abc import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic, OffsetSpec
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidReplicationFactorError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from laggard.kafka_config import client_config
from laggard.settings import Settings


def alert_ticks_name(settings: Settings) -> str:
    """The worker's alerting clock: ticks share a single-partition channel with the findings."""
    return f"{settings.topic_findings}.alert-ticks"


# The worker's Faust tables (name: partitions). Faust names each table's changelog topic
# "{app id}-{table}-changelog" and checks its partition count against the source topic's on the
# first write; created here beforehand, so a cold broker cannot show it with 0 partitions yet.
def worker_tables(settings: Settings) -> dict[str, int]:
    return {"window-checkpoints": settings.topic_partitions, "detect-checkpoints": settings.topic_partitions,
            "alert-state": 1}


def changelog_name(settings: Settings, table: str) -> str:
    return f"{settings.worker_app_id}-{table}-changelog"


def topic_partitions(settings: Settings) -> dict[str, int]:
    """laggard's topics with their partition counts."""
    topics = {name: settings.topic_partitions for name in (
        settings.topic_samples, settings.topic_deadletter, settings.topic_windows, settings.topic_truth,
        settings.topic_fleet)}
    # Findings are few, and the alert lifecycle needs all of them in one place: 1 partition.
    topics |= {settings.topic_findings: 1, alert_ticks_name(settings): 1}
    topics |= dict.fromkeys(shared_state_topics(settings), 1)
    return topics | {changelog_name(settings, table): n for table, n in worker_tables(settings).items()}


def shared_state_topics(settings: Settings) -> list[str]:
    """The silences and the live alerts, compacted (rules/shared_state.py)."""
    return [settings.topic_silences, settings.topic_alerts]


def topic_configs(settings: Settings, name: str) -> dict[str, str]:
    """Changelogs and shared state keep the newest record per key; an alert board may be large."""
    if name in {changelog_name(settings, table) for table in worker_tables(settings)}:
        return {"cleanup.policy": "compact"}
    if name in shared_state_topics(settings):
        # A new segment every hour: compaction never cleans the active one, which would otherwise
        # keep a week of alert boards (one every 10 s).
        return {"cleanup.policy": "compact", "max.message.bytes": str(8 * 1024 * 1024), "segment.ms": "3600000"}
    return {}


class TopicsUnavailable(RuntimeError):
    """laggard's topics are missing and cannot be created here; the message says which and why."""


def _wanted(missing: list[str], wanted: dict[str, int]) -> str:
    return ", ".join(f"{name} ({wanted[name]} partitions)" for name in missing)


def ensure_topics(settings: Settings, timeout_s: float = 60, only: Iterable[str] | None = None) -> list[str]:
    """Create laggard's topics (or those of them named in `only`) that do not exist yet (with
    `topic_replication_factor` replicas; changelogs and shared state compacted) and wait until every
    partition of each has a leader; returns the names created. With `topic_create` off, only check
    that they exist (an admin creates them)."""
    wanted = topic_partitions(settings)
    if only is not None:
        wanted = {name: wanted[name] for name in only}
    admin = KafkaAdminClient(**client_config(settings), client_id="laggard-topics")
    try:
        existing = set(admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing and not settings.topic_create:
            raise TopicsUnavailable(f"topics missing (LAGGARD_TOPIC_CREATE is off, so an admin creates them): "
                                    f"{_wanted(missing, wanted)}; changelogs, {' and '.join(shared_state_topics(settings))} "
                                    "with cleanup.policy=compact")
        if missing:
            replicas = settings.topic_replication_factor
            try:
                admin.create_topics([NewTopic(name, wanted[name], replicas, topic_configs=topic_configs(settings, name))
                                     for name in missing])
            except TopicAlreadyExistsError:  # another process won the race
                pass
            except (TopicAuthorizationFailedError, ClusterAuthorizationFailedError) as err:
                raise TopicsUnavailable(f"not allowed to create topics ({type(err).__name__}): have an admin create "
                                        f"{_wanted(missing, wanted)} and set LAGGARD_TOPIC_CREATE=false") from None
            except InvalidReplicationFactorError as err:
                raise TopicsUnavailable(f"cannot create topics with {replicas} replicas "
                                        f"(LAGGARD_TOPIC_REPLICATION_FACTOR): {err}") from None
        deadline = time.monotonic() + timeout_s
        while not_ready := _topics_without_leaders(admin, wanted):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Kafka topics not ready within {timeout_s:.0f} s: {', '.join(not_ready)}")
            time.sleep(0.2)  # polled against the deadline above
        return missing
    finally:
        admin.close()


def _topics_without_leaders(admin: KafkaAdminClient, wanted: dict[str, int]) -> list[str]:
    """Topics not yet described, or with a partition that has no leader (a topic created before
    with another partition count is taken as it is)."""
    described = {t["name"]: t for t in admin.describe_topics(list(wanted))}
    return [name for name in wanted
            if name not in described or described[name].get("error_code") or not described[name]["partitions"]
            or any(p["leader_id"] < 0 for p in described[name]["partitions"])]


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
    """Messages at offsets [start, end) of one partition, as (offset, value); those retention has
    deleted are left out (a start before the log start reads from the log start)."""
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False, auto_offset_reset="earliest")
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


def last_message(settings: Settings, topic: str, timeout_s: float = 30) -> tuple[int, bytes] | None:
    """The newest message of a one-partition topic as (offset, value); None while it has none."""
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        end = consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()
    newest = read_range(settings, topic, 0, end - 1, end, timeout_s) if end else []
    return newest[-1] if newest else None


def committed_offsets(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """Where `group` resumes each partition of `topic`: its committed offset, or where nothing is
    committed the partition's first offset (laggard's consumers start at the earliest)."""
    admin = KafkaAdminClient(**client_config(settings))
    try:
        partitions = sorted(p["partition_index"] for t in admin.describe_topics([topic]) for p in t["partitions"])
        committed = admin.list_group_offsets([group]).get(group, {})
        offsets = {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == topic and meta.offset >= 0}
        if missing := [TopicPartition(topic, p) for p in partitions if p not in offsets]:
            starts = admin.list_partition_offsets(dict.fromkeys(missing, OffsetSpec.EARLIEST))
            offsets.update({tp.partition: start.offset for tp, start in starts.items()})
    finally:
        admin.close()
    return {p: offsets[p] for p in partitions}
