"""In-job comparisons for one window: which rank paces a job, and which GPU model paces a mixed one.

In synchronous training every rank waits at each collective for the slowest. *Where* it waits
decides what NVML shows (DESIGN.md, "Domain facts"):
- inside the collective kernel (NCCL, the usual case): the waiting GPU spins on a few SMs, so
  util_gpu reads ~100% at near-idle power with a boosted clock;
- on the host: the waiting GPU reads idle.
So the rank that paces its job is told from its peers (same job, same GPU model) by one of four
signatures, each a robust comparison (median and MAD of the peers, with noise floors, so that 2- and
3-rank jobs still need a clear gap):
- `throttled`: its SM clock sits below its peers' with a throttle reason they do not carry, or far
  below (a lowered power limit leaves the same SW_POWER_CAP flag busy peers carry anyway): thermal,
  power cap, HW slowdown. It computes longer at the lower clock while its peers wait.
- `busier`: it works a larger share of the time than its peers, who idle while they wait (host-side
  waits: util shows it).
- `slow_compute`: its peers spin in the collective (util ~100% at a low power share) while it
  works at a higher power share at the same or a lower clock, without a throttle reason: memory
  thrashing, a weak part.
- `host`: its peers spin at ~100% while its own GPU idles part of each step: its host (input
  pipeline, CPU contention, GC) is late, not its GPU.
Work share is DCGM's SM_ACTIVE where a source has it, else the lower of util_gpu and the busy share
power implies (agents/effective.py `work_share`). A host-side straggler whose peers also wait on
the host looks like them in every window mean: nothing here can name it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from statistics import median
from typing import Literal

import numpy as np

from laggard.agents.effective import work_share
from laggard.results import WindowResult

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution -> its standard deviation
# A rank's usual (work share, util) above its peers' medians: its job's shape (agents/detectors.py).
Usual = Callable[[WindowResult], tuple[float, float]]
Signature = Literal["throttled", "busier", "slow_compute", "host"]
# A throttle reason carried for at least this share of a window's samples counts as carried.
REASON_SHARE = 0.5
# Groups this small have no robust median: one culprit is half or a third of every peer set.
SMALL_GROUP = 3
# Groups at least this large measure their own spread well (see _Group._stats).
LARGE_GROUP = 16


@dataclass(frozen=True)
class StragglerConfig:
    min_ratio: float = 1.05  # culprit work / peer median work (busier, slow_compute)
    min_gap_pct: float = 4.0  # culprit util - peer median util, percentage points (busier, host)
    min_work_gap: float = 0.04  # culprit work share - peer median (slow_compute, busier)
    min_clock_deficit: float = 0.03  # culprit SM clock below the peers' median, share of it (throttled)
    clock_deficit_alone: float = 0.10  # ... without a throttle reason the peers lack
    z: float = 4.0  # gaps in robust sigmas of the peers
    noise_floor_pct: float = 1.5  # smallest sigma assumed for window-mean util (tiny or uniform groups)
    work_noise_floor: float = 0.015  # smallest sigma of window-mean work share
    clock_noise_floor: float = 0.005  # smallest sigma of window-mean SM clock, share of the median
    spinning_util_pct: float = 90.0  # peers at or above this util while working less wait inside a kernel
    busy_pct: float = 5.0  # a GPU below this mean util takes no part in comparisons (idle, stalled)
    mixed_min_waste: float = 0.08  # 1 - fast group work / slow group work
    # Weak evidence: every gap and z at this share of the above. A window of it counts as `weak_share`
    # of a window towards the persistence (agents/detectors.py): a 1.05x slowdown under one window's
    # noise floor is named after about three windows of it.
    weak: float = 0.7
    weak_share: float = 0.4

    def weakened(self) -> StragglerConfig:
        w = self.weak
        return replace(self, min_ratio=1.0 + (self.min_ratio - 1.0) * w, min_gap_pct=self.min_gap_pct * w,
                       min_work_gap=self.min_work_gap * w, min_clock_deficit=self.min_clock_deficit * w,
                       clock_deficit_alone=self.clock_deficit_alone * w, z=self.z * w)


def reasons(r: WindowResult) -> frozenset[str]:
    """The throttle reasons a GPU carried this window."""
    return frozenset(name for name, share in r.throttle_share.items() if share >= REASON_SHARE)


def work(r: WindowResult) -> float:
    return work_share(r.util_mean, r.power_share, r.sm_active)


@dataclass(frozen=True)
class Straggler:
    """A rank that paces its job this window, with the numbers that show it."""

    culprit: WindowResult
    peers: tuple[WindowResult, ...]
    signature: Signature
    wait_share: float  # share of each step the typical peer spends waiting for the culprit
    window_wait: float  # share of this window the typical peer spent waiting
    peer_util_median: float
    peer_util_sigma: float
    peer_work_median: float
    peer_clock_median: float | None  # None where the peers report no SM clock (neither do the others)
    peer_temp_median: float | None
    strong: bool  # passed the full thresholds, not only the weak ones
    extra_reasons: frozenset[str]  # throttle reasons the culprit carries and most peers do not
    peer_common_reasons: frozenset[str]  # carried by at least half of the peers

    @property
    def culprit_work(self) -> float:
        return work(self.culprit)

    @property
    def fault_share(self) -> float:
        """How much of the window the fault covered: the share of samples with the throttle reason
        the peers lack, where there is one; else the whole window (nothing finer to go by)."""
        shares = [share for name, share in self.culprit.throttle_share.items()
                  if share > 0 and name not in self.peer_common_reasons]
        return max(shares) if shares else 1.0

    def peer_wait_s(self) -> list[float]:
        """Seconds each peer spent waiting this window."""
        return [self.window_wait * p.window_s for p in self.peers]


@dataclass(frozen=True)
class MixedGeneration:
    """A job whose faster GPU model waits for its slower one."""

    slow_model: str
    fast_model: str
    slow_work_median: float
    fast_work_median: float
    slow: tuple[WindowResult, ...]
    fast: tuple[WindowResult, ...]

    @property
    def waste(self) -> float:
        """1 - slow throughput / fast throughput, from the fast ranks' work share."""
        return 1.0 - self.fast_work_median / self.slow_work_median


