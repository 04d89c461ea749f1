"""Detectors over closed windows, as one registry: `DETECTORS` maps each finding kind to a plain
function, its persistence/clearing and the shapes of evidence it emits.

A detector looks at one job's GPU results of a window (`per="job"`) or at the whole window
(`per="window"`) and returns candidate findings, firing ones, of its kind. `FleetDetector.observe`
runs every registered detector once per closed window, in window order, and applies each kind's
lifecycle (agents/finding_lifecycle.py): a finding fires after `fire_after` consecutive windows and
resolves after `clear_after` clean ones. All its state is `FleetDetector.state`, a pydantic model
that dumps to a plain dict and restores from one (`to_dict` / `from_dict`).

Adding a detector is one function and one entry in `DETECTORS`: the worker runs it, `laggard rules
check` accepts rules on its kind and renders their templates on its `samples`, and `laggard eval`
scores it in its `family` against the simulator's truths of the kinds in `truths`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import median
from typing import Any

from laggard.agents.detector_views import (
    Detector,
    DetectorConfig,
    DetectorState,
    JobView,
    RankShape,
    SeenGpu,
    WindowView,
    gpu_finding,
    utc_clock,
)
from laggard.agents.finding_lifecycle import Lifecycle, LifecycleState
from laggard.agents.pacing import (
    SHAPE_RATE,
    SHAPE_WINDOWS,
    SPAN_WINDOWS,
    mixed_generation,
    slow_nodes,
    stragglers,
)
from laggard.agents.straggler import LARGE_GROUP, by_model, work
from laggard.results import Finding, WindowResult, finding_fingerprint


def _whole_job_finding(job: JobView, kind: str, summary: str, last_busy_end: float | None) -> Finding:
    window = job.window
    return Finding(
        kind=kind, state="firing", cluster=job.cluster, job=job.job, window_start=window.start,
        window_end=window.end, summary=summary,
        evidence={"ranks": len(job.ranks), "max_util_pct": round(max(r.util_mean for r in job.ranks), 2),
                  "last_busy_window_end": last_busy_end},
        cost={"gpu_s_idle": round(len(job.ranks) * window.length_s, 1),
              "energy_wh_idle": round(sum(r.energy_wh for r in job.ranks), 3)},
    )


def job_stalled(job: JobView) -> list[Finding]:
    """Every rank idle in a job that was busy before: one finding for the job."""
    if len(job.idle) != len(job.ranks) or job.busy_before is None:
        return []
    last_busy_end = job.busy_before + job.window.length_s
    return [_whole_job_finding(job, "job_stalled", f"job {job.job} stalled: all {len(job.ranks)} ranks idle "
                                                   f"(busy until {utc_clock(last_busy_end, job.window.end)})",
                                   last_busy_end)]


def idle_allocated(job: JobView) -> list[Finding]:
    """A job that holds GPUs and has never used them (one finding for the job), or idle ranks of a
    working job (one each). In a stalled job the stall is the finding; only GPUs already idle
    before it stay reported."""
    idle, window = job.idle, job.window
    whole_job_idle = len(idle) == len(job.ranks)
    if whole_job_idle and job.busy_before is None:
        peak = max(r.util_mean for r in job.ranks)
        return [_whole_job_finding(job, "idle_allocated", f"job {job.job} holds {len(job.ranks)} GPUs and has not "
                                                          f"used them ({peak:.1f}% peak util)", None)]
    found = []
    for r in idle:
        f = gpu_finding(
            "idle_allocated", r,
            f"GPU {r.labels.gpu} on node {r.labels.node} is allocated to job {job.job} (rank {r.labels.rank}) "
            f"but idle ({r.util_mean:.1f}% util)",
            evidence={"util_pct": round(r.util_mean, 2), "power_w": round(r.power_w_mean, 1)},
            cost={"gpu_s_idle": round(window.length_s, 1), "energy_wh_idle": round(r.energy_wh, 3)},
        )
        if not whole_job_idle or window.is_firing("idle_allocated", f.fingerprint):
            found.append(f)
    return found


def xids(window: WindowView) -> list[Finding]:
    """A GPU that reported an XID error: an event, fired on the window that carries it."""
    return [gpu_finding("xid", r, f"GPU {r.labels.gpu} on node {r.labels.node} reported XID {r.xid_last} "
                               f"({r.xid_count} sample(s) this window)",
                     evidence={"xid": r.xid_last, "xid_samples": r.xid_count})
            for r in window.results if r.xid_count]


def group_last_seen(seen: Mapping[str, SeenGpu]) -> dict[str, float]:
    """The last window each group (job, else node) reported in: its latest-seen GPU's."""
    last: dict[str, float] = {}
    for g in seen.values():
        if g.last_window > last.get(g.group, float("-inf")):
            last[g.group] = g.last_window
    return last


