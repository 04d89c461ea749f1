"""The laggard worker: a Faust app, run by `laggard worker`; more workers share the partitions.

Agents (the arithmetic is in agents/stages.py and the modules it uses):
- `window_samples`   gpu.samples (keyed by node) -> GPU and node windows to InfluxDB, GPU results
                     re-keyed by job to laggard.windows, partial cluster results to laggard.fleet;
                     bad or late messages to the dead-letter topic with their reason.
- `detect`           laggard.windows (keyed by job) -> findings to laggard.findings and InfluxDB.
- `fleet_kpi`        laggard.fleet (keyed by cluster) -> the fleet KPI to InfluxDB.

Nothing accepted is lost when a worker dies. Open windows live in memory, and Faust commits a
message's offset once the agent has taken it (holding acknowledgements until windows close was
tried: Faust's rebalance waits for every unacknowledged message and deadlocks). So stages 1 and 2
checkpoint, per input partition, in Faust tables (changelog in Kafka) what they have emitted and
the lowest input offset still feeding an open window. A worker taking a partition over re-reads
from that offset up to where Faust resumes, rebuilding the open windows exactly; what was
already emitted is skipped. Outputs carry deterministic ids (window id = series + window start,
finding idempotency key), so the at-least-once repeats of a crash overwrite instead of doubling.
Faust itself repeats or skips messages in races around a rebalance; every stage knows the next
offset it expects, so a repeat is ignored and a skipped range is taken anyway (agents/gaps.py).
Faust's seek back to the group's commit, after it throws fetched messages away, moves every
partition here (agents/transport.py): aiokafka's alone skipped partitions committed at 0.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import faust
from faust.exceptions import ConsumerNotStarted
from faust.types import TP
from kafka.errors import KafkaError
from pydantic import TypeAdapter, ValidationError

from agents.detectors import LowUtilizationBaseline
from agents.findings import Finding, WindowResult
from agents.gaps import StallWatch, acknowledge
from agents.metrics import consumer_lags, input_partitions, metrics_page, worker_registry
from agents.points import finding_point, fleet_point
from agents.sink import InfluxRejected, InfluxSink
from agents.transport import App
from agents.outputs import window_outputs
from agents.stages import (
    MARKER_PREFIX, DetectStage, FleetPartial, FleetStage, SampleStage, WindowMarker, kpi_window,
    merge_fleet, parse_results,
)
from agents.windows import ClosedWindow
from laggard.events import describe_validation_error
from laggard.settings import get_settings
from laggard.topics import alert_ticks_name, committed_offsets, read_range, worker_tables

log = logging.getLogger("laggard.worker")
settings = get_settings()


def _broker_url() -> str:
    return ";".join(f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(","))


def _broker_credentials() -> faust.SASLCredentials | faust.SSLCredentials | None:
    """The same TLS/SASL settings the kafka-python clients use (laggard/kafka_config.py)."""
    protocol = settings.kafka_security_protocol
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile) if "SSL" in protocol else None
    if protocol.startswith("SASL"):
        password = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        return faust.SASLCredentials(username=settings.kafka_sasl_username, password=password,
                                     mechanism=settings.kafka_sasl_mechanism, ssl_context=context)
    return faust.SSLCredentials(context) if context else None


WORKER_DATA = settings.state_dir / "workers"
WORKER_DATA.mkdir(parents=True, exist_ok=True)  # Faust creates only the last folder level
app = App(
    settings.worker_app_id,
    broker=_broker_url(),
    broker_credentials=_broker_credentials(),
    datadir=str(WORKER_DATA / settings.worker_app_id),
    store="memory://",
    topic_partitions=settings.topic_partitions,
    consumer_auto_offset_reset="earliest",
    web_host=settings.worker_web_host,
    web_bind=settings.worker_web_host,  # loopback by default: /stats and /metrics are not public
    web_port=settings.worker_web_port,
    broker_session_timeout=15.0,
    broker_heartbeat_interval=3.0,
    producer_compression_type="lz4",
    producer_max_request_size=8 * 1024 * 1024,
    stream_buffer_maxsize=16384,
    # Bigger fetches: fewer round trips through aiokafka's thread (+35% on a no-op agent here).
    consumer_max_fetch_size=8 * 1024 * 1024,
)
samples_topic = app.topic(settings.topic_samples, value_serializer="raw", key_serializer="raw")
windows_topic = app.topic(settings.topic_windows, value_serializer="raw", key_serializer="raw")
fleet_topic = app.topic(settings.topic_fleet, value_serializer="raw", key_serializer="raw")
findings_topic = app.topic(settings.topic_findings, value_serializer="raw", key_serializer="raw")
deadletter_topic = app.topic(settings.topic_deadletter, value_serializer="raw", key_serializer="raw")
# Stage 4's single-partition channel: its ticks and the clusters' fleet KPI windows (threshold rules).
alert_channel = app.topic(alert_ticks_name(settings), value_serializer="raw", key_serializer="raw")
tables = worker_tables(settings)  # their changelog topics are created by ensure_topics
window_checkpoints = app.Table("window-checkpoints", default=dict, partitions=tables["window-checkpoints"])
detect_checkpoints = app.Table("detect-checkpoints", default=dict, partitions=tables["detect-checkpoints"])

sink = InfluxSink(settings)


@dataclass
class Counters:
    accepted: int = 0
    rejected: int = 0
    late: int = 0
    replayed: int = 0
    influx_rejected: int = 0  # points InfluxDB dropped
    influx_dead_letters: int = 0  # refused writes, one dead letter each
    windows_closed: int = 0
    findings: int = 0
    fleet_windows: int = 0
    notifications: int = 0
    notifications_failed: int = 0
    rules_reload_failures: int = 0
    notifications_deferred: int = 0  # not taken by the webhook after retries: tried again later
    silences_load_failures: int = 0
    stage_rejected: int = 0  # messages between stages that were not what the stage reads
    input_gaps: int = 0  # offset ranges Faust skipped around a rebalance: re-read, or sought back to


counters = Counters()


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


async def dead_letter(message: Input, reason: str) -> None:
    record = {"reason": reason, "topic": message.topic, "partition": message.partition, "offset": message.offset,
              "at": time.time(), "payload": (message.value or b"")[:4096].decode("utf-8", "replace")}
    await deadletter_topic.send(key=message.topic.encode(), value=json.dumps(record).encode())


async def reject_stage_message(message: Input, err: ValueError) -> None:
    """A message on a topic between the worker's stages that is not what the stage reads (written
    by something else, or by an older laggard): dead-lettered and counted, the stage goes on."""
    counters.stage_rejected += 1
    reason = describe_validation_error(err) if isinstance(err, ValidationError) else str(err)
    log.error("%s[%d]@%d is not a laggard stage message: %s", message.topic, message.partition, message.offset, reason)
    await dead_letter(message, f"not a laggard stage message: {reason}")


async def replay(topic: str, partition: int, start: int, end: int) -> list[tuple[int, bytes]]:
    """Messages [start, end) of one partition, read directly (not through Faust's consumer)."""
    if start >= end:
        return []
    records = await asyncio.to_thread(read_range, settings, topic, partition, start, end)
    counters.replayed += len(records)
    return records


# Writes in flight: while one waits (InfluxDB down), the agents stand still and no partition
# may be taken for quiet by the idle timer.
writes_waiting = 0


async def write(points: list) -> None:
    """Blocks this agent (not the event loop) until InfluxDB has the points. Points InfluxDB
    refuses (type conflicts, say) go to the dead-letter topic with its answer."""
    if not points:
        return
    global writes_waiting
    writes_waiting += 1
    started = time.monotonic()
    try:
        await asyncio.to_thread(sink.write, points, "ms")
    except InfluxRejected as err:
        # A partial write keeps the good points: count what InfluxDB says it dropped.
        dropped = len(points) if err.dropped is None else err.dropped
        counters.influx_rejected += dropped
        counters.influx_dead_letters += 1
        log.error("%s (%d of %d points dropped; the batch is dead-lettered)", err, dropped, len(points))
        lines = "\n".join(p if isinstance(p, str) else p.to_line_protocol() for p in points)
        record = {"reason": str(err), "topic": "influxdb", "at": time.time(), "payload": lines[:4096]}
        await deadletter_topic.send(key=b"influxdb", value=json.dumps(record).encode())
    finally:
        writes_waiting -= 1
        if time.monotonic() - started > 1.0:  # the agents stood still, the partitions were not quiet
            for stage in sample_stages.values():
                stage.last_arrival = time.monotonic()


# --- stage 1: samples -> windows ----------------------------------------------------------------

sample_stages: dict[int, SampleStage] = {}


async def emit_closed(closed: ClosedWindow, partition: int) -> None:
    out = window_outputs(closed, partition)
    await write(out.lines)
    for key, value in out.to_detect:
        await windows_topic.send(key=key, value=value)
    for key, value in out.fleet:
        await fleet_topic.send(key=key, value=value)
    await send_marker(out.marker)
    counters.windows_closed += 1


async def send_marker(marker: bytes) -> None:
    """Tell every stage-2 and stage-3 partition that a stage-1 partition is done with the windows
    up to the marker (see PendingWindows); after its results, so each partition sees them first."""
    for topic in (windows_topic, fleet_topic):
        for target in range(settings.topic_partitions):
            await topic.send(key=None, value=marker, partition=target)


def fetched_highwater(topic: str, partition: int) -> int | None:
    """The partition's highwater at the consumer's last fetch; None before the first one."""
    try:
        return app.consumer.highwater(TP(topic, partition))
    except (AssertionError, ConsumerNotStarted):  # revoked meanwhile, or not started
        return None


def caught_up(topic: str, partition: int, next_offset: int) -> bool:
    """Whether a stage expecting `next_offset` has taken every message its partition had at the
    consumer's last fetch. Only then may wall time close its windows or vouch for it with
    heartbeats: a partition whose messages are still to come (a backlog, a rebalance, a table
    recovery) is not quiet, however long nothing has arrived; closing its windows would make
    those messages late."""
    if app.rebalancing or app.in_recovery:
        return False
    highwater = fetched_highwater(topic, partition)
    return highwater is not None and next_offset >= highwater


async def send_heartbeats() -> None:
    """A marker for each samples partition here that has had nothing to window for hold_s (no
    data, or its nodes went quiet): it will emit no window ending before now - hold_s (a later
    sample for one is late there), so it does not hold stages 2 and 3 back forever."""
    hold, now = settings.window_hold_s, time.monotonic()
    for partition, stage in sorted(sample_stages.items()):
        if (not stage.windower.open_windows and now - stage.last_arrival >= hold
                and caught_up(settings.topic_samples, partition, stage.offsets.next)):
            marker = WindowMarker(part=partition, closed_before=time.time() - hold, heartbeat=True)
            await send_marker(marker.model_dump_json().encode())


# A stage is rebuilt by whichever comes first after a restart or a rebalance: the partition's
# next message, or the timer (a partition taken over with nothing new to read gets no message,
# and its open windows would never close; an empty one needs a stage to send heartbeats). The
# lock keeps the two from rebuilding it twice.
stage_locks: dict[tuple[str, int], asyncio.Lock] = collections.defaultdict(asyncio.Lock)


def assigned(topic: str) -> set[int]:
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}


