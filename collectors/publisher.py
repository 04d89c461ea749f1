"""The one publisher every source shares: events onto Kafka with kafka-python.

It knows nothing of NVML or DCGM; sources know nothing of Kafka. Throughput comes from batching
(`linger_ms`, `batch_size`) and compression, chosen by `bench/collectors.py`, and from keeping the
per-message work small: kafka-python's own per-record path costs tens of microseconds, so the
publisher adds as little as it can on top (see "Why no callbacks" below).

Delivery is `acks=all` with idempotence; kafka-python retries inside its delivery timeout, and a
message that still fails is sent again here (counted as retried) up to `max_resends` times before
it is counted as failed and logged. A message rejected for its own content (too large for the
producer's `max_request_size`, checked before sending, or for the topic's `max.message.bytes`; an
invalid record) is counted as failed at once, with its reason in `stats.failed_reasons`.

Why the producer is sometimes replaced: kafka-python's idempotent producer turns any non-retriable
broker error, even one about a single message, into a fatal state in which it aborts every other
message in flight and its flush/close raise. The publisher then settles what the producer still
holds, starts a new producer and sends the unacknowledged messages again (counted as retried). The
aborted messages fail with the very error of the one at fault, so when that error is about a
message, the group is sent again in halves until the message at fault is alone (about log2(n)
replacements for n messages in flight). Messages the broker had written but the old producer
aborted before their acknowledgement arrived are written twice: a new producer is a new
idempotence identity.

kafka-python 3 has no bound on its buffer, so the publisher
bounds the bytes in flight itself: when the broker is slow, `publish` blocks until
acknowledgements bring them under `max_in_flight_bytes` (backpressure with bounded memory, never
a silent drop).

Why no callbacks: a callback and an errback per message cost two `functools.partial`s, two lock
round trips and a condition notify on kafka-python's I/O thread, which shares the one core with
the caller. Instead every send's future waits in a FIFO, and the caller's thread settles the
finished ones at the head on each publish (and all of them on flush): ack counts, freed bytes and
resends all happen here, on the caller's thread. A Publisher is therefore used from one thread.

Partitioning: a message goes to the partition kafka-python's (and the Java client's) default
partitioner picks for its key, murmur2(key) mod the topic's partition count, so the node -> partition
mapping is the standard one. It is computed once per key and remembered, since the pure-Python
murmur2 (~4 us) and the partitioner's metadata lookups cost ~10 us a message.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    InvalidTimestampError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnknownError,
)
from kafka.partitioner import murmur2
from kafka.producer.future import FutureRecordMetadata

from laggard.batches import NodeBatch
from laggard.events import NodeSample, encode
from laggard.kafka_config import client_config
from laggard.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Measured with bench/collectors.py (its docstring has the comparison): lz4 cuts bytes 4.5x for
# ~3 us a message; shorter linger / smaller batches cost more per message, longer ones gain nothing.
DEFAULT_PRODUCER_CONFIG: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 50,
    "batch_size": 512 * 1024,
    "compression_type": "lz4",
    "max_block_ms": 60_000,
    "max_request_size": 8 * 1024 * 1024,
    # kafka-python backs off up to 30 s between reconnects: after an outage, a collector would hold
    # its buffer that long after the broker is back, and workers close idle windows after
    # window_hold_s (15 s) of quiet. 2 s brings the buffer in well within that.
    "reconnect_backoff_max_ms": 2_000,
}

# Keys remembered per topic before the memo starts over (node names: a few thousand at most).
PARTITION_MEMO_KEYS = 100_000
# How often a topic's partition count is read again (kafka-python refreshes metadata every 5 min).
PARTITION_RECHECK_S = 30.0
# How long `flush` and backpressure wait on one future before looking again.
WAIT_SLICE_S = 1.0

# Broker rejections about the message itself: sending it again cannot help, the others are not at fault.
MESSAGE_FAULTS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidRecordError,
    InvalidTimestampError,
    CorruptRecordError,
)


def default_partition(key: bytes, partition_count: int) -> int:
    """The partition kafka-python's DefaultPartitioner (and the Java client) picks for `key`."""
    return (murmur2(key) & 0x7FFFFFFF) % partition_count


def failed_for_good(producer: KafkaProducer) -> bool:
    """Whether kafka-python's idempotent producer is in its fatal state (it aborts every send and
    its flush/close raise). kafka-python has no public accessor for it."""
    manager = producer._transaction_manager
    return manager is not None and manager.has_fatal_error()


