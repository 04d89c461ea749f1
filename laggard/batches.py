"""Schema version 2: one message carries one node's samples of a whole flush interval, columnar.

Version 1 sends every GPU of a node once per tick (`NodeSample`): at 1 Hz that is a Kafka message,
a Faust event and a JSON object per node per second, and those per-message costs decide how many
GPUs one worker can carry. A `NodeBatch` carries the ticks of a flush interval instead
(Telegraf's `interval` / `flush_interval`): `ts` lists the ticks, `gpus` the GPUs' labels, and
each measured field is a matrix with a row per GPU and a column per tick. A GPU silent at a tick
has `null` there in every row of its.

```json
{"v": 2, "cluster": "c", "node": "n0", "source": "nvml", "ts": [1e9, 1e9+1], "until": 1e9+10,
 "gpus": [{"index": 0, "uuid": "GPU-...", "model": "H200", "job": "llm", "rank": 0}, {"index": 1, ...}],
 "util_gpu": [[97, null], [95, 96]], "power_w": [[650, null], [640, 655]], "power_limit_w": ..., ...}
```

A GPU's labels (index, uuid, model, job, rank, MIG, whether power is estimated) hold for the
whole batch: a collector flushes early when one changes. `until` is the end of the time the batch
covers: the node sends nothing stamped before it afterwards, which lets a worker close a window
once every node has reported past it (agents/windows.py) instead of waiting out the grace.

Every field's bounds are GpuSample's own (one definition of a valid value), so a reject names the
field, GPU row, tick and value: 'util_gpu.1.3 = 104.0: Input should be less than or equal to 100'.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import orjson
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from laggard.events import (
    LABEL_PATTERN,
    MAX_MESSAGE_BYTES,
    PLAUSIBLE_TS_RANGE,
    EventRejected,
    GpuSample,
    NodeSample,
    _Strict,
    decode_node_sample,
    describe_validation_error,
    plausible_ts,
)

BATCH_VERSION = 2
# A flush interval longer than an hour holds a node's samples back from every window in it.
MAX_BATCH_TICKS = 3600
MAX_UNTIL_AHEAD_S = 3600.0

# What a batch holds once per GPU, and what it holds per GPU and tick (every other GpuSample field).
LABEL_FIELDS = ("index", "uuid", "model", "job", "rank", "mig_profile", "mig_instance", "power_estimated")
COLUMN_FIELDS = tuple(name for name in GpuSample.model_fields if name not in LABEL_FIELDS)
# Present at every tick a GPU reports; the others may be left out (a matrix of nulls is not sent).
REQUIRED_COLUMNS = ("util_gpu", "power_w", "power_limit_w")
INT_COLUMNS = ("clocks_event_reasons", "xid")


def _matrix_type(name: str) -> Any:
    """list[list[<GpuSample's type and bounds for `name`> | None]]: a row per GPU, a column per tick."""
    base = int if name in INT_COLUMNS else float
    return list[list[Annotated[base, *GpuSample.model_fields[name].metadata] | None]]


GpuLabels = create_model(
    "GpuLabels", __base__=_Strict, __doc__="What holds for one GPU over the whole batch.",
    **{name: (GpuSample.model_fields[name].annotation, GpuSample.model_fields[name]) for name in LABEL_FIELDS})


class _BatchHead(_Strict):
    """NodeBatch without its matrices (they follow, built from GpuSample's fields): `v` comes first
    in the JSON, where `decode_event` looks for it."""

    v: Literal[2] = BATCH_VERSION
    cluster: str = Field(min_length=1, max_length=128, pattern=LABEL_PATTERN)
    node: str = Field(min_length=1, max_length=256, pattern=LABEL_PATTERN)
    source: str = Field(default="", max_length=64, pattern=LABEL_PATTERN)
    ts: list[float] = Field(min_length=1, max_length=MAX_BATCH_TICKS, description="tick times, unix s, increasing")
    until: float | None = Field(default=None, description="the node sends nothing stamped before this afterwards")
    gpus: list[GpuLabels] = Field(min_length=1, max_length=256)  # type: ignore[valid-type]

    @field_validator("v", mode="before")
    @classmethod
    def _integer_version(cls, v: object) -> object:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"schema version must be the integer 2, got {v!r}")
        return v

    @field_validator("ts")
    @classmethod
    def _increasing_plausible(cls, ts: list[float]) -> list[float]:
        for i, t in enumerate(ts):
            if not plausible_ts(t):
                raise ValueError(f"ts[{i}] = {t!r} is outside {PLAUSIBLE_TS_RANGE}")
            if i and t <= ts[i - 1]:
                raise ValueError(f"ts[{i}] = {t!r} does not come after ts[{i - 1}] = {ts[i - 1]!r}")
        return ts

    @model_validator(mode="after")
    def _aligned_columns(self) -> _BatchHead:
        ticks, gpus = len(self.ts), len(self.gpus)
        if self.until is not None and not self.ts[-1] <= self.until <= self.ts[-1] + MAX_UNTIL_AHEAD_S:
            raise ValueError(f"until = {self.until!r} must lie within {MAX_UNTIL_AHEAD_S:.0f} s after the last tick "
                             f"{self.ts[-1]!r}")
        seen: set[tuple[int, int | None]] = set()
        for g, gpu in enumerate(self.gpus):
            key = (gpu.index, gpu.mig_instance)
            if key in seen:
                raise ValueError(f"gpus.{g}: GPU {gpu.index} appears twice in one batch")
            seen.add(key)
        for name in COLUMN_FIELDS:
            matrix = getattr(self, name)
            if matrix is None:
                continue
            if len(matrix) != gpus:
                raise ValueError(f"{name} has {len(matrix)} rows for {gpus} GPUs")
            for g, row in enumerate(matrix):
                if len(row) != ticks:
                    raise ValueError(f"{name}.{g} has {len(row)} values for {ticks} ticks")
        for g, (util, power, limit) in enumerate(zip(self.util_gpu, self.power_w, self.power_limit_w)):
            if util.count(None) == ticks:
                raise ValueError(f"gpus.{g}: GPU {self.gpus[g].index} has no sample in the batch")
            if any((u is None) != (p is None) or (u is None) != (lim is None) for u, p, lim in zip(util, power, limit)):
                raise ValueError(f"GPU row {g}: util_gpu, power_w and power_limit_w must be present or null "
                                 f"(a silent GPU) at the same ticks")
        return self

    def key(self) -> bytes:
        return self.node.encode()

    def samples(self) -> list[NodeSample]:
        """The batch as version-1 samples, one per tick with a reporting GPU (the reference path)."""
        columns = {name: matrix for name in COLUMN_FIELDS if (matrix := getattr(self, name)) is not None}
        out = []
        for i, ts in enumerate(self.ts):
            gpus = []
            for g, labels in enumerate(self.gpus):
                if self.util_gpu[g][i] is None:
                    continue
                values = {name: v for name, matrix in columns.items() if (v := matrix[g][i]) is not None}
                gpus.append(GpuSample.model_construct(**dict(labels), **values))
            if gpus:
                out.append(NodeSample.model_construct(ts=ts, cluster=self.cluster, node=self.node, source=self.source,
                                                      gpus=gpus))
        return out

    @property
    def sample_count(self) -> int:
        """GPU samples in the batch (silent ticks left out)."""
        return sum(len(row) - row.count(None) for row in self.util_gpu)

NodeBatch = create_model(
    "NodeBatch", __base__=_BatchHead,
    __doc__="One node's GPUs over the ticks of a flush interval: one Kafka message, keyed by `node`.",
    **{name: (_matrix_type(name), ...) if name in REQUIRED_COLUMNS else (_matrix_type(name) | None, None)
       for name in COLUMN_FIELDS})


def flush_period_end(ts: float, flush_s: float) -> float:
    """The end of the flush interval `ts` falls in: intervals are aligned to multiples of `flush_s`."""
    return (math.floor(ts / flush_s) + 1) * flush_s


def series_labels(gpu: GpuSample) -> tuple:
    """What a batch holds once per GPU: a change means a new batch."""
    return tuple(getattr(gpu, name) for name in LABEL_FIELDS)


def batch_of(samples: Sequence[NodeSample], until: float | None = None) -> NodeBatch:
    """One node's consecutive samples (increasing ts, the same labels per GPU) as one batch."""
    first = samples[0]
    ticks = len(samples)
    rows: dict[tuple[int, int | None], int] = {}
    labels: list[dict[str, Any]] = []
    columns: dict[str, list[list[Any]]] = {name: [] for name in COLUMN_FIELDS}
    for i, sample in enumerate(samples):
        for gpu in sample.gpus:
            row = rows.get((gpu.index, gpu.mig_instance))
            if row is None:
                row = rows[(gpu.index, gpu.mig_instance)] = len(labels)
                labels.append({name: getattr(gpu, name) for name in LABEL_FIELDS})
                for matrix in columns.values():
                    matrix.append([None] * ticks)
            elif any(labels[row][name] != getattr(gpu, name) for name in LABEL_FIELDS):
                raise ValueError(f"GPU {gpu.index} of node {sample.node} changes labels at {sample.ts!r}: "
                                 f"a batch holds one set per GPU")
            for name, matrix in columns.items():
                matrix[row][i] = getattr(gpu, name)
    present = {name: matrix for name, matrix in columns.items()
               if name in REQUIRED_COLUMNS or any(v is not None for r in matrix for v in r)}
    return NodeBatch(cluster=first.cluster, node=first.node, source=first.source, ts=[s.ts for s in samples],
                     until=until, gpus=labels, **present)


def gpu_sample_count(raw: bytes) -> int:
    """GPU samples in an encoded message of either version, without validating it (for counts)."""
    if not _says_batch(raw):
        return raw.count(b'"index"')  # one per GPU entry of a version-1 sample
    return sum(len(row) - row.count(None) for row in orjson.loads(raw)["util_gpu"])


def decode_event(raw: bytes | str | None) -> NodeSample | NodeBatch:
    """A version-1 or version-2 message, validated. Raises EventRejected naming field and value."""
    if raw is None or len(raw) > MAX_MESSAGE_BYTES:
        return decode_node_sample(raw)
    if not _says_batch(raw):
        try:
            return decode_node_sample(raw)
        except EventRejected:
            if not _version_2(raw):  # a batch whose "v" is not written first (hand-made, another encoder)
                raise
    try:
        return NodeBatch.model_validate_json(raw, strict=True)
    except ValidationError as err:
        raise EventRejected(describe_validation_error(err)) from None
    except (ValueError, TypeError) as err:
        raise EventRejected(f"not a JSON event: {err}") from None


def _says_batch(raw: bytes | str) -> bool:
    """Whether the message starts '{"v":2,' as every encoder of ours writes it (the fast path)."""
    head = raw[:16] if isinstance(raw, bytes) else raw[:16].encode()
    return head.replace(b" ", b"").startswith(b'{"v":2,')


def _version_2(raw: bytes | str) -> bool:
    """Whether a message v1 refused is an object with "v": 2 (parsed again only on this cold path)."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("v") == 2 and not isinstance(parsed.get("v"), bool)
