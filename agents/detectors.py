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

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from statistics import median
from typing import Any, Literal

from pydantic import BaseModel, Field

from laggard.agents.finding_lifecycle import Lifecycle, LifecycleState
from laggard.agents.slow_job import SlowGroup, find_slow_groups, worth_a_look
from laggard.agents.straggler import (
    LARGE_GROUP,
    MixedGeneration,
    Straggler,
    StragglerConfig,
    by_model,
    find_mixed_generation,
    find_stragglers,
    merge_span,
    work,
)
from laggard.agents.windows import IDLE_UTIL_PCT
from laggard.results import Finding, WindowResult, finding_fingerprint, group_key

# (labels, evidence, cost) of one shape a finding of a kind comes in: what rule templates are
# rendered on at check time. A None value where the detector may send None.
Shape = tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]


@dataclass(frozen=True)
class DetectorConfig:
    idle_util_pct: float = IDLE_UTIL_PCT  # window-mean util at or below which an allocated GPU is idle
    busy_job_util_pct: float = 20.0  # median util at which a job counts as having been busy
    forget_after_windows: int = 360  # drop bookkeeping for GPUs/jobs unseen this long (not firing)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)


class SeenGpu(BaseModel):
    last_window: float
    cluster: str
    node: str
    gpu: int
    model: str
    job: str | None = None
    rank: int | None = None
    # Windows between its samples, learned (a collector scraping every 30 s into 10 s windows
    # fills one window in three): it is silent only once it misses more than that.
    every: int = 1
    learned: bool = False

    @property
    def group(self) -> str:
        """What its results are keyed by in stage 2 (agents.stages.detect_key): its job, else its node."""
        return group_key(self.cluster, self.job, self.node)


class RankShape(BaseModel):
    """How a rank usually differs from its peers (pipeline stage, the rank holding the loss): its
    work share and util minus its group's medians, smoothed over windows it was not flagged in."""

    work: float = 0.0
    util: float = 0.0
    last_window: float = 0.0


class DetectorState(BaseModel):
    lifecycles: dict[str, LifecycleState] = Field(default_factory=dict)  # per detector kind
    seen_gpus: dict[str, SeenGpu] = Field(default_factory=dict)  # cluster|node|gpu -> last sighting
    job_busy: dict[str, float] = Field(default_factory=dict)  # cluster|job -> last window it was busy
    job_windows: dict[str, int] = Field(default_factory=dict)  # cluster|job -> windows seen
    # cluster|job|rank -> its usual difference from its peers; only ranks that differ are kept
    rank_shapes: dict[str, RankShape] = Field(default_factory=dict)
    # cluster|job -> GPU model -> its busy ranks' usual SM clock, MHz, learned while it is not slow
    job_clocks: dict[str, dict[str, float]] = Field(default_factory=dict)


@dataclass(frozen=True)
class WindowView:
    """What a detector sees of one closed window: its GPU results, the detectors' memory of earlier
    windows (updated with this one) and whether a finding is firing now."""

    start: float
    length_s: float
    results: Sequence[WindowResult]
    config: DetectorConfig
    memory: DetectorState
    is_firing: Callable[[str, str], bool]  # (kind, fingerprint)
    # cluster|job -> its ranks' results in the windows just before this one, oldest first (SPAN_WINDOWS - 1
    # at most; kept in memory only: after a restart a span fills again)
    earlier: Mapping[str, Sequence[Sequence[WindowResult]]] = field(default_factory=dict)

    @property
    def end(self) -> float:
        return self.start + self.length_s


@dataclass(frozen=True)
class JobView:
    """One job's GPU results (its ranks) in a window."""

    cluster: str
    job: str
    ranks: Sequence[WindowResult]
    window: WindowView

    @property
    def idle(self) -> list[WindowResult]:
        return [r for r in self.ranks if r.util_mean <= self.window.config.idle_util_pct]

    @property
    def busy_before(self) -> float | None:
        """The start of the last window the job was busy in (this one included), if any."""
        return self.window.memory.job_busy.get(f"{self.cluster}|{self.job}")

    @property
    def windows_seen(self) -> int:
        """Windows of this job seen so far, this one included."""
        return self.window.memory.job_windows.get(f"{self.cluster}|{self.job}", 0)

    def shape(self, rank: int | None) -> RankShape:
        return self.window.memory.rank_shapes.get(f"{self.cluster}|{self.job}|{rank}") or RankShape()

    @property
    def span(self) -> list[Sequence[WindowResult]]:
        """Its ranks' results in the last SPAN_WINDOWS windows, this one last; fewer after its start."""
        return [*self.window.earlier.get(f"{self.cluster}|{self.job}", ()), self.ranks]

    def usual_clocks(self) -> dict[str, float]:
        """Its busy ranks' usual SM clock per GPU model, where learned."""
        return self.window.memory.job_clocks.get(f"{self.cluster}|{self.job}", {})