async def group_resume_offsets(topic: str) -> dict[int, int]:
    """Where this worker group resumes each partition of `topic`: its committed offset (the log
    start where there is none)."""
    return await asyncio.to_thread(committed_offsets, settings, settings.worker_app_id, topic)


@dataclass(frozen=True)
class Route:
    """How one input topic's messages reach its stages: one per partition (`stages`), each
    taking messages in offset order (`take`) and knowing the next one it expects
    (`stage.offsets.next`). `build` makes a partition's stage resuming at an offset (from its
    checkpoint where it has one). Shared by the topic's agent and the timer."""

    topic: str
    stages: dict[int, Any]
    build: Callable[[int, int], Awaitable[Any]]
    take: Callable[[Any, Input], Awaitable[None]]


async def stage_for(route: Route, partition: int, resume_offset: int | None = None) -> Any:
    """The partition's stage, built where there is none (its first message since a start or a
    takeover, or the timer) to resume where the group resumes (`resume_offset`, where the caller
    has read it), not at whichever message came first: Faust may have skipped some before it."""
    stage = route.stages.get(partition)
    if stage is not None:
        return stage
    async with stage_locks[(route.topic, partition)]:
        stage = route.stages.get(partition)
        if stage is None:
            if resume_offset is None:
                resume_offset = (await group_resume_offsets(route.topic))[partition]
            stage = await route.build(partition, resume_offset)
            # A rebalance may have taken the partition away while this re-read: a stage for a
            # partition owned elsewhere would write stale windows over the owner's.
            if partition in assigned(route.topic):
                route.stages[partition] = stage
    return stage


