"""What the agents emit: per-window metrics (`WindowResult`) and detector output (`Finding`).

Both carry deterministic ids so a retried write (InfluxDB point, Kafka message, chat alert) is
idempotent: the same window or the same finding transition always gets the same id.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Scope = Literal["gpu", "node", "job", "model", "cluster"]
FindingState = Literal["firing", "resolved"]
# A finding's kind names the detector that made it (the registry: agents/detectors.py DETECTORS).
KIND_PATTERN = r"^[a-z][a-z0-9_]*$"
# The fleet KPI's numbers per cluster and window (agents.stages.FleetKpi): what the sink writes, and
# the metrics threshold rules can watch (the worker evaluates them on scope cluster only).
FLEET_METRICS = ("gpus", "allocated_gpus", "idle_allocated_gpus", "samples", "util_mean", "effective_util",
                 "power_w_mean", "energy_wh", "parts")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Labels(_Frozen):
    """Where a result belongs; only the labels that make sense for its scope are set."""

    cluster: str
    node: str | None = None
    gpu: int | None = None
    job: str | None = None
    rank: int | None = None
    model: str | None = None


class WindowResult(_Frozen):
    """Metrics of one scope key over one event-time tumbling window.

    Percentages (util_*) are 0-100, effective_util 0-1, throttle_share maps a clocks-event
    reason name (power_cap, hw_slowdown, sw_thermal, hw_thermal, power_brake) to the share of
    samples that carried it. `gpus` counts GPU series in the scope; `allocated_gpus` those with a
    job, `idle_allocated_gpus` those with a job and (near) zero utilization (fleet KPI).
    """

    scope: Scope
    key: str
    labels: Labels
    window_start: float
    window_s: float
    samples: int
    gpus: int
    allocated_gpus: int
    idle_allocated_gpus: int
    util_mean: float
    util_min: float
    util_max: float
    util_p50: float
    util_p95: float
    effective_util: float
    # Where the time went, for telling work from waiting (agents/straggler.py): mean power share
    # (power above idle over the loaded range, 0-1) and DCGM's SM_ACTIVE where the source has it.
    power_share: float | None = None
    sm_active: float | None = None
    power_w_mean: float
    power_estimated_share: float = 0.0  # of samples whose power figures were estimated (see GpuSample)
    idle_power_w: float
    energy_wh: float
    sm_clock_mhz_mean: float | None  # None: no sample carried one (the source does not export it)
    temp_c_mean: float | None
    temp_c_max: float | None
    throttled_share: float
    throttle_share: dict[str, float]
    xid_count: int
    xid_last: int | None = None

    @property
    def window_end(self) -> float:
        return self.window_start + self.window_s

    @property
    def id(self) -> str:
        return window_id(self.scope, self.key, self.window_start)


def group_key(cluster: str, job: str | None, node: str | None) -> str:
    """Stage 2's partition key: the job, so all its ranks meet; else the node."""
    return f"{cluster}/{job}" if job is not None else f"{cluster}/node/{node}"


def detect_key(result: WindowResult) -> str:
    labels = result.labels
    return group_key(labels.cluster, labels.job, labels.node)


def window_id(scope: str, key: str, window_start: float) -> str:
    return f"{scope}:{key}:{round(window_start * 1000)}"


class Finding(_Frozen):
    """A detector's statement about a job/rank/GPU, firing or resolved.

    `evidence` holds the numbers the verdict rests on, `cost` what the problem costs per window
    (GPU-seconds, Wh, share of step time); both are flat name -> value maps so sinks can write
    them as fields.
    """

    kind: str = Field(pattern=KIND_PATTERN)
    state: FindingState
    cluster: str
    job: str | None = None
    rank: int | None = None
    node: str | None = None
    gpu: int | None = None
    model: str | None = None
    window_start: float
    window_end: float
    evidence: dict[str, float | int | str | None] = Field(default_factory=dict)
    cost: dict[str, float] = Field(default_factory=dict)
    summary: str

    @property
    def fingerprint(self) -> str:
        return finding_fingerprint(self.kind, self.cluster, self.job, self.rank, self.node, self.gpu)

    @property
    def idempotency_key(self) -> str:
        return f"{self.fingerprint}|{self.state}|{round(self.window_start * 1000)}"


def finding_fingerprint(
    kind: str, cluster: str, job: str | None, rank: int | None, node: str | None, gpu: int | None
) -> str:
    """Identity of what a finding is about, stable across windows (Alertmanager-style dedup key)."""
    parts = (kind, cluster, job or "", "" if rank is None else str(rank), node or "", "" if gpu is None else str(gpu))
    return "|".join(parts)