@dataclass
class PublisherStats:
    sent: int = 0
    acked: int = 0
    retried: int = 0
    failed: int = 0
    blocked: int = 0
    bytes: int = 0
    in_flight_bytes: int = 0
    # Producers replaced after kafka-python's fatal state (see the module docstring).
    replaced_producers: int = 0
    last_error: str = ""
    # Error type name -> messages counted as failed for it.
    failed_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "failed_reasons": dict(self.failed_reasons)}


# One send waiting for its acknowledgement, with what it takes to send it again:
# (future, topic, key, value, attempt). A plain tuple: building one is the cheapest record there is.
_Pending = tuple[FutureRecordMetadata, str, bytes | None, bytes, int]


class _PartitionMemo:
    """key -> partition for one topic. The partition count is read again every
    PARTITION_RECHECK_S (partitions can be added to a topic); if it changed, the memo starts over."""

    def __init__(self, partition_count: int) -> None:
        self.partition_count = partition_count
        self.recheck_at = time.monotonic() + PARTITION_RECHECK_S
        self.by_key: dict[bytes, int] = {}

    def recheck(self, partition_count: int) -> None:
        if partition_count != self.partition_count:
            self.partition_count = partition_count
            self.by_key.clear()
        self.recheck_at = time.monotonic() + PARTITION_RECHECK_S

    def assign(self, key: bytes) -> int:
        if len(self.by_key) >= PARTITION_MEMO_KEYS:
            self.by_key.clear()
        partition = self.by_key[key] = default_partition(key, self.partition_count)
        return partition