async def deliver(route: Route, message: Input) -> None:
    """A message Faust delivered, to its partition's stage; after those Faust skipped before it
    (agents/gaps.py), re-read from Kafka and taken as if Faust had delivered them."""
    stage = await stage_for(route, message.partition)
    expected = stage.offsets.next
    if message.offset > expected:
        counters.input_gaps += 1
        log.warning("%s[%d]: Faust skipped offsets %d..%d; re-reading them from Kafka",
                    message.topic, message.partition, expected, message.offset - 1)
        for offset, raw in await replay(message.topic, message.partition, expected, message.offset):
            await route.take(stage, Input(message.topic, message.partition, offset, raw))
        acknowledge(app.consumer, message.topic, message.partition, expected, message.offset)
    await route.take(stage, message)


async def sample_stage(partition: int, resume_offset: int) -> SampleStage:
    """A stage for this partition, rebuilt from its checkpoint by re-reading up to `resume_offset`
    (emitting the windows that closes); without a checkpoint, a new stage from `resume_offset`
    (`take_sample` checkpoints it first)."""
    stage = SampleStage(settings.window_s, settings.late_grace_s)
    saved = window_checkpoints.get(str(partition))
    if saved:
        stage.restore(saved)
        records = await replay(settings.topic_samples, partition, saved["replay_from"], resume_offset)
        for offset, raw in records:
            stage.add(raw, offset)  # rejects and late ones were dead-lettered the first time
        stage.offsets.next = max(stage.offsets.next, resume_offset)  # none left out (deleted ones included)
        log.info("samples[%d]: rebuilt from its checkpoint, %d messages re-read (offsets %d..%d)",
                 partition, len(records), saved["replay_from"], resume_offset)
        for window in stage.closed():
            await emit_closed(window, partition)
    else:
        stage.offsets.next = resume_offset
        log.info("samples[%d]: no checkpoint, a new stage from offset %d", partition, resume_offset)
    return stage


