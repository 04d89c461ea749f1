"""Effective utilization: how much of a GPU's capacity did useful work, 0..1.

NVML `util_gpu` is the share of time *a* kernel ran. A device-to-device copy reads 97% on an H200
while drawing 457 W against 680 W for real compute; an under-fed training loop reads 33.5% while
doing 16% of its steady work. Two estimates, best first:

1. DCGM profiling: SM_ACTIVE (share of SM cycles with a warp resident) is a direct measure of how
   much of the chip was in use; DCGM's guide calls >= 0.8 necessary for effective use and < 0.5
   likely ineffective. It is used as is. Tensor-pipe activity is not required: FP32/INT kernels are
   useful work too, so gating on it would punish non-matmul jobs.
2. NVML only: the lower of util_gpu and the *power share*, i.e. power above idle as a share of the
   loaded range (power limit - idle power). Power measures how much silicon switched; util_gpu
   measures whether anything ran. A copy or a tiny kernel keeps util high but power low; a busy
   GPU near its limit has both high. Taking the lower of the two means neither can vouch for work
   the other does not see (util gates away the idle-with-high-clocks power floor).

   The SM clock needs no separate term: a GPU slowed by a lower clock (thermal, power brake) draws
   correspondingly less power, and a power-capped GPU at its limit is by definition using all the
   capacity it has; scaling by clock again would count the slowdown twice.

Combine the two inputs over a window, not per sample: NVML averages utilization over its own
sample period while power draw is a ~1 s average on Hopper, so at 100 ms sampling the per-sample
minimum is biased low (the two are out of phase in duty cycles). `WindowAccumulator` therefore sums
util and power share separately and applies `effective_utilization` to the window means.

Parameters: one per GPU model, its idle power (GPU clocked up, no kernel: the state of a rank
waiting at a collective). The H200 value is measured in fixtures/h200-nvml-trace (idle phases
119-137 W); other models use the same share of their power limit (120 / 700 = 0.17).
"""

from __future__ import annotations

# Idle power at full clocks (W), measured; models not listed use IDLE_SHARE_OF_LIMIT.
MEASURED_IDLE_W: dict[str, float] = {"H200": 120.0}
IDLE_SHARE_OF_LIMIT = 120.0 / 700.0


def idle_power_w(model: str, power_limit_w: float) -> float:
    """Power a GPU of `model` draws when clocked up with nothing running."""
    measured = MEASURED_IDLE_W.get(model)
    if measured is not None and measured < power_limit_w:
        return measured
    return IDLE_SHARE_OF_LIMIT * power_limit_w


def power_share(power_w: float, power_limit_w: float, idle_w: float) -> float:
    """Power above idle as a share of the loaded range (idle .. limit), clamped to 0..1."""
    span = power_limit_w - idle_w
    if span <= 0:
        return 0.0
    share = (power_w - idle_w) / span
    return 0.0 if share < 0.0 else 1.0 if share > 1.0 else share


# Power rises with busy share as busy ** 0.71 (fitted on fixtures/h200-nvml-trace: at low duty
# the clock boosts, so each busy millisecond draws more).
POWER_CURVE_EXPONENT = 0.71


def work_share(util_pct: float, power_share_frac: float | None, sm_active: float | None = None) -> float:
    """Share of the time a GPU did real work, 0..1: DCGM's SM_ACTIVE where there is one; else the
    lower of util_gpu and the busy share its power implies (the power curve inverted). A rank
    spinning in a collective kernel reads util ~100% at near-idle power: util alone calls it busy,
    its power does not."""
    if sm_active is not None:
        return sm_active
    util = util_pct / 100.0
    if power_share_frac is None:
        return util
    from_power = power_share_frac ** (1.0 / POWER_CURVE_EXPONENT)
    return util if util < from_power else from_power


def effective_utilization(util_frac: float, power_share_frac: float, sm_active: float | None = None) -> float:
    """Effective utilization 0..1 from (window-mean) util_gpu/100, power share and SM_ACTIVE."""
    if sm_active is not None:
        return sm_active
    return util_frac if util_frac < power_share_frac else power_share_frac
