"""Who paces a job, as detectors: the straggling rank (agents/straggler.py, per window and over a
span of windows for long steps), the node that slows a whole job (agents/slow_job.py) and the slower
GPU model of a mixed one; with the findings operators read (why, in the units they use, and what
it costs)."""

from __future__ import annotations

from collections.abc import Callable
from statistics import median

from laggard.agents.detector_views import JobView, gpu_finding
from laggard.agents.slow_job import SlowGroup, find_slow_groups, worth_a_look
from laggard.agents.straggler import (
    MixedGeneration,
    Straggler,
    StragglerConfig,
    find_mixed_generation,
    find_stragglers,
    merge_span,
)
from laggard.results import Finding, WindowResult, finding_fingerprint

_REASON_WORDS = {"power_cap": "power-capped", "power_brake": "power brake", "hw_slowdown": "HW slowdown",
                 "sw_thermal": "thermal", "hw_thermal": "HW thermal"}


def _why(s: Straggler) -> list[str]:
    """What an operator reads in the summary: the signature's numbers, and only the throttle
    reasons the culprit carries that its peers do not (busy Hopper GPUs all carry SW_POWER_CAP)."""
    c, peers = s.culprit, len(s.peers)
    # Where the source sends no SM clock, there is nothing to say about it (a throttled one needs it).
    clock = ([f"SM clock {c.sm_clock_mhz_mean:.0f} MHz vs {s.peer_clock_median:.0f} peers"]
             if c.sm_clock_mhz_mean is not None and s.peer_clock_median is not None else [])
    words = [_REASON_WORDS.get(name, name) for name in sorted(s.extra_reasons)]
    if s.signature == "throttled":
        why = [*clock, *words]
    elif s.signature == "slow_compute":
        why = [f"working {s.culprit_work:.0%} of the time vs {s.peer_work_median:.0%} for {peers} peers spinning in "
               f"the collective", *clock, "no throttle reason: slow compute"]
    elif s.signature == "host":
        why = [f"GPU idle {1 - c.util_mean / 100:.0%} of each step while {peers} peers spin in the collective: "
               f"host-side"]
    else:
        why = [f"busy {c.util_mean:.0f}% vs {s.peer_util_median:.0f}% for peers that idle while they wait", *words]
    if c.temp_c_mean is not None and s.peer_temp_median is not None and c.temp_c_mean > s.peer_temp_median + 5:
        why.append(f"{c.temp_c_mean:.0f} °C vs {s.peer_temp_median:.0f} peers")
    return why


def _rounded(value: float | None) -> float | None:
    """A reading for the evidence; None where the source does not send it."""
    return None if value is None else round(value, 1)


def straggler_finding(s: Straggler, weak_share: float = StragglerConfig.weak_share, span_s: float | None = None) -> Finding:
    """`span_s`: the seconds its numbers cover (one window, or a span of them for long steps)."""
    c = s.culprit
    waits = s.peer_wait_s()
    idle_w = [p.idle_power_w for p in s.peers]
    summary = (
        f"job {c.labels.job} is paced by rank {c.labels.rank} on node {c.labels.node} GPU {c.labels.gpu} "
        f"({', '.join(_why(s))}); {len(s.peers)} peers wait {s.wait_share:.0%} of each step"
    )
    return gpu_finding(
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
            "sm_clock_mhz": _rounded(c.sm_clock_mhz_mean),
            "peer_sm_clock_median_mhz": _rounded(s.peer_clock_median),
            "temp_c": _rounded(c.temp_c_mean),
            "peer_temp_median_c": _rounded(s.peer_temp_median),
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
    lost_s = group.deficit * sum(r.window_s for r in group.ranks)  # GPU-seconds the job loses this window
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
                "job_gpu_s_wasted": round(share * lost_s, 2),
                "energy_wh_wasted": round(share * lost_s * idle_w / 3600.0, 3),
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