@dataclass(frozen=True)
class Detector:
    kind: str
    find: Callable[[Any], Iterable[Finding]]  # a JobView (per="job") or a WindowView (per="window") -> firing findings
    per: Literal["job", "window"]
    samples: tuple[Shape, ...]
    fire_after: int = 2  # consecutive windows before a finding fires (so latency <= 2 windows)
    clear_after: int = 2  # consecutive clean windows before it resolves
    fire_after_s: float = 0.0  # ... and seconds of the condition in them (findings' evidence fault_share)
    family: str = ""  # what `laggard eval` scores it as (default: its kind)
    truths: tuple[str, ...] = ()  # the simulator's truth kinds it should find (default: its kind)

    @property
    def eval_family(self) -> str:
        return self.family or self.kind

    @property
    def truth_kinds(self) -> tuple[str, ...]:
        return self.truths or (self.kind,)


def _finding(kind: str, r: WindowResult, summary: str, **extra: object) -> Finding:
    """A firing finding about GPU result `r`'s GPU (job, rank, node, gpu, model from its labels)."""
    lb = r.labels
    return Finding(
        kind=kind,
        state="firing",
        cluster=lb.cluster,
        job=lb.job,
        rank=lb.rank,
        node=lb.node,
        gpu=lb.gpu,
        model=lb.model,
        window_start=r.window_start,
        window_end=r.window_end,
        summary=summary,
        **extra,
    )


def _clock(ts: float, ref: float) -> str:
    """A time for a summary: '12:03:10 UTC' on the UTC day of `ref` (the window's end), else with
    its date. Summaries are read by people (chat, dashboards): never a raw epoch."""
    when = datetime.fromtimestamp(ts, tz=timezone.utc)
    same_day = when.date() == datetime.fromtimestamp(ref, tz=timezone.utc).date()
    return when.strftime("%H:%M:%S UTC" if same_day else "%Y-%m-%d %H:%M:%S UTC")


_REASON_WORDS = {"power_cap": "power-capped", "power_brake": "power brake", "hw_slowdown": "HW slowdown",
                 "sw_thermal": "thermal", "hw_thermal": "HW thermal"}


def _why(s: Straggler) -> list[str]:
    """What an operator reads in the summary: the signature's numbers, and only the throttle
    reasons the culprit carries that its peers do not (busy Hopper GPUs all carry SW_POWER_CAP)."""
    c, peers = s.culprit, len(s.peers)
    clock = f"SM clock {c.sm_clock_mhz_mean:.0f} MHz vs {s.peer_clock_median:.0f} peers"
    words = [_REASON_WORDS.get(name, name) for name in sorted(s.extra_reasons)]
    if s.signature == "throttled":
        why = [clock, *words]
    elif s.signature == "slow_compute":
        why = [f"working {s.culprit_work:.0%} of the time vs {s.peer_work_median:.0%} for {peers} peers spinning in "
               f"the collective", clock, "no throttle reason: slow compute"]
    elif s.signature == "host":
        why = [f"GPU idle {1 - c.util_mean / 100:.0%} of each step while {peers} peers spin in the collective: "
               f"host-side"]
    else:
        why = [f"busy {c.util_mean:.0f}% vs {s.peer_util_median:.0f}% for peers that idle while they wait", *words]
    if c.temp_c_mean > s.peer_temp_median + 5:
        why.append(f"{c.temp_c_mean:.0f} °C vs {s.peer_temp_median:.0f} peers")
    return why