def by_model(ranks: Sequence[WindowResult]) -> dict[str, list[WindowResult]]:
    groups: dict[str, list[WindowResult]] = {}
    for r in ranks:
        groups.setdefault(r.labels.model or "", []).append(r)
    return groups


@dataclass(frozen=True)
class _Rank:
    """A rank's numbers for the comparison: util and work share less what its rank usually adds
    (its job's shape: a pipeline stage that always does more), so a job's design is not a straggler
    and does not widen the spread a straggler is measured against."""

    result: WindowResult
    util: float
    work: float
    reasons: frozenset[str]

    @classmethod
    def of(cls, r: WindowResult, usual: Usual | None) -> _Rank:
        usual_work, usual_util = usual(r) if usual is not None else (0.0, 0.0)
        return cls(r, r.util_mean - usual_util, work(r) - usual_work, reasons(r))


def _median(values: np.ndarray) -> float:
    """statistics.median of an array: the middle value, or the mean of the middle two."""
    return float(np.median(values))


def _mad(values: np.ndarray, centre: float) -> float:
    return _median(np.abs(values - centre))


@dataclass(frozen=True)
class _Peers:
    """Robust statistics of one candidate's peers."""

    util: float
    util_sigma: float
    work: float
    work_sigma: float
    clock: float  # 0.0 where none reports an SM clock: no clock comparison then
    clock_sigma: float
    common_reasons: frozenset[str]  # carried by at least half of them


@dataclass(frozen=True)
class _Group:
    """One job's ranks of one GPU model as arrays, so that each candidate's peers (the group but
    itself) cost a few array operations instead of a pass in Python over every other rank: a job
    of 8,192 ranks has as many candidates."""

    ranks: list[_Rank]
    utils: np.ndarray
    works: np.ndarray
    clocks: np.ndarray  # NaN where a rank reports no SM clock
    reason_counts: Counter[str]

    @classmethod
    def of(cls, ranks: list[_Rank]) -> _Group:
        clocks = [r.result.sm_clock_mhz_mean for r in ranks]
        return cls(ranks, np.array([r.util for r in ranks]), np.array([r.work for r in ranks]),
                   np.array([np.nan if c is None else c for c in clocks]),
                   Counter(name for r in ranks for name in r.reasons))

    def whole(self, cfg: StragglerConfig) -> _Peers:
        return self._stats(self.utils, self.works, self.clocks, self.reason_counts, len(self.ranks), cfg)

    def peers_of(self, i: int, cfg: StragglerConfig) -> _Peers:
        """The statistics of every rank but the i-th."""
        return self._stats(np.delete(self.utils, i), np.delete(self.works, i), np.delete(self.clocks, i),
                           self.reason_counts - Counter(self.ranks[i].reasons), len(self.ranks) - 1, cfg)

    @staticmethod
    def _stats(utils: np.ndarray, works: np.ndarray, clocks: np.ndarray, counts: Counter[str], n: int,
               cfg: StragglerConfig) -> _Peers:
        clocks = clocks[~np.isnan(clocks)]
        u, w = _median(utils), _median(works)
        c = _median(clocks) if len(clocks) else 0.0
        # The floors stand in for a spread a small group cannot measure; a large one's MAD is
        # good, so its floors can sit lower (still above the rounding of whole-number samples).
        floor = 1.0 if n < LARGE_GROUP else 0.5
        return _Peers(u, max(MAD_TO_SIGMA * _mad(utils, u), floor * cfg.noise_floor_pct),
                      w, max(MAD_TO_SIGMA * _mad(works, w), floor * cfg.work_noise_floor),
                      c, max(MAD_TO_SIGMA * _mad(clocks, c), floor * cfg.clock_noise_floor * c) if len(clocks)
                      else 0.0,
                      frozenset(name for name, k in counts.items() if k > 0 and 2 * k >= n))


