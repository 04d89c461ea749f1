"""Scenario files: the fleet, its jobs and the faults to inject, as YAML validated by pydantic.

Times in a scenario are seconds from its start. A fault names its GPU either as `job` + `rank`
or as `node` + `gpu`; a job names its nodes as ranges of node groups, and its ranks follow
node order, then GPU order. A job whose ranks span two GPU models is a mixed-generation job:
that is placement, not an injected fault, so the simulator derives its ground truth.
A bad file is one ScenarioError naming the file, the line (where the YAML has one) and the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from laggard.collectors.simulate.physics import MODELS
from laggard.events import PLAUSIBLE_TS_RANGE, describe_validation_error, plausible_ts

ModelName = Literal["H100", "H200", "GB200"]


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the field."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NodeGroup(_Spec):
    """`count` nodes named prefix0000, prefix0001, ... all with the same GPU model."""

    prefix: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    count: int = Field(ge=1, le=100_000)
    model: ModelName
    gpus_per_node: int | None = Field(default=None, ge=1, le=64, description="default: the model's usual count")

    @property
    def gpus(self) -> int:
        return self.gpus_per_node or MODELS[self.model].gpus_per_node

    def node_name(self, i: int) -> str:
        return f"{self.prefix}{i:04d}"


class NodeRange(_Spec):
    """Nodes first .. first + count - 1 of the group with this prefix."""

    group: str
    first: int = Field(default=0, ge=0)
    count: int = Field(ge=1)


class JobSpec(_Spec):
    """A synchronous data-parallel job: one rank per GPU of its nodes."""

    name: str = Field(min_length=1, max_length=200)
    nodes: list[NodeRange] = Field(min_length=1)
    step_s: float = Field(gt=0, le=3600, description="healthy step time on H100s at normal clocks")
    comm_share: float = Field(default=0.1, ge=0, lt=1, description="share of the healthy step spent in the collective")
    intensity: float = Field(default=1.0, gt=0, le=1, description="power drawn at full busy, share of loaded (0.6: memory-bound)")
    mem_util_pct: float = Field(default=40.0, ge=0, le=100, description="util_mem while busy")
    mem_share: float = Field(default=0.8, ge=0, le=1, description="share of GPU memory the job holds")
    # Load that differs by design, not stragglers (laggard must not name these ranks):
    pipeline_stages: int = Field(default=1, ge=1, le=1024, description="pipeline-parallel stages, contiguous rank blocks")
    pipeline_imbalance: float = Field(default=0.15, ge=0, le=2, description="extra compute of the first and last stages")
    rank_jitter: float = Field(default=0.0, ge=0, le=0.5, description="per-rank compute spread, redrawn every tick "
                               "(MoE experts whose load moves from step to step)")
    step_jitter: float = Field(default=0.0, ge=0, le=0.5, description="the whole job's compute spread, every tick")
    collective_wait: Literal["kernel", "host"] = Field(
        default="kernel", description="where a rank waits for the slowest: spinning inside the collective kernel "
        "(NCCL: util ~100% at near-idle power, boosted clock) or on the host (the GPU reads idle)")
    start_s: float = Field(default=0.0, ge=0)
    end_s: float | None = Field(default=None, gt=0)


class Timed(_Spec):
    start_s: float = Field(ge=0)
    end_s: float | None = Field(default=None, gt=0, description="default: until the scenario ends")

    @model_validator(mode="after")
    def _ends_after_start(self) -> Timed:
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")
        return self


class GpuTarget(Timed):
    """One GPU: job + rank, or node + gpu."""

    job: str | None = None
    rank: int | None = Field(default=None, ge=0)
    node: str | None = None
    gpu: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_target(self) -> GpuTarget:
        by_rank = self.job is not None and self.rank is not None and self.node is None and self.gpu is None
        by_gpu = self.node is not None and self.gpu is not None and self.job is None and self.rank is None
        if not (by_rank or by_gpu):
            raise ValueError("name the GPU as job + rank or as node + gpu (one of the two pairs)")
        return self


class Throttle(_Spec):
    clock_mhz: float | None = Field(default=None, gt=0, le=5000, description="SM clock while throttled")
    slowdown: float | None = Field(default=None, gt=1, le=20, description="compute-time factor (instead of clock_mhz)")

    @model_validator(mode="after")
    def _one_severity(self) -> Throttle:
        if self.clock_mhz is not None and self.slowdown is not None:
            raise ValueError("give clock_mhz or slowdown, not both")
        return self


class StragglerFault(GpuTarget, Throttle):
    """One rank slower than its peers. GPU throttles: thermal (SW_THERMAL, hot), power (SW_POWER_CAP,
    a lowered limit) or hw_slowdown, at a lower clock. slow_compute: each step's compute takes
    `slowdown` times longer at the same clock, no flag (memory thrashing, a weak part). host: its
    host is late, its GPU idles for (slowdown - 1) x its compute time each step (input pipeline,
    CPU contention)."""

    kind: Literal["straggler"]
    cause: Literal["thermal", "power", "hw_slowdown", "slow_compute", "host"] = "thermal"
    power_limit_w: float | None = Field(default=None, gt=0, le=5000, description="cause power: the lowered limit")

    @model_validator(mode="after")
    def _clock_only_for_throttles(self) -> StragglerFault:
        if self.cause in ("slow_compute", "host") and (self.clock_mhz is not None or self.power_limit_w is not None):
            raise ValueError(f"cause {self.cause} keeps the clock and the limit: give slowdown instead")
        return self


class SlowNodeFault(Timed, Throttle):
    """Every GPU of a node slowed together (HW_SLOWDOWN: a failing PSU, a hot rack)."""

    kind: Literal["slow_node"]
    node: str


class XidFault(GpuTarget):
    """An XID error reported at start_s (and every repeat_s); then_silent: the GPU falls off the bus."""

    kind: Literal["xid"]
    code: int = Field(default=79, ge=1, le=1000)
    repeat_s: float | None = Field(default=None, gt=0)
    then_silent: bool = False

    @model_validator(mode="after")
    def _silent_gpus_report_nothing(self) -> XidFault:
        if self.then_silent and self.repeat_s is not None:
            raise ValueError("then_silent and repeat_s exclude each other: a GPU off the bus reports no more XIDs")
        return self


class SilentGpuFault(GpuTarget):
    """The GPU stops reporting: its samples vanish from its node's messages (it keeps computing)."""

    kind: Literal["silent_gpu"]