async def emit_windows(stage: SampleStage, closed: list[ClosedWindow], partition: int) -> None:
    if not closed:
        return
    for window in closed:
        await emit_closed(window, partition)
    window_checkpoints[str(partition)] = stage.checkpoint()


@app.agent(samples_topic)
async def window_samples(stream: faust.StreamT) -> None:
    async for event in stream.events():
        await deliver(routes[settings.topic_samples], Input.of(event))


async def take_sample(stage: SampleStage, message: Input) -> None:
    if str(message.partition) not in window_checkpoints:  # first owner: so a takeover before any window closes replays it all
        window_checkpoints[str(message.partition)] = stage.checkpoint()
    outcome = stage.add(message.value, message.offset)
    if outcome.seen:
        return
    if outcome.rejected or outcome.late:
        reason = outcome.rejected.reason if outcome.rejected else (
            f"late: sample at {outcome.sample.ts:.3f} is older than its window allows "
            f"(watermark {stage.windower.watermark:.3f}, grace {settings.late_grace_s} s)")
        counters.rejected += outcome.rejected is not None
        counters.late += outcome.late
        await dead_letter(message, reason)
        return
    counters.accepted += 1
    await emit_windows(stage, stage.closed(), message.partition)


# --- stage 2: GPU windows -> findings -----------------------------------------------------------

