"""The worker's Faust app (`worker_app`) on Faust's Kafka transport (aiokafka) with one fix:
seeking back to the group's commit moves every partition, including one the group has committed
at offset 0 or not at all.

Faust throws away messages it fetched while its flow was stopped (a rebalance, a table recovery)
and calls `Consumer.perform_seek` to fetch them again from the group's committed offsets.
aiokafka's `seek_to_committed` seeks only partitions committed above 0 (`if offset and offset > 0`
in aiokafka 0.14), so on a partition nobody had committed yet (a new topic, a second worker joining
a busy group) the thrown-away messages were never delivered: the worker held the partition, Faust's
read offset stayed at 0 and aiokafka's position at the end. `bench/scale.py` with two workers saw
it in most runs (issue 12).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from signal import Signals
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from laggard import logs
from laggard.settings import Settings


async def rewind_to_committed(consumer: AIOKafkaConsumer,
                              rewinds: Callable[[TopicPartition], bool]) -> dict[TopicPartition, int | None]:
    """Seek every assigned partition to the group's committed offset, and those of them that
    `rewinds` picks and that are committed at 0 or not at all to their beginning (where the
    group resumes them: laggard's consumers start at the earliest). Returns the committed offsets."""
    committed = await consumer.seek_to_committed()
    unmoved = [tp for tp, offset in committed.items() if not offset and rewinds(tp)]
    if unmoved:
        await consumer.seek_to_beginning(*unmoved)
    return committed


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[TP, int]:
        # Changelog partitions are positioned by Faust's table recovery, not by the group's commit.
        changelogs = self.app.tables.changelog_topics
        return await self.call_thread(rewind_to_committed, self._ensure_consumer(),
                                      lambda tp: tp.topic not in changelogs)

    def last_fetched(self, tp: TP) -> float | None:
        """When the broker last answered a fetch for `tp` (unix seconds); None before the first.
        A read of the fetcher's per-partition state, like Faust's own `highwater`."""
        millis = self._ensure_consumer().last_poll_timestamp(tp)
        return millis / 1000.0 if millis else None


class Consumer(faust_aiokafka.Consumer):
    def last_fetched(self, tp: TP) -> float | None:
        return self._thread.last_fetched(tp)

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer


class App(faust.App):
    """A Faust app whose consumer is the one above. `stopping` is set as soon as the worker is told
    to stop: what blocks a thread (InfluxDB retries) gives up on it instead of holding the stop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopping = threading.Event()

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)


class Worker(faust.Worker):
    """Faust's worker, logging through laggard's handler (laggard/logs.py: its format and level,
    secrets redacted, no colour) instead of mode's coloured one, which decides on colour by
    stdout while it writes to stderr. Its progress spinner (cursor codes even into a file) is
    drawn only on a terminal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.stdout.isatty():
            self.spinner = None

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, logs.attach(logger))

    def _schedule_shutdown(self, signal: Signals) -> None:
        self.app.stopping.set()  # before Faust waits for the agents' current events
        super()._schedule_shutdown(signal)


def broker_credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """The same TLS/SASL settings the kafka-python clients use (laggard/kafka_config.py)."""
    protocol = settings.kafka_security_protocol
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile) if "SSL" in protocol else None
    if protocol.startswith("SASL"):
        password = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        return faust.SASLCredentials(username=settings.kafka_sasl_username, password=password,
                                     mechanism=settings.kafka_sasl_mechanism, ssl_context=context)
    return faust.SSLCredentials(context) if context else None


def worker_app(settings: Settings) -> App:
    """The worker's Faust app: consumer group `worker_app_id`, in-memory tables (their changelogs
    in Kafka), its web server (/stats, /metrics) on loopback by default."""
    datadir = settings.state_dir / "workers" / settings.worker_app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)  # Faust creates only the last folder level
    return App(
        settings.worker_app_id,
        broker=";".join(f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(",")),
        broker_credentials=broker_credentials(settings),
        datadir=str(datadir),
        store="memory://",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        topic_allow_declare=settings.topic_create,
        consumer_auto_offset_reset="earliest",
        web_host=settings.worker_web_host,
        web_bind=settings.worker_web_host,  # loopback by default: /stats and /metrics are not public
        web_port=settings.worker_web_port,
        Worker=Worker,
        broker_session_timeout=15.0,
        broker_heartbeat_interval=3.0,
        producer_compression_type="lz4",
        producer_max_request_size=8 * 1024 * 1024,
        stream_buffer_maxsize=16384,
        # Bigger fetches: fewer round trips through aiokafka's thread (+35% on a no-op agent here).
        consumer_max_fetch_size=8 * 1024 * 1024,
    )
