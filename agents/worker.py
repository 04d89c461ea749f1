"""The laggard worker: a Faust app built by `build_worker`, run by `laggard worker`; more workers share the partitions.

Agents (the arithmetic is in agents/stages.py and the modules it uses):
- `window_samples`   gpu.samples (keyed by node) -> GPU and node windows to InfluxDB, GPU results
                     re-keyed by job to laggard.windows, partial cluster results to laggard.fleet;
                     bad or late messages to the dead-letter topic with their reason.
- `detect`           laggard.windows (keyed by job) -> findings to laggard.findings and InfluxDB.
- `fleet_kpi`        laggard.fleet (keyed by cluster) -> the fleet KPI to InfluxDB.
- `alert_on_findings` (agents/alerting.py) findings and fleet KPI windows -> alert rules -> webhooks.

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
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import faust
from faust.types import TP
from kafka.errors import KafkaError
from pydantic import TypeAdapter

from laggard.agents.alerting import add_alerting
from laggard.agents.core import Input, WorkerCore, log
from laggard.agents.detectors import LowUtilizationBaseline
from laggard.agents.gaps import StallWatch
from laggard.agents.metrics import consumer_lags, input_partitions, metrics_page, worker_registry
from laggard.agents.outputs import window_outputs
from laggard.agents.points import finding_point, fleet_point
from laggard.agents.stages import (
    MARKER_PREFIX,
    DetectStage,
    FleetPartial,
    FleetStage,
    SampleStage,
    WindowMarker,
    kpi_window,
    merge_fleet,
    parse_results,
)
from laggard.agents.windows import ClosedWindow
from laggard.results import Finding, WindowResult
from laggard.settings import Settings
from laggard.topics import worker_tables

_FLEET_MESSAGE = TypeAdapter(WindowMarker | FleetPartial)
# How long a partition may stand still with input left before `unstick` takes it for one whose
# messages Faust dropped: a partition behind a working agent moves every few milliseconds, and
# Faust commits every few seconds.
STALL_AFTER_S = 10.0


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


class Worker(WorkerCore):
    """One worker: the shared parts (agents/core.py), the stages of each input partition, and
    the rebalance and timer logic around them. `build_worker` makes one and registers its agents,
    timers and web pages on its Faust app."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        app, tables = self.app, worker_tables(settings)  # the tables' changelog topics are created by ensure_topics
        self.window_checkpoints = app.Table("window-checkpoints", default=dict, partitions=tables["window-checkpoints"])
        self.detect_checkpoints = app.Table("detect-checkpoints", default=dict, partitions=tables["detect-checkpoints"])
        self.sample_stages: dict[int, SampleStage] = {}
        self.detect_stages: dict[int, DetectStage] = {}
        self.fleet_stages: dict[int, FleetStage] = {}
        # A stage is rebuilt by whichever comes first after a restart or a rebalance: the
        # partition's next message, or the timer (a partition taken over with nothing new to read
        # gets no message, and its open windows would never close; an empty one needs a stage to
        # send heartbeats). The lock keeps the two from rebuilding it twice.
        self.stage_locks: dict[tuple[str, int], asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.stalls = StallWatch(after_s=STALL_AFTER_S)
        # Until the group first assigns partitions (a join can wait out a departed member's session),
        # what this worker will hold is unknown: its backlog is not empty.
        self.assigned_yet = False
        self.settled: dict[tuple[str, int], int | None] = {}  # partition -> highwater at which its group commit was complete
        self.routes = {route.topic: route for route in (
            Route(settings.topic_samples, self.sample_stages, self.sample_stage, self.take_sample),
            Route(settings.topic_windows, self.detect_stages, self.detect_stage, self.take_window),
            Route(settings.topic_fleet, self.fleet_stages, self.fleet_stage, self.take_fleet),
        )}

    def held_up(self) -> None:
        for stage in self.sample_stages.values():  # the agents stood still: the partitions were not quiet
            stage.last_arrival = time.monotonic()

    def caught_up(self, topic: str, partition: int, next_offset: int) -> bool:
        """Whether a stage expecting `next_offset` has taken every message its partition had at the
        consumer's last fetch. Only then may wall time close its windows or vouch for it with
        heartbeats: a partition whose messages are still to come (a backlog, a rebalance, a table
        recovery) is not quiet, however long nothing has arrived; closing its windows would make
        those messages late."""
        if self.app.rebalancing or self.app.in_recovery:
            return False
        highwater = self.fetched_highwater(topic, partition)
        return highwater is not None and next_offset >= highwater

    def assigned(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}

    async def stage_for(self, route: Route, partition: int, resume_offset: int | None = None) -> Any:
        """The partition's stage, built where there is none (its first message since a start or a
        takeover, or the timer) to resume where the group resumes (`resume_offset`, where the caller
        has read it), not at whichever message came first: Faust may have skipped some before it."""
        stage = route.stages.get(partition)
        if stage is not None:
            return stage
        async with self.stage_locks[(route.topic, partition)]:
            stage = route.stages.get(partition)
            if stage is None:
                if resume_offset is None:
                    resume_offset = (await self.group_resume_offsets(route.topic))[partition]
                stage = await route.build(partition, resume_offset)
                # A rebalance may have taken the partition away while this re-read: a stage for a
                # partition owned elsewhere would write stale windows over the owner's.
                if partition in self.assigned(route.topic):
                    route.stages[partition] = stage
        return stage

    async def deliver(self, topic: str, event: Any) -> None:
        """A message Faust delivered, to its partition's stage; after those Faust skipped before it
        (agents/gaps.py), re-read from Kafka and taken as if Faust had delivered them."""
        route, message = self.routes[topic], Input.of(event)
        stage = await self.stage_for(route, message.partition)
        await self.take_skipped(message, stage.offsets.next, lambda skipped: route.take(stage, skipped))
        await route.take(stage, message)

    # --- stage 1: samples -> windows ------------------------------------------------------------

    async def window_samples(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            await self.deliver(self.settings.topic_samples, event)

    async def sample_stage(self, partition: int, resume_offset: int) -> SampleStage:
        """A stage for this partition, rebuilt from its checkpoint by re-reading up to `resume_offset`
        (emitting the windows that closes); without a checkpoint, a new stage from `resume_offset`
        (`take_sample` checkpoints it first)."""
        settings = self.settings
        stage = SampleStage(settings.window_s, settings.late_grace_s)
        saved = self.window_checkpoints.get(str(partition))
        if saved:
            stage.restore(saved)
            records = await self.replay(settings.topic_samples, partition, saved["replay_from"], resume_offset)
            for offset, raw in records:
                stage.add(raw, offset)  # rejects and late ones were dead-lettered the first time
            stage.offsets.next = max(stage.offsets.next, resume_offset)  # none left out (deleted ones included)
            log.info("samples[%d]: rebuilt from its checkpoint, %d messages re-read (offsets %d..%d)",
                     partition, len(records), saved["replay_from"], resume_offset)
            for window in stage.closed():
                await self.emit_closed(window, partition)
        else:
            stage.offsets.next = resume_offset
            log.info("samples[%d]: no checkpoint, a new stage from offset %d", partition, resume_offset)
        return stage

    async def take_sample(self, stage: SampleStage, message: Input) -> None:
        checkpoints = self.window_checkpoints
        if str(message.partition) not in checkpoints:  # first owner: so a takeover before any window closes replays it all
            checkpoints[str(message.partition)] = stage.checkpoint()
        outcome = stage.add(message.value, message.offset)
        if outcome.seen:
            return
        if outcome.rejected or outcome.late:
            reason = outcome.rejected.reason if outcome.rejected else (
                f"late: sample at {outcome.first_ts:.3f} is older than its window allows "
                f"(watermark {stage.windower.watermark:.3f}, grace {self.settings.late_grace_s} s)")
            self.counters.rejected += outcome.rejected is not None
            self.counters.late += outcome.late
            await self.dead_letter(message, reason)
            return
        self.counters.accepted += 1
        if outcome.late_samples:  # a batch reaching back into a closed window: the rest was taken
            self.counters.late_in_part += 1
            self.counters.late_gpu_samples += outcome.late_samples
            await self.dead_letter(message, f"late in part: {outcome.late_samples} GPU samples from "
                                   f"{outcome.first_ts:.3f} on are older than their window allows (watermark "
                                   f"{stage.windower.watermark:.3f}); the batch's other samples were taken")
        closed = stage.closed()
        if closed:
            for window in closed:
                await self.emit_closed(window, message.partition)
            checkpoints[str(message.partition)] = stage.checkpoint()

    async def emit_closed(self, closed: ClosedWindow, partition: int) -> None:
        out = window_outputs(closed, partition)
        await self.write(out.lines)
        for key, value in out.to_detect:
            await self.windows_topic.send(key=key, value=value)
        for key, value in out.fleet:
            await self.fleet_topic.send(key=key, value=value)
        await self.send_marker(out.marker)
        self.counters.windows_closed += 1

    async def send_marker(self, marker: bytes) -> None:
        """Tell every stage-2 and stage-3 partition that a stage-1 partition is done with the windows
        up to the marker (see PendingWindows); after its results, so each partition sees them first."""
        for topic in (self.windows_topic, self.fleet_topic):
            for target in range(self.settings.topic_partitions):
                await topic.send(key=None, value=marker, partition=target)

    async def send_heartbeats(self) -> None:
        """A marker for each samples partition here that has had nothing to window for hold_s (no
        data, or its nodes went quiet): it will emit no window ending before now - hold_s (a later
        sample for one is late there), so it does not hold stages 2 and 3 back forever."""
        hold, now = self.settings.window_hold_s, time.monotonic()
        for partition, stage in sorted(self.sample_stages.items()):
            if (not stage.windower.open_windows and now - stage.last_arrival >= hold
                    and self.caught_up(self.settings.topic_samples, partition, stage.offsets.next)):
                marker = WindowMarker(part=partition, closed_before=time.time() - hold, heartbeat=True)
                await self.send_marker(marker.model_dump_json().encode())

    # --- stage 2: GPU windows -> findings -------------------------------------------------------

    async def detect(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            await self.deliver(self.settings.topic_windows, event)

    async def publish_judged(self, stage: DetectStage, findings: list[Finding]) -> None:
        """What judging windows gave: the findings that fired or resolved (to the findings topic and
        InfluxDB), and a point for each finding going on in each window, so dashboards show what is
        active in any time range; one InfluxDB write for both."""
        for finding in findings:
            await self.findings_topic.send(key=finding.fingerprint.encode(), value=finding.model_dump_json().encode())
        await self.write([finding_point(f) for f in findings]
                         + [finding_point(f, "finding_active") for f in stage.take_active()])
        self.counters.findings += len(findings)

    async def detect_stage(self, partition: int, resume_offset: int) -> DetectStage:
        """As `sample_stage`, for stage 2 (what the re-read releases is published again)."""
        settings = self.settings
        baseline = LowUtilizationBaseline(settings.baseline_util_pct) if settings.baseline_detector else None
        stage = DetectStage(settings.window_s, settings.window_hold_s, settings.topic_partitions, baseline=baseline)
        saved = self.detect_checkpoints.get(str(partition))
        if saved:
            stage.restore(saved)
            for offset, raw in await self.replay(settings.topic_windows, partition, saved["replay_from"], resume_offset):
                try:
                    await self.publish_judged(stage, feed_detect(stage, raw, offset))
                except ValueError:
                    continue  # dead-lettered the first time
            stage.offsets.next = max(stage.offsets.next, resume_offset)
        else:
            stage.offsets.next = resume_offset
        return stage

    async def take_window(self, stage: DetectStage, message: Input) -> None:
        if message.offset < stage.offsets.next:
            return  # taken already: Faust delivered it again
        partition = str(message.partition)
        if partition not in self.detect_checkpoints:  # first owner: see take_sample
            self.detect_checkpoints[partition] = stage.checkpoint()
        before = stage.released_before
        try:
            await self.publish_judged(stage, feed_detect(stage, message.value, message.offset))
        except ValueError as err:
            stage.offsets.saw(message.offset)  # taken: not a gap for the next message
            await self.reject_stage_message(message, err)
        if stage.released_before > before:
            self.detect_checkpoints[partition] = stage.checkpoint()

    # --- stage 3: partial cluster results -> fleet KPI ------------------------------------------

    async def fleet_kpi(self, stream: faust.StreamT) -> None:
        async for event in stream.events():
            await self.deliver(self.settings.topic_fleet, event)

    async def fleet_stage(self, partition: int, resume_offset: int) -> FleetStage:
        """No checkpoint: always a new stage (its partial windows were the previous owner's)."""
        settings = self.settings
        stage = FleetStage(settings.window_s, settings.window_hold_s, settings.topic_partitions)
        stage.offsets.next = resume_offset
        return stage

    async def take_fleet(self, stage: FleetStage, message: Input) -> None:
        if message.offset < stage.offsets.next:
            return  # taken already: Faust delivered it again
        stage.offsets.saw(message.offset)
        try:
            taken = _FLEET_MESSAGE.validate_json(message.value or b"")
        except ValueError as err:
            await self.reject_stage_message(message, err)
            return
        if isinstance(taken, WindowMarker):
            await self.write_fleet(stage.mark(taken.part, taken.closed_before, taken.heartbeat))
        else:
            stage.pending(taken.result.labels.cluster).add(taken.result, str(taken.part), 0)

    async def write_fleet(self, released: list[list[WindowResult]]) -> None:
        kpis = [merge_fleet(results) for results in released]
        await self.write([fleet_point(kpi) for kpi in kpis])
        for kpi in kpis:  # to the alert rules too: threshold rules on scope cluster read these
            await self.alert_channel.send(value=json.dumps(kpi_window(kpi)).encode(), partition=0)
        self.counters.fleet_windows += len(released)

    # --- rebalances and timers ------------------------------------------------------------------

    async def note_assigned(self, app: faust.App, assigned: set, **kwargs: Any) -> None:
        self.assigned_yet = True

    async def forget_revoked(self, app: faust.App, revoked: set, **kwargs: Any) -> None:
        """A partition that moves away is rebuilt from its checkpoint if it comes back; partial
        fleet windows are the new owner's to complete."""
        for tp in revoked:
            route = self.routes.get(tp.topic)
            if route is not None:
                route.stages.pop(tp.partition, None)

    async def close_idle_windows(self) -> None:
        """Close on wall time what no new data will close (the end of a replay, a quiet partition)."""
        settings = self.settings
        self.drop_unassigned()
        await self.rebuild_taken_over()
        await self.unstick()
        for topic, route in self.routes.items():
            for partition, waiting in list(route.stages.items()):
                if not self.fetched_lately(topic, partition):
                    # Quiet counts only while the broker answers: what a collector buffered while it
                    # was away is still to come.
                    waiting.hold()
        for partition, stage in list(self.sample_stages.items()) if not self.writes_waiting else []:
            if self.caught_up(settings.topic_samples, partition, stage.offsets.next):
                for closed in stage.close_idle(settings.window_hold_s):
                    await self.emit_closed(closed, partition)
        # Copies: a rebalance may add or drop stages while this awaits.
        for partition, stage in list(self.detect_stages.items()):
            if self.caught_up(settings.topic_windows, partition, stage.offsets.next):
                await self.publish_judged(stage, stage.tick())
        for fleet in list(self.fleet_stages.values()):
            for pending in list(fleet.clusters.values()):
                await self.write_fleet(pending.tick())
        if not self.writes_waiting:
            await self.send_heartbeats()

    def drop_unassigned(self) -> None:
        """Keep stages only for partitions assigned here now: one left from before a rebalance (its
        partition revoked while it was being rebuilt) would write stale windows over the owner's."""
        for topic, route in self.routes.items():
            owned = self.assigned(topic)
            for partition in [p for p in route.stages if p not in owned]:
                del route.stages[partition]

    def taken_over(self) -> dict[str, list[int]]:
        """Assigned input partitions, by topic, with no stage here (yet): every samples partition,
        and the windows partitions that have a checkpoint."""
        settings = self.settings
        return {
            settings.topic_samples: sorted(self.assigned(settings.topic_samples) - self.sample_stages.keys()),
            settings.topic_windows: sorted(p for p in self.assigned(settings.topic_windows) - self.detect_stages.keys()
                                           if str(p) in self.detect_checkpoints),
        }

    async def rebuild_taken_over(self) -> None:
        """Give the partitions of `taken_over` their stage, from their checkpoint if they have one.
        Not while tables recover: a checkpoint read then may be an old one."""
        if self.app.rebalancing or self.app.in_recovery:
            return
        for topic, partitions in self.taken_over().items():
            if partitions:
                resume = await self.group_resume_offsets(topic)  # one read for all of them
                for partition in partitions:
                    await self.stage_for(self.routes[topic], partition, resume[partition])

    def standing_still(self, topic: str, partition: int) -> bool:
        """Whether nothing has moved on this input partition for `STALL_AFTER_S` (what its stage
        expects, what Faust read) while it may have input left, for the stage or for the group's
        commit. Faust's own idea of its commit is no guide: it records a commit the broker refused."""
        tp, stage = TP(topic, partition), self.routes[topic].stages.get(partition)
        progress = (None if stage is None else stage.offsets.next, self.app.monitor.tp_read_offsets.get(tp))
        if not self.stalls.stalled((topic, partition), progress):
            return False
        highwater = self.fetched_highwater(topic, partition)
        return highwater is not None and self.settled.get((topic, partition)) != highwater

    async def unstick(self) -> None:
        """Put Faust's consumer back on the group's committed offsets where a partition stands still
        with input left (below the highwater for its stage or for the group's commit): Faust dropped
        some of its messages (agents/gaps.py) and nothing shows the hole to `deliver` (they were the
        partition's last, or below what the stage had from its checkpoint), or Faust believes in a
        commit the broker refused. Either way something waits for good. Faust's own `perform_seek`
        (what it does after a recovery) reads the commits and seeks every partition to them; Faust
        then delivers the rest again through the agents, which write their tables and acknowledge
        it the usual way; the stages ignore what they have."""
        if self.app.rebalancing or self.app.in_recovery or self.writes_waiting:
            self.stalls.forget()
            return
        lagging = []
        for topic, route in self.routes.items():
            stuck = [partition for partition in sorted(self.assigned(topic)) if self.standing_still(topic, partition)]
            if not stuck:
                continue
            try:
                committed = await self.group_resume_offsets(topic)
            except KafkaError as err:  # the broker is away: nothing moves, nothing to mend yet
                log.warning("cannot read the group's committed offsets of %s: %s", topic, err)
                return
            for partition in stuck:
                stage, highwater = route.stages.get(partition), self.fetched_highwater(topic, partition)
                resume = min(committed[partition], committed[partition] if stage is None else stage.offsets.next)
                if highwater is None or resume >= highwater:
                    self.settled[(topic, partition)] = highwater
                else:
                    lagging.append(f"{topic}[{partition}] (stage at {'none' if stage is None else stage.offsets.next}, "
                                   f"group commit {committed[partition]}, highwater {highwater})")
        if lagging:
            self.counters.input_gaps += len(lagging)
            log.warning("nothing moved for %.0f s with input left on %s: Faust dropped messages or a commit; "
                        "seeking every partition back to the group's commit", STALL_AFTER_S, ", ".join(lagging))
            await self.app.consumer.perform_seek()

    # --- what the worker reports ----------------------------------------------------------------

    def backlog(self) -> dict[str, int]:
        """Work this worker still holds: unread input of stages 1-3 (unknown for a partition not
        fetched yet), partitions taken over but not rebuilt yet, windows open in stage 1, windows
        waiting in stages 2 and 3. All zero once everything published has reached InfluxDB."""
        app = self.app
        # What the stages have taken, rather than what Faust has committed: Faust's commit can
        # stall behind a message it lost track of in a rebalance, though the stage has it.
        taken = {(topic, p): stage.offsets.next for topic, route in self.routes.items()
                 for p, stage in route.stages.items()}
        partitions = [tp for tp in input_partitions(app) if tp.topic in self.routes]
        lags = consumer_lags(app, partitions, taken)
        # While tables recover, partitions move or none were assigned yet, what this worker will have
        # to rebuild is unknown.
        settling = int(bool(app.rebalancing or app.in_recovery or not self.assigned_yet))
        return {"input_lag": sum(lag.lag for lag in lags),
                "unfetched_partitions": sum(self.fetched_highwater(tp.topic, tp.partition) is None
                                            for tp in partitions),
                "stages_to_rebuild": settling + sum(len(waiting) for waiting in self.taken_over().values()),
                "open_windows": sum(stage.windower.open_windows for stage in self.sample_stages.values()),
                "pending_windows": sum(len(stage.windows.pending) for stage in self.detect_stages.values())
                + sum(len(pending.pending) for fleet in self.fleet_stages.values()
                      for pending in fleet.clusters.values())}

    def stats(self) -> dict[str, Any]:
        return {**self.counters.__dict__, "influx_points_written": self.sink.points_written,
                "influx_write_failures": self.sink.write_failures, "backlog": self.backlog()}

    def health(self) -> list[str]:
        """What keeps this worker from doing its job now; empty when it is healthy (/healthz)."""
        problems = []
        if self.app.stopping.is_set():
            problems.append("stopping")
        if (since := self.sink.unavailable_since) is not None:
            problems.append(f"InfluxDB unavailable for {time.time() - since:.0f} s: results wait in Kafka")
        assigned = list(self.app.assignor.assigned_actives())
        if assigned and not any(self.fetched_lately(tp.topic, tp.partition) for tp in assigned):
            problems.append("the Kafka broker has answered no fetch lately")
        return problems

    def gpus_tracked(self) -> int:
        return sum(stage.windower.gpus_tracked for stage in self.sample_stages.values())


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


def build_worker(settings: Settings) -> Worker:
    """The worker for `settings`: its agents, timers and pages registered on its Faust app
    (`worker.app.main()` runs it), the alerting stage (agents/alerting.py) among them."""
    worker = Worker(settings)
    app = worker.app
    app.agent(worker.samples_topic, name="window_samples")(worker.window_samples)
    app.agent(worker.windows_topic, name="detect")(worker.detect)
    app.agent(worker.fleet_topic, name="fleet_kpi")(worker.fleet_kpi)
    app.on_partitions_revoked.connect(worker.forget_revoked)
    app.on_partitions_assigned.connect(worker.note_assigned)
    app.timer(interval=1.0, name="close_idle_windows")(worker.close_idle_windows)
    add_alerting(worker)
    registry = worker_registry(app, worker.counters, worker.sink, worker.gpus_tracked)

    @app.page("/stats")
    async def stats(web: Any, request: Any) -> Any:
        return web.json(worker.stats())

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        return metrics_page(web, registry)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        problems = worker.health()
        return web.json({"status": "unhealthy" if problems else "ok", "problems": problems},
                        status=503 if problems else 200)

    return worker