class IdleAllocatedFault(Timed):
    """Allocated GPUs doing nothing: all ranks of the job, or the listed ones (left out of its steps)."""

    kind: Literal["idle_allocated"]
    job: str
    ranks: list[int] | None = Field(default=None, min_length=1)


class JobStalledFault(Timed):
    """Every rank of the job idle together (input pipeline, checkpoint): no steps complete."""

    kind: Literal["job_stalled"]
    job: str


FAULT_MODELS = (StragglerFault, SlowNodeFault, XidFault, SilentGpuFault, IdleAllocatedFault, JobStalledFault)
Fault = Annotated[
    StragglerFault | SlowNodeFault | XidFault | SilentGpuFault | IdleAllocatedFault | JobStalledFault,
    Field(discriminator="kind"),
]


def fault_kinds() -> set[str]:
    """The kinds of the simulator's ground truth: each fault it injects, and a job spanning two GPU
    models (paced by the slower, collectors/simulate/faults.py)."""
    return {model.model_fields["kind"].annotation.__args__[0] for model in FAULT_MODELS} | {"mixed_generation"}


class Scenario(_Spec):
    name: str = Field(min_length=1, max_length=200)
    seed: int = Field(default=0, ge=0, description="numpy's generator takes no negative seed")
    duration_s: float = Field(gt=0, le=30 * 86_400)
    tick_s: float = Field(default=1.0, gt=0, le=3600)
    start: float | None = Field(default=None, description="unix seconds; default: when the run starts")
    cluster: str = Field(default="sim", min_length=1, max_length=128)
    dcgm_profiling: bool = Field(default=False, description="samples carry DCGM's SM_ACTIVE, TENSOR_ACTIVE and "
                                 "DRAM_ACTIVE (dcgm-exporter with profiling metrics), not NVML's counters alone")
    nodes: list[NodeGroup] = Field(min_length=1)
    jobs: list[JobSpec] = Field(default_factory=list)
    faults: list[Fault] = Field(default_factory=list)

    @field_validator("start")
    @classmethod
    def _plausible_start(cls, start: float | None) -> float | None:
        if start is not None and not plausible_ts(start):
            raise ValueError(f"{start!r} is outside {PLAUSIBLE_TS_RANGE}: consumers would reject every sample")
        return start

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        problems = _reference_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def group(self, prefix: str) -> NodeGroup:
        return next(g for g in self.nodes if g.prefix == prefix)

    def job(self, name: str) -> JobSpec:
        return next(j for j in self.jobs if j.name == name)

    def job_size(self, job: JobSpec) -> int:
        return sum(r.count * self.group(r.group).gpus for r in job.nodes)

    def node_gpus(self) -> dict[str, int]:
        """Every node name with its GPU count, in fleet order."""
        return {g.node_name(i): g.gpus for g in self.nodes for i in range(g.count)}


