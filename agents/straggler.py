"""In-job comparisons for one window: which rank paces a job, and which GPU model paces a mixed one.

In synchronous data-parallel training every rank waits at each collective for the slowest. The
slow rank is therefore the *busiest* (high util, often with a lower clock, a throttle reason, a
higher temperature) and its healthy peers show lower util from waiting: the inverse of what a
"low utilization" alert looks for. Each rank is compared with the peers of its own GPU model
(a mixed-generation job's slower model is not a straggler, it is `mixed_generation`) using the
median and MAD of the peers, with a noise floor so that 2- and 3-rank jobs, whose MAD is
meaningless, still need a clear gap.

The util ratio culprit / peer median approximates the slowdown: a rank computing s times longer
is busy for s * c + comm of a step while its peers are busy c + comm, so the ratio sits a little
below s. Slowdowns under ~10% are left alone (below the noise of a window and not worth a page).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

from laggard.results import WindowResult

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution -> its standard deviation


@dataclass(frozen=True)
class StragglerConfig:
    min_ratio: float = 1.07  # culprit util / peer median util
    min_gap_pct: float = 4.0  # culprit util - peer median util, percentage points
    z: float = 4.0  # gap in robust sigmas of the peers' util
    noise_floor_pct: float = 1.5  # smallest sigma assumed for window-mean util (tiny or uniform groups)
    busy_pct: float = 5.0  # a GPU below this mean util takes no part in comparisons (idle, stalled)
    mixed_min_waste: float = 0.08  # 1 - fast group util / slow group util


@dataclass(frozen=True)
class Straggler:
    """A rank that paces its job this window, with the numbers that show it."""

    culprit: WindowResult
    peers: tuple[WindowResult, ...]
    peer_util_median: float
    peer_util_sigma: float
    peer_clock_median: float
    peer_temp_median: float

    @property
    def wait_share(self) -> float:
        """Share of each step the typical peer spends waiting for the culprit."""
        return max(0.0, 1.0 - self.peer_util_median / self.culprit.util_mean)

    def peer_wait_s(self) -> list[float]:
        """Seconds each peer spent waiting this window (the culprit's busy time minus its own)."""
        c = self.culprit
        return [max(0.0, c.util_mean - p.util_mean) / 100.0 * c.window_s for p in self.peers]


@dataclass(frozen=True)
class MixedGeneration:
    """A job whose faster GPU model waits for its slower one."""

    slow_model: str
    fast_model: str
    slow_util_median: float
    fast_util_median: float
    slow: tuple[WindowResult, ...]
    fast: tuple[WindowResult, ...]

    @property
    def waste(self) -> float:
        """1 - slow throughput / fast throughput, from the fast ranks' busy share."""
        return 1.0 - self.fast_util_median / self.slow_util_median


def mad(values: Sequence[float], centre: float) -> float:
    return median(abs(v - centre) for v in values)


def by_model(ranks: Sequence[WindowResult]) -> dict[str, list[WindowResult]]:
    groups: dict[str, list[WindowResult]] = {}
    for r in ranks:
        groups.setdefault(r.labels.model or "", []).append(r)
    return groups


def find_stragglers(ranks: Sequence[WindowResult], cfg: StragglerConfig) -> list[Straggler]:
    """Ranks of one job (GPU results of one window) whose util stands out above their model peers."""
    busy = [r for r in ranks if r.util_mean >= cfg.busy_pct]
    found = []
    for group in by_model(busy).values():
        if len(group) < 2:
            continue
        # Removing a rank above the median moves the median down by at most half its gap, so a
        # rank within min_gap/2 of the whole group's median cannot pass: skip the O(n) test for it.
        group_median = median(r.util_mean for r in group)
        for i, cand in enumerate(group):
            if cand.util_mean - group_median < cfg.min_gap_pct / 2:
                continue
            peers = group[:i] + group[i + 1 :]
            utils = [p.util_mean for p in peers]
            med = median(utils)
            sigma = max(MAD_TO_SIGMA * mad(utils, med), cfg.noise_floor_pct)
            gap = cand.util_mean - med
            if gap >= cfg.min_gap_pct and gap >= cfg.z * sigma and cand.util_mean >= cfg.min_ratio * med:
                found.append(
                    Straggler(
                        culprit=cand,
                        peers=tuple(peers),
                        peer_util_median=med,
                        peer_util_sigma=sigma,
                        peer_clock_median=median(p.sm_clock_mhz_mean for p in peers),
                        peer_temp_median=median(p.temp_c_mean for p in peers),
                    )
                )
    return found


def find_mixed_generation(ranks: Sequence[WindowResult], cfg: StragglerConfig) -> MixedGeneration | None:
    """The slowest-paced pair of GPU models in a job spanning several, if the faster one waits."""
    groups = by_model([r for r in ranks if r.util_mean >= cfg.busy_pct])
    if len(groups) < 2:
        return None
    medians = {model: median(r.util_mean for r in group) for model, group in groups.items()}
    slow = max(medians, key=medians.__getitem__)  # the busiest model paces the others
    fast = min(medians, key=medians.__getitem__)
    mixed = MixedGeneration(slow, fast, medians[slow], medians[fast], tuple(groups[slow]), tuple(groups[fast]))
    return mixed if mixed.waste >= cfg.mixed_min_waste else None
