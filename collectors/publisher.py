"""The one publisher every source shares: events onto Kafka with kafka-python.

It knows nothing of NVML or DCGM; sources know nothing of Kafka. Throughput comes from batching
(`linger_ms`, `batch_size`) and compression, chosen by `bench/collectors.py`. Delivery is
`acks=all` with idempotence; kafka-python retries inside its delivery timeout, and a message that
still fails is queued and sent again here (counted as retried) up to `max_resends` times before
it is counted as failed and logged. kafka-python 3 has no bound on its buffer, so the publisher
bounds the bytes in flight itself: when the broker is slow, `publish` blocks until acknowledgements
bring them under `max_in_flight_bytes` (backpressure with bounded memory, never a silent drop).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from laggard.events import NodeSample, encode
from laggard.kafka_config import client_config
from laggard.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Measured with bench/collectors.py (see README): lz4 cut bytes ~5x at little CPU cost.
DEFAULT_PRODUCER_CONFIG: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 50,
    "batch_size": 512 * 1024,
    "compression_type": "lz4",
    "max_block_ms": 60_000,
    "max_request_size": 8 * 1024 * 1024,
}


@dataclass
class PublisherStats:
    sent: int = 0
    acked: int = 0
    retried: int = 0
    failed: int = 0
    blocked: int = 0
    bytes: int = 0
    in_flight_bytes: int = 0
    last_error: str = ""
    _lock: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


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
        self._resend: collections.deque[tuple[str, bytes, bytes, int]] = collections.deque()
        config = {**client_config(self.settings), **DEFAULT_PRODUCER_CONFIG, **producer_overrides}
        self._producer = KafkaProducer(client_id="laggard-collector", **config)
        self._closed = False

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(self, sample: NodeSample, topic: str | None = None) -> None:
        self.publish_raw(sample.key(), encode(sample), topic)

    def publish_raw(self, key: bytes, value: bytes, topic: str | None = None) -> None:
        self._drain_resends()
        self._send(topic or self.topic, key, value, attempt=0)

    def _send(self, topic: str, key: bytes, value: bytes, attempt: int) -> None:
        self._wait_for_room()
        while True:
            try:
                future = self._producer.send(topic, key=key, value=value)
                break
            except KafkaTimeoutError as err:
                # No metadata within max_block_ms: the broker is gone. Keep waiting rather than
                # drop; the caller is blocked, which is the backpressure.
                self.stats.blocked += 1
                log.warning("kafka send blocked: %s; still waiting", err)
        with self.stats._lock:
            self.stats.sent += attempt == 0
            self.stats.bytes += len(value)
            self.stats.in_flight_bytes += len(value)
        future.add_callback(self._on_ack, len(value))
        future.add_errback(self._on_error, topic, key, value, attempt)

    def _wait_for_room(self) -> None:
        with self.stats._lock:
            if self.stats.in_flight_bytes <= self.max_in_flight_bytes:
                return
            self.stats.blocked += 1
            while self.stats.in_flight_bytes > self.max_in_flight_bytes // 2:
                self.stats._lock.wait(timeout=1.0)

    def _on_ack(self, size: int, _metadata: object) -> None:
        with self.stats._lock:
            self.stats.acked += 1
            self.stats.in_flight_bytes -= size
            self.stats._lock.notify_all()

    def _on_error(self, topic: str, key: bytes, value: bytes, attempt: int, err: Exception) -> None:
        # Runs on kafka-python's I/O thread: never send from here (a full buffer would deadlock).
        with self.stats._lock:
            self.stats.in_flight_bytes -= len(value)
            self.stats._lock.notify_all()
            self.stats.last_error = f"{type(err).__name__}: {err}"
            if attempt < self.max_resends:
                self.stats.retried += 1
                self._resend.append((topic, key, value, attempt + 1))
            else:
                self.stats.failed += 1
                log.error("delivery to %s failed after %d resends: %s", topic, attempt, err)

    def _drain_resends(self) -> None:
        while self._resend:
            topic, key, value, attempt = self._resend.popleft()
            self._send(topic, key, value, attempt)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything sent so far is acknowledged or has failed (resends included)."""
        self._producer.flush(timeout=timeout_s)
        while self._resend:
            self._drain_resends()
            self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float | None = 120) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout_s)
        except KafkaError as err:
            log.error("flush on close failed: %s", err)
        finally:
            self._producer.close(timeout=timeout_s)
