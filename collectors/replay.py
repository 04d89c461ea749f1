"""Play a recorded trace back as if it were live.

Two formats, told apart by the first record (or forced with `fmt`):

- `nvml-trace`: the raw NVML recording of fixtures/h200-nvml-trace (one GPU per line: `ts`, `gpu`,
  `power_mw`, `energy_mj`, `mem_used_bytes`, ...). Units are converted to the schema's (W, J, MiB);
  node, cluster, model and UUID come from the options. Consecutive lines form one tick until a GPU
  index repeats, so a multi-GPU recording becomes one NodeSample per tick.
- `samples`: the schema's own JSONL (one NodeSample per line, what `--stdout` prints), replayed as
  recorded; consecutive lines with the same `ts` (several nodes) form one tick.

Timing: tick i is due at start + (ts_i - ts_0) / speed on the monotonic clock, so sleeping never
adds up to drift; speed 0 or inf means as fast as possible. `shift` moves every timestamp so that
the trace starts ("start") or ends ("end") at the moment the replay starts; timestamps are moved,
not compressed, so at speed > 1 with "start" they run ahead of the wall clock (backfill with "end").
Bad lines are counted, logged and skipped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from collectors.attribution import Attribution
from collectors.base import Clock, Source, SystemClock, Tick, build_node_sample, sleep_until
from laggard.events import NodeSample

Format = Literal["auto", "nvml-trace", "samples"]
Shift = Literal["none", "start", "end"]

MIB = 1024 * 1024.0

# GpuSample field <- (nvml-trace field, divisor to the schema's unit; None keeps the value as is)
NVML_TRACE_FIELDS: dict[str, tuple[str, float | None]] = {
    "index": ("gpu", None),
    "util_gpu": ("util_gpu", None),
    "util_mem": ("util_mem", None),
    "power_w": ("power_mw", 1000.0),
    "power_limit_w": ("power_limit_mw", 1000.0),
    "energy_j": ("energy_mj", 1000.0),
    "sm_clock_mhz": ("sm_clock_mhz", None),
    "mem_clock_mhz": ("mem_clock_mhz", None),
    "temp_c": ("temp_c", None),
    "mem_used_mib": ("mem_used_bytes", MIB),
    "mem_total_mib": ("mem_total_bytes", MIB),
    "clocks_event_reasons": ("clock_event_reasons", None),
}


def nvml_trace_gpu(record: dict[str, Any]) -> dict[str, Any]:
    """GpuSample fields (without uuid/model) from one nvml-trace line; bad values pass on for validation."""
    out: dict[str, Any] = {}
    for name, (key, divisor) in NVML_TRACE_FIELDS.items():
        value = record.get(key)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        out[name] = value / divisor if divisor is not None and numeric else value
    return out


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def last_ts(path: Path) -> float:
    """The `ts` of the last line, for shifting a trace so that it ends now."""
    last = ""
    with path.open() as lines:
        for line in lines:
            last = line if line.strip() else last
    try:
        ts = _number(json.loads(last).get("ts"))
    except (ValueError, AttributeError):
        ts = None
    if ts is None:
        raise ValueError(f"{path}: the last line has no numeric 'ts' to shift by")
    return ts


class ReplaySource(Source):
    name = "replay"

    def __init__(
        self,
        path: Path,
        *,
        cluster: str,
        node: str = "replay",
        fmt: Format = "auto",
        speed: float = 1.0,
        shift: Shift = "none",
        model: str = "H200",
        uuid_template: str = "GPU-{node}-{gpu}",
        attribution: Attribution | None = None,
        clock: Clock | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        if not speed >= 0:
            raise ValueError(f"speed must be >= 0 (0 or inf: as fast as possible), got {speed!r}")
        self.path = path
        self.cluster = cluster
        self.node = node
        self.fmt = fmt
        self.speed = speed
        self.shift = shift
        self.model = model
        self.uuid_template = uuid_template
        self.attribution = attribution or Attribution()
        self.clock = clock or SystemClock()
        self.now = now
        self.end_ts = last_ts(path) if shift == "end" else None

    def _records(self) -> Iterator[dict[str, Any]]:
        with self.path.open() as lines:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    self.rejects.count("not_json", f"{self.path.name}:{lineno}", str(err))
                    continue
                if not isinstance(record, dict):
                    self.rejects.count("not_json", f"{self.path.name}:{lineno}", "not a JSON object")
                    continue
                if self.fmt == "auto":
                    self.fmt = "samples" if "gpus" in record else "nvml-trace"
                yield record

    def _same_tick(self, group: list[dict[str, Any]], record: dict[str, Any]) -> bool:
        if self.fmt == "samples":
            return record.get("ts") == group[0].get("ts")
        return record.get("gpu") not in {r.get("gpu") for r in group}

    def _groups(self) -> Iterator[list[dict[str, Any]]]:
        """The records of each tick, in file order."""
        group: list[dict[str, Any]] = []
        for record in self._records():
            if group and not self._same_tick(group, record):
                yield group
                group = []
            group.append(record)
        if group:
            yield group

    def _samples(self, group: list[dict[str, Any]], offset: float) -> Tick:
        if self.fmt == "samples":
            shifted = (r | {"ts": r["ts"] + offset} if _number(r.get("ts")) is not None else r for r in group)
            found = (self.rejects.validate(NodeSample, r, f"node {r.get('node', '?')}") for r in shifted)
            return [s for s in found if s is not None]
        gpus = []
        for record in group:
            gpu = nvml_trace_gpu(record)
            uuid = self.uuid_template.format(node=self.node, gpu=gpu["index"])
            gpus.append(gpu | {"uuid": uuid, "model": self.model} | self.attribution.fields(gpu["index"], uuid))
        ts = (_number(group[0].get("ts")) or math.nan) + offset
        sample = build_node_sample(self.rejects, ts=ts, cluster=self.cluster, node=self.node, gpus=gpus)
        return [sample] if sample else []

    def ticks(self) -> Iterator[Tick]:
        as_fast_as_possible = self.speed == 0 or math.isinf(self.speed)
        start: tuple[float, float] | None = None  # (monotonic, trace ts) of the first tick
        offset = 0.0
        trace_ts = 0.0
        for group in self._groups():
            trace_ts = _number(group[0].get("ts")) or trace_ts
            if start is None:
                start = (self.clock.monotonic(), trace_ts)
                if self.shift != "none":
                    anchor = self.end_ts if self.end_ts is not None else trace_ts
                    offset = self.now() - anchor
            due = start[0] if as_fast_as_possible else start[0] + (trace_ts - start[1]) / self.speed
            if sleep_until(self.clock, due):
                return
            yield self._samples(group, offset)
