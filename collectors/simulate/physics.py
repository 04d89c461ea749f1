"""How a simulated GPU's power, clock and temperature follow from how busy it is.

Calibrated on the real H200 trace (shared/fixtures/h200-nvml-trace): idle ~128 W at 1980 MHz;
dense bf16 GEMMs ~680 W, pinned at the 700 W limit, SM clock ~1467 MHz, clocks-event reason
0x4 (software power cap); duty-cycled GEMMs fall between. Power rises faster than linearly with
busy share (exponent ~0.71 from `fit_power_curve` over those phase means): at low duty the clock
boosts, so each busy millisecond draws more. A memory-bound copy reads 97% busy at only 457 W and
full clock: its power *intensity* (share of the idle-to-loaded range at full busy) is ~0.6,
which is why a job carries an `intensity` beside its busy share.

Only the H200 numbers are measured. H100 and GB200 are scaled from public specs (power limit,
boost clock, memory) and are estimates; their relative throughputs are a modelling choice for
memory-bound LLM training: H100 1.0, H200 1.4 (same compute, 1.4x the HBM bandwidth and more
memory, which is what bandwidth-bound steps gain), GB200 2.5 (NVIDIA's per-GPU training claims
over H100 sit between 2x and 4x; 2.5 is the conservative end for a mixed fleet).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from laggard.events import ClockReason

# Work that draws at least this share of a model's loaded power bursts into the power limit: its
# clock drops with busy share and it carries SW_POWER_CAP (the fixture's GEMM phases do, the
# memory copy at intensity 0.6 does not).
CAP_INTENSITY = 0.9
# Busy share above which a capped workload shows SW_POWER_CAP in the sample (the 29% duty phase does).
CAP_REASON_MIN_BUSY = 0.2
# Temperature follows power with a first-order lag of this time constant.
THERMAL_TAU_S = 20.0
# DCGM profiling ratios, a model (not measured here): dense compute keeps nearly every SM busy with
# warps and the tensor pipes at a share scaled by the job's intensity; a collective kernel, moving
# data or spinning while it waits, occupies a few SMs (one CTA per NCCL channel).
SM_ACTIVE_COMPUTE = 0.9
SM_ACTIVE_COLLECTIVE = 0.12
TENSOR_ACTIVE_COMPUTE = 0.6


@dataclass(frozen=True)
class GpuModelSpec:
    """One GPU model's electrical and thermal envelope and its relative training speed."""

    name: str
    gpus_per_node: int
    power_limit_w: float
    idle_w: float
    loaded_w: float  # mean power under dense compute (at the power cap for H100/H200)
    max_sm_clock_mhz: float
    loaded_sm_clock_mhz: float  # SM clock under dense compute at the power cap
    mem_clock_mhz: float
    mem_total_mib: float
    throughput: float  # step speed relative to an H100
    idle_temp_c: float
    temp_c_per_w: float  # steady-state rise above idle per watt above idle


POWER_EXPONENT = 0.71  # fitted on the H200 fixture, see fit_power_curve and tests

MODELS: dict[str, GpuModelSpec] = {
    spec.name: spec
    for spec in (
        GpuModelSpec("H100", 8, 700.0, 75.0, 670.0, 1980.0, 1650.0, 2619.0, 81_559.0, 1.0, 33.0, 0.045),
        GpuModelSpec("H200", 8, 700.0, 128.0, 680.0, 1980.0, 1467.0, 3201.0, 143_771.0, 1.4, 37.0, 0.038),
        GpuModelSpec("GB200", 4, 1200.0, 190.0, 1150.0, 1965.0, 1700.0, 3996.0, 189_471.0, 2.5, 30.0, 0.02),
    )
}


@dataclass(frozen=True)
class PhaseMean:
    """Mean NVML utilization and power over one labelled phase of a trace."""

    util_gpu: float
    power_w: float


@dataclass(frozen=True)
class PowerCurve:
    """power = idle + (loaded - idle) * intensity * busy ** exponent.

    A throttled clock scales the dynamic part down: pass intensity * clock ratio.
    """

    idle_w: float | np.ndarray  # one value, or one per GPU
    loaded_w: float | np.ndarray
    exponent: float

    def power_w(self, busy: np.ndarray | float, intensity: np.ndarray | float = 1.0) -> np.ndarray:
        return self.idle_w + (self.loaded_w - self.idle_w) * intensity * np.power(busy, self.exponent)


def fit_power_curve(phases: Sequence[PhaseMean]) -> PowerCurve:
    """Least-squares power curve over compute phases (idle, full and partly busy ones).

    Idle is the mean of phases under 1% busy, loaded the mean of phases at >= 95%; the exponent is
    the least-squares slope through the origin of log(power share) on log(busy share) over the rest.
    """
    idle = [p.power_w for p in phases if p.util_gpu < 1]
    loaded = [p.power_w for p in phases if p.util_gpu >= 95]
    partial = [p for p in phases if 1 <= p.util_gpu < 95]
    if not idle or not loaded or not partial:
        raise ValueError("need at least one idle, one fully busy and one partly busy phase")
    idle_w, loaded_w = float(np.mean(idle)), float(np.mean(loaded))
    x = np.log([p.util_gpu / 100 for p in partial])
    y = np.log([(p.power_w - idle_w) / (loaded_w - idle_w) for p in partial])
    return PowerCurve(idle_w, loaded_w, float(np.sum(x * y) / np.sum(x * x)))


def busy_integral(phase: np.ndarray, compute_share: np.ndarray, comm_share: np.ndarray) -> np.ndarray:
    """Busy time, in steps, from phase 0 to `phase` (in steps) of a rank in a synchronous job.

    Each step the rank computes for `compute_share` of the step, waits for the slowest rank
    (kernel-free: the wait shows as idle) and runs the collective for the last `comm_share`.
    """
    whole = np.floor(phase)
    frac = phase - whole
    return whole * (compute_share + comm_share) + np.minimum(frac, compute_share) + np.maximum(0.0, frac - (1.0 - comm_share))


def sm_clock_mhz(max_mhz: np.ndarray, loaded_mhz: np.ndarray, busy: np.ndarray, capped: np.ndarray) -> np.ndarray:
    """SM clock without faults: capped work loses clock in proportion to its busy share, the rest boosts."""
    return np.where(capped, max_mhz - (max_mhz - loaded_mhz) * busy, max_mhz)


def power_cap_reason(busy: np.ndarray, capped: np.ndarray) -> np.ndarray:
    """SW_POWER_CAP where capped work is busy enough for its bursts to hit the limit."""
    return np.where(capped & (busy >= CAP_REASON_MIN_BUSY), int(ClockReason.SW_POWER_CAP), 0)


def temperature_step(temp_c: np.ndarray, target_c: np.ndarray, tick_s: float) -> np.ndarray:
    """One tick of a first-order lag towards `target_c`."""
    return temp_c + (target_c - temp_c) * (1.0 - np.exp(-tick_s / THERMAL_TAU_S))