detect_stages: dict[int, DetectStage] = {}


async def publish_findings(findings: list[Finding]) -> None:
    for finding in findings:
        await findings_topic.send(key=finding.fingerprint.encode(), value=finding.model_dump_json().encode())
    await write([finding_point(f) for f in findings])
    counters.findings += len(findings)


def feed_detect(stage: DetectStage, raw: bytes | None, offset: int) -> list[Finding]:
    """A batch of GPU results, or another partition's 'window closed' marker. Raises
    ValueError (ValidationError is one) for anything else, before touching the stage."""
    if raw is None:
        raise ValueError("a message with no value (a tombstone)")
    if raw.startswith(MARKER_PREFIX):
        marker = WindowMarker.model_validate_json(raw)
        return stage.mark(marker.part, marker.closed_before, offset, marker.heartbeat)
    stage.add(parse_results(raw), offset)
    return []


async def detect_stage(partition: int, resume_offset: int) -> DetectStage:
    """As `sample_stage`, for stage 2 (what the re-read releases is published again)."""
    baseline = LowUtilizationBaseline(settings.baseline_util_pct) if settings.baseline_detector else None
    stage = DetectStage(settings.window_s, settings.window_hold_s, settings.topic_partitions, baseline=baseline)
    saved = detect_checkpoints.get(str(partition))
    if saved:
        stage.restore(saved)
        for offset, raw in await replay(settings.topic_windows, partition, saved["replay_from"], resume_offset):
            try:
                await publish_findings(feed_detect(stage, raw, offset))
            except ValueError:
                continue  # dead-lettered the first time
        stage.offsets.next = max(stage.offsets.next, resume_offset)
    else:
        stage.offsets.next = resume_offset
    return stage


@app.agent(windows_topic)
async def detect(stream: faust.StreamT) -> None:
    async for event in stream.events():
        await deliver(routes[settings.topic_windows], Input.of(event))


async def take_window(stage: DetectStage, message: Input) -> None:
    if message.offset < stage.offsets.next:
        return  # taken already: Faust delivered it again
    partition = str(message.partition)
    if partition not in detect_checkpoints:  # first owner: see take_sample
        detect_checkpoints[partition] = stage.checkpoint()
    before = stage.released_before
    try:
        await publish_findings(feed_detect(stage, message.value, message.offset))
    except ValueError as err:
        stage.offsets.saw(message.offset)  # taken: not a gap for the next message
        await reject_stage_message(message, err)
    if stage.released_before > before:
        detect_checkpoints[partition] = stage.checkpoint()


@app.on_partitions_revoked.connect
async def forget_revoked(app: faust.App, revoked: set, **kwargs: Any) -> None:
    """A partition that moves away is rebuilt from its checkpoint if it comes back."""
    for tp in revoked:
        if tp.topic == settings.topic_samples:
            sample_stages.pop(tp.partition, None)
        elif tp.topic == settings.topic_windows:
            detect_stages.pop(tp.partition, None)
        elif tp.topic == settings.topic_fleet:
            fleet_stages.pop(tp.partition, None)  # partial fleet windows are the new owner's to complete


# --- stage 3: partial cluster results -> fleet KPI ----------------------------------------------

fleet_stages: dict[int, FleetStage] = {}
_FLEET_MESSAGE = TypeAdapter(WindowMarker | FleetPartial)


async def fleet_stage(partition: int, resume_offset: int) -> FleetStage:
    """No checkpoint: always a new stage (its partial windows were the previous owner's)."""
    stage = FleetStage(settings.window_s, settings.window_hold_s, settings.topic_partitions)
    stage.offsets.next = resume_offset
    return stage


@app.agent(fleet_topic)
async def fleet_kpi(stream: faust.StreamT) -> None:
    async for event in stream.events():
        await deliver(routes[settings.topic_fleet], Input.of(event))