def straggler_finding(s: Straggler, weak_share: float = StragglerConfig.weak_share, span_s: float | None = None) -> Finding:
    """`span_s`: the seconds its numbers cover (one window, or a span of them for long steps)."""
    c = s.culprit
    waits = s.peer_wait_s()
    idle_w = [p.idle_power_w for p in s.peers]
    summary = (
        f"job {c.labels.job} is paced by rank {c.labels.rank} on node {c.labels.node} GPU {c.labels.gpu} "
        f"({', '.join(_why(s))}); {len(s.peers)} peers wait {s.wait_share:.0%} of each step"
    )
    return _finding(
        "straggler",
        c,
        summary,
        evidence={
            "signature": s.signature,
            "rank_util_pct": round(c.util_mean, 2),
            "peer_util_median_pct": round(s.peer_util_median, 2),
            "peer_util_sigma_pct": round(s.peer_util_sigma, 2),
            "rank_work_share": round(s.culprit_work, 3),
            "peer_work_share_median": round(s.peer_work_median, 3),
            "sm_clock_mhz": round(c.sm_clock_mhz_mean, 1),
            "peer_sm_clock_median_mhz": round(s.peer_clock_median, 1),
            "temp_c": round(c.temp_c_mean, 1),
            "peer_temp_median_c": round(s.peer_temp_median, 1),
            "throttled_share": round(c.throttled_share, 3),
            "throttle_reasons": ",".join(sorted(s.extra_reasons)) or None,
            "fault_share": round(s.fault_share * (1.0 if s.strong else weak_share), 3),
            "strength": "strong" if s.strong else "weak",
            "peers": len(s.peers),
            "span_s": round(c.window_s if span_s is None else span_s, 1),
        },
        cost={
            "peer_wait_share": round(s.wait_share, 4),
            "peer_gpu_s_wasted": round(sum(waits), 2),
            "energy_wh_wasted": round(sum(w * i for w, i in zip(waits, idle_w)) / 3600.0, 3),
        },
    )


def mixed_generation_finding(m: MixedGeneration, window_start: float, window_s: float) -> Finding:
    any_rank = m.fast[0].labels
    fast_wait_s = [m.waste * window_s for _ in m.fast]
    summary = (
        f"job {any_rank.job} spans {m.slow_model} and {m.fast_model}: {len(m.fast)} {m.fast_model} ranks wait "
        f"{m.waste:.0%} of each step for {len(m.slow)} {m.slow_model} ranks"
    )
    return Finding(
        kind="mixed_generation",
        state="firing",
        cluster=any_rank.cluster,
        job=any_rank.job,
        window_start=window_start,
        window_end=window_start + window_s,
        summary=summary,
        evidence={
            "slow_model": m.slow_model,
            "fast_model": m.fast_model,
            "slow_util_median_pct": round(median(r.util_mean for r in m.slow), 2),
            "fast_util_median_pct": round(median(r.util_mean for r in m.fast), 2),
            "slow_work_share_median": round(m.slow_work_median, 3),
            "fast_work_share_median": round(m.fast_work_median, 3),
            "slow_ranks": len(m.slow),
            "fast_ranks": len(m.fast),
        },
        cost={
            "fast_rank_waste_share": round(m.waste, 4),
            "fast_gpu_s_wasted": round(sum(fast_wait_s), 2),
            "energy_wh_wasted": round(sum(w * f.idle_power_w for w, f in zip(fast_wait_s, m.fast)) / 3600.0, 3),
        },
    )


# --- the detectors ----------------------------------------------------------------------------

# A job's first minute teaches each rank's usual shape; until then only a throttled clock (hardware
# evidence) names a straggler: one that works more or idles from the start looks like the job's design.
SHAPE_WINDOWS = 6
SHAPE_RATE = 0.4  # weight of a new window in a rank's shape: 5 full windows learn 92% of a steady one
# Windows a job's ranks are also compared over: its peers wait once a step, so with steps longer
# than a window (24 s steps in 10 s windows) a wait lands in one window of two or three.
SPAN_WINDOWS = 3


def stragglers(job: JobView) -> list[Finding]:
    """The rank that paces its job (agents/straggler.py), each rank's usual shape taken off: by a
    throttled clock at once; by working more or idling only once the job's first windows have
    shown that shape (a first pipeline stage always does more, and is not a straggler for it)."""
    young = job.windows_seen < SHAPE_WINDOWS

    cfg = job.window.config.straggler

    def usual(r: WindowResult) -> tuple[float, float]:
        shape = job.shape(r.labels.rank)
        # A shape within the noise of a few windows is no design: taking it off would add noise.
        if abs(shape.work) < cfg.min_work_gap and abs(shape.util) < cfg.min_gap_pct:
            return 0.0, 0.0
        return shape.work, shape.util

    found = [(s, job.window.length_s) for s in find_stragglers(job.ranks, cfg, usual)]
    if len(job.span) == SPAN_WINDOWS:
        named = {s.culprit.key for s, _ in found}
        found += [(s, SPAN_WINDOWS * job.window.length_s) for s in _span_stragglers(job, cfg, usual)
                  if s.culprit.key not in named]
    return [straggler_finding(s, cfg.weak_share, span_s) for s, span_s in found
            if s.signature == "throttled" or not young]