def _clock_gap(p: _Peers, r: WindowResult) -> float:
    """How far `r`'s SM clock sits below its peers' median, MHz; 0 where either is not known."""
    return p.clock - r.sm_clock_mhz_mean if r.sm_clock_mhz_mean is not None and p.clock > 0 else 0.0


def _signature(rank: _Rank, p: _Peers, cfg: StragglerConfig) -> tuple[Signature, float, float] | None:
    """Which signature (if any) says `rank` paces its peers, the share of each step they wait, and
    the share of the window the typical peer spent waiting."""
    cand, w, u = rank.result, rank.work, rank.util
    clock_gap = _clock_gap(p, cand)
    clock_deficit = clock_gap / p.clock if p.clock > 0 else 0.0
    extra = reasons(cand) - p.common_reasons
    if -clock_deficit >= cfg.min_clock_deficit and p.common_reasons - reasons(cand):
        # Its peers are the throttled ones (a job mostly on slow nodes): at its full clock it works
        # more of each step than they appear to by their lowered power. They pace it, not it them.
        return None
    work_wait = 1.0 - p.work / w if w > 0 else 0.0
    if clock_deficit >= cfg.min_clock_deficit and clock_gap >= cfg.z * p.clock_sigma and (
            extra or clock_deficit >= cfg.clock_deficit_alone):
        step_wait = max(work_wait, clock_deficit)
        return "throttled", step_wait, step_wait * max(u / 100.0, w)
    util_gap = u - p.util
    works_more = (w - p.work >= cfg.min_work_gap and w - p.work >= cfg.z * p.work_sigma and w >= cfg.min_ratio * p.work)
    if util_gap >= cfg.min_gap_pct and util_gap >= cfg.z * p.util_sigma and u >= cfg.min_ratio * p.util:
        return "busier", max(work_wait, 1.0 - p.util / u), util_gap / 100.0
    # Peers that spin read busier than they work, by more than the candidate does (the power model's
    # error for a GPU model shifts both alike).
    spin_excess = (p.util / 100.0 - p.work) - (u / 100.0 - w)
    spinning = p.util >= cfg.spinning_util_pct and spin_excess >= cfg.min_work_gap / 2
    if works_more:
        return ("slow_compute" if spinning else "busier"), work_wait, w - p.work
    if spinning and -util_gap >= cfg.min_gap_pct and -util_gap >= cfg.z * p.util_sigma:
        return "host", -util_gap / 100.0, -util_gap / 100.0
    return None


def _mean(values: Sequence[float | None], weights: Sequence[int]) -> float | None:
    if any(v is None for v in values):
        return None
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)  # type: ignore[operator]


def merge_span(windows: Sequence[Sequence[WindowResult]]) -> list[WindowResult]:
    """Each rank's results over consecutive windows as one, weighted by samples, for a job whose
    steps are longer than a window: its peers wait once a step, so in one window of two or three,
    and only the span holds a whole step of each. Ranks missing from any window are left out. The
    result stands for the last window (its start and length), so costs stay per window."""
    by_key: dict[str, list[WindowResult]] = {}
    for results in windows:
        for r in results:
            by_key.setdefault(r.key, []).append(r)
    merged = []
    for rs in by_key.values():
        if len(rs) != len(windows):
            continue
        n = [max(1, r.samples) for r in rs]
        reasons_seen = {name for r in rs for name in r.throttle_share}
        merged.append(rs[-1].model_copy(update={
            "util_mean": _mean([r.util_mean for r in rs], n),
            "power_share": _mean([r.power_share for r in rs], n),
            "sm_active": _mean([r.sm_active for r in rs], n),
            "sm_clock_mhz_mean": _mean([r.sm_clock_mhz_mean for r in rs], n),
            "temp_c_mean": _mean([r.temp_c_mean for r in rs], n),
            "throttle_share": {name: _mean([r.throttle_share.get(name, 0.0) for r in rs], n) for name in reasons_seen},
        }))
    return merged