async def take_fleet(stage: FleetStage, message: Input) -> None:
    if message.offset < stage.offsets.next:
        return  # taken already: Faust delivered it again
    stage.offsets.saw(message.offset)
    try:
        taken = _FLEET_MESSAGE.validate_json(message.value or b"")
    except ValueError as err:
        await reject_stage_message(message, err)
        return
    if isinstance(taken, WindowMarker):
        await write_fleet(stage.mark(taken.part, taken.closed_before, taken.heartbeat))
    else:
        stage.pending(taken.result.labels.cluster).add(taken.result, str(taken.part), 0)


async def write_fleet(released: list[list[WindowResult]]) -> None:
    kpis = [merge_fleet(results) for results in released]
    await write([fleet_point(kpi) for kpi in kpis])
    for kpi in kpis:  # to the alert rules too: threshold rules on scope cluster read these
        await alert_channel.send(value=json.dumps(kpi_window(kpi)).encode(), partition=0)
    counters.fleet_windows += len(released)


# --- timers: close what no new data will close -------------------------------------------------

@app.timer(interval=1.0)
async def close_idle_windows() -> None:
    """Close on wall time what no new data will close (the end of a replay, a quiet partition)."""
    drop_unassigned()
    await rebuild_taken_over()
    await unstick()
    for partition, stage in list(sample_stages.items()) if not writes_waiting else []:
        if caught_up(settings.topic_samples, partition, stage.offsets.next):
            for closed in stage.close_idle(settings.window_hold_s):
                await emit_closed(closed, partition)
    # Copies: a rebalance may add or drop stages while this awaits.
    for partition, stage in list(detect_stages.items()):
        if caught_up(settings.topic_windows, partition, stage.offsets.next):
            await publish_findings(stage.tick())
    for fleet in list(fleet_stages.values()):
        for pending in list(fleet.clusters.values()):
            await write_fleet(pending.tick())
    if not writes_waiting:
        await send_heartbeats()


def drop_unassigned() -> None:
    """Keep stages only for partitions assigned here now: one left from before a rebalance (its
    partition revoked while it was being rebuilt) would write stale windows over the owner's."""
    for topic, stages in ((settings.topic_samples, sample_stages), (settings.topic_windows, detect_stages),
                          (settings.topic_fleet, fleet_stages)):
        owned = assigned(topic)
        for partition in [p for p in stages if p not in owned]:
            del stages[partition]


def taken_over() -> dict[str, list[int]]:
    """Assigned input partitions, by topic, with no stage here (yet): every samples partition,
    and the windows partitions that have a checkpoint."""
    return {
        settings.topic_samples: sorted(assigned(settings.topic_samples) - sample_stages.keys()),
        settings.topic_windows: sorted(p for p in assigned(settings.topic_windows) - detect_stages.keys()
                                       if str(p) in detect_checkpoints),
    }


async def rebuild_taken_over() -> None:
    """Give the partitions of `taken_over` their stage, from their checkpoint if they have one.
    Not while tables recover: a checkpoint read then may be an old one."""
    if app.rebalancing or app.in_recovery:
        return
    for topic, partitions in taken_over().items():
        if partitions:
            resume = await group_resume_offsets(topic)  # one read for all of them
            for partition in partitions:
                await stage_for(routes[topic], partition, resume[partition])


# How long a partition may stand still with input left before `unstick` takes it for one whose
# messages Faust dropped: a partition behind a working agent moves every few milliseconds, and
# Faust commits every few seconds.
stalls = StallWatch(after_s=10.0)
settled: dict[tuple[str, int], int] = {}  # partition -> highwater at which its group commit was found complete


def standing_still(topic: str, partition: int) -> bool:
    """Whether nothing has moved on this input partition for `stalls.after_s` (what its stage
    expects, what Faust read) while it may have input left, for the stage or for the group's
    commit. Faust's own idea of its commit is no guide: it records a commit the broker refused."""
    tp, stage = TP(topic, partition), routes[topic].stages.get(partition)
    progress = (None if stage is None else stage.offsets.next, app.monitor.tp_read_offsets.get(tp))
    if not stalls.stalled((topic, partition), progress):
        return False
    highwater = fetched_highwater(topic, partition)
    return highwater is not None and settled.get((topic, partition)) != highwater


