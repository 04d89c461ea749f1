"""Jobs slowed as a whole by their hardware: most ranks throttled, so no healthy peer inside the job.

The in-job comparison (agents/straggler.py) needs healthy peers. A job entirely on one slow node,
or with 2 of its 3 nodes slow (a failing PSU, a hot rack), has a slow median, and its slow ranks
look like the norm. Their SM clock is compared instead with two references outside the job's present:
- the same GPU model elsewhere in the fleet (other jobs' busy GPUs in the same window): lower by
  `2 * min_clock_deficit` *with* a throttle reason most of those GPUs do not carry, the power cap
  aside. A lower clock alone, or under the power cap, says nothing here: busy Hopper GPUs all carry
  SW_POWER_CAP, and healthy jobs differ in clock by how much power their kernels draw (a heavy GEMM
  job runs well below a light one);
- the job's own past (its usual clock per model, learned while it is not slow): lower by
  `clock_deficit_alone` with a throttle reason other than the power cap, or by twice that without.
A model group is slow when more than half of its ranks are: with fewer, the in-job comparison names
them. A job slowing down at full clock (its data loader, a phase of its work) is not this: its clock
does not fall.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import median
from typing import Literal

from laggard.agents.straggler import REASON_SHARE, StragglerConfig, by_model, reasons
from laggard.results import WindowResult

# Fewer busy GPUs of a model elsewhere than this are no fleet reference.
MIN_REFERENCE_GPUS = 8
# The throttle reason every busy Hopper GPU carries: not evidence of a fault by itself.
ROUTINE_REASONS = frozenset({"power_cap"})
Reference = Literal["fleet", "past"]


@dataclass(frozen=True)
class ClockReference:
    """What a model group's SM clock is compared with."""

    kind: Reference
    clock_mhz: float
    gpus: int  # GPUs it stands on (fleet), or 0 (the job's own past)
    common_reasons: frozenset[str]  # carried by at least half of them


@dataclass(frozen=True)
class SlowGroup:
    """Ranks of one GPU model in a job, most of them slowed by their hardware."""

    model: str
    ranks: tuple[WindowResult, ...]  # every busy rank of the model in the job
    slow: tuple[WindowResult, ...]
    reference: ClockReference
    extra_reasons: frozenset[str]  # carried by most slow ranks and not by the reference

    @property
    def clock_mhz(self) -> float:
        return median(r.sm_clock_mhz_mean for r in self.slow)

    @property
    def deficit(self) -> float:
        """Share of each step the job loses: its slow ranks compute at this share less clock."""
        return max(0.0, 1.0 - self.clock_mhz / self.reference.clock_mhz)

    @property
    def fault_share(self) -> float:
        """How much of the window the fault covered: the slow ranks' median share of samples with
        the reason the reference lacks, where there is one."""
        if not self.extra_reasons:
            return 1.0
        return median(max((r.throttle_share.get(name, 0.0) for name in self.extra_reasons), default=0.0)
                      for r in self.slow)

    def by_node(self) -> dict[str, list[WindowResult]]:
        nodes: dict[str, list[WindowResult]] = {}
        for r in self.slow:
            nodes.setdefault(r.labels.node or "", []).append(r)
        return nodes


def _busy_with_clock(r: WindowResult, cfg: StragglerConfig) -> bool:
    """Busy, and reporting an SM clock: what can be compared by clock (a source may not send it)."""
    return r.util_mean >= cfg.busy_pct and r.sm_clock_mhz_mean is not None


def fleet_reference(model: str, elsewhere: Sequence[WindowResult], cfg: StragglerConfig) -> ClockReference | None:
    """The busy GPUs of `model` outside the job, if there are enough of them."""
    same = [r for r in elsewhere if (r.labels.model or "") == model and _busy_with_clock(r, cfg)]
    if len(same) < MIN_REFERENCE_GPUS:
        return None
    counts: dict[str, int] = {}
    for r in same:
        for name in reasons(r):
            counts[name] = counts.get(name, 0) + 1
    common = frozenset(name for name, n in counts.items() if 2 * n >= len(same))
    return ClockReference("fleet", median(r.sm_clock_mhz_mean for r in same), len(same), common)


def _slow_against(r: WindowResult, ref: ClockReference, cfg: StragglerConfig) -> bool:
    deficit = 1.0 - r.sm_clock_mhz_mean / ref.clock_mhz if ref.clock_mhz > 0 else 0.0
    if ref.kind == "fleet":
        return deficit >= 2 * cfg.min_clock_deficit and bool(reasons(r) - ref.common_reasons - ROUTINE_REASONS)
    return deficit >= 2 * cfg.clock_deficit_alone or (
        deficit >= cfg.clock_deficit_alone and bool(reasons(r) - ROUTINE_REASONS))


def worth_a_look(ranks: Sequence[WindowResult], usual_clock: Mapping[str, float], cfg: StragglerConfig) -> bool:
    """Whether any rank could be slow against either reference: a throttle reason beyond the routine
    one, or a clock below the job's usual (most jobs, most windows: no, and no fleet reference is built)."""
    return any(reasons(r) - ROUTINE_REASONS or (
        (r.labels.model or "") in usual_clock
        and r.sm_clock_mhz_mean <= (1 - cfg.clock_deficit_alone) * usual_clock[r.labels.model or ""])
        for r in ranks if _busy_with_clock(r, cfg))


def find_slow_groups(ranks: Sequence[WindowResult], elsewhere: Sequence[WindowResult],
                     usual_clock: Mapping[str, float], cfg: StragglerConfig) -> list[SlowGroup]:
    """Model groups of one job (its GPU results of one window) that run mostly slowed by their
    hardware, against the same model `elsewhere` (other jobs' busy GPUs this window) or the job's
    `usual_clock` per model; the fleet first, where it has enough GPUs of the model."""
    found = []
    for model, group in by_model([r for r in ranks if _busy_with_clock(r, cfg)]).items():
        refs = [ref for ref in (fleet_reference(model, elsewhere, cfg),
                                ClockReference("past", usual_clock[model], 0, frozenset()) if model in usual_clock
                                else None) if ref is not None]
        for ref in refs:
            slow = [r for r in group if _slow_against(r, ref, cfg)]
            if 2 * len(slow) > len(group):
                counts: dict[str, int] = {}
                for r in slow:
                    for name in reasons(r) - ref.common_reasons - ROUTINE_REASONS:
                        counts[name] = counts.get(name, 0) + 1
                extra = frozenset(name for name, n in counts.items() if n >= REASON_SHARE * len(slow))
                found.append(SlowGroup(model, tuple(group), tuple(slow), ref, extra))
                break
    return found