# A GPU seen once is kept this long while its group is absent, to learn its interval from its next
# sample: scrapes every 30 s (dcgm-exporter's default) or every minute are common.
LEARN_WITHIN_S = 120.0


def group_gone(g: SeenGpu, group_last: Mapping[str, float], window_start: float, window_s: float) -> bool:
    """Whether `g`'s whole job (or node) has stopped reporting: silent for as many windows as `g`
    reports every (a node scraped every 30 s into 10 s windows is absent from two windows in three),
    or, while its interval is not known yet, for LEARN_WITHIN_S."""
    absent_s = window_start - group_last[g.group]
    return absent_s >= (g.every * window_s if g.learned else max(window_s, LEARN_WITHIN_S))


def silent_gpus(window: WindowView) -> list[Finding]:
    """A GPU seen before that stopped reporting while the rest of its job (or node) goes on."""
    group_last = group_last_seen(window.memory.seen_gpus)
    found = []
    for g in window.memory.seen_gpus.values():
        if group_gone(g, group_last, window.start, window.length_s):
            continue  # its job ended or its node left as a whole: not one silent GPU
        missing = round((window.start - g.last_window) / window.length_s)
        if g.learned and missing >= g.every:  # seen twice: its interval is known
            found.append(Finding(
                kind="silent_gpu", state="firing", cluster=g.cluster, job=g.job, rank=g.rank, node=g.node,
                gpu=g.gpu, model=g.model, window_start=window.start, window_end=window.end,
                summary=f"GPU {g.gpu} on node {g.node} stopped reporting (last sample in the window from "
                        f"{utc_clock(g.last_window, window.end)})",
                evidence={"last_window_start": g.last_window, "windows_missing": missing},
            ))
    return found


# Sample shapes, for rule-template checks (tests/test_rules_samples.py holds them to what the
# detectors really emit).
_T0 = 1_700_000_000.0
_GPU_OF_JOB: dict[str, Any] = {"cluster": "cluster-0", "job": "job-0", "rank": 3, "node": "node-0", "gpu": 1,
                               "model": "H100"}