def _reference_problems(s: Scenario) -> list[str]:
    """Names and times that point nowhere: '<field path>: <what is wrong>'."""
    problems: list[str] = []
    prefixes = [g.prefix for g in s.nodes]
    if len(set(prefixes)) != len(prefixes):
        problems.append(f"nodes: prefixes must be unique, got {prefixes}")
    names = [j.name for j in s.jobs]
    if len(set(names)) != len(names):
        problems.append(f"jobs: names must be unique, got {names}")
    if problems:
        return problems
    nodes = s.node_gpus()
    owner: dict[str, tuple[int, float, float]] = {}
    for i, job in enumerate(s.jobs):
        end = job.end_s if job.end_s is not None else s.duration_s
        if job.end_s is not None and job.end_s <= job.start_s:
            problems.append(f"jobs.{i}.end_s: {job.end_s} must be after start_s {job.start_s}")
        elif job.start_s >= s.duration_s:
            problems.append(f"jobs.{i}.start_s: {job.start_s} is not before duration_s {s.duration_s}")
        for k, rng in enumerate(job.nodes):
            where = f"jobs.{i}.nodes.{k}"
            if rng.group not in prefixes:
                problems.append(f"{where}.group: no node group with prefix {rng.group!r} (groups: {prefixes})")
                continue
            group = s.group(rng.group)
            if rng.first + rng.count > group.count:
                problems.append(f"{where}: nodes {rng.first}..{rng.first + rng.count - 1} beyond the group's {group.count}")
                continue
            for n in range(rng.first, rng.first + rng.count):
                node = group.node_name(n)
                if node in owner and owner[node][1] < end and job.start_s < owner[node][2]:
                    problems.append(f"{where}: node {node} is already in jobs.{owner[node][0]} at the same time")
                    break
                owner[node] = (i, job.start_s, end)
    for i, fault in enumerate(s.faults):
        where = f"faults.{i}"
        if fault.start_s >= s.duration_s:
            problems.append(f"{where}.start_s: {fault.start_s} is not before duration_s {s.duration_s}")
        job_name = getattr(fault, "job", None)
        if job_name is not None:
            if job_name not in names:
                problems.append(f"{where}.job: unknown job {job_name!r} (jobs: {names})")
                continue
            size = s.job_size(s.job(job_name))
            ranks = [r for r in [getattr(fault, "rank", None), *(getattr(fault, "ranks", None) or [])] if r is not None]
            problems += [f"{where}.rank: {r} is not below the job's {size} ranks" for r in ranks if r >= size]
        node = getattr(fault, "node", None)
        if node is not None:
            if node not in nodes:
                problems.append(f"{where}.node: unknown node {node!r}")
            elif (gpu := getattr(fault, "gpu", None)) is not None and gpu >= nodes[node]:
                problems.append(f"{where}.gpu: {gpu} is not below the node's {nodes[node]} GPUs")
    return problems


class _Mapping(dict[Any, Any]):
    """A YAML mapping that remembers where it starts and the line of each key, for error messages."""

    line = 0
    key_lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings are `_Mapping`s."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> Iterator[_Mapping]:
    data = _Mapping()
    yield data  # PyYAML's two-step construction: lets a mapping contain itself through an alias
    data.update(loader.construct_mapping(node))  # also resolves merge keys into node.value
    data.line = node.start_mark.line + 1
    data.key_lines = {str(key.value): key.start_mark.line + 1 for key, _ in node.value}


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def line_of(raw: object, loc: tuple[int | str, ...]) -> int | None:
    """The line of the deepest key or list item of `loc` found in `raw` (parts that are no key, such as a
    union's tag, are passed over)."""
    line = None
    for part in loc:
        if isinstance(raw, _Mapping):
            if str(part) in raw.key_lines:
                line, raw = raw.key_lines[str(part)], raw.get(part)
        elif isinstance(raw, list) and isinstance(part, int) and 0 <= part < len(raw):
            raw = raw[part]
            line = raw.line if isinstance(raw, _Mapping) else line
        else:
            break
    return line


def _error_loc(err: ValidationError) -> tuple[int | str, ...]:
    """Where the first error is: its own loc, or the path that starts a cross-reference problem."""
    first = err.errors(include_url=False)[0]
    if first["loc"]:
        return tuple(first["loc"])
    path = first["msg"].removeprefix("Value error, ").split(":", 1)[0]
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; ScenarioError names the file, the line and the field."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ScenarioError(f"{path}: cannot read scenario: {err}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario is a YAML mapping, got {type(raw).__name__}")
    try:
        return Scenario.model_validate(raw)
    except ValidationError as err:
        line = line_of(raw, _error_loc(err))
        raise ScenarioError(f"{path}{f':{line}' if line else ''}: {explain(err)}") from None


def explain(err: ValidationError) -> str:
    """Field errors as 'field.path = value: message'; cross-reference errors carry their own paths."""
    whole = [e["msg"].removeprefix("Value error, ") for e in err.errors(include_url=False) if not e["loc"]]
    return "; ".join(whole) if whole else describe_validation_error(err)


def revalidated(scenario: Scenario, **changes: Any) -> Scenario:
    """The scenario with `changes`, validated again (model_copy(update=...) would skip every check)."""
    try:
        return Scenario.model_validate(scenario.model_dump() | changes)
    except ValidationError as err:
        raise ScenarioError(explain(err)) from None


def shortened(scenario: Scenario, duration_s: float) -> Scenario:
    """The scenario cut (or stretched) to `duration_s`: jobs and faults starting later are dropped."""
    jobs = [j for j in scenario.jobs if j.start_s < duration_s]
    kept = {j.name for j in jobs}
    faults = [f for f in scenario.faults if f.start_s < duration_s and getattr(f, "job", None) in kept | {None}]
    return revalidated(scenario, duration_s=duration_s, jobs=jobs, faults=faults)
