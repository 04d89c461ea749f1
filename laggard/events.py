"""The event schema: what collectors put on Kafka and what agents read.

A `NodeSample` is every GPU of one node at one tick: schema version 1, one Kafka message each,
keyed by node, so a node's samples stay ordered in one partition. Collectors now send a node's
ticks of a flush interval as one schema-2 message (laggard/batches.py), whose columns take their
bounds from `GpuSample`. The wire format is JSON; `v` is the schema version and a decoder rejects
versions it does not know.
"""

from __future__ import annotations

import time
from enum import IntFlag
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1

# Samples must be stamped between 2020-01-01 and one day ahead of the reader's clock: anything
# outside is a broken clock or a unit mistake (ms for s), not telemetry. A collector a few
# minutes off is accepted; the agents count it as late or early instead.
EARLIEST_TS = 1_577_836_800.0
MAX_FUTURE_S = 86_400.0
MAX_MESSAGE_BYTES = 1_000_000
# What `plausible_ts` accepts, in words for error messages.
PLAUSIBLE_TS_RANGE = "[2020-01-01, now + 1 day]"


def plausible_ts(ts: float) -> bool:
    """Whether `ts` can be a sample time (NaN is not); NodeSample refuses any other."""
    return EARLIEST_TS <= ts <= time.time() + MAX_FUTURE_S


class ClockReason(IntFlag):
    """NVML clocks-event reasons (nvmlClocksEventReason*), as reported in the bitmask."""

    GPU_IDLE = 0x1
    APPLICATIONS_CLOCKS = 0x2
    SW_POWER_CAP = 0x4
    HW_SLOWDOWN = 0x8
    SYNC_BOOST = 0x10
    SW_THERMAL = 0x20
    HW_THERMAL = 0x40
    HW_POWER_BRAKE = 0x80
    DISPLAY_CLOCKS = 0x100


# The reasons that mean "this GPU is being slowed down", as opposed to idle or configured.
THROTTLE_REASONS = (
    ClockReason.SW_POWER_CAP
    | ClockReason.HW_SLOWDOWN
    | ClockReason.SW_THERMAL
    | ClockReason.HW_THERMAL
    | ClockReason.HW_POWER_BRAKE
)


# Labels become tags, chat text and file names downstream: no control characters (a newline would
# split a line-protocol point, a NUL ends a C string). Checked by pydantic-core, off the hot path.
LABEL_PATTERN = r"^[^\x00-\x1f\x7f]*$"
_LABEL_WORDS = "no control characters (newline, tab, NUL, ...)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class GpuSample(_Strict):
    """One GPU at one tick. Percentages are 0-100; DCGM activity ratios are 0-1."""

    index: int = Field(ge=0, le=1023)
    uuid: str = Field(min_length=1, max_length=128, pattern=LABEL_PATTERN)
    model: str = Field(min_length=1, max_length=64, pattern=LABEL_PATTERN, description="GPU model, e.g. H100, H200, GB200")
    job: str | None = Field(default=None, max_length=256, pattern=LABEL_PATTERN)
    rank: int | None = Field(default=None, ge=0, le=10_000_000)
    util_gpu: float = Field(ge=0, le=100, description="NVML utilization.gpu, % of time a kernel ran")
    # Optional fields are ones an exporter's counter list may leave out. Memory: nothing downstream
    # reads it. SM clock and temperature: detection compares them where a GPU reports them (a GPU
    # without a clock cannot show a throttled clock); utilization and power it cannot do without.
    util_mem: float | None = Field(default=None, ge=0, le=100)
    power_w: float = Field(ge=0, le=5000)
    power_limit_w: float = Field(gt=0, le=5000)
    # The power figures are estimates: a board-default limit (the source exports none), or a MIG
    # instance's share of its GPU's power. Windows carry the share of such samples.
    power_estimated: bool = False
    sm_clock_mhz: float | None = Field(default=None, ge=0, le=10_000)
    mem_clock_mhz: float | None = Field(default=None, ge=0, le=50_000)
    temp_c: float | None = Field(default=None, ge=-50, le=200)
    mem_used_mib: float | None = Field(default=None, ge=0, le=10_000_000)
    mem_total_mib: float | None = Field(default=None, ge=0, le=10_000_000)
    clocks_event_reasons: int = Field(default=0, ge=0, lt=2**64)
    energy_j: float | None = Field(default=None, ge=0, description="cumulative energy counter, J")
    sm_active: float | None = Field(default=None, ge=0, le=1)
    tensor_active: float | None = Field(default=None, ge=0, le=1)
    dram_active: float | None = Field(default=None, ge=0, le=1)
    xid: int | None = Field(default=None, ge=0, le=2**31 - 1, description="last XID error seen since the previous tick")
    mig_profile: str | None = Field(default=None, max_length=64, pattern=LABEL_PATTERN)
    mig_instance: int | None = Field(default=None, ge=0)


