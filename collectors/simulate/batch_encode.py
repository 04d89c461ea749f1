"""Schema-2 batches (laggard/batches.py) straight from the frames of a flush interval, no pydantic.

The frames of one flush interval are stacked into (GPU, tick) arrays; a node's matrices are
slices of them, which orjson writes straight from numpy, so a node's message costs one dict and
one `orjson.dumps`. A node whose GPUs change job or rank within the interval is sent as one batch
per run of equal labels; a node with a GPU silent at a tick (nulls there) or an XID goes the slow
way, through lists.
Values are the whole numbers the version-1 encoder sends, so both versions carry the same samples.
"""

from __future__ import annotations

import numpy as np
import orjson

from laggard.batches import flush_period_end
from laggard.collectors.simulate.encode import SOURCE
from laggard.collectors.simulate.frame import Frame
from laggard.collectors.simulate.layout import FleetLayout
from laggard.collectors.simulate.scenario import Scenario

_NVML = ("util_gpu", "util_mem", "power_w", "power_limit_w", "sm_clock_mhz", "temp_c", "mem_used_mib")
_DCGM = ("sm_active", "tensor_active", "dram_active")


class BatchEncoder:
    """Collects frames; `add` returns the node batches a frame past the flush interval completes."""

    def __init__(self, scenario: Scenario, layout: FleetLayout, flush_s: float) -> None:
        if not flush_s > 0:
            raise ValueError(f"flush interval must be > 0 seconds, got {flush_s!r}")
        self.scenario = scenario
        self.layout = layout
        self.flush_s = flush_s
        self.jobs = [job.name for job in scenario.jobs]
        self.mem_clock_mhz = layout.spec_array("mem_clock_mhz")
        self.mem_total_mib = layout.spec_array("mem_total_mib")
        self.bounds = list(zip(layout.node_first_gpu[:-1].tolist(), layout.node_first_gpu[1:].tolist()))
        self._keys = [node.encode() for node in layout.nodes]
        self.frames: list[Frame] = []

    def add(self, frame: Frame) -> list[tuple[bytes, bytes]]:
        out = []
        if self.frames and frame.ts >= (end := flush_period_end(self.frames[-1].ts, self.flush_s)):
            out = self.flush(until=end)
        self.frames.append(frame)
        return out

    def flush(self, until: float | None = None) -> list[tuple[bytes, bytes]]:
        """(node key, JSON) for every node with a sample in the frames held; `until` when the
        interval is over (None at the end of the run: nothing promised past the last tick)."""
        frames, self.frames = self.frames, []
        if not frames:
            return []
        names = _NVML + (_DCGM if self.scenario.dcgm_profiling else ())
        matrices = {name: np.stack([getattr(f, name) for f in frames], axis=1) for name in names}
        for name in _DCGM:
            if name in matrices:
                matrices[name] = np.round(matrices[name], 3)
        ticks = len(frames)
        matrices["mem_clock_mhz"] = np.repeat(self.mem_clock_mhz[:, None], ticks, axis=1)
        matrices["mem_total_mib"] = np.repeat(self.mem_total_mib[:, None], ticks, axis=1)
        matrices["clocks_event_reasons"] = np.stack([f.reasons for f in frames], axis=1)
        matrices["energy_j"] = np.stack([f.energy_j for f in frames], axis=1)
        xid = np.stack([f.xid for f in frames], axis=1)
        present = np.stack([f.present for f in frames], axis=1)
        job = np.stack([f.job for f in frames], axis=1)
        rank = np.stack([f.rank for f in frames], axis=1)
        ts = [f.ts for f in frames]
        relabelled = (job[:, 1:] != job[:, :-1]) | (rank[:, 1:] != rank[:, :-1])  # a GPU's job or rank changes
        irregular = ~present.all(axis=1) | (xid != 0).any(axis=1)  # silent at a tick, or an XID: lists, not arrays
        out = []
        for n, (lo, hi) in enumerate(self.bounds):
            cuts = [0, *(np.flatnonzero(relabelled[lo:hi].any(axis=0)) + 1).tolist(), ticks]
            for a, b in zip(cuts, cuts[1:]):
                message = self._message(n, lo, hi, a, b, ts, matrices, job, rank, present, xid,
                                        bool(irregular[lo:hi].any()), until if b == ticks else ts[b])
                if message is not None:
                    out.append((self._keys[n], message))
        return out

    def _message(self, n: int, lo: int, hi: int, a: int, b: int, ts: list[float], matrices: dict[str, np.ndarray],
                 job: np.ndarray, rank: np.ndarray, present: np.ndarray, xid: np.ndarray, irregular: bool,
                 until: float | None) -> bytes | None:
        """Node `n`'s GPUs lo..hi over ticks a..b as one batch; `until` where the run ends before the
        interval does is the next run's first tick (nothing before it is still to come)."""
        rows = list(range(lo, hi))
        if irregular:
            rows = [g for g in rows if present[g, a:b].any()]
            if not rows:
                return None
        message: dict = {"v": 2, "cluster": self.scenario.cluster, "node": self.layout.nodes[n], "source": SOURCE,
                         "ts": ts[a:b]}
        if until is not None:
            message["until"] = until
        message["gpus"] = [self._labels(g, job[g, a], rank[g, a]) for g in rows]
        if not irregular:  # the common case: C-contiguous int arrays, which orjson writes itself
            for name, matrix in matrices.items():
                message[name] = np.ascontiguousarray(matrix[lo:hi, a:b])
            return orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY)
        seen = present[rows, a:b]
        for name, matrix in matrices.items():
            message[name] = _with_nulls(matrix[rows, a:b].tolist(), seen)
        codes = np.where(seen, xid[rows, a:b], 0)
        if codes.any():
            message["xid"] = [[int(c) if c else None for c in row] for row in codes.tolist()]
        return orjson.dumps(message)

    def _labels(self, g: int, job: int, rank: int) -> dict:
        lay = self.layout
        labels: dict = {"index": int(lay.gpu_index[g]), "uuid": lay.gpu_uuid[g], "model": lay.gpu_model[g]}
        if job >= 0:
            labels["job"] = self.jobs[job]
            labels["rank"] = int(rank)
        return labels


def _with_nulls(rows: list[list], seen: np.ndarray) -> list[list]:
    """Null where a GPU was silent."""
    if seen.all():
        return rows
    return [[v if p else None for v, p in zip(row, row_seen)] for row, row_seen in zip(rows, seen.tolist())]
