"""Event-time tumbling windows over GPU samples, with mergeable float accumulators.

Hot path: one `GpuAccumulator` per GPU series (cluster, node, gpu, job, rank, model) per window,
updated with plain float arithmetic from the decoded `NodeSample` (no per-sample model objects).
When a window closes, GPU accumulators are rolled up into node, job, GPU-model and cluster scopes,
so each sample is touched once however many scopes are reported.

Window start = floor(ts / window_s) * window_s. The watermark is the largest event time seen
minus `grace_s`; a window closes when the watermark passes its end. A sample whose window has
already closed is late: it is counted (`late_samples`) and `add` reports it to the caller, which
can dead-letter it; it is never merged silently into a closed window nor dropped without a count.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np

from laggard.agents.columns import BatchColumns, SegmentSums, segment_energy, segment_sums
from laggard.agents.effective import effective_utilization, idle_power_w, power_share
from laggard.batches import NodeBatch
from laggard.events import THROTTLE_REASONS, ClockReason, NodeSample
from laggard.results import Labels, Scope, WindowResult

# Reported throttle reasons, in accumulator order; plain ints because IntFlag arithmetic is slow.
THROTTLE_NAMES: tuple[tuple[str, int], ...] = (
    ("power_cap", int(ClockReason.SW_POWER_CAP)),
    ("hw_slowdown", int(ClockReason.HW_SLOWDOWN)),
    ("sw_thermal", int(ClockReason.SW_THERMAL)),
    ("hw_thermal", int(ClockReason.HW_THERMAL)),
    ("power_brake", int(ClockReason.HW_POWER_BRAKE)),
)
_THROTTLE_MASK = int(THROTTLE_REASONS)
_THROTTLE_BITS = tuple(bit for _, bit in THROTTLE_NAMES)

# A GPU with a job whose window-mean utilization is at most this (%) counts as allocated-but-idle.
IDLE_UTIL_PCT = 2.0
# A worker's clock and its collectors' may differ by this much before a sample stamped ahead of
# the worker stops moving event time (see Windower.clock).
FUTURE_TOLERANCE_S = 60.0
# A sample stamped further ahead of the worker's clock than this is rejected (agents/stages.py).
MAX_AHEAD_S = 900.0
# An interval longer than this between two samples of a GPU is a gap, not something to integrate.
MAX_INTERVAL_S = 120.0

GpuKey = tuple[str, str, int, str | None, int | None, str]  # cluster, node, gpu index, job, rank, model


@dataclass(slots=True)
class GpuAccumulator:
    """Sums over one window; `total` adds up several (a scope's GPU series)."""

    samples: int = 0
    util_sum: float = 0.0
    util_min: float = math.inf
    util_max: float = -math.inf
    util_hist: list[int] = field(default_factory=lambda: [0] * 101)  # 1% bins, for p50/p95
    power_share_sum: float = 0.0
    sm_active_sum: float = 0.0
    sm_active_samples: int = 0
    power_sum: float = 0.0
    power_estimated: int = 0  # samples whose power figures are estimates (GpuSample.power_estimated)
    idle_power_sum: float = 0.0  # idle power of the model at its limit, for waiting-energy costs
    energy_wh: float = 0.0
    clock_sum: float = 0.0
    clock_samples: int = 0  # samples that carried an SM clock (an exporter may not send it)
    temp_sum: float = 0.0
    temp_samples: int = 0
    temp_max: float = -math.inf
    throttled: int = 0
    throttled_by: list[int] = field(default_factory=lambda: [0] * len(THROTTLE_NAMES))
    xid_count: int = 0
    xid_last: int | None = None

    @classmethod
    def total(cls, accs: list[GpuAccumulator]) -> GpuAccumulator:
        """The sums of several accumulators (a scope's GPU series): one pass per field, the
        histograms added column by column, instead of one merge per series."""
        out = cls(
            samples=sum(a.samples for a in accs),
            util_sum=sum(a.util_sum for a in accs),
            util_min=min((a.util_min for a in accs), default=math.inf),
            util_max=max((a.util_max for a in accs), default=-math.inf),
            power_share_sum=sum(a.power_share_sum for a in accs),
            sm_active_sum=sum(a.sm_active_sum for a in accs),
            sm_active_samples=sum(a.sm_active_samples for a in accs),
            power_sum=sum(a.power_sum for a in accs),
            power_estimated=sum(a.power_estimated for a in accs),
            idle_power_sum=sum(a.idle_power_sum for a in accs),
            energy_wh=sum(a.energy_wh for a in accs),
            clock_sum=sum(a.clock_sum for a in accs),
            clock_samples=sum(a.clock_samples for a in accs),
            temp_sum=sum(a.temp_sum for a in accs),
            temp_samples=sum(a.temp_samples for a in accs),
            temp_max=max((a.temp_max for a in accs), default=-math.inf),
            throttled=sum(a.throttled for a in accs),
            xid_count=sum(a.xid_count for a in accs),
            # Of a scope: the highest code its GPUs reported last (whichever order its series came in).
            xid_last=max((a.xid_last for a in accs if a.xid_last is not None), default=None),
        )
        if accs:
            out.util_hist = list(map(sum, zip(*(a.util_hist for a in accs))))
            out.throttled_by = list(map(sum, zip(*(a.throttled_by for a in accs))))
        return out

    def effective(self) -> float:
        """Effective utilization of one GPU series over the window (see agents.effective)."""
        if not self.samples:
            return 0.0
        sm_active = self.sm_active_sum / self.sm_active_samples if self.sm_active_samples else None
        return effective_utilization(self.util_sum / self.samples / 100.0, self.power_share_sum / self.samples, sm_active)


@dataclass(slots=True)
class Rollup:
    """A scope above GPU level: merged GPU sums plus per-GPU effective utilization and counts."""

    acc: GpuAccumulator = field(default_factory=GpuAccumulator)
    effective_weighted: float = 0.0  # sum over GPU series of effective * samples
    gpus: int = 0
    allocated: int = 0
    idle_allocated: int = 0

    @classmethod
    def of_gpu(cls, gpu: GpuAccumulator, job: str | None) -> Rollup:
        """One GPU series as its own scope (shares its accumulator, no copy)."""
        allocated = job is not None
        idle = allocated and gpu.util_sum / gpu.samples <= IDLE_UTIL_PCT
        return cls(gpu, gpu.effective() * gpu.samples, 1, int(allocated), int(idle))

    @classmethod
    def of_gpus(cls, gpus: list[Rollup]) -> Rollup:
        """A scope made of GPU series (each a Rollup.of_gpu)."""
        return cls(GpuAccumulator.total([g.acc for g in gpus]), sum(g.effective_weighted for g in gpus),
                   sum(g.gpus for g in gpus), sum(g.allocated for g in gpus), sum(g.idle_allocated for g in gpus))


def _percentile(cumulative: list[int], q: float) -> float:
    """Smallest 1% bin holding at least q of the samples, from the cumulative histogram."""
    return float(min(100, bisect_left(cumulative, q * cumulative[-1])))


def _result(scope: Scope, key: str, labels: Labels, start: float, size: float, rollup: Rollup) -> WindowResult:
    a = rollup.acc
    n = a.samples
    cumulative = list(accumulate(a.util_hist))
    return WindowResult(
        scope=scope,
        key=key,
        labels=labels,
        window_start=start,
        window_s=size,
        samples=n,
        gpus=rollup.gpus,
        allocated_gpus=rollup.allocated,
        idle_allocated_gpus=rollup.idle_allocated,
        util_mean=a.util_sum / n,
        util_min=a.util_min,
        util_max=a.util_max,
        util_p50=_percentile(cumulative, 0.50),
        util_p95=_percentile(cumulative, 0.95),
        effective_util=rollup.effective_weighted / n,
        power_share=a.power_share_sum / n,
        sm_active=a.sm_active_sum / a.sm_active_samples if a.sm_active_samples else None,
        power_w_mean=a.power_sum / n,
        power_estimated_share=a.power_estimated / n,
        idle_power_w=a.idle_power_sum / n,
        energy_wh=a.energy_wh,
        sm_clock_mhz_mean=a.clock_sum / a.clock_samples if a.clock_samples else None,
        temp_c_mean=a.temp_sum / a.temp_samples if a.temp_samples else None,
        temp_c_max=a.temp_max if a.temp_samples else None,
        throttled_share=a.throttled / n,
        throttle_share={name: c / n for (name, _), c in zip(THROTTLE_NAMES, a.throttled_by)},
        xid_count=a.xid_count,
        xid_last=a.xid_last,
    )


@dataclass(slots=True)
class ClosedWindow:
    """One closed window: its GPU series accumulators and the results of every scope."""

    window_start: float
    window_s: float
    series: dict[GpuKey, GpuAccumulator]

    @property
    def window_end(self) -> float:
        return self.window_start + self.window_s

    def gpu_results(self) -> list[WindowResult]:
        out = []
        for (cluster, node, gpu, job, rank, model), acc in self.series.items():
            # The rank too: a GPU that changes rank within a window is two series, not one twice.
            series_key = f"{cluster}/{node}/{gpu}" + (f"@{job}#{rank}" if job is not None else "")
            labels = Labels(cluster=cluster, node=node, gpu=gpu, job=job, rank=rank, model=model)
            out.append(_result("gpu", series_key, labels, self.window_start, self.window_s, Rollup.of_gpu(acc, job)))
        return out

    def rollup_results(self) -> list[WindowResult]:
        """Node, job, GPU-model and cluster results (the cluster ones carry the fleet KPI)."""
        scopes: dict[tuple[Scope, str], list[Rollup]] = {}
        labels: dict[tuple[Scope, str], Labels] = {}

        def into(scope: Scope, key: str, gpu: Rollup, **label: str) -> None:
            members = scopes.get((scope, key))
            if members is None:
                members = scopes[(scope, key)] = []
                labels[(scope, key)] = Labels(**label)
            members.append(gpu)

        for (cluster, node, _gpu, job, _rank, model), acc in self.series.items():
            gpu = Rollup.of_gpu(acc, job)
            into("node", f"{cluster}/{node}", gpu, cluster=cluster, node=node)
            if job is not None:
                into("job", f"{cluster}/{job}", gpu, cluster=cluster, job=job)
            into("model", f"{cluster}/{model}", gpu, cluster=cluster, model=model)
            into("cluster", cluster, gpu, cluster=cluster)
        return [
            _result(scope, key, labels[(scope, key)], self.window_start, self.window_s, Rollup.of_gpus(members))
            for (scope, key), members in scopes.items()
        ]

    def results(self) -> list[WindowResult]:
        return self.gpu_results() + self.rollup_results()


class Windower:
    """Assigns GPU samples to event-time tumbling windows and closes them by watermark."""

    def __init__(self, window_s: float, grace_s: float = 0.0, max_interval_s: float = MAX_INTERVAL_S,
                 clock: Callable[[], float] | None = None) -> None:
        if window_s <= 0 or grace_s < 0:
            raise ValueError(f"window_s must be > 0 and grace_s >= 0, got {window_s!r}, {grace_s!r}")
        self.window_s = window_s
        self.grace_s = grace_s
        self.max_interval_s = max_interval_s
        # Samples stamped more than FUTURE_TOLERANCE_S ahead of this clock (the worker's wall clock
        # when live) are windowed but do not move event time: a collector whose clock runs minutes
        # fast would otherwise close its partition's windows early and make its neighbours' samples
        # late. Its own samples wait in their windows until the others' event time gets there.
        self.clock = clock
        self.max_ts = -math.inf
        self.late_samples = 0  # GPU samples whose window had closed when they arrived
        self._open: dict[float, dict[GpuKey, GpuAccumulator]] = {}
        self._closed_before = -math.inf  # every window starting before this has been emitted
        self._last: dict[str, tuple[float, float | None]] = {}  # GPU uuid -> ts, energy_j of its last sample
        self._on_time_at = clock() if clock is not None else 0.0  # wall time of the last sample not too far ahead
        self._idle: dict[tuple[str, float], float] = {}  # (model, power limit) -> idle power
        # The per-node watermark (schema-2 batches): each node's `until`, the nodes still short of
        # the oldest open window's end, and the newest version-1 sample (whose nodes promise nothing).
        self._until: dict[tuple[str, str], float] = {}
        self._behind: set[tuple[str, str]] = set()
        self._behind_of = math.inf  # the window end `_behind` was taken for
        self._v1_ts = -math.inf
        # Until a window has closed by the grace, nodes not yet heard from may still have samples for it.
        self._nodes_known = False

    @property
    def watermark(self) -> float:
        return self.max_ts - self.grace_s

    @property
    def gpus_tracked(self) -> int:
        """GPUs this windower keeps a last sample of (for energy deltas): its memory grows with them."""
        return len(self._last)

    @property
    def open_windows(self) -> int:
        return len(self._open)

    def window_start(self, ts: float) -> float:
        return math.floor(ts / self.window_s) * self.window_s

    def add(self, sample: NodeSample) -> bool:
        """Accumulate one node sample; False when it arrived after its window closed (counted late)."""
        ts = sample.ts
        start = self.window_start(ts)
        if start < self._closed_before or start + self.window_s <= self.watermark:
            self.late_samples += len(sample.gpus)
            # Still the GPUs' latest sighting: after a restart, the replay starts with samples of
            # windows already emitted, and the first open window's energy is measured from them.
            for g in sample.gpus:
                if ts > self._last.get(g.uuid, (-math.inf, None))[0]:
                    self._last[g.uuid] = (ts, g.energy_j)
            return False
        if ts > self.max_ts:
            self._advance(ts)
        if ts > self._v1_ts:
            self._v1_ts = ts
        series = self._open.get(start)
        if series is None:
            series = self._open[start] = {}
        cluster, node = sample.cluster, sample.node
        last, idle_cache, max_interval = self._last, self._idle, self.max_interval_s
        for g in sample.gpus:  # hot path: plain arithmetic on locals, no per-sample objects
            key = (cluster, node, g.index, g.job, g.rank, g.model)
            acc = series.get(key)
            if acc is None:
                acc = series[key] = GpuAccumulator()
            util = g.util_gpu
            power = g.power_w
            acc.samples += 1
            acc.util_sum += util
            if util < acc.util_min:
                acc.util_min = util
            if util > acc.util_max:
                acc.util_max = util
            acc.util_hist[int(util + 0.5)] += 1
            limit = g.power_limit_w
            idle = idle_cache.get((g.model, limit))
            if idle is None:
                idle = idle_cache[(g.model, limit)] = idle_power_w(g.model, limit)
            acc.power_share_sum += power_share(power, limit, idle)
            acc.power_sum += power
            acc.power_estimated += g.power_estimated
            acc.idle_power_sum += idle
            if g.sm_active is not None:
                acc.sm_active_sum += g.sm_active
                acc.sm_active_samples += 1
            if g.sm_clock_mhz is not None:
                acc.clock_sum += g.sm_clock_mhz
                acc.clock_samples += 1
            temp = g.temp_c
            if temp is not None:
                acc.temp_sum += temp
                acc.temp_samples += 1
                if temp > acc.temp_max:
                    acc.temp_max = temp
            reasons = g.clocks_event_reasons
            if reasons & _THROTTLE_MASK:
                acc.throttled += 1
                for i, (_, bit) in enumerate(THROTTLE_NAMES):
                    if reasons & bit:
                        acc.throttled_by[i] += 1
            if g.xid:
                acc.xid_count += 1
                acc.xid_last = g.xid
            # Energy since this GPU's previous sample: counter delta when both have one, else power x
            # interval; nothing for a first sample, a gap, or an out-of-order one (the later sample's
            # interval already covers it).
            energy = g.energy_j
            prev = last.get(g.uuid)
            if prev is None or ts > prev[0]:
                last[g.uuid] = (ts, energy)
                if prev is not None and ts - prev[0] <= max_interval:
                    if energy is not None and prev[1] is not None and energy >= prev[1]:
                        acc.energy_wh += (energy - prev[1]) / 3600.0
                    else:
                        acc.energy_wh += power * (ts - prev[0]) / 3600.0
        return True

    def add_batch(self, batch: NodeBatch) -> tuple[list[float], int]:
        """Accumulate a schema-2 batch, window by window, as `add` would its samples one by one.
        Returns the starts of the windows it fed and how many of its GPU samples came late."""
        columns = BatchColumns.of(batch)
        starts = np.floor(columns.ts / self.window_s) * self.window_s
        edges = [0, *(np.flatnonzero(np.diff(starts)) + 1).tolist(), len(batch.ts)]
        uuids = [gpu.uuid for gpu in batch.gpus]
        fed: list[float] = []
        late = 0
        for a, b in zip(edges, edges[1:]):
            start = float(starts[a])
            last = [self._last.get(uuid) for uuid in uuids]
            last_ts = np.array([-math.inf if p is None else p[0] for p in last])
            last_energy = np.array([math.nan if p is None or p[1] is None else p[1] for p in last])
            energy, newer = segment_energy(columns, a, b, last_ts, last_energy, self.max_interval_s)
            self._remember(uuids, columns, a, newer)
            if start < self._closed_before or start + self.window_s <= self.watermark:
                late += int(columns.present[:, a:b].sum())
                continue
            if batch.ts[b - 1] > self.max_ts:
                self._advance(batch.ts[b - 1])
            series = self._open.get(start)
            if series is None:
                series = self._open[start] = {}
            sums = segment_sums(columns, a, b, _THROTTLE_MASK, _THROTTLE_BITS)
            self._accumulate(series, batch, sums, energy.tolist())
            fed.append(start)
        self.late_samples += late
        self._reported(batch)
        return fed, late

    def _reported(self, batch: NodeBatch) -> None:
        """Note how far `batch`'s node has reported: it sends nothing stamped before its `until`
        (before its last tick when it gives none: a node's ticks only go forward)."""
        node = (batch.cluster, batch.node)
        until = max(batch.until if batch.until is not None else batch.ts[-1], self._until.get(node, -math.inf))
        if node not in self._until and until < self._behind_of:
            self._behind.add(node)
        elif until >= self._behind_of:
            self._behind.discard(node)
        self._until[node] = until

    def _closed_by_nodes(self) -> float:
        """Windows ending at or before this are complete by the per-node watermark: every node
        that reported into the oldest open window's start has reported past their end. A node short
        of that start has gone quiet (or lags a window behind): it holds one window back until the
        grace closes it, then no more. -inf until a window has closed by the grace (every node then
        had a window and the grace to be heard from: a worker that just started does not know them
        all), and while a version-1 node is about (it promises nothing)."""
        if not self._nodes_known or not self._until or self._v1_ts >= self.watermark:
            return -math.inf
        oldest_end = min(self._open) + self.window_s
        if oldest_end != self._behind_of:  # once per window: who is short of its end
            oldest_start = oldest_end - self.window_s
            self._until = {node: u for node, u in self._until.items() if u >= oldest_start}
            self._behind = {node for node, u in self._until.items() if u < oldest_end}
            self._behind_of = oldest_end
        if self._behind or not self._until:
            return -math.inf
        return min(self._until.values())

    def _remember(self, uuids: list[str], columns: BatchColumns, a: int, newer: np.ndarray) -> None:
        """Each GPU's newest sample of a segment (the `newer` ticks from tick `a` on) as its last."""
        rows = np.flatnonzero(newer.any(axis=1))
        at = newer.shape[1] - 1 - np.argmax(newer[rows, ::-1], axis=1) + a
        for row, tick in zip(rows.tolist(), at.tolist()):
            energy = columns.energy[row, tick]
            self._last[uuids[row]] = (float(columns.ts[tick]), None if math.isnan(energy) else float(energy))

    @staticmethod
    def _accumulate(series: dict[GpuKey, GpuAccumulator], batch: NodeBatch, sums: SegmentSums,
                    energy: list[float]) -> None:
        s = sums
        hist_rows, hist_bins = np.nonzero(s.util_hist)
        hist = {}
        for row, b, n in zip(hist_rows.tolist(), hist_bins.tolist(), s.util_hist[hist_rows, hist_bins].tolist()):
            hist.setdefault(row, []).append((b, n))
        throttled_by = s.throttled_by.tolist()
        for row, gpu in enumerate(batch.gpus):
            n = s.samples[row]
            if not n:
                continue
            key = (batch.cluster, batch.node, gpu.index, gpu.job, gpu.rank, gpu.model)
            acc = series.get(key)
            if acc is None:
                acc = series[key] = GpuAccumulator()
            acc.samples += n
            acc.util_sum += s.util_sum[row]
            acc.util_min = min(acc.util_min, s.util_min[row])
            acc.util_max = max(acc.util_max, s.util_max[row])
            for b, count in hist[row]:
                acc.util_hist[b] += count
            acc.power_share_sum += s.power_share_sum[row]
            acc.power_sum += s.power_sum[row]
            acc.power_estimated += n if gpu.power_estimated else 0
            acc.idle_power_sum += s.idle_power_sum[row]
            acc.sm_active_sum += s.sm_active_sum[row]
            acc.sm_active_samples += s.sm_active_samples[row]
            acc.clock_sum += s.clock_sum[row]
            acc.clock_samples += s.clock_samples[row]
            acc.temp_sum += s.temp_sum[row]
            acc.temp_samples += s.temp_samples[row]
            acc.temp_max = max(acc.temp_max, s.temp_max[row])
            if s.throttled[row]:
                acc.throttled += s.throttled[row]
                acc.throttled_by = [x + y for x, y in zip(acc.throttled_by, throttled_by[row])]
            if s.xid_count[row]:
                acc.xid_count += s.xid_count[row]
                acc.xid_last = s.xid_last[row]
            acc.energy_wh += energy[row]

    def _advance(self, ts: float) -> None:
        """Move event time to `ts`, unless it is stamped too far ahead of the clock (see `clock`).
        A partition whose every collector runs fast would then never close a window: once only
        such samples have come for FUTURE_TOLERANCE_S of wall time, event time follows the clock."""
        now = self.clock() if self.clock is not None else None
        if now is None or ts <= now + FUTURE_TOLERANCE_S:
            self.max_ts = ts
            self._on_time_at = now
        elif now - self._on_time_at > FUTURE_TOLERANCE_S:
            self.max_ts = max(self.max_ts, now)

    def checkpoint(self) -> dict[str, float | None]:
        """Event-time progress (not the open windows): enough to resume after a replay."""
        return {"max_ts": _finite(self.max_ts), "closed_before": _finite(self._closed_before)}

    def restore(self, state: dict[str, float | None]) -> None:
        self.max_ts = -math.inf if state["max_ts"] is None else state["max_ts"]
        self._closed_before = -math.inf if state["closed_before"] is None else state["closed_before"]

    def pop_closed(self) -> list[ClosedWindow]:
        """Windows whose end the watermark (or every node, see `_closed_by_nodes`) has passed,
        oldest first; each is returned once."""
        if not self._open:
            return []
        closes = self.watermark
        if min(self._open) + self.window_s > closes:
            closes = max(closes, self._closed_by_nodes())
            if min(self._open) + self.window_s > closes:
                return []  # called for every message: the common answer without sorting
        else:
            self._nodes_known = True
        return self._pop(lambda start: start + self.window_s <= closes)

    def flush(self) -> list[ClosedWindow]:
        """Close every open window (end of a replay or shutdown)."""
        return self._pop(lambda start: True)

    def _pop(self, ready: Callable[[float], bool]) -> list[ClosedWindow]:
        starts = sorted(s for s in self._open if ready(s))
        if starts:
            self._closed_before = max(self._closed_before, starts[-1] + self.window_s)
        return [ClosedWindow(s, self.window_s, self._open.pop(s)) for s in starts]


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


def windows_of(samples: Iterable[NodeSample], windower: Windower) -> Iterator[ClosedWindow]:
    """Run samples through a windower, yielding windows as they close and the rest at the end."""
    for sample in samples:
        windower.add(sample)
        yield from windower.pop_closed()
    yield from windower.flush()
