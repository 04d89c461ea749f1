"""Silences and alert state on two compacted Kafka topics, so that every worker and every `laggard`
command sees the same ones wherever it runs, and both outlive restarts (Alertmanager shares them
by gossip between its replicas; laggard already has a Kafka cluster for that).

- `topic_silences`: one record per silence, keyed by its id. Expiring a silence writes it again
  with its new end; compaction keeps the newest record per id.
- `topic_alerts`: the live alerts as the alerting worker last saw them, one record under the key
  `alerts`, written when they change and at least every HEARTBEAT_S: a board older than STALE_AFTER_S
  means that no worker is alerting now, and `alerts list` says so instead of showing them as firing.

Records come from outside (anyone who can write to the topic): each is validated, and one that is
not a silence (or a board) is skipped with a reason naming its topic and offset, never its content.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pydantic import BaseModel, Field, ValidationError

from laggard.kafka_config import client_config
from laggard.rules.alert_lifecycle import AlertState
from laggard.rules.silences import Silence
from laggard.settings import Settings
from laggard.topics import ensure_topics, last_message, read_records, shared_state_topics

ALERTS_KEY = b"alerts"
HEARTBEAT_S = 10.0  # the board is rewritten this often even when nothing changed
STALE_AFTER_S = 3 * HEARTBEAT_S
# Beyond this many bytes of JSON the oldest pending alerts are left off the board (and counted):
# a record must stay within the topic's max.message.bytes (topics.py sets 8 MiB; lz4 shrinks it too).
BOARD_MAX_BYTES = 4 * 1024 * 1024
# Expired silences are kept this long for `silence list --all`, then forgotten (tombstoned) by the
# next `silence add` or `expire`: Alertmanager's default --data.retention.
SILENCE_RETENTION_S = 5 * 86400.0


def record_problem(err: ValidationError) -> str:
    """The first thing wrong with a record, in one line, without quoting it."""
    first = err.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).replace("\n", " ")
    if first["type"] == "json_invalid":
        return f"not valid JSON ({message.removeprefix('Invalid JSON: ')})"
    more = len(err.errors()) - 1
    return f"{where + ': ' if where else ''}{message}" + (f" (and {more} more)" if more else "")


@dataclass
class SilenceBook:
    """The silences as the topic's records so far tell them: the newest record per id wins, a
    tombstone (no value) removes one."""

    silences: dict[str, Silence] = field(default_factory=dict)

    def apply(self, key: bytes | None, value: bytes | None, where: str) -> str | None:
        """Take one record; returns why it was skipped (naming `where`), or None."""
        if key is None:
            return f"{where}: a record without a key (a silence's id) skipped"
        silence_id = key.decode("utf-8", "replace")
        if value is None:
            self.silences.pop(silence_id, None)
            return None
        try:
            silence = Silence.model_validate_json(value)
        except ValidationError as err:
            return f"{where}: not a silence, skipped: {record_problem(err)}"
        if silence.id != silence_id:
            return f"{where}: a silence filed under another id ({silence_id!r}), skipped"
        self.silences[silence_id] = silence
        return None

    def forgettable(self, now: float) -> list[str]:
        """Ids of silences that ended more than SILENCE_RETENTION_S ago."""
        return sorted(i for i, s in self.silences.items() if s.ends_at < now - SILENCE_RETENTION_S)

    def listed(self, now: float, include_expired: bool = False) -> list[Silence]:
        """Pending and active silences (expired too with `include_expired`), oldest first."""
        kept = [s for s in self.silences.values() if include_expired or s.state(now) != "expired"]
        return sorted(kept, key=lambda s: (s.created_at, s.id))


def read_silences(settings: Settings) -> tuple[SilenceBook, list[str]]:
    """Every silence on the topic now, and why any record was skipped."""
    ensure_topics(settings, only=shared_state_topics(settings))
    book, problems = SilenceBook(), []
    for record in read_records(settings, settings.topic_silences):
        problem = book.apply(record.key, record.value, f"{settings.topic_silences}@{record.offset}")
        problems += [problem] if problem else []
    return book, problems


def write_silence(settings: Settings, silence: Silence, forget: Sequence[str] = ()) -> None:
    """File a silence (new, or its new version), and tombstones for the ids in `forget`; returns
    once the broker has them all."""
    ensure_topics(settings, only=shared_state_topics(settings))
    producer = KafkaProducer(**client_config(settings), acks="all")
    try:
        sent = [producer.send(settings.topic_silences, key=silence_id.encode(), value=None) for silence_id in forget]
        sent.append(producer.send(settings.topic_silences, key=silence.id.encode(),
                                  value=silence.model_dump_json().encode()))
        for future in sent:
            future.get(timeout=30)
    finally:
        producer.close()


class SilenceFeed:
    """The worker's view of the silences topic, read on from where it got to on every call: a
    silence added anywhere mutes the worker's next notifications. Blocking: call it in a thread."""

    def __init__(self, settings: Settings, book: SilenceBook) -> None:
        self.topic, self.book = settings.topic_silences, book
        self.consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False)
        partitions = self.consumer.partitions_for_topic(self.topic) or {0}
        self.partitions = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(self.partitions)
        self.consumer.seek_to_beginning()
        self.start_end = self.consumer.end_offsets(self.partitions)  # what "read to its end" means
        self.caught_up = False

    def read(self, timeout_s: float) -> list[str]:
        """Records that arrived since the last call, for up to `timeout_s` while not yet caught up;
        returns why any were skipped."""
        problems: list[str] = []
        deadline = time.monotonic() + timeout_s
        while True:
            for batch in self.consumer.poll(timeout_ms=0 if self.caught_up else 200).values():
                for record in batch:
                    problem = self.book.apply(record.key, record.value, f"{self.topic}@{record.offset}")
                    problems += [problem] if problem else []
            self.caught_up = self.caught_up or all(self.consumer.position(tp) >= end for tp, end in self.start_end.items())
            if self.caught_up or time.monotonic() >= deadline:
                return problems

    def close(self) -> None:
        self.consumer.close()


class AlertBoard(BaseModel):
    """The live (pending and firing) alerts one worker published, and when."""

    written_at: float
    writer: str = Field(min_length=1)  # host:pid of the worker that alerts
    alerts: list[AlertState]
    left_off: int = 0  # alerts not on the board: it would have been larger than BOARD_MAX_BYTES

    def stale(self, now: float) -> bool:
        return now - self.written_at > STALE_AFTER_S


def this_writer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def board_record(alerts: list[AlertState], now: float, writer: str) -> bytes:
    """The board for `alerts` (oldest first), firing ones before pending ones when not all fit."""
    ranked = sorted(alerts, key=lambda a: (a.status != "firing", a.active_since, a.fingerprint))
    while True:
        board = AlertBoard(written_at=now, writer=writer, alerts=ranked, left_off=len(alerts) - len(ranked))
        data = board.model_dump_json().encode()
        if len(data) <= BOARD_MAX_BYTES or not ranked:
            return data
        ranked = ranked[: int(len(ranked) * BOARD_MAX_BYTES / len(data) * 0.95)]


def read_alert_board(settings: Settings) -> AlertBoard | None:
    """The newest board on the topic (None when none was ever written); ValueError naming the
    record when it is not a board."""
    ensure_topics(settings, only=shared_state_topics(settings))
    newest = last_message(settings, settings.topic_alerts)
    if newest is None:
        return None
    offset, value = newest
    try:
        return AlertBoard.model_validate_json(value or b"")
    except ValidationError as err:
        raise ValueError(f"{settings.topic_alerts}@{offset}: not an alert board: {record_problem(err)}") from None
