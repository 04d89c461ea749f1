"""The worker's three stages as plain classes (no Faust): the agents in agents/worker.py feed them.

1. `SampleStage` (input partitioned by node): decode, reject, window per GPU. Closed windows give
   GPU and node results (complete: a node lives in one partition), and a partial cluster result.
2. `DetectStage` (GPU results re-keyed by job, or node when unallocated): all ranks of a job meet
   in one partition; a window is judged once every stage-1 partition has marked it closed (a
   marker goes to every stage-2 partition) or, on the timer, once it has waited `hold_s`.
3. `FleetStage` (partial cluster results keyed by cluster, one per input partition): the fleet KPI.
Every stage keeps its state per input partition, so a replay after a crash or a rebalance
produces the same results with the same ids (idempotent writes downstream).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from laggard.agents.detectors import FleetDetector, LowUtilizationBaseline
from laggard.agents.windows import MAX_AHEAD_S, ClosedWindow, Windower
from laggard.batches import NodeBatch, decode_event
from laggard.events import EventRejected, NodeSample, shown
from laggard.results import FLEET_METRICS, Finding, WindowResult


@dataclass
class Rejected:
    reason: str
    raw: bytes


@dataclass
class SampleOutcome:
    sample: NodeSample | NodeBatch | None = None
    rejected: Rejected | None = None
    late: bool = False  # every GPU sample of the message came after its window closed
    late_samples: int = 0  # GPU samples that did (a batch can be late in part)
    seen: bool = False  # already taken before a restart: nothing to do, nothing to count

    @property
    def first_ts(self) -> float:
        sample = self.sample
        return sample.ts[0] if isinstance(sample, NodeBatch) else sample.ts if sample is not None else float("nan")


@dataclass
class InputOffsets:
    """The lowest input offset feeding each open window: where a restarted worker re-reads from
    to rebuild what it had in memory (see agents/worker.py, checkpoints). With `keep_last_closed`,
    from the last closed window's instead: its samples come back as already emitted, but they are
    each GPU's previous sample, which the first interval of the open window's energy is measured from."""

    first: dict[float, int] = field(default_factory=dict)
    next: int = 0
    keep_last_closed: bool = False
    last_closed: int | None = None

    def saw(self, offset: int) -> None:
        self.next = max(self.next, offset + 1)

    def feeds(self, window_start: float, offset: int) -> None:
        """The message at `offset` (already `saw`) went into the window starting at `window_start`."""
        self.first.setdefault(window_start, offset)

    def done_before(self, window_end: float) -> None:
        done = sorted(s for s in self.first if s < window_end)
        if done and self.keep_last_closed:
            self.last_closed = self.first[done[-1]]
        for start in done:
            del self.first[start]

    def replay_from(self) -> int:
        kept = [self.last_closed] if self.last_closed is not None else []
        return min([*self.first.values(), *kept], default=self.next)


class SampleStage:
    def __init__(self, window_s: float, grace_s: float, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.windower = Windower(window_s, grace_s, clock=clock)
        self.offsets = InputOffsets(keep_last_closed=True)
        self.taken_before = -1  # offsets below this were taken before the restart
        self.last_arrival = time.monotonic()

    def checkpoint(self) -> dict:
        return {**self.windower.checkpoint(), "replay_from": self.offsets.replay_from(), "next": self.offsets.next}

    def restore(self, state: dict) -> None:
        self.windower.restore(state)
        self.offsets.next = state["replay_from"]
        self.taken_before = state.get("next", state["replay_from"])  # checkpoints before 'next' existed

    def add(self, raw: bytes | None, offset: int) -> SampleOutcome:
        """Take one message. After a restart, messages taken before it come again (re-read from
        the checkpoint, or redelivered past Faust's last commit): those whose window was already
        emitted are `seen`, and rejects among them were dead-lettered the first time. So is a
        message below `offsets.next`: this stage has taken it already (Faust can deliver a message
        again around a rebalance, or after `unstick` seeks back to a commit stalled by a broker
        outage), and taking it twice would count its samples twice. Nor is it news: it must not
        keep `close_idle` from closing the partition's last windows."""
        if offset < self.offsets.next:
            return SampleOutcome(seen=True)
        self.last_arrival = time.monotonic()
        self.offsets.saw(offset)
        retaken = offset < self.taken_before
        try:
            sample = self.on_clock(decode_event(raw))
        except EventRejected as err:
            if retaken:
                return SampleOutcome(seen=True)
            return SampleOutcome(rejected=Rejected(err.reason, raw))
        if isinstance(sample, NodeBatch):
            fed, late = self.windower.add_batch(sample)
            for start in fed:
                self.offsets.feeds(start, offset)
            if not fed:
                return SampleOutcome(sample=sample, seen=retaken, late=not retaken, late_samples=late)
            return SampleOutcome(sample=sample, late_samples=0 if retaken else late)
        if not self.windower.add(sample):
            return SampleOutcome(sample=sample, seen=retaken, late=not retaken, late_samples=len(sample.gpus))
        self.offsets.feeds(self.windower.window_start(sample.ts), offset)
        return SampleOutcome(sample=sample)

    def hold(self) -> None:
        """Restart the quiet clock of `close_idle`: nothing arrived because nothing could."""
        self.last_arrival = time.monotonic()

    def on_clock(self, sample: NodeSample | NodeBatch) -> NodeSample | NodeBatch:
        """Refuse a sample stamped more than MAX_AHEAD_S ahead of this worker's clock: its window
        would stay open until wall time got there, and with it the offset a restart re-reads from."""
        ts = sample.ts[-1] if isinstance(sample, NodeBatch) else sample.ts
        ahead = ts - self.clock()
        if ahead > MAX_AHEAD_S:
            raise EventRejected(f"ts = {ts!r}: stamped {ahead:.0f} s ahead of the worker's clock (at most "
                                f"{MAX_AHEAD_S:.0f} s accepted): the clock of node {shown(sample.node)} is wrong")
        return sample

    def _done(self, windows: list[ClosedWindow]) -> list[ClosedWindow]:
        if windows:
            self.offsets.done_before(windows[-1].window_end)
        return windows

    def closed(self) -> list[ClosedWindow]:
        return self._done(self.windower.pop_closed())

    def close_idle(self, hold_s: float, now: float | None = None) -> list[ClosedWindow]:
        """Close every open window once no sample has arrived for `hold_s` of wall time: event
        time alone never closes the last windows of a partition that went quiet."""
        now = time.monotonic() if now is None else now
        if now - self.last_arrival < hold_s:
            return []
        return self._done(self.windower.flush())


_RESULTS = TypeAdapter(list[WindowResult])
# Stage-1 -> stage-2 messages: a JSON list of GPU results, or a WindowMarker object.
MARKER_PREFIX = b'{"part"'


class WindowMarker(BaseModel):
    """Stage-1 partition `part` has emitted every window ending at or before `closed_before`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    part: int = Field(ge=0)
    closed_before: float
    heartbeat: bool = False  # from a partition with nothing to window: not activity (see PendingWindows.tick)


class FleetPartial(BaseModel):
    """One stage-1 partition's share of a cluster's window, for stage 3."""

    model_config = ConfigDict(extra="forbid")
    part: int = Field(ge=0)
    result: WindowResult


def results_json(results: list[WindowResult]) -> bytes:
    return _RESULTS.dump_json(results)


def parse_results(raw: bytes) -> list[WindowResult]:
    return _RESULTS.validate_json(raw)


@dataclass
class PendingWindows:
    """Results gathered per window until the window is complete; each window is released once.

    Complete = every one of the `parts` upstream partitions has said it closed the window
    (`mark`), or nothing has arrived for `hold_s` of wall time. An upstream partition that carries
    no data says so with heartbeat marks (agents/worker.py), so it does not hold the others back; a
    slow one still sends, so it is waited for (a backlog drains partitions at different speeds).
    """

    window_s: float
    hold_s: float
    parts: int
    pending: dict[float, dict[str, WindowResult]] = field(default_factory=dict)
    last_arrival: float = field(default_factory=time.monotonic)
    closed_before: dict[int, float] = field(default_factory=dict)  # upstream partition -> watermark
    released_before: float = float("-inf")
    offsets: InputOffsets = field(default_factory=InputOffsets)
    duplicates: int = 0
    too_late: int = 0

    def checkpoint(self) -> dict:
        return {"closed_before": {str(p): t for p, t in self.closed_before.items()},
                "released_before": None if self.released_before == float("-inf") else self.released_before,
                "replay_from": self.offsets.replay_from()}

    def restore(self, state: dict) -> None:
        self.closed_before = {int(p): t for p, t in state["closed_before"].items()}
        if state["released_before"] is not None:
            self.released_before = state["released_before"]
        self.offsets.next = state["replay_from"]

    def add(self, result: WindowResult, key: str, offset: int, now: float | None = None) -> None:
        start = result.window_start
        self.offsets.saw(offset)
        if start < self.released_before:
            self.too_late += 1
            return
        self.offsets.feeds(start, offset)
        window = self.pending.setdefault(start, {})
        if key in window:  # at-least-once delivery repeats a result: same key, same content
            self.duplicates += 1
        window[key] = result
        self.last_arrival = time.monotonic() if now is None else now

    def mark(self, part: int, closed_before: float, offset: int, heartbeat: bool = False) -> list[list[WindowResult]]:
        """Upstream partition `part` has emitted every window ending at or before `closed_before`."""
        if not heartbeat:  # heartbeats come on while all is quiet: they must not stop `tick` flushing
            self.last_arrival = time.monotonic()
        self.offsets.saw(offset)
        self.closed_before[part] = max(closed_before, self.closed_before.get(part, float("-inf")))
        if len(self.closed_before) < self.parts:
            return []
        everywhere = min(self.closed_before.values())
        return self._release(lambda s: s + self.window_s <= everywhere)

    def tick(self, now: float | None = None) -> list[list[WindowResult]]:
        now = time.monotonic() if now is None else now
        return self.flush() if now - self.last_arrival >= self.hold_s else []

    def flush(self) -> list[list[WindowResult]]:
        return self._release(lambda s: True)

    def _release(self, ready: Callable[[float], bool]) -> list[list[WindowResult]]:
        out = []
        for start in sorted(s for s in self.pending if ready(s)):
            out.append(list(self.pending.pop(start).values()))
            self.released_before = max(self.released_before, start + self.window_s)
        self.offsets.done_before(self.released_before)
        return out


class DetectStage:
    """One per input partition: the detectors over the jobs (and nodes) keyed to it, and the
    naive baseline when asked for (evaluation only)."""

    def __init__(self, window_s: float, hold_s: float, parts: int, detector: FleetDetector | None = None,
                 baseline: LowUtilizationBaseline | None = None) -> None:
        self.windows = PendingWindows(window_s, hold_s, parts)
        self.detector = detector or FleetDetector()
        self.baseline = baseline
        self.active: list[Finding] = []  # what went on in each window judged since `take_active`

    @property
    def released_before(self) -> float:
        return self.windows.released_before

    @property
    def offsets(self) -> InputOffsets:
        return self.windows.offsets

    def checkpoint(self) -> dict:
        """Detector state and window progress, consistent with each other: taken after a release."""
        return {**self.windows.checkpoint(), "detector": self.detector.to_dict()}

    def restore(self, state: dict) -> None:
        self.windows.restore(state)
        self.detector = FleetDetector.from_dict(state["detector"], self.detector.config)

    def _judge(self, released: list[list[WindowResult]]) -> list[Finding]:
        findings: list[Finding] = []
        for results in released:
            start, size = results[0].window_start, results[0].window_s
            findings += self.detector.observe(start, size, results)
            self.active += self.detector.active()
            if self.baseline is not None:
                findings += self.baseline.observe(start, size, results)
        return findings

    def add(self, results: list[WindowResult], offset: int, now: float | None = None) -> None:
        for result in results:
            self.windows.add(result, result.id, offset, now)

    def take_active(self) -> list[Finding]:
        """The findings going on in each window judged since the last call (dashboards' 'now')."""
        active, self.active = self.active, []
        return active

    def mark(self, part: int, closed_before: float, offset: int, heartbeat: bool = False) -> list[Finding]:
        return self._judge(self.windows.mark(part, closed_before, offset, heartbeat))

    def hold(self) -> None:
        self.windows.last_arrival = time.monotonic()

    def tick(self, now: float | None = None) -> list[Finding]:
        return self._judge(self.windows.tick(now))

    def flush(self) -> list[Finding]:
        return self._judge(self.windows.flush())


@dataclass
class FleetStage:
    """One stage-3 partition: every stage-1 partition's marks, and each cluster's pending windows.
    A cluster's window is complete once every stage-1 partition has marked it, whether or not it
    has nodes of that cluster (its partials, if any, come before its mark)."""

    window_s: float
    hold_s: float
    parts: int  # stage-1 partitions
    closed_before: dict[int, float] = field(default_factory=dict)  # shared by every cluster's PendingWindows
    clusters: dict[str, PendingWindows] = field(default_factory=dict)
    offsets: InputOffsets = field(default_factory=InputOffsets)  # only `next`: it has no checkpoint

    def pending(self, cluster: str) -> PendingWindows:
        pending = self.clusters.get(cluster)
        if pending is None:
            pending = self.clusters[cluster] = PendingWindows(self.window_s, self.hold_s, self.parts,
                                                              closed_before=self.closed_before)
        return pending

    def hold(self) -> None:
        for pending in self.clusters.values():
            pending.last_arrival = time.monotonic()

    def mark(self, part: int, closed_before: float, heartbeat: bool = False) -> list[list[WindowResult]]:
        self.closed_before[part] = max(closed_before, self.closed_before.get(part, float("-inf")))
        return [window for pending in self.clusters.values()
                for window in pending.mark(part, closed_before, 0, heartbeat)]


@dataclass
class FleetKpi:
    cluster: str
    window_start: float
    window_s: float
    gpus: int
    allocated_gpus: int
    idle_allocated_gpus: int
    samples: int
    util_mean: float
    effective_util: float
    power_w_mean: float
    energy_wh: float
    parts: int


def merge_fleet(partials: list[WindowResult]) -> FleetKpi:
    """Merge partial cluster results of one window (one per worker share), weighting by samples."""
    first = partials[0]
    samples = sum(p.samples for p in partials)

    def weighted(name: str) -> float:
        return sum(getattr(p, name) * p.samples for p in partials) / samples if samples else 0.0

    return FleetKpi(
        cluster=first.labels.cluster, window_start=first.window_start, window_s=first.window_s,
        gpus=sum(p.gpus for p in partials), allocated_gpus=sum(p.allocated_gpus for p in partials),
        idle_allocated_gpus=sum(p.idle_allocated_gpus for p in partials), samples=samples,
        util_mean=weighted("util_mean"), effective_util=weighted("effective_util"),
        power_w_mean=weighted("power_w_mean"), energy_wh=sum(p.energy_wh for p in partials), parts=len(partials),
    )


def kpi_window(kpi: FleetKpi) -> dict:
    """A cluster's fleet KPI as a window for the alert rules (rules.evaluate.WindowIn)."""
    return {"scope": "cluster", "labels": {"cluster": kpi.cluster}, "window_start": kpi.window_start,
            "window_end": kpi.window_start + kpi.window_s,
            "metrics": {name: float(getattr(kpi, name)) for name in FLEET_METRICS}}