async def unstick() -> None:
    """Put Faust's consumer back on the group's committed offsets where a partition stands still
    with input left (below the highwater for its stage or for the group's commit): Faust dropped
    some of its messages (agents/gaps.py) and nothing shows the hole to `deliver` (they were the
    partition's last, or below what the stage had from its checkpoint), or Faust believes in a
    commit the broker refused. Either way something waits for good. Faust's own `perform_seek`
    (what it does after a recovery) reads the commits and seeks every partition to them; Faust
    then delivers the rest again through the agents, which write their tables and acknowledge
    it the usual way; the stages ignore what they have."""
    if app.rebalancing or app.in_recovery or writes_waiting:
        stalls.forget()
        return
    lagging = []
    for topic, route in routes.items():
        stuck = [partition for partition in sorted(assigned(topic)) if standing_still(topic, partition)]
        if not stuck:
            continue
        try:
            committed = await group_resume_offsets(topic)
        except KafkaError as err:  # the broker is away: nothing moves, nothing to mend yet
            log.warning("cannot read the group's committed offsets of %s: %s", topic, err)
            return
        for partition in stuck:
            stage, highwater = route.stages.get(partition), fetched_highwater(topic, partition)
            resume = min(committed[partition], committed[partition] if stage is None else stage.offsets.next)
            if highwater is None or resume >= highwater:
                settled[(topic, partition)] = highwater
            else:
                lagging.append(f"{topic}[{partition}] (stage at {'none' if stage is None else stage.offsets.next}, "
                               f"group commit {committed[partition]}, highwater {highwater})")
    if lagging:
        counters.input_gaps += len(lagging)
        log.warning("nothing moved for %.0f s with input left on %s: Faust dropped messages or a commit; "
                    "seeking every partition back to the group's commit", stalls.after_s, ", ".join(lagging))
        await app.consumer.perform_seek()


def backlog() -> dict[str, int]:
    """Work this worker still holds: unread input of stages 1-3 (unknown for a partition not
    fetched yet), partitions taken over but not rebuilt yet, windows open in stage 1, windows
    waiting in stages 2 and 3. All zero once everything published has reached InfluxDB."""
    # What the stages have taken, rather than what Faust has committed: Faust's commit can
    # stall behind a message it lost track of in a rebalance, though the stage has it.
    taken = {(topic, p): stage.offsets.next for topic, route in routes.items() for p, stage in route.stages.items()}
    partitions = [tp for tp in input_partitions(app) if tp.topic in routes]
    lags = consumer_lags(app, partitions, taken)
    # While tables recover or partitions move, what this worker will have to rebuild is unknown.
    settling = int(bool(app.rebalancing or app.in_recovery))
    return {"input_lag": sum(lag.lag for lag in lags),
            "unfetched_partitions": sum(fetched_highwater(tp.topic, tp.partition) is None for tp in partitions),
            "stages_to_rebuild": settling + sum(len(waiting) for waiting in taken_over().values()),
            "open_windows": sum(stage.windower.open_windows for stage in sample_stages.values()),
            "pending_windows": sum(len(stage.windows.pending) for stage in detect_stages.values())
            + sum(len(pending.pending) for fleet in fleet_stages.values() for pending in fleet.clusters.values())}


routes = {route.topic: route for route in (
    Route(settings.topic_samples, sample_stages, sample_stage, take_sample),
    Route(settings.topic_windows, detect_stages, detect_stage, take_window),
    Route(settings.topic_fleet, fleet_stages, fleet_stage, take_fleet),
)}


@app.page("/stats")
async def stats(web: Any, request: Any) -> Any:
    return web.json({**counters.__dict__, "influx_points_written": sink.points_written,
                     "influx_write_failures": sink.write_failures, "backlog": backlog()})


metrics_registry = worker_registry(app, counters, sink,
                                   lambda: sum(stage.windower.gpus_tracked for stage in sample_stages.values()))


@app.page("/metrics")
async def metrics(web: Any, request: Any) -> Any:
    return metrics_page(web, metrics_registry)


# Stage 4 (alerting) lives in its own module and registers its agents on this app.
from agents import alerting  # noqa: E402,F401
