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
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import faust

from agents.detectors import LowUtilizationBaseline
from agents.findings import Finding, WindowResult
from agents.metrics import consumer_lags, input_partitions, metrics_page, worker_registry
from agents.points import finding_point, fleet_point, window_line
from agents.sink import InfluxRejected, InfluxSink
from agents.stages import (
    MARKER_PREFIX, DetectStage, PendingWindows, SampleStage, detect_key, merge_fleet, parse_results, results_json,
)
from agents.windows import ClosedWindow
from laggard.settings import get_settings
from laggard.topics import committed_offsets, read_range, worker_tables

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
app = faust.App(
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
    influx_rejected: int = 0
    windows_closed: int = 0
    findings: int = 0
    fleet_windows: int = 0
    notifications: int = 0
    notifications_failed: int = 0
    rules_reload_failures: int = 0


counters = Counters()


async def dead_letter(raw: bytes | None, reason: str, event: Any) -> None:
    message = event.message
    record = {"reason": reason, "topic": message.topic, "partition": message.partition, "offset": message.offset,
              "at": time.time(), "payload": (raw or b"")[:4096].decode("utf-8", "replace")}
    await deadletter_topic.send(key=message.topic.encode(), value=json.dumps(record).encode())


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
        counters.influx_rejected += len(points)
        log.error("%s (%d points dead-lettered)", err, len(points))
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
    gpu_results = closed.gpu_results()
    rollups = closed.rollup_results()
    await write([window_line(r) for r in gpu_results] + [window_line(r) for r in rollups if r.scope == "node"])
    # One message per job (or unallocated node) and window: all its ranks from this partition.
    by_key: dict[str, list[WindowResult]] = {}
    for result in gpu_results:
        by_key.setdefault(detect_key(result), []).append(result)
    for key, results in by_key.items():
        await windows_topic.send(key=key.encode(), value=results_json(results))
    # Tell every stage-2 partition this partition is done with the window (see PendingWindows).
    marker = json.dumps({"part": partition, "closed_before": closed.window_end}).encode()
    for target in range(settings.topic_partitions):
        await windows_topic.send(key=None, value=marker, partition=target)
    for result in rollups:
        if result.scope == "cluster":
            partial = {"part": partition, "result": result.model_dump(mode="json")}
            await fleet_topic.send(key=result.labels.cluster.encode(), value=json.dumps(partial).encode())
    counters.windows_closed += 1


# A stage is rebuilt by whichever comes first after a restart or a rebalance: the partition's
# next message, or the timer (a partition taken over with nothing new to read gets no message,
# and its open windows would never close). The lock keeps the two from rebuilding it twice.
stage_locks: dict[tuple[str, int], asyncio.Lock] = collections.defaultdict(asyncio.Lock)


async def sample_stage(partition: int, resume_offset: int) -> tuple[SampleStage, list[ClosedWindow]]:
    """This partition's stage, rebuilt from its checkpoint by re-reading up to `resume_offset`
    (where Faust's stream resumes) when this worker has none; with the windows that closed."""
    async with stage_locks[("samples", partition)]:
        stage = sample_stages.get(partition)
        if stage is not None:
            return stage, []
        stage = SampleStage(settings.window_s, settings.late_grace_s)
        saved = window_checkpoints.get(str(partition))
        if saved:
            stage.restore(saved)
            for offset, raw in await replay(settings.topic_samples, partition, saved["replay_from"], resume_offset):
                stage.add(raw, offset)  # rejects and late ones were dead-lettered the first time
        else:  # first owner: a checkpoint from the start, so a takeover before any window closes replays it all
            stage.offsets.next = resume_offset
            window_checkpoints[str(partition)] = stage.checkpoint()
        sample_stages[partition] = stage
        return stage, stage.closed()


async def emit_windows(stage: SampleStage, closed: list[ClosedWindow], partition: int) -> None:
    if not closed:
        return
    for window in closed:
        await emit_closed(window, partition)
    window_checkpoints[str(partition)] = stage.checkpoint()


@app.agent(samples_topic)
async def window_samples(stream: faust.StreamT) -> None:
    async for event in stream.events():
        stage = sample_stages.get(event.message.partition)
        if stage is None:  # first message here since start or takeover: rebuild from the checkpoint
            stage, closed = await sample_stage(event.message.partition, event.message.offset)
            await emit_windows(stage, closed, event.message.partition)
        raw = event.value
        outcome = stage.add(raw, event.message.offset)
        if outcome.seen:
            continue
        if outcome.rejected or outcome.late:
            reason = outcome.rejected.reason if outcome.rejected else (
                f"late: sample at {outcome.sample.ts:.3f} is older than its window allows "
                f"(watermark {stage.windower.watermark:.3f}, grace {settings.late_grace_s} s)")
            counters.rejected += outcome.rejected is not None
            counters.late += outcome.late
            await dead_letter(raw, reason, event)
            continue
        counters.accepted += 1
        await emit_windows(stage, stage.closed(), event.message.partition)


# --- stage 2: GPU windows -> findings -----------------------------------------------------------

detect_stages: dict[int, DetectStage] = {}


async def publish_findings(findings: list[Finding]) -> None:
    for finding in findings:
        await findings_topic.send(key=finding.fingerprint.encode(), value=finding.model_dump_json().encode())
    await write([finding_point(f) for f in findings])
    counters.findings += len(findings)


def feed_detect(stage: DetectStage, raw: bytes, offset: int) -> list[Finding]:
    """A batch of GPU results, or another partition's 'window closed' marker."""
    if raw.startswith(MARKER_PREFIX):
        marker = json.loads(raw)
        return stage.mark(marker["part"], marker["closed_before"], offset)
    stage.add(parse_results(raw), offset)
    return []


async def detect_stage(partition: int, resume_offset: int) -> DetectStage:
    async with stage_locks[("windows", partition)]:
        stage = detect_stages.get(partition)
        if stage is not None:
            return stage
        baseline = LowUtilizationBaseline(settings.baseline_util_pct) if settings.baseline_detector else None
        stage = DetectStage(settings.window_s, settings.window_hold_s, settings.topic_partitions, baseline=baseline)
        saved = detect_checkpoints.get(str(partition))
        if saved:
            stage.restore(saved)
            for offset, raw in await replay(settings.topic_windows, partition, saved["replay_from"], resume_offset):
                await publish_findings(feed_detect(stage, raw, offset))
        else:  # first owner: see sample_stage
            stage.windows.offsets.next = resume_offset
            detect_checkpoints[str(partition)] = stage.checkpoint()
        detect_stages[partition] = stage
        return stage


@app.agent(windows_topic)
async def detect(stream: faust.StreamT) -> None:
    async for event in stream.events():
        stage = detect_stages.get(event.message.partition) or await detect_stage(
            event.message.partition, event.message.offset)
        before = stage.released_before
        await publish_findings(feed_detect(stage, event.value, event.message.offset))
        if stage.released_before > before:
            detect_checkpoints[str(event.message.partition)] = stage.checkpoint()


@app.on_partitions_revoked.connect
async def forget_revoked(app: faust.App, revoked: set, **kwargs: Any) -> None:
    """A partition that moves away is rebuilt from its checkpoint if it comes back."""
    for tp in revoked:
        if tp.topic == settings.topic_samples:
            sample_stages.pop(tp.partition, None)
        elif tp.topic == settings.topic_windows:
            detect_stages.pop(tp.partition, None)
        elif tp.topic == settings.topic_fleet:
            fleet_pending.clear()  # partial fleet windows are the new owner's to complete


# --- stage 3: partial cluster results -> fleet KPI ----------------------------------------------

fleet_pending: dict[str, PendingWindows] = {}


@app.agent(fleet_topic)
async def fleet_kpi(stream: faust.StreamT) -> None:
    async for raw in stream:
        partial = json.loads(raw)
        result = WindowResult.model_validate(partial["result"])
        pending = fleet_pending.get(result.labels.cluster)
        if pending is None:
            pending = fleet_pending[result.labels.cluster] = PendingWindows(
                settings.window_s, settings.window_hold_s, settings.topic_partitions)
        pending.add(result, str(partial["part"]), 0)
        await write_fleet(pending.mark(partial["part"], result.window_end, 0))


async def write_fleet(released: list[list[WindowResult]]) -> None:
    await write([fleet_point(merge_fleet(results)) for results in released])
    counters.fleet_windows += len(released)


# --- timers: close what no new data will close -------------------------------------------------

@app.timer(interval=1.0)
async def close_idle_windows() -> None:
    """Close on wall time what no new data will close (the end of a replay, a quiet partition)."""
    await rebuild_taken_over()
    for partition, stage in list(sample_stages.items()) if not writes_waiting else []:
        for closed in stage.close_idle(settings.window_hold_s):
            await emit_closed(closed, partition)
    # Copies: a rebalance may add or drop stages while this awaits.
    for stage in list(detect_stages.values()):
        await publish_findings(stage.tick())
    for pending in list(fleet_pending.values()):
        await write_fleet(pending.tick())


def taken_over() -> dict[str, list[int]]:
    """Assigned input partitions, by topic, that have a checkpoint but no stage here (yet)."""
    assigned = app.assignor.assigned_actives()
    return {
        topic: [tp.partition for tp in assigned if tp.topic == topic and tp.partition not in stages
                and str(tp.partition) in checkpoints]
        for topic, stages, checkpoints in ((settings.topic_samples, sample_stages, window_checkpoints),
                                           (settings.topic_windows, detect_stages, detect_checkpoints))
    }


async def rebuild_taken_over() -> None:
    """Rebuild the stages of assigned partitions that have a checkpoint but no stage here."""
    for topic, partitions in taken_over().items():
        if not partitions:
            continue
        committed = await asyncio.to_thread(committed_offsets, settings, settings.worker_app_id, topic)
        for partition in partitions:
            if topic == settings.topic_samples:
                _stage, closed = await sample_stage(partition, committed[partition])
                for window in closed:
                    await emit_closed(window, partition)
            else:
                await detect_stage(partition, committed[partition])


def backlog() -> dict[str, int]:
    """Work this worker still holds: unread input of stages 1-3, partitions taken over but not
    rebuilt yet, windows open in stage 1, windows waiting in stages 2 and 3. All zero once
    everything published has reached InfluxDB."""
    stage_topics = {settings.topic_samples, settings.topic_windows, settings.topic_fleet}
    lags = consumer_lags(app, [tp for tp in input_partitions(app) if tp.topic in stage_topics])
    # While tables recover or partitions move, what this worker will have to rebuild is unknown.
    settling = int(bool(app.rebalancing or app.in_recovery))
    return {"input_lag": sum(lag.lag for lag in lags),
            "stages_to_rebuild": settling + sum(len(partitions) for partitions in taken_over().values()),
            "open_windows": sum(stage.windower.open_windows for stage in sample_stages.values()),
            "pending_windows": sum(len(stage.windows.pending) for stage in detect_stages.values())
            + sum(len(pending.pending) for pending in fleet_pending.values())}


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