class NodeSample(_Strict):
    """All GPUs of one node at one tick: one Kafka message, keyed by `node`."""

    v: Literal[1] = SCHEMA_VERSION
    ts: float = Field(description="sample time, unix seconds (event time)")
    cluster: str = Field(min_length=1, max_length=128, pattern=LABEL_PATTERN)
    node: str = Field(min_length=1, max_length=256, pattern=LABEL_PATTERN)
    source: str = Field(default="", max_length=64, pattern=LABEL_PATTERN)
    gpus: list[GpuSample] = Field(min_length=1, max_length=256)

    @field_validator("v", mode="before")
    @classmethod
    def _integer_version(cls, v: object) -> object:
        if isinstance(v, bool) or not isinstance(v, int):  # 1 == True == 1.0 would pass Literal[1]
            raise ValueError(f"schema version must be the integer 1, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_entry_per_gpu(self) -> NodeSample:
        seen: set[tuple[int, int | None]] = set()
        for gpu in self.gpus:
            key = (gpu.index, gpu.mig_instance)
            if key in seen:
                where = f"GPU {gpu.index}" + (f" MIG instance {gpu.mig_instance}" if gpu.mig_instance is not None else "")
                raise ValueError(f"{where} appears twice in one node sample")
            seen.add(key)
        return self

    @field_validator("ts")
    @classmethod
    def _plausible_time(cls, ts: float) -> float:
        if not plausible_ts(ts):
            raise ValueError(f"timestamp {ts!r} is outside {PLAUSIBLE_TS_RANGE}")
        return ts

    def key(self) -> bytes:
        return self.node.encode()


class FaultTruth(_Strict):
    """Ground truth from the simulator: a fault it injected, for scoring detectors."""

    v: Literal[1] = SCHEMA_VERSION
    scenario: str
    kind: str = Field(pattern=r"^[a-z][a-z0-9_]*$")  # a fault the simulator injects (collectors/simulate/scenario.py)
    cluster: str
    job: str | None = None
    rank: int | None = None
    node: str | None = None
    gpu: int | None = None
    start: float
    end: float | None = None
    detail: dict[str, float | str] = Field(default_factory=dict)


class EventRejected(ValueError):
    """A message that is not a valid event; `reason` names the field and the value."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def shown(value: object, limit: int = 80) -> str:
    """`value` as a reject reason quotes it: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_validation_error(err: ValidationError, limit: int = 3) -> str:
    """'gpus.0.power_w = -3.0: Input should be greater than or equal to 0' (first few errors)."""
    parts = []
    for item in err.errors(include_url=False)[:limit]:
        if not item["loc"]:  # about the message as a whole: its own words say what is wrong
            parts.append(item["msg"])
            continue
        where = ".".join(str(p) for p in item["loc"])
        value = item.get("input")
        label = item["type"] == "string_pattern_mismatch" and item.get("ctx", {}).get("pattern") == LABEL_PATTERN
        parts.append(f"{where} = {shown(value) if not isinstance(value, (dict, list)) else type(value).__name__}: "
                     f"{_LABEL_WORDS if label else item['msg']}")
    more = err.error_count() - limit
    if more > 0:
        parts.append(f"(+{more} more)")
    return "; ".join(parts)


def decode_node_sample(raw: bytes | str | None) -> NodeSample:
    """Parse and validate one message. Raises EventRejected with a reason naming field and value."""
    if raw is None:
        raise EventRejected("a message with no value (a tombstone)")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise EventRejected(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        # Strict: a number sent as a string or a bool sent as a number is a broken producer, not data.
        return NodeSample.model_validate_json(raw, strict=True)
    except ValidationError as err:
        raise EventRejected(describe_validation_error(err)) from None
    except (ValueError, TypeError) as err:  # undecodable bytes
        raise EventRejected(f"not a JSON event: {err}") from None


def encode(event: BaseModel) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()