_FREE_GPU: dict[str, Any] = {"cluster": "cluster-0", "node": "node-0", "gpu": 1, "model": "H100"}
_JOB: dict[str, Any] = {"cluster": "cluster-0", "job": "job-0"}
_STRAGGLER_EVIDENCE: dict[str, Any] = {
    "signature": "throttled", "rank_util_pct": 99.5, "peer_util_median_pct": 99.4, "peer_util_sigma_pct": 1.5,
    "rank_work_share": 0.62, "peer_work_share_median": 0.71, "sm_clock_mhz": 1410.0, "peer_sm_clock_median_mhz": 1980.0,
    "temp_c": 82.0, "peer_temp_median_c": 55.0, "throttled_share": 1.0, "throttle_reasons": "sw_thermal",
    "fault_share": 1.0, "strength": "strong", "peers": 31, "span_s": 10.0,
}
_STRAGGLER_COST = {"peer_wait_share": 0.286, "peer_gpu_s_wasted": 85.3, "energy_wh_wasted": 2.844}
_IDLE_JOB_COST = {"gpu_s_idle": 40.0, "energy_wh_idle": 1.389}
_XID = {"xid": 79, "xid_samples": 3}
_SILENT = {"last_window_start": _T0 - 20.0, "windows_missing": 2}
_NODE_OF_JOB: dict[str, Any] = {"cluster": "cluster-0", "job": "job-0", "node": "node-0", "model": "H100"}
_SLOW_NODE = {"reference": "fleet", "sm_clock_mhz": 1350.0, "reference_sm_clock_mhz": 1755.0, "reference_gpus": 96,
              "throttle_reasons": "hw_slowdown", "slow_gpus": 8, "job_slow_ranks": 16, "job_ranks": 24,
              "fault_share": 1.0}

DETECTORS: dict[str, Detector] = {d.kind: d for d in (
    # 12 s of fault: a blip of a few seconds never fires, even across a window boundary, and a fault
    # that begins mid-window still fires at the end of the next one.
    Detector("straggler", stragglers, "job", fire_after_s=12.0, truths=("straggler", "slow_node"), samples=(
        (_GPU_OF_JOB, _STRAGGLER_EVIDENCE, _STRAGGLER_COST),
        (_GPU_OF_JOB, {**_STRAGGLER_EVIDENCE, "throttled_share": 0.0, "throttle_reasons": None}, _STRAGGLER_COST),
    )),
    # A job slowed as a whole (no healthy peer inside it); persistence as for a straggler.
    Detector("slow_node", slow_nodes, "job", fire_after_s=12.0, family="straggler", truths=("slow_node",), samples=(
        (_NODE_OF_JOB, _SLOW_NODE, {"job_step_loss_share": 0.231, "job_gpu_s_wasted": 18.5, "energy_wh_wasted": 0.36}),
        (_NODE_OF_JOB, {**_SLOW_NODE, "reference": "past", "reference_gpus": 0, "throttle_reasons": None},
         {"job_step_loss_share": 0.231, "job_gpu_s_wasted": 18.5, "energy_wh_wasted": 0.36}),
    )),
    Detector("mixed_generation", mixed_generation, "job", samples=((_JOB, {
        "slow_model": "H100", "fast_model": "H200", "slow_util_median_pct": 99.6, "fast_util_median_pct": 99.5,
        "slow_work_share_median": 0.93, "fast_work_share_median": 0.66, "slow_ranks": 8, "fast_ranks": 16,
    }, {"fast_rank_waste_share": 0.286, "fast_gpu_s_wasted": 41.1, "energy_wh_wasted": 1.37}),)),
    # A job left idle and one that stalled look alike in telemetry: one family for eval.
    Detector("idle_allocated", idle_allocated, "job", family="idle", samples=(
        (_GPU_OF_JOB, {"util_pct": 0.0, "power_w": 125.0}, {"gpu_s_idle": 10.0, "energy_wh_idle": 0.347}),
        (_JOB, {"ranks": 4, "max_util_pct": 0.4, "last_busy_window_end": None}, _IDLE_JOB_COST),
    )),
    Detector("job_stalled", job_stalled, "job", family="idle", samples=(
        (_JOB, {"ranks": 4, "max_util_pct": 0.2, "last_busy_window_end": _T0 - 30.0}, _IDLE_JOB_COST),
    )),
    Detector("xid", xids, "window", fire_after=1, clear_after=3, samples=((_GPU_OF_JOB, _XID, {}), (_FREE_GPU, _XID, {}))),
    # Missing windows are the persistence (SeenGpu.every): it fires when the gap is seen, resolves on the next sample.
    Detector("silent_gpu", silent_gpus, "window", fire_after=2, clear_after=1,
             samples=((_GPU_OF_JOB, _SILENT, {}), (_FREE_GPU, _SILENT, {}))),
)}


