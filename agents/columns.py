"""Columnar window sums for a schema-2 batch (laggard/batches.py): numpy over GPUs x ticks.

`Windower.add` walks a version-1 message GPU by GPU in Python; a batch carries a node's GPUs over
a flush interval, so each window's sums for all of them come from a few array operations per
column instead of a few Python operations per sample. The arithmetic is the same as `add`'s (the
tests feed both paths the same samples and compare every field); only the order in which floats
are summed differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from laggard.agents.effective import IDLE_SHARE_OF_LIMIT, MEASURED_IDLE_W
from laggard.batches import NodeBatch

UTIL_BINS = 101  # GpuAccumulator.util_hist: 1% bins


def _floats(matrix: list | None, shape: tuple[int, int]) -> np.ndarray:
    """A matrix as floats, null (and an absent matrix) as NaN."""
    if matrix is None:
        return np.full(shape, np.nan)
    return np.array(matrix, dtype=float)


def _ints(matrix: list | None, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """A matrix as integers, null (and an absent matrix) as 0: 'no reason', 'no XID'."""
    if matrix is None:
        return np.zeros(shape, dtype=dtype)
    try:
        return np.array(matrix, dtype=dtype)
    except TypeError:  # nulls in it
        return np.array([[0 if v is None else v for v in row] for row in matrix], dtype=dtype)


@dataclass(frozen=True)
class BatchColumns:
    """One batch as arrays of shape (GPUs, ticks); `present` is False where a GPU was silent."""

    ts: np.ndarray
    present: np.ndarray
    util: np.ndarray
    power: np.ndarray
    limit: np.ndarray
    idle: np.ndarray
    sm_active: np.ndarray
    clock: np.ndarray
    temp: np.ndarray
    energy: np.ndarray
    reasons: np.ndarray
    xid: np.ndarray

    @classmethod
    def of(cls, batch: NodeBatch) -> BatchColumns:
        shape = (len(batch.gpus), len(batch.ts))

        def floats(name: str) -> np.ndarray:
            return _floats(getattr(batch, name), shape)

        util = floats("util_gpu")
        limit = floats("power_limit_w")
        # agents.effective.idle_power_w, per element: the measured idle power where it is below the limit.
        measured = np.array([MEASURED_IDLE_W.get(g.model, np.nan) for g in batch.gpus])[:, None]
        with np.errstate(invalid="ignore"):
            idle = np.where(measured < limit, measured, IDLE_SHARE_OF_LIMIT * limit)
        return cls(
            ts=np.array(batch.ts, dtype=float), present=~np.isnan(util), util=util, power=floats("power_w"),
            limit=limit, idle=idle, sm_active=floats("sm_active"), clock=floats("sm_clock_mhz"),
            temp=floats("temp_c"), energy=floats("energy_j"),
            reasons=_ints(batch.clocks_event_reasons, shape, np.uint64),
            xid=_ints(batch.xid, shape, np.int64),
        )


def _sum(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    return np.where(where, values, 0.0).sum(axis=1)


@dataclass(frozen=True)
class SegmentSums:
    """Per GPU row, the window sums of ticks [a, b) of a batch (GpuAccumulator's fields)."""

    samples: list[int]
    util_sum: list[float]
    util_min: list[float]
    util_max: list[float]
    util_hist: np.ndarray  # (GPUs, UTIL_BINS)
    power_share_sum: list[float]
    power_sum: list[float]
    idle_power_sum: list[float]
    sm_active_sum: list[float]
    sm_active_samples: list[int]
    clock_sum: list[float]
    clock_samples: list[int]
    temp_sum: list[float]
    temp_samples: list[int]
    temp_max: list[float]
    throttled: list[int]
    throttled_by: np.ndarray  # (GPUs, len(bits))
    xid_count: list[int]
    xid_last: list[int]


def segment_sums(c: BatchColumns, a: int, b: int, throttle_mask: int, throttle_bits: tuple[int, ...]) -> SegmentSums:
    """The window sums of ticks [a, b) for every GPU row (rows without a sample there sum to 0)."""
    present = c.present[:, a:b]
    util = c.util[:, a:b]
    rows = util.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        limit, idle, power = c.limit[:, a:b], c.idle[:, a:b], c.power[:, a:b]
        span = limit - idle
        share = np.where(span > 0, np.clip((power - idle) / span, 0.0, 1.0), 0.0)
    bins = np.floor(np.where(present, util, 0.0) + 0.5).astype(np.int64) + np.arange(rows)[:, None] * UTIL_BINS
    hist = np.bincount(bins[present], minlength=rows * UTIL_BINS).reshape(rows, UTIL_BINS)
    has = {name: present & ~np.isnan(getattr(c, name)[:, a:b]) for name in ("sm_active", "clock", "temp")}
    temp = c.temp[:, a:b]
    reasons = c.reasons[:, a:b]
    throttled = present & ((reasons & np.uint64(throttle_mask)) != 0)
    xid = c.xid[:, a:b]
    with_xid = present & (xid != 0)
    last_xid = with_xid.shape[1] - 1 - np.argmax(with_xid[:, ::-1], axis=1)
    return SegmentSums(
        samples=present.sum(axis=1).tolist(),
        util_sum=_sum(util, present).tolist(),
        util_min=np.where(present, util, np.inf).min(axis=1).tolist(),
        util_max=np.where(present, util, -np.inf).max(axis=1).tolist(),
        util_hist=hist,
        power_share_sum=_sum(share, present).tolist(),
        power_sum=_sum(power, present).tolist(),
        idle_power_sum=_sum(idle, present).tolist(),
        sm_active_sum=_sum(c.sm_active[:, a:b], has["sm_active"]).tolist(),
        sm_active_samples=has["sm_active"].sum(axis=1).tolist(),
        clock_sum=_sum(c.clock[:, a:b], has["clock"]).tolist(),
        clock_samples=has["clock"].sum(axis=1).tolist(),
        temp_sum=_sum(temp, has["temp"]).tolist(),
        temp_samples=has["temp"].sum(axis=1).tolist(),
        temp_max=np.where(has["temp"], temp, -np.inf).max(axis=1).tolist(),
        throttled=throttled.sum(axis=1).tolist(),
        throttled_by=np.stack([(present & ((reasons & np.uint64(bit)) != 0)).sum(axis=1) for bit in throttle_bits],
                              axis=1),
        xid_count=with_xid.sum(axis=1).tolist(),
        xid_last=xid[np.arange(rows), last_xid].tolist(),
    )


def segment_energy(c: BatchColumns, a: int, b: int, last_ts: np.ndarray, last_energy: np.ndarray,
                   max_interval_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Energy (Wh) per GPU row over ticks [a, b), and which ticks count as each GPU's newest sample.

    Windower.add's rule, per sample in order: a sample newer than the GPU's previous one adds the
    counter delta (when both carry a counter and it did not go back) or power x interval (when the
    interval is no gap); an older one adds nothing and is not remembered. `last_ts`/`last_energy`
    hold each GPU's previous sample before this segment (-inf / NaN when none).
    Returns (energy per row, newer mask); a row's new last sample is the last True in its mask."""
    ts = np.broadcast_to(c.ts[a:b], c.present[:, a:b].shape)
    newer = c.present[:, a:b] & (ts > last_ts[:, None])  # ticks increase, so only the first ones can be older
    ticks = newer.shape[1]
    index = np.where(newer, np.arange(ticks), -1)
    latest = np.maximum.accumulate(index, axis=1)
    before = np.concatenate([np.full((newer.shape[0], 1), -1), latest[:, :-1]], axis=1)
    inside = before >= 0
    at = np.clip(before, 0, None)
    energy = c.energy[:, a:b]
    prev_ts = np.where(inside, c.ts[a:b][at], last_ts[:, None])
    prev_energy = np.where(inside, np.take_along_axis(energy, at, axis=1), last_energy[:, None])
    interval = ts - prev_ts
    with np.errstate(invalid="ignore"):
        counts = newer & (interval <= max_interval_s)
        counter = ~np.isnan(energy) & ~np.isnan(prev_energy) & (energy >= prev_energy)
        wh = np.where(counter, (energy - prev_energy) / 3600.0, c.power[:, a:b] * interval / 3600.0)
    return np.where(counts, wh, 0.0).sum(axis=1), newer
