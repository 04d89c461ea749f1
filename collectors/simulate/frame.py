"""One tick of the simulated fleet as arrays: what the physics produces and the encoder sends."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One tick of the fleet: reported values per GPU (whole numbers, as sent) and step truth per job."""

    ts: float
    job: np.ndarray  # job index per GPU, -1 when unallocated
    rank: np.ndarray
    present: np.ndarray  # False where the GPU is silent this tick
    util_gpu: np.ndarray
    util_mem: np.ndarray
    power_w: np.ndarray
    power_limit_w: np.ndarray
    sm_clock_mhz: np.ndarray
    temp_c: np.ndarray
    mem_used_mib: np.ndarray
    reasons: np.ndarray
    energy_j: np.ndarray
    xid: np.ndarray  # 0 where none
    busy: np.ndarray  # exact busy share, before noise
    sm_active: np.ndarray  # DCGM profiling ratios 0-1 (sent only where the scenario's fleet has them)
    tensor_active: np.ndarray
    dram_active: np.ndarray
    job_step_s: np.ndarray  # per job: step time this tick (inf: stalled or all idle; nan: not running)
    job_steps: np.ndarray  # per job: steps completed during this tick