def low_utilization(window: WindowView, threshold_pct: float) -> list[Finding]:
    return [gpu_finding("low_utilization", r, f"GPU {r.labels.gpu} on node {r.labels.node} at {r.util_mean:.0f}% "
                                           f"utilization (below {threshold_pct:.0f}%)",
                     evidence={"util_pct": round(r.util_mean, 2)})
            for r in window.results if r.util_mean < threshold_pct]


# The naive rule laggard is compared with (`laggard eval`); not run by the fleet detector.
BASELINE = Detector("low_utilization", low_utilization, "window", fire_after=1, clear_after=1, samples=(
    (_GPU_OF_JOB, {"util_pct": 41.5}, {}), (_FREE_GPU, {"util_pct": 3.0}, {})))


def finding_kinds() -> dict[str, Detector]:
    """Every kind a finding can have: the registered detectors' and the baseline's."""
    return {**DETECTORS, BASELINE.kind: BASELINE}


class FleetDetector:
    """Every registered detector with its persistence/clearing; state is one serialisable model.
    The registry is read when the detector is made."""

    def __init__(self, config: DetectorConfig | None = None, state: DetectorState | None = None) -> None:
        self.config = config or DetectorConfig()
        self.state = state or DetectorState()
        self.detectors = dict(DETECTORS)
        # cluster|job -> (window start, its ranks) of the windows before the next one (WindowView.earlier)
        self._earlier: dict[str, list[tuple[float, list[WindowResult]]]] = {}
        self._lifecycles = {
            kind: Lifecycle(d.fire_after, d.clear_after, state=self.state.lifecycles.setdefault(kind, LifecycleState()),
                            fire_after_s=d.fire_after_s)
            for kind, d in self.detectors.items()
        }

    def to_dict(self) -> dict:
        return self.state.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict, config: DetectorConfig | None = None) -> FleetDetector:
        return cls(config, DetectorState.model_validate(data))

    def firing(self) -> list[Finding]:
        return [f for lc in self._lifecycles.values() for f in lc.firing()]

    def active(self) -> list[Finding]:
        """The findings going on in the last window observed (see Lifecycle.active)."""
        return [f for lc in self._lifecycles.values() for f in lc.active()]

    def is_firing(self, kind: str, fingerprint: str) -> bool:
        return self._lifecycles[kind].is_firing(fingerprint)

    def observe(self, window_start: float, window_s: float, gpu_results: Sequence[WindowResult]) -> list[Finding]:
        """Feed one closed window's GPU results; returns the findings that fired or resolved in it."""
        jobs: dict[tuple[str, str], list[WindowResult]] = {}
        for r in gpu_results:
            if r.labels.job is not None:
                jobs.setdefault((r.labels.cluster, r.labels.job), []).append(r)
        self._remember(window_start, window_s, gpu_results, jobs)
        earlier = {key: [ranks for _, ranks in span] for key, span in self._earlier.items()
                   if span[-1][0] == window_start - window_s}  # consecutive windows only
        window = WindowView(window_start, window_s, gpu_results, self.config, self.state, self.is_firing, earlier)
        job_views = [JobView(cluster, job, ranks, window) for (cluster, job), ranks in jobs.items()]
        out = []
        flagged: dict[str, str] = {}  # cluster|job|rank -> the straggler signature it showed this window
        slow_jobs: set[str] = set()  # cluster|job of the jobs slowed as a whole this window
        for kind, detector in self.detectors.items():
            found = detector.find(window) if detector.per == "window" else (
                f for job in job_views for f in detector.find(job))
            observed = {f.fingerprint: f for f in found}
            if kind == "straggler":
                flagged = {f"{f.cluster}|{f.job}|{f.rank}": str(f.evidence.get("signature")) for f in observed.values()}
            elif kind == "slow_node":
                slow_jobs = {f"{f.cluster}|{f.job}" for f in observed.values()}
            out += self._lifecycles[kind].step(window_start, window_s, observed)
        self._learn_shapes(window_start, job_views, flagged)
        self._learn_clocks(job_views, slow_jobs)
        self._keep_for_span(window_start, job_views)
        self._forget(window_start, window_s)
        return out

    def _learn_shapes(self, window_start: float, jobs: Sequence[JobView], flagged: Mapping[str, str]) -> None:
        """Each large group's ranks' usual difference from their model peers, smoothed; not while a
        straggler fires in the job (it must not become the norm, and it bends its peers too),
        except in the job's first windows, which teach the shape (a throttled rank's numbers even
        then are not its shape)."""
        cfg, shapes = self.config.straggler, self.state.rank_shapes
        for job in jobs:
            young = job.windows_seen <= SHAPE_WINDOWS
            if not young and any(key.startswith(f"{job.cluster}|{job.job}|") for key in flagged):
                continue  # a straggler bends its peers too: the job's shape waits until it is gone
            for group in by_model([r for r in job.ranks if r.util_mean >= cfg.busy_pct]).values():
                if len(group) < LARGE_GROUP:
                    continue
                work_median, util_median = median(work(r) for r in group), median(r.util_mean for r in group)
                full = median(r.samples for r in group) / 2  # a rank's first, partial window is noise, not shape
                for r in group:
                    if r.samples < full:
                        continue
                    key = f"{job.cluster}|{job.job}|{r.labels.rank}"
                    if flagged.get(key) == "throttled":
                        continue
                    dev_work, dev_util = work(r) - work_median, r.util_mean - util_median
                    shape = shapes.get(key)
                    if shape is None:
                        if abs(dev_work) < cfg.min_work_gap / 2 and abs(dev_util) < cfg.min_gap_pct / 2:
                            continue  # like its peers: nothing to keep
                        shape = shapes[key] = RankShape()
                    shape.work += SHAPE_RATE * (dev_work - shape.work)
                    shape.util += SHAPE_RATE * (dev_util - shape.util)
                    shape.last_window = window_start
                    if abs(shape.work) < cfg.min_work_gap / 4 and abs(shape.util) < cfg.min_gap_pct / 4:
                        del shapes[key]

    def _keep_for_span(self, window_start: float, jobs: Sequence[JobView]) -> None:
        """Each job's ranks of its last SPAN_WINDOWS - 1 consecutive windows, this one last
        (WindowView.earlier); a job absent from this window starts again."""
        kept = {}
        for job in jobs:
            key = f"{job.cluster}|{job.job}"
            before = self._earlier.get(key, []) if key in job.window.earlier else []
            kept[key] = [*before, (window_start, list(job.ranks))][-(SPAN_WINDOWS - 1):]
        self._earlier = kept

    def _learn_clocks(self, jobs: Sequence[JobView], slow_jobs: set[str]) -> None:
        """Each job's usual SM clock per GPU model (median of its busy ranks, smoothed), not while
        it is slow: what `slow_nodes` compares it with when the fleet has no reference."""
        busy_pct = self.config.straggler.busy_pct
        for job in jobs:
            key = f"{job.cluster}|{job.job}"
            if key in slow_jobs:
                continue
            usual = self.state.job_clocks.setdefault(key, {})
            with_clock = [r for r in job.ranks if r.util_mean >= busy_pct and r.sm_clock_mhz_mean is not None]
            for model, group in by_model(with_clock).items():
                clock = median(r.sm_clock_mhz_mean for r in group)
                usual[model] = clock if model not in usual else usual[model] + SHAPE_RATE * (clock - usual[model])

    def _remember(self, window_start: float, window_s: float, gpu_results: Sequence[WindowResult],
                  jobs: Mapping[tuple[str, str], list[WindowResult]]) -> None:
        """The detectors' memory, updated with this window: when each job was last busy, when
        each GPU was last seen and how often it reports."""
        for (cluster, job), ranks in jobs.items():
            self.state.job_windows[f"{cluster}|{job}"] = self.state.job_windows.get(f"{cluster}|{job}", 0) + 1
            utils = sorted(r.util_mean for r in ranks)
            if utils[len(utils) // 2] >= self.config.busy_job_util_pct:
                self.state.job_busy[f"{cluster}|{job}"] = window_start
        seen = self.state.seen_gpus
        for r in gpu_results:
            lb = r.labels
            key = f"{lb.cluster}|{lb.node}|{lb.gpu}"
            known = seen.get(key)
            if known is not None and (known.job, known.rank) == (lb.job, lb.rank):
                gap = round((window_start - known.last_window) / window_s)
                if gap >= 1:
                    known.every = gap if not known.learned else min(known.every, gap)
                    known.learned = True
                known.last_window = window_start  # the common case: no new object per GPU per window
            else:
                seen[key] = SeenGpu(last_window=window_start, cluster=lb.cluster, node=lb.node or "", gpu=lb.gpu or 0,
                                    model=lb.model or "", job=lb.job, rank=lb.rank)
        # A job that ended (or a node that left) stops reporting here as a whole, and its GPUs go on
        # under another key, maybe in another partition: forget them unless one is firing silent.
        group_last = group_last_seen(seen)
        for key, g in list(seen.items()):
            if (group_gone(g, group_last, window_start, window_s)
                    and not self.is_firing("silent_gpu", self._silent_fingerprint(g))):
                del seen[key]

    @staticmethod
    def _silent_fingerprint(g: SeenGpu) -> str:
        return finding_fingerprint("silent_gpu", g.cluster, g.job, g.rank, g.node, g.gpu)

    def _forget(self, window_start: float, window_s: float) -> None:
        horizon = window_start - self.config.forget_after_windows * window_s
        silent = self.state.lifecycles["silent_gpu"].episodes
        for key, g in list(self.state.seen_gpus.items()):
            if g.last_window < horizon and self._silent_fingerprint(g) not in silent:
                del self.state.seen_gpus[key]
        for key, shape in list(self.state.rank_shapes.items()):
            if shape.last_window < horizon:
                del self.state.rank_shapes[key]
        seen_jobs = {f"{g.cluster}|{g.job}" for g in self.state.seen_gpus.values() if g.job is not None}
        for key in [k for k in self.state.job_windows if k not in seen_jobs]:
            del self.state.job_windows[key]
        for key in [k for k in self.state.job_clocks if k not in seen_jobs]:
            del self.state.job_clocks[key]
        stalled = self.state.lifecycles["job_stalled"].episodes
        for key, last in list(self.state.job_busy.items()):
            cluster, _, job = key.partition("|")
            # A job stalled for longer than the horizon is still the job that was busy, not a new idle one.
            if last < horizon and finding_fingerprint("job_stalled", cluster, job, None, None, None) not in stalled:
                del self.state.job_busy[key]


class LowUtilizationBaseline:
    """The naive rule laggard is compared with: alert on any GPU whose window-mean util is below X%."""

    def __init__(self, threshold_pct: float = 50.0, fire_after: int = BASELINE.fire_after,
                 state: LifecycleState | None = None) -> None:
        self.threshold_pct = threshold_pct
        self._lifecycle = Lifecycle(fire_after, BASELINE.clear_after, state)

    @property
    def state(self) -> LifecycleState:
        return self._lifecycle.state

    def observe(self, window_start: float, window_s: float, gpu_results: Sequence[WindowResult]) -> list[Finding]:
        window = WindowView(window_start, window_s, gpu_results, DetectorConfig(), DetectorState(),
                            lambda kind, fingerprint: False)
        observed = {f.fingerprint: f for f in low_utilization(window, self.threshold_pct)}
        return self._lifecycle.step(window_start, window_s, observed)