def find_stragglers(ranks: Sequence[WindowResult], cfg: StragglerConfig, usual: Usual | None = None) -> list[Straggler]:
    """Ranks of one job (GPU results of one window) that pace their model peers, by any signature;
    `usual` gives each rank's usual (work share, util) above its peers' medians, taken off first."""
    busy = [r for r in ranks if r.util_mean >= cfg.busy_pct]
    found: list[Straggler] = []
    weak = cfg.weakened()
    for models in by_model(busy).values():
        if len(models) < 2:
            continue
        # Shapes only where a group is large enough to have one (pipeline stages, experts): in a
        # small one, learning it would learn the noise of a few windows.
        group = [_Rank.of(r, usual if len(models) >= LARGE_GROUP else None) for r in models]
        arrays = _Group.of(group)
        in_group: list[Straggler] = []
        # Leaving one rank out moves a median by at most half of that rank's gap from it, so a rank
        # within half of every threshold of the whole group's medians cannot pass: skip the O(n) test.
        whole = arrays.whole(cfg)
        for i, rank in enumerate(group):
            cand = rank.result
            least = weak if len(models) >= LARGE_GROUP else cfg
            if (abs(rank.util - whole.util) < least.min_gap_pct / 2
                    and rank.work - whole.work < least.min_work_gap / 2
                    and _clock_gap(whole, cand) < least.min_clock_deficit / 2 * whole.clock):
                continue
            stats = arrays.peers_of(i, cfg)
            strong = _signature(rank, stats, cfg)
            # Weak evidence only where the group measures its own spread: in a small one the floors
            # stand in for it, and three windows of noise could pass.
            verdict = strong or (_signature(rank, stats, weak) if len(models) >= LARGE_GROUP else None)
            if verdict is None:
                continue
            signature, wait_share, window_wait = verdict
            peers = group[:i] + group[i + 1:]
            in_group.append(Straggler(
                culprit=cand, peers=tuple(p.result for p in peers), signature=signature,
                wait_share=max(0.0, min(1.0, wait_share)),
                window_wait=max(0.0, min(1.0, window_wait)), strong=strong is not None,
                peer_util_median=stats.util, peer_util_sigma=stats.util_sigma, peer_work_median=stats.work,
                peer_clock_median=stats.clock or None,
                peer_temp_median=median(temps) if (temps := [t for p in peers if (t := p.result.temp_c_mean) is not None])
                else None,
                extra_reasons=reasons(cand) - stats.common_reasons, peer_common_reasons=stats.common_reasons,
            ))
        # In a group of 2 or 3 a victim's peers are mostly the culprit: next to a rank whose GPU
        # paces the job, the others look host-starved, and the culprit's lowered clock also lowers
        # the power its work is read from. Keep only the strongest explanation there (a lower
        # clock, then working more, then idling); a larger group's medians stand on real peers.
        if len(models) <= SMALL_GROUP:
            for strongest in (("throttled",), ("throttled", "busier", "slow_compute")):
                if any(s.signature in strongest for s in in_group):
                    in_group = [s for s in in_group if s.signature in strongest]
                    break
        found += in_group
    return found


def find_mixed_generation(ranks: Sequence[WindowResult], cfg: StragglerConfig) -> MixedGeneration | None:
    """The slowest-paced pair of GPU models in a job spanning several, if the faster one waits
    (idle, or spinning in the collective: work share sees both)."""
    groups = by_model([r for r in ranks if r.util_mean >= cfg.busy_pct])
    if len(groups) < 2:
        return None
    medians = {model: median(work(r) for r in group) for model, group in groups.items()}
    slow = max(medians, key=medians.__getitem__)  # the hardest-working model paces the others
    fast = min(medians, key=medians.__getitem__)
    if medians[slow] <= 0:
        return None
    mixed = MixedGeneration(slow, fast, medians[slow], medians[fast], tuple(groups[slow]), tuple(groups[fast]))
    return mixed if mixed.waste >= cfg.mixed_min_waste else None
