"""What every stage of the worker shares: its Faust app, topics, counters and InfluxDB sink, and
how a stage dead-letters a message, writes points and re-reads a partition. The stages build on
it: agents/worker.py (samples, windows, fleet KPI) and agents/alerting.py (alerts)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import faust
from faust.exceptions import ConsumerNotStarted
from faust.types import TP
from kafka.errors import KafkaError
from pydantic import ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, wait_exponential_jitter

from laggard.agents.gaps import acknowledge
from laggard.agents.metrics import Counters
from laggard.agents.sink import InfluxRejected, InfluxSink
from laggard.agents.transport import worker_app
from laggard.events import describe_validation_error
from laggard.settings import Settings
from laggard.topics import alert_ticks_name, committed_offsets, read_range

log = logging.getLogger("laggard.worker")

# The broker answers a caught-up consumer's fetch at least every fetch_max_wait (1.5 s in Faust):
# a partition not heard of for longer than this is cut off from it (the broker away), not quiet.
FETCH_FRESH_S = 5.0
# Refused points go to the dead-letter topic whole, this many characters of lines per record at most.
DEAD_LETTER_PAYLOAD_CHARS = 64 * 1024
# How long a direct read from Kafka (a group's offsets, a re-read) keeps retrying what the broker
# calls retriable (no coordinator yet, a connection refused) before the error stops the worker.
KAFKA_RETRY_S = 300.0


def _retriable(err: BaseException) -> bool:
    """Whether the broker may answer this read if asked again: it is starting, moving a coordinator
    or away for a while (read_range's TimeoutError)."""
    return isinstance(err, TimeoutError) or (isinstance(err, KafkaError) and err.retriable)


def _log_retry(state: RetryCallState) -> None:
    err = state.outcome.exception() if state.outcome else None
    log.warning("reading from Kafka failed (%s: %s); trying again in %.1f s",
                type(err).__name__, err, state.upcoming_sleep)


async def read_kafka(read: Callable[..., Any], *args: Any) -> Any:
    """`read(*args)` (a blocking kafka-python read) in a thread, asked again with backoff while it
    fails in a way the broker calls retriable: a worker started with its broker, or cut off from
    it, waits for it rather than crashing."""
    async for attempt in AsyncRetrying(retry=retry_if_exception(_retriable), before_sleep=_log_retry,
                                       wait=wait_exponential_jitter(initial=0.2, max=5.0),
                                       stop=stop_after_delay(KAFKA_RETRY_S), reraise=True):
        with attempt:
            return await asyncio.to_thread(read, *args)


def _chunks(lines: list[str], limit: int) -> list[list[str]]:
    """`lines` in order, grouped so that each group's lines add up to at most `limit` characters
    (a longer line is a group of its own)."""
    groups: list[list[str]] = []
    size = limit + 1
    for line in lines:
        if size + len(line) > limit:
            groups.append([])
            size = 0
        groups[-1].append(line)
        size += len(line) + 1
    return groups


@dataclass(frozen=True)
class Input:
    """One input message: from a Faust event, or re-read from Kafka where Faust skipped it."""

    topic: str
    partition: int
    offset: int
    value: bytes | None

    @classmethod
    def of(cls, event: Any) -> Input:
        return cls(event.message.topic, event.message.partition, event.message.offset, event.value)


class WorkerCore:
    """The parts of a worker every stage uses; `Worker` (agents/worker.py) adds the stages."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = worker_app(settings)
        topic = self.topic
        self.samples_topic, self.windows_topic = topic(settings.topic_samples), topic(settings.topic_windows)
        self.fleet_topic, self.findings_topic = topic(settings.topic_fleet), topic(settings.topic_findings)
        self.deadletter_topic = topic(settings.topic_deadletter)
        # Stage 4's single-partition channel: its ticks and the clusters' fleet KPI windows (threshold rules).
        self.alert_channel = topic(alert_ticks_name(settings))
        self.sink = InfluxSink(settings, stopping=self.app.stopping)
        self.counters = Counters()
        # Writes in flight: while one waits (InfluxDB down), the agents stand still and no
        # partition may be taken for quiet by the idle timer.
        self.writes_waiting = 0

    def topic(self, *names: str) -> faust.TopicT:
        return self.app.topic(*names, value_serializer="raw", key_serializer="raw")

    async def dead_letter(self, message: Input, reason: str) -> None:
        record = {"reason": reason, "topic": message.topic, "partition": message.partition,
                  "offset": message.offset, "at": time.time(),
                  "payload": (message.value or b"")[:4096].decode("utf-8", "replace")}
        await self.deadletter_topic.send(key=message.topic.encode(), value=json.dumps(record).encode())

    async def reject_stage_message(self, message: Input, err: ValueError) -> None:
        """A message on a topic between the worker's stages that is not what the stage reads
        (written by something else, or by an older laggard): dead-lettered and counted, the stage goes on."""
        self.counters.stage_rejected += 1
        reason = describe_validation_error(err) if isinstance(err, ValidationError) else str(err)
        log.error("%s[%d]@%d is not a laggard stage message: %s", message.topic, message.partition, message.offset,
                  reason)
        await self.dead_letter(message, f"not a laggard stage message: {reason}")

    async def replay(self, topic: str, partition: int, start: int, end: int) -> list[tuple[int, bytes]]:
        """Messages [start, end) of one partition, read directly (not through Faust's consumer)."""
        if start >= end:
            return []
        records = await read_kafka(read_range, self.settings, topic, partition, start, end)
        self.counters.replayed += len(records)
        return records

    async def group_resume_offsets(self, topic: str) -> dict[int, int]:
        """Where this worker group resumes each partition of `topic`: its committed offset (the
        log start where there is none)."""
        return await read_kafka(committed_offsets, self.settings, self.settings.worker_app_id, topic)

    async def take_skipped(self, message: Input, expected: int, take: Callable[[Input], Awaitable[None]]) -> None:
        """The messages before `message` from `expected` on that Faust skipped (agents/gaps.py),
        re-read from Kafka, given to `take` as if Faust had delivered them, and acknowledged."""
        if message.offset <= expected:
            return
        self.counters.input_gaps += 1
        log.warning("%s[%d]: Faust skipped offsets %d..%d; re-reading them from Kafka",
                    message.topic, message.partition, expected, message.offset - 1)
        for offset, raw in await self.replay(message.topic, message.partition, expected, message.offset):
            await take(Input(message.topic, message.partition, offset, raw))
        acknowledge(self.app.consumer, message.topic, message.partition, expected, message.offset)

    async def write(self, points: list[str]) -> None:
        """Blocks this agent (not the event loop) until InfluxDB has the points. Points InfluxDB
        refuses (type conflicts, say) go to the dead-letter topic with its answer."""
        if not points:
            return
        self.writes_waiting += 1
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.sink.write, points, "ms")
        except InfluxRejected as err:
            # The sink wrote the rest: only the lines InfluxDB refused are dead-lettered.
            refused = err.rejected  # InfluxSink.write always says which lines
            self.counters.influx_rejected += len(refused)
            log.error("%s (%d of %d points refused; dead-lettered)", err, len(refused), len(points))
            for chunk in _chunks(refused, DEAD_LETTER_PAYLOAD_CHARS):
                self.counters.influx_dead_letters += 1
                record = {"reason": str(err), "topic": "influxdb", "at": time.time(), "payload": "\n".join(chunk)}
                await self.deadletter_topic.send(key=b"influxdb", value=json.dumps(record).encode())
        finally:
            self.writes_waiting -= 1
            if time.monotonic() - started > 1.0:
                self.held_up()

    def held_up(self) -> None:
        """After a write that held the agents for over a second (InfluxDB slow or down)."""

    def fetched_highwater(self, topic: str, partition: int) -> int | None:
        """The partition's highwater at the consumer's last fetch; None before the first one."""
        try:
            return self.app.consumer.highwater(TP(topic, partition))
        except (AssertionError, ConsumerNotStarted):  # revoked meanwhile, or not started
            return None

    def fetched_lately(self, topic: str, partition: int) -> bool:
        """Whether the broker answered a fetch for the partition within FETCH_FRESH_S."""
        try:
            fetched_at = self.app.consumer.last_fetched(TP(topic, partition))
        except (AssertionError, ConsumerNotStarted):
            return False
        return fetched_at is not None and time.time() - fetched_at <= FETCH_FRESH_S