def _span_stragglers(job: JobView, cfg: StragglerConfig, usual: Callable[[WindowResult], tuple[float, float]]
                     ) -> list[Straggler]:
    """Stragglers over the job's last SPAN_WINDOWS windows: with steps longer than a window, peers
    wait in one window of two or three, so this window alone may show nothing. Strong evidence only,
    and not a rank that carried a throttle reason its peers lack in part of the span (single windows
    name that one in each window of it: the span would only drag its end). While a straggler of the
    job fires, only that one: its peers' numbers are bent by it."""
    found = [s for s in find_stragglers(merge_span(job.span), cfg, usual) if s.strong and s.fault_share == 1.0]
    if not found:
        return []
    firing = {r.key for r in job.ranks if job.window.is_firing("straggler", finding_fingerprint(
        "straggler", r.labels.cluster, r.labels.job, r.labels.rank, r.labels.node, r.labels.gpu))}
    return [s for s in found if not firing or s.culprit.key in firing]


def slow_node_findings(group: SlowGroup, job: JobView) -> list[Finding]:
    """One finding per node of a job's slow group: what an operator drains. The job's loss (each
    rank loses the group's clock deficit of each step) is shared out by slow GPUs."""
    ref, window = group.reference, job.window
    against = (f"{ref.clock_mhz:.0f} MHz for {group.model} elsewhere in the fleet ({ref.gpus} GPUs)"
               if ref.kind == "fleet" else f"{ref.clock_mhz:.0f} MHz for this job before")
    words = [_REASON_WORDS.get(name, name) for name in sorted(group.extra_reasons)]
    lost_s = [group.deficit * r.window_s for r in group.ranks]
    idle_w = median(r.idle_power_w for r in group.ranks)
    found = []
    for node, slow in sorted(group.by_node().items()):
        share = len(slow) / len(group.slow)
        clock = median(r.sm_clock_mhz_mean for r in slow)
        any_rank = slow[0].labels
        found.append(Finding(
            kind="slow_node", state="firing", cluster=job.cluster, job=job.job, node=node, model=any_rank.model,
            window_start=window.start, window_end=window.end,
            summary=(f"node {node} slows job {job.job}: {len(slow)} of its GPUs at SM clock {clock:.0f} MHz vs "
                     f"{against}{''.join(f', {w}' for w in words)}; all {len(group.ranks)} {group.model} ranks "
                     f"lose {group.deficit:.0%} of each step"),
            evidence={
                "reference": ref.kind,
                "sm_clock_mhz": round(clock, 1),
                "reference_sm_clock_mhz": round(ref.clock_mhz, 1),
                "reference_gpus": ref.gpus,
                "throttle_reasons": ",".join(sorted(group.extra_reasons)) or None,
                "slow_gpus": len(slow),
                "job_slow_ranks": len(group.slow),
                "job_ranks": len(group.ranks),
                "fault_share": round(group.fault_share, 3),
            },
            cost={
                "job_step_loss_share": round(group.deficit, 4),
                "job_gpu_s_wasted": round(share * sum(lost_s), 2),
                "energy_wh_wasted": round(share * sum(lost_s) * idle_w / 3600.0, 3),
            },
        ))
    return found


def slow_nodes(job: JobView) -> list[Finding]:
    """Nodes that slow a job as a whole (agents/slow_job.py): most of its ranks throttled, against the
    same GPU model elsewhere in this window or the job's own usual clock."""
    cfg, usual = job.window.config.straggler, job.usual_clocks()
    if not worth_a_look(job.ranks, usual, cfg):
        return []
    elsewhere = [r for r in job.window.results if (r.labels.cluster, r.labels.job) != (job.cluster, job.job)]
    return [f for group in find_slow_groups(job.ranks, elsewhere, usual, cfg) for f in slow_node_findings(group, job)]


def mixed_generation(job: JobView) -> list[Finding]:
    """The slower GPU model that paces a job spanning two."""
    mixed = find_mixed_generation(job.ranks, job.window.config.straggler)
    return [] if mixed is None else [mixed_generation_finding(mixed, job.window.start, job.window.length_s)]


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
                                                   f"(busy until {_clock(last_busy_end, job.window.end)})",
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
        f = _finding(
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
    return [_finding("xid", r, f"GPU {r.labels.gpu} on node {r.labels.node} reported XID {r.xid_last} "
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
                        f"{_clock(g.last_window, window.end)})",
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
    return [_finding("low_utilization", r, f"GPU {r.labels.gpu} on node {r.labels.node} at {r.util_mean:.0f}% "
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
            for model, group in by_model([r for r in job.ranks if r.util_mean >= busy_pct]).items():
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