class Publisher:
    """`with Publisher() as pub: pub.publish(sample)`; closing flushes everything in flight."""

    def __init__(self, settings: Settings | None = None, topic: str | None = None,
                 max_resends: int = 3, max_in_flight_bytes: int = 64 * 1024 * 1024,
                 **producer_overrides: Any) -> None:
        self.settings = settings or get_settings()
        self.topic = topic or self.settings.topic_samples
        self.max_resends = max_resends
        self.max_in_flight_bytes = max_in_flight_bytes
        self.stats = PublisherStats()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._resend: collections.deque[_Pending] = collections.deque()
        self._partitions: dict[str, _PartitionMemo] = {}
        self._config = {**client_config(self.settings), **DEFAULT_PRODUCER_CONFIG, **producer_overrides}
        self._producer = KafkaProducer(client_id="laggard-collector", **self._config)
        self._closed = False

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(self, sample: NodeSample | NodeBatch, topic: str | None = None) -> None:
        self.publish_raw(sample.key(), encode(sample), topic)

    def publish_raw(self, key: bytes, value: bytes, topic: str | None = None) -> None:
        pending = self._pending
        if pending and pending[0][0].is_done:
            self._settle_done()
        if self._resend:
            self._drain_resends()
        self._send(topic or self.topic, key, value, 0)

    def _send(self, topic: str, key: bytes | None, value: bytes, attempt: int) -> None:
        if self.stats.in_flight_bytes > self.max_in_flight_bytes:
            self._wait_for_room()
        self._send_now(topic, key, value, attempt)

    def _send_now(self, topic: str, key: bytes | None, value: bytes, attempt: int) -> None:
        stats = self.stats
        stats.sent += attempt == 0
        while True:
            try:
                partition = None if key is None else self._partition(topic, key)
                future = self._producer.send(topic, value, key, partition=partition)
                break
            except MessageSizeTooLargeError as err:
                # kafka-python compares the serialized record with max_request_size before queueing it.
                self._fail(topic, key, value, err)
                return
            except KafkaTimeoutError as err:
                # No metadata within max_block_ms: the broker is gone. Keep waiting rather than
                # drop; the caller is blocked, which is the backpressure.
                stats.blocked += 1
                log.warning("kafka send blocked: %s; still waiting", err)
        stats.bytes += len(value)
        stats.in_flight_bytes += len(value)
        self._pending.append((future, topic, key, value, attempt))

    def _partition(self, topic: str, key: bytes) -> int:
        memo = self._partitions.get(topic)
        if memo is None or time.monotonic() > memo.recheck_at:
            # Blocks for the topic's metadata the first time (KafkaTimeoutError after max_block_ms).
            count = len(self._producer.partitions_for(topic))
            if memo is None:
                memo = self._partitions[topic] = _PartitionMemo(count)
            else:
                memo.recheck(count)
        partition = memo.by_key.get(key)
        return memo.assign(key) if partition is None else partition

    def _wait_for_room(self) -> None:
        """Block until acknowledgements bring the bytes in flight down to half the bound."""
        self.stats.blocked += 1
        self._settle_done()
        while self.stats.in_flight_bytes > self.max_in_flight_bytes // 2:
            self._wait_for_oldest()
            self._settle_done()

    def _wait_for_oldest(self) -> None:
        try:
            self._pending[0][0].get(timeout=WAIT_SLICE_S)
        except KafkaError:
            pass  # failed (settled as such by the caller) or not done yet (it looks again)

    def _settle_done(self) -> None:
        failed = self._take_done(block=False)
        if failed:
            self._on_failures(failed)

    def _take_done(self, block: bool) -> list[_Pending]:
        """Count the finished sends at the head of the FIFO (all of them if `block`, waiting for
        each) and return the failed ones."""
        pending, stats = self._pending, self.stats
        acked = freed = 0
        failed: list[_Pending] = []
        while pending:
            if not pending[0][0].is_done:
                if not block:
                    break
                self._wait_for_oldest()
                continue
            entry = pending.popleft()
            freed += len(entry[3])
            if entry[0].exception is None:
                acked += 1
            else:
                failed.append(entry)
        stats.acked += acked
        stats.in_flight_bytes -= freed
        return failed

    def _on_failures(self, failed: list[_Pending]) -> None:
        fatal = failed_for_good(self._producer)
        if fatal:
            failed += self._take_done(block=True)  # it aborts whatever it still holds
            self._replace_producer(failed[0][0].exception)
        suspects = [entry for entry in failed if isinstance(entry[0].exception, MESSAGE_FAULTS)]
        for entry in failed:
            if not isinstance(entry[0].exception, MESSAGE_FAULTS):
                self._resend_later(entry)
        if not fatal or len(suspects) == 1:
            for future, topic, key, value, _attempt in suspects:
                self._fail(topic, key, value, future.exception)
        elif suspects:
            # The one at fault and the ones aborted with it failed with the same error: halve.
            half = len(suspects) // 2
            self._send_again_together(suspects[:half])
            self._send_again_together(suspects[half:])

    def _send_again_together(self, group: list[_Pending]) -> None:
        self.stats.retried += len(group)
        for _future, topic, key, value, attempt in group:
            self._send_now(topic, key, value, attempt + 1)
        failed = self._take_done(block=True)
        if failed:
            self._on_failures(failed)

    def _replace_producer(self, error: BaseException | None) -> None:
        log.warning("kafka producer failed for good (%s: %s); starting a new one", type(error).__name__, error)
        try:
            self._producer.close(timeout=0)  # nothing of ours is left in it
        except KafkaError as err:
            log.warning("closing the failed kafka producer: %s", err)
        self._producer = KafkaProducer(client_id="laggard-collector", **self._config)
        self.stats.replaced_producers += 1

    def _resend_later(self, entry: _Pending) -> None:
        future, topic, key, value, attempt = entry
        error = future.exception
        self.stats.last_error = f"{type(error).__name__}: {error}"
        if attempt < self.max_resends:
            self.stats.retried += 1
            self._resend.append((future, topic, key, value, attempt + 1))
        else:
            self._fail(topic, key, value, error, f"after {attempt} resends")

    def _fail(self, topic: str, key: bytes | None, value: bytes, error: BaseException | None,
              when: str = "rejected") -> None:
        stats, reason = self.stats, type(error).__name__
        stats.failed += 1
        stats.failed_reasons[reason] = stats.failed_reasons.get(reason, 0) + 1
        stats.last_error = f"{reason}: {error}"
        log.error("message to %s (key %r, %d bytes) failed, %s: %s: %s", topic, key, len(value), when, reason, error)

    def _drain_resends(self) -> None:
        while self._resend:
            _future, topic, key, value, attempt = self._resend.popleft()
            self._send(topic, key, value, attempt)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything sent so far is acknowledged or has failed (resends included)."""
        while True:
            self._drain_resends()
            try:
                self._producer.flush(timeout=timeout_s)
            except UnknownError:
                pass  # "Future not done": a producer in its fatal state; settling below replaces it
            failed = self._take_done(block=True)
            if failed:
                self._on_failures(failed)
            if not self._resend and not self._pending:
                return

    def close(self, timeout_s: float | None = 120) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout_s)
        except KafkaError as err:
            log.error("flush on close failed: %s", err)
        finally:
            try:
                self._producer.close(timeout=timeout_s)
            except KafkaError as err:
                log.error("closing the kafka producer failed: %s", err)
