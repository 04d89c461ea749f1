"""Play a recorded trace back as if it were live.

Two formats, told apart by the first record (or forced with `fmt`):

- `nvml-trace`: the raw NVML recording of fixtures/h200-nvml-trace (one GPU per line: `ts`, `gpu`,
  `power_mw`, `energy_mj`, `mem_used_bytes`, ...). Units are converted to the schema's (W, J, MiB);
  node, cluster, model and UUID come from the options. Consecutive lines form one tick until a GPU
  index repeats or a line's `ts` is more than half the recording interval (the median gap between
  recent ticks) away from the tick's first, so a missing line costs one tick, not a shift of that
  GPU's data by one tick for the rest of the trace. A multi-GPU recording becomes one NodeSample per tick.
- `samples`: the schema's own JSONL (what `--stdout` prints), replayed as recorded: version-1 lines
  (one node at one tick) and schema-2 batches (one node over a flush interval), which are taken
  apart into their ticks; consecutive lines with the same `ts` (several nodes) form one tick, and
  the ticks of consecutive batches that overlap in time (every node's batch of one interval) are
  put in time order.

Timing: tick i is due at start + (ts_i - ts_0) / speed on the monotonic clock, so sleeping never
adds up to drift; speed 0 or inf means as fast as possible. A wait longer than `max_wait_s` (a
break in the recording, or a very low speed) is not waited out: the replay warns once, emits the
tick at once and schedules the rest from there; timestamps stay as recorded.
`shift` moves every timestamp so that the trace starts ("start": the first line with a numeric
`ts` anchors it) or ends ("end": the last such line) at the moment the replay starts; timestamps
are moved, not compressed, so at speed > 1 with "start" they run ahead of the wall clock (backfill with "end").

Bad lines are counted, logged and skipped, never fatal: not UTF-8 or not JSON (also nesting too
deep for the parser), no numeric `ts`, a (shifted) `ts` that is no plausible sample time (the
schema's rule: a millisecond timestamp, a clock jump of decades), a `gpu` that is not an integer.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from laggard.collectors.attribution import Attribution
from laggard.collectors.base import Clock, Source, SystemClock, Tick, build_node_sample, log, sleep_until
from laggard.batches import NodeBatch
from laggard.events import PLAUSIBLE_TS_RANGE, NodeSample, plausible_ts, shown

Format = Literal["auto", "nvml-trace", "samples"]
Shift = Literal["none", "start", "end"]

MIB = 1024 * 1024.0

# A wait longer than this (wall-clock seconds) is not waited out: see "Timing" above.
MAX_WAIT_S = 600.0
# How many recent same-GPU ts gaps estimate the recording interval; their median ignores a few odd ones.
INTERVAL_HISTORY = 15
# What str.format raises for a template that does not fit its arguments.
FORMAT_ERRORS = (KeyError, IndexError, ValueError, AttributeError, TypeError, OverflowError)

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
        number = _number(value)
        out[name] = number / divisor if divisor is not None and number is not None else value
    return out


def _number(value: object) -> float | None:
    """A finite float from a JSON number; None for anything else (text, bool, an integer too big for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _is_gpu_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_object(line: bytes) -> dict[str, Any]:
    """One trace line as a JSON object; ValueError says why not (not UTF-8, not JSON, nested too deep)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def _nonblank_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes): bytes, so that one undecodable line is one bad line, not the end of the file."""
    with path.open("rb") as lines:
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                yield lineno, line


def _last_tick(record: dict[str, Any]) -> float | None:
    """A line's `ts`, or a batch's last tick."""
    ts = record.get("ts")
    return _number(ts[-1] if isinstance(ts, list) and ts and record.get("v") == 2 else ts)


def last_ts(path: Path) -> float:
    """The last numeric `ts` of the trace, for shifting it so that it ends now (bad lines are passed over)."""
    last: float | None = None
    for _, line in _nonblank_lines(path):
        try:
            ts = _last_tick(_json_object(line))
        except ValueError:
            continue
        last = ts if ts is not None else last
    if last is None:
        raise ValueError(f"{path}: no line has a numeric 'ts' to shift by")
    return last


def check_uuid_template(template: str, node: str) -> None:
    """ValueError naming --uuid-template unless it fills in with {node} and an integer {gpu} to a usable UUID."""
    try:
        uuid = template.format(node=node, gpu=0)
    except FORMAT_ERRORS as err:
        raise ValueError(
            f"--uuid-template {template!r} cannot be filled in ({type(err).__name__}: {err}); "
            "it may use {node} and {gpu} (an integer), e.g. 'GPU-{node}-{gpu}'"
        ) from None
    if not 1 <= len(uuid) <= 128:
        raise ValueError(f"--uuid-template {template!r} gives a UUID of {len(uuid)} characters; 1 to 128 are allowed")


class Line(NamedTuple):
    """One usable trace line: its `ts` (already shifted) and the record."""

    ts: float
    record: dict[str, Any]


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
        max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        super().__init__()
        if not speed >= 0:
            raise ValueError(f"speed must be >= 0 (0 or inf: as fast as possible), got {speed!r}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0 seconds, got {max_wait_s!r}")
        check_uuid_template(uuid_template, node)
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
        self.max_wait_s = max_wait_s
        self.waits_skipped = 0  # waits longer than max_wait_s, not waited out
        self.end_ts = last_ts(path) if shift == "end" else None

    def _offset(self, first_ts: float) -> float:
        """What `shift` adds to every ts, given the first numeric one."""
        if self.shift == "none":
            return 0.0
        anchor = self.end_ts if self.end_ts is not None else first_ts
        return self.now() - anchor

    def _records(self) -> Iterator[Line]:
        """The usable lines in file order (a batch's ticks in time order with the batches that
        overlap it); every other line is counted by why and skipped."""
        offset: float | None = None
        batched: list[Line] = []  # the ticks of overlapping batches, until one starts after them all
        batched_end = -math.inf
        for lineno, raw in _nonblank_lines(self.path):
            where = f"{self.path.name}:{lineno}"
            try:
                record = _json_object(raw)
            except ValueError as err:
                self.rejects.count("not_json", where, str(err))
                continue
            if self.fmt == "auto":
                self.fmt = "samples" if "gpus" in record else "nvml-trace"
            is_batch = self.fmt == "samples" and record.get("v") == 2 and isinstance(record.get("ts"), list)
            first = record["ts"][0] if is_batch and record["ts"] else record.get("ts")
            ts = _number(first)
            if ts is None:
                self.rejects.count("ts:not_a_number", where, f"ts = {shown(record.get('ts'))} is not a finite number")
                continue
            offset = self._offset(ts) if offset is None else offset
            if batched and (not is_batch or ts + offset >= batched_end):
                yield from sorted(batched, key=lambda line: line.ts)
                batched, batched_end = [], -math.inf
            if is_batch:
                lines = self._batch_lines(record, offset, where)
                batched += lines
                batched_end = max([batched_end, *(line.ts for line in lines)])
                continue
            if not plausible_ts(ts + offset):
                self.rejects.count("ts:implausible", where, f"ts = {ts + offset!r} is outside {PLAUSIBLE_TS_RANGE}")
                continue
            if self.fmt == "nvml-trace" and not _is_gpu_index(record.get("gpu")):
                self.rejects.count("gpu:not_an_index", where, f"gpu = {shown(record.get('gpu'))} is not an integer")
                continue
            yield Line(ts + offset, record)
        yield from sorted(batched, key=lambda line: line.ts)

    def _batch_lines(self, record: dict[str, Any], offset: float, where: str) -> list[Line]:
        """A schema-2 batch, shifted and validated, as one version-1 line per tick; none if invalid."""
        shifted = record | {"ts": [t + offset if _number(t) is not None else t for t in record["ts"]]}
        if _number(record.get("until")) is not None:
            shifted["until"] = record["until"] + offset
        batch = self.rejects.validate(NodeBatch, shifted, where)
        if batch is None:
            return []
        return [Line(sample.ts, sample.model_dump(exclude_none=True)) for sample in batch.samples()]

    def _same_tick(self, group: list[Line], line: Line, interval: float) -> bool:
        if self.fmt == "samples":
            return line.ts == group[0].ts
        near = abs(line.ts - group[0].ts) <= interval / 2
        return near and line.record["gpu"] not in {g.record["gpu"] for g in group}

    def _groups(self) -> Iterator[list[Line]]:
        """The lines of each tick, in file order."""
        group: list[Line] = []
        last_seen: dict[int, float] = {}  # nvml-trace: each GPU's previous ts
        gaps: deque[float] = deque(maxlen=INTERVAL_HISTORY)
        interval = math.inf  # unknown until a GPU repeats
        for line in self._records():
            if self.fmt == "nvml-trace":
                previous = last_seen.get(line.record["gpu"])
                last_seen[line.record["gpu"]] = line.ts
                if previous is not None and line.ts > previous:
                    gaps.append(line.ts - previous)
                    interval = statistics.median(gaps)
            if group and not self._same_tick(group, line, interval):
                yield group
                group = []
            group.append(line)
        if group:
            yield group

    def _samples(self, group: list[Line]) -> Tick:
        if self.fmt == "samples":
            found = (
                self.rejects.validate(NodeSample, line.record | {"ts": line.ts}, f"node {line.record.get('node', '?')}")
                for line in group
            )
            return [s for s in found if s is not None]
        gpus = []
        for line in group:
            gpu = nvml_trace_gpu(line.record)
            try:
                uuid = self.uuid_template.format(node=self.node, gpu=gpu["index"])
            except FORMAT_ERRORS as err:
                where = f"node {self.node} gpu {gpu['index']}"
                self.rejects.count("uuid:template_failed", where, f"--uuid-template {self.uuid_template!r}: {err}")
                continue
            gpus.append(gpu | {"uuid": uuid, "model": self.model} | self.attribution.fields(gpu["index"], uuid))
        sample = build_node_sample(self.rejects, ts=group[0].ts, cluster=self.cluster, node=self.node, gpus=gpus)
        return [sample] if sample else []

    def _not_waiting(self, wait_s: float) -> None:
        if not self.waits_skipped:
            log.warning(
                "replay %s: a wait of %.3g s (a break in the recording, or speed %g) exceeds max_wait_s %g; "
                "not waiting out this or any later one",
                self.path.name,
                wait_s,
                self.speed,
                self.max_wait_s,
            )
        self.waits_skipped += 1

    def ticks(self) -> Iterator[Tick]:
        as_fast_as_possible = self.speed == 0 or math.isinf(self.speed)
        start: tuple[float, float] | None = None  # (monotonic, ts) the schedule counts from
        for group in self._groups():
            ts = group[0].ts
            now = self.clock.monotonic()
            if start is None:
                start = (now, ts)
            due = now if as_fast_as_possible else start[0] + (ts - start[1]) / self.speed
            if due - now > self.max_wait_s:
                self._not_waiting(due - now)
                start, due = (now, ts), now
            if sleep_until(self.clock, due):
                return
            yield self._samples(group)
