"""What a detector sees and the detectors' memory: one closed window (`WindowView`), one job's
ranks in it (`JobView`), the state `FleetDetector` keeps between windows (`DetectorState`), what a
registered detector is (`Detector`), and the helpers every detector builds findings with."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from laggard.agents.finding_lifecycle import LifecycleState
from laggard.agents.straggler import StragglerConfig
from laggard.agents.windows import IDLE_UTIL_PCT
from laggard.results import Finding, WindowResult, group_key

# (labels, evidence, cost) of one shape a finding of a kind comes in: what rule templates are
# rendered on at check time. A None value where the detector may send None.
Shape = tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]


@dataclass(frozen=True)
class DetectorConfig:
    idle_util_pct: float = IDLE_UTIL_PCT  # window-mean util at or below which an allocated GPU is idle
    busy_job_util_pct: float = 20.0  # median util at which a job counts as having been busy
    forget_after_windows: int = 360  # drop bookkeeping for GPUs/jobs unseen this long (not firing)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)


class SeenGpu(BaseModel):
    last_window: float
    cluster: str
    node: str
    gpu: int
    model: str
    job: str | None = None
    rank: int | None = None
    # Windows between its samples, learned (a collector scraping every 30 s into 10 s windows
    # fills one window in three): it is silent only once it misses more than that.
    every: int = 1
    learned: bool = False

    @property
    def group(self) -> str:
        """What its results are keyed by in stage 2 (agents.stages.detect_key): its job, else its node."""
        return group_key(self.cluster, self.job, self.node)


class RankShape(BaseModel):
    """How a rank usually differs from its peers (pipeline stage, the rank holding the loss): its
    work share and util minus its group's medians, smoothed over windows it was not flagged in."""

    work: float = 0.0
    util: float = 0.0
    last_window: float = 0.0


class DetectorState(BaseModel):
    lifecycles: dict[str, LifecycleState] = Field(default_factory=dict)  # per detector kind
    seen_gpus: dict[str, SeenGpu] = Field(default_factory=dict)  # cluster|node|gpu -> last sighting
    job_busy: dict[str, float] = Field(default_factory=dict)  # cluster|job -> last window it was busy
    job_windows: dict[str, int] = Field(default_factory=dict)  # cluster|job -> windows seen
    # cluster|job|rank -> its usual difference from its peers; only ranks that differ are kept
    rank_shapes: dict[str, RankShape] = Field(default_factory=dict)
    # cluster|job -> GPU model -> its busy ranks' usual SM clock, MHz, learned while it is not slow
    job_clocks: dict[str, dict[str, float]] = Field(default_factory=dict)


@dataclass(frozen=True)
class WindowView:
    """What a detector sees of one closed window: its GPU results, the detectors' memory of earlier
    windows (updated with this one) and whether a finding is firing now."""

    start: float
    length_s: float
    results: Sequence[WindowResult]
    config: DetectorConfig
    memory: DetectorState
    is_firing: Callable[[str, str], bool]  # (kind, fingerprint)
    # cluster|job -> its ranks' results in the windows just before this one, oldest first (SPAN_WINDOWS - 1
    # at most; kept in memory only: after a restart a span fills again)
    earlier: Mapping[str, Sequence[Sequence[WindowResult]]] = field(default_factory=dict)

    @property
    def end(self) -> float:
        return self.start + self.length_s


@dataclass(frozen=True)
class JobView:
    """One job's GPU results (its ranks) in a window."""

    cluster: str
    job: str
    ranks: Sequence[WindowResult]
    window: WindowView

    @property
    def idle(self) -> list[WindowResult]:
        return [r for r in self.ranks if r.util_mean <= self.window.config.idle_util_pct]

    @property
    def busy_before(self) -> float | None:
        """The start of the last window the job was busy in (this one included), if any."""
        return self.window.memory.job_busy.get(f"{self.cluster}|{self.job}")

    @property
    def windows_seen(self) -> int:
        """Windows of this job seen so far, this one included."""
        return self.window.memory.job_windows.get(f"{self.cluster}|{self.job}", 0)

    def shape(self, rank: int | None) -> RankShape:
        return self.window.memory.rank_shapes.get(f"{self.cluster}|{self.job}|{rank}") or RankShape()

    @property
    def span(self) -> list[Sequence[WindowResult]]:
        """Its ranks' results in the last SPAN_WINDOWS windows, this one last; fewer after its start."""
        return [*self.window.earlier.get(f"{self.cluster}|{self.job}", ()), self.ranks]

    def usual_clocks(self) -> dict[str, float]:
        """Its busy ranks' usual SM clock per GPU model, where learned."""
        return self.window.memory.job_clocks.get(f"{self.cluster}|{self.job}", {})


@dataclass(frozen=True)
class Detector:
    kind: str
    find: Callable[[Any], Iterable[Finding]]  # a JobView (per="job") or a WindowView (per="window") -> firing findings
    per: Literal["job", "window"]
    samples: tuple[Shape, ...]
    fire_after: int = 2  # consecutive windows before a finding fires (so latency <= 2 windows)
    clear_after: int = 2  # consecutive clean windows before it resolves
    fire_after_s: float = 0.0  # ... and seconds of the condition in them (findings' evidence fault_share)
    family: str = ""  # what `laggard eval` scores it as (default: its kind)
    truths: tuple[str, ...] = ()  # the simulator's truth kinds it should find (default: its kind)

    @property
    def eval_family(self) -> str:
        return self.family or self.kind

    @property
    def truth_kinds(self) -> tuple[str, ...]:
        return self.truths or (self.kind,)


def gpu_finding(kind: str, r: WindowResult, summary: str, **extra: object) -> Finding:
    """A firing finding about GPU result `r`'s GPU (job, rank, node, gpu, model from its labels)."""
    lb = r.labels
    return Finding(
        kind=kind,
        state="firing",
        cluster=lb.cluster,
        job=lb.job,
        rank=lb.rank,
        node=lb.node,
        gpu=lb.gpu,
        model=lb.model,
        window_start=r.window_start,
        window_end=r.window_end,
        summary=summary,
        **extra,
    )


def utc_clock(ts: float, ref: float) -> str:
    """A time for a summary: '12:03:10 UTC' on the UTC day of `ref` (the window's end), else with
    its date. Summaries are read by people (chat, dashboards): never a raw epoch."""
    when = datetime.fromtimestamp(ts, tz=timezone.utc)
    same_day = when.date() == datetime.fromtimestamp(ref, tz=timezone.utc).date()
    return when.strftime("%H:%M:%S UTC" if same_day else "%Y-%m-%d %H:%M:%S UTC")
