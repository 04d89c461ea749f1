"""Detectors over closed windows: per job, per GPU, and a naive baseline to compare against.

`FleetDetector.observe(window_start, window_s, gpu_results)` is called once per closed window, in
window order, with the GPU-scope results of that window. It returns the findings that changed
state (firing or resolved) in that window. All state is in `FleetDetector.state`, a pydantic model
that dumps to a plain dict and restores from one (`to_dict` / `from_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from agents.findings import Finding, FindingKind, WindowResult, detect_key, finding_fingerprint, group_key
from agents.lifecycle import Lifecycle, LifecycleState
from agents.straggler import MixedGeneration, Straggler, StragglerConfig, find_mixed_generation, find_stragglers
from agents.windows import IDLE_UTIL_PCT

DetectorKind = Literal["straggler", "mixed_generation", "idle_allocated", "job_stalled", "xid", "silent_gpu"]


@dataclass(frozen=True)
class DetectorConfig:
    fire_after: int = 2  # consecutive windows before a finding fires (so latency <= 2 windows)
    clear_after: int = 2  # consecutive clean windows before it resolves
    xid_fire_after: int = 1  # an XID is an event: fire on the window that carries it
    xid_clear_after: int = 3
    silent_after: int = 2  # windows without samples from a GPU seen before
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


class DetectorState(BaseModel):
    lifecycles: dict[str, LifecycleState] = Field(default_factory=dict)  # per detector kind
    seen_gpus: dict[str, SeenGpu] = Field(default_factory=dict)  # cluster|node|gpu -> last sighting
    job_busy: dict[str, float] = Field(default_factory=dict)  # cluster|job -> last window it was busy


def _finding(kind: FindingKind, r: WindowResult, summary: str, **extra: object) -> Finding:
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


def _throttle_words(r: WindowResult) -> list[str]:
    words = {"power_cap": "power-capped", "power_brake": "power brake", "hw_slowdown": "HW slowdown",
             "sw_thermal": "thermal throttling", "hw_thermal": "HW thermal throttling"}
    return [words[name] for name, share in r.throttle_share.items() if share >= 0.5]


def straggler_finding(s: Straggler) -> Finding:
    c = s.culprit
    waits = s.peer_wait_s()
    idle_w = [p.idle_power_w for p in s.peers]
    why = [f"SM clock {c.sm_clock_mhz_mean:.0f} MHz vs {s.peer_clock_median:.0f} peers"] if (
        c.sm_clock_mhz_mean < 0.97 * s.peer_clock_median
    ) else []
    why += _throttle_words(c)
    if c.temp_c_mean > s.peer_temp_median + 5:
        why.append(f"{c.temp_c_mean:.0f} °C vs {s.peer_temp_median:.0f} peers")
    where = f" ({', '.join(why)})" if why else ""
    summary = (
        f"job {c.labels.job} is paced by rank {c.labels.rank} on node {c.labels.node} GPU {c.labels.gpu}{where}; "
        f"{len(s.peers)} peers wait {s.wait_share:.0%} of each step"
    )
    return _finding(
        "straggler",
        c,
        summary,
        evidence={
            "rank_util_pct": round(c.util_mean, 2),
            "peer_util_median_pct": round(s.peer_util_median, 2),
            "peer_util_sigma_pct": round(s.peer_util_sigma, 2),
            "sm_clock_mhz": round(c.sm_clock_mhz_mean, 1),
            "peer_sm_clock_median_mhz": round(s.peer_clock_median, 1),
            "temp_c": round(c.temp_c_mean, 1),
            "peer_temp_median_c": round(s.peer_temp_median, 1),
            "throttled_share": round(c.throttled_share, 3),
            "throttle_reasons": ",".join(n for n, v in c.throttle_share.items() if v >= 0.5) or None,
            "peers": len(s.peers),
        },
        cost={
            "peer_wait_share": round(s.wait_share, 4),
            "peer_gpu_s_wasted": round(sum(waits), 2),
            "energy_wh_wasted": round(sum(w * i for w, i in zip(waits, idle_w)) / 3600.0, 3),
        },
    )


def mixed_generation_finding(m: MixedGeneration, window_start: float, window_s: float) -> Finding:
    any_rank = m.fast[0].labels
    fast_wait_s = [max(0.0, m.slow_util_median - f.util_mean) / 100.0 * window_s for f in m.fast]
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
            "slow_util_median_pct": round(m.slow_util_median, 2),
            "fast_util_median_pct": round(m.fast_util_median, 2),
            "slow_ranks": len(m.slow),
            "fast_ranks": len(m.fast),
        },
        cost={
            "fast_rank_waste_share": round(m.waste, 4),
            "fast_gpu_s_wasted": round(sum(fast_wait_s), 2),
            "energy_wh_wasted": round(sum(w * f.idle_power_w for w, f in zip(fast_wait_s, m.fast)) / 3600.0, 3),
        },
    )


class FleetDetector:
    """All laggard detectors with their persistence/clearing; state is one serialisable model."""

    KINDS: tuple[DetectorKind, ...] = ("straggler", "mixed_generation", "idle_allocated", "job_stalled", "xid", "silent_gpu")

    def __init__(self, config: DetectorConfig | None = None, state: DetectorState | None = None) -> None:
        self.config = cfg = config or DetectorConfig()
        self.state = state or DetectorState()
        timing = {"xid": (cfg.xid_fire_after, cfg.xid_clear_after), "silent_gpu": (cfg.silent_after, 1)}
        self._lifecycles = {
            kind: Lifecycle(
                *timing.get(kind, (cfg.fire_after, cfg.clear_after)),
                state=self.state.lifecycles.setdefault(kind, LifecycleState()),
            )
            for kind in self.KINDS
        }

    def to_dict(self) -> dict:
        return self.state.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict, config: DetectorConfig | None = None) -> FleetDetector:
        return cls(config, DetectorState.model_validate(data))

    def firing(self) -> list[Finding]:
        return [f for lc in self._lifecycles.values() for f in lc.firing()]

    def observe(self, window_start: float, window_s: float, gpu_results: Sequence[WindowResult]) -> list[Finding]:
        """Feed one closed window's GPU results; returns the findings that fired or resolved in it."""
        observed: dict[str, dict[str, Finding]] = {kind: {} for kind in self.KINDS}
        jobs: dict[tuple[str, str], list[WindowResult]] = {}
        for r in gpu_results:
            if r.labels.job is not None:
                jobs.setdefault((r.labels.cluster, r.labels.job), []).append(r)
            if r.xid_count:
                self._add(observed, _finding("xid", r, f"GPU {r.labels.gpu} on node {r.labels.node} reported XID "
                                             f"{r.xid_last} ({r.xid_count} sample(s) this window)",
                                             evidence={"xid": r.xid_last, "xid_samples": r.xid_count}))
        for (cluster, job), ranks in jobs.items():
            self._observe_job(observed, cluster, job, ranks, window_start, window_s)
        self._observe_silent(observed, window_start, window_s, gpu_results)
        self._forget(window_start, window_s)
        out = []
        for kind, lifecycle in self._lifecycles.items():
            out += lifecycle.step(window_start, window_s, observed[kind])
        return out

    @staticmethod
    def _add(observed: dict[str, dict[str, Finding]], f: Finding) -> None:
        observed[f.kind][f.fingerprint] = f

    def _observe_job(
        self,
        observed: dict[str, dict[str, Finding]],
        cluster: str,
        job: str,
        ranks: list[WindowResult],
        window_start: float,
        window_s: float,
    ) -> None:
        cfg = self.config
        job_key = f"{cluster}|{job}"
        idle = [r for r in ranks if r.util_mean <= cfg.idle_util_pct]
        utils = sorted(r.util_mean for r in ranks)
        if utils[len(utils) // 2] >= cfg.busy_job_util_pct:
            self.state.job_busy[job_key] = window_start
        whole_job_idle = len(idle) == len(ranks)
        stalled = whole_job_idle and job_key in self.state.job_busy
        if whole_job_idle:
            # One finding for the job, not one per GPU: stalled if it was busy before, else never used.
            if stalled:
                last_busy_end = self.state.job_busy[job_key] + window_s
                kind: FindingKind = "job_stalled"
                summary = f"job {job} stalled: all {len(ranks)} ranks idle (busy until {last_busy_end:.0f})"
            else:
                last_busy_end = None
                kind = "idle_allocated"
                summary = f"job {job} holds {len(ranks)} GPUs and has not used them ({utils[-1]:.1f}% peak util)"
            self._add(observed, Finding(
                kind=kind, state="firing", cluster=cluster, job=job,
                window_start=window_start, window_end=window_start + window_s, summary=summary,
                evidence={"ranks": len(ranks), "max_util_pct": round(utils[-1], 2), "last_busy_window_end": last_busy_end},
                cost={"gpu_s_idle": round(len(ranks) * window_s, 1),
                      "energy_wh_idle": round(sum(r.energy_wh for r in ranks), 3)},
            ))
            if not stalled:
                return
        for r in idle:
            f = _finding(
                "idle_allocated", r,
                f"GPU {r.labels.gpu} on node {r.labels.node} is allocated to job {job} (rank {r.labels.rank}) "
                f"but idle ({r.util_mean:.1f}% util)",
                evidence={"util_pct": round(r.util_mean, 2), "power_w": round(r.power_w_mean, 1)},
                cost={"gpu_s_idle": round(window_s, 1), "energy_wh_idle": round(r.energy_wh, 3)},
            )
            # In a stalled job the stall is the finding; only GPUs already idle before it stay reported.
            if not stalled or self._lifecycles["idle_allocated"].is_firing(f.fingerprint):
                self._add(observed, f)
        for s in find_stragglers(ranks, cfg.straggler):
            self._add(observed, straggler_finding(s))
        mixed = find_mixed_generation(ranks, cfg.straggler)
        if mixed is not None:
            self._add(observed, mixed_generation_finding(mixed, window_start, window_s))

    def _observe_silent(
        self,
        observed: dict[str, dict[str, Finding]],
        window_start: float,
        window_s: float,
        gpu_results: Sequence[WindowResult],
    ) -> None:
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
        # under another key, maybe in another partition: only a GPU whose group still reports is silent.
        reporting = {detect_key(r) for r in gpu_results}
        for key, g in list(seen.items()):
            if g.last_window < window_start and g.group not in reporting:
                if not self._lifecycles["silent_gpu"].is_firing(self._silent_fingerprint(g)):
                    del seen[key]
                continue
            missing = round((window_start - g.last_window) / window_s)
            if g.learned and missing >= g.every:  # seen twice: its interval is known
                self._add(observed, Finding(
                    kind="silent_gpu", state="firing", cluster=g.cluster, job=g.job, rank=g.rank, node=g.node,
                    gpu=g.gpu, model=g.model, window_start=window_start, window_end=window_start + window_s,
                    summary=f"GPU {g.gpu} on node {g.node} stopped reporting (last sample in window {g.last_window:.0f})",
                    evidence={"last_window_start": g.last_window, "windows_missing": missing},
                ))

    @staticmethod
    def _silent_fingerprint(g: SeenGpu) -> str:
        return finding_fingerprint("silent_gpu", g.cluster, g.job, g.rank, g.node, g.gpu)

    def _forget(self, window_start: float, window_s: float) -> None:
        horizon = window_start - self.config.forget_after_windows * window_s
        silent = self.state.lifecycles["silent_gpu"].episodes
        for key, g in list(self.state.seen_gpus.items()):
            if g.last_window < horizon and self._silent_fingerprint(g) not in silent:
                del self.state.seen_gpus[key]
        stalled = self.state.lifecycles["job_stalled"].episodes
        for key, last in list(self.state.job_busy.items()):
            cluster, _, job = key.partition("|")
            # A job stalled for longer than the horizon is still the job that was busy, not a new idle one.
            if last < horizon and finding_fingerprint("job_stalled", cluster, job, None, None, None) not in stalled:
                del self.state.job_busy[key]


class LowUtilizationBaseline:
    """The naive rule laggard is compared with: alert on any GPU whose window-mean util is below X%."""

    def __init__(self, threshold_pct: float = 50.0, fire_after: int = 1, state: LifecycleState | None = None) -> None:
        self.threshold_pct = threshold_pct
        self._lifecycle = Lifecycle(fire_after, 1, state)

    @property
    def state(self) -> LifecycleState:
        return self._lifecycle.state

    def observe(self, window_start: float, window_s: float, gpu_results: Sequence[WindowResult]) -> list[Finding]:
        observed = {}
        for r in gpu_results:
            if r.util_mean < self.threshold_pct:
                f = _finding("low_utilization", r, f"GPU {r.labels.gpu} on node {r.labels.node} at {r.util_mean:.0f}% "
                             f"utilization (below {self.threshold_pct:.0f}%)", evidence={"util_pct": round(r.util_mean, 2)})
                observed[f.fingerprint] = f
        return self._lifecycle.step(window_start, window_s, observed)
