"""Injected faults: what each does to the GPUs in a tick, and the ground truth it leaves behind."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from laggard.collectors.simulate.layout import FleetLayout
from laggard.collectors.simulate.physics import MODELS
from laggard.collectors.simulate.scenario import (
    Fault,
    GpuTarget,
    IdleAllocatedFault,
    JobStalledFault,
    Scenario,
    SilentGpuFault,
    SlowNodeFault,
    StragglerFault,
    XidFault,
)
from laggard.events import ClockReason, FaultTruth

# Unless a fault says how slow: compute takes this much longer (published fail-slows average ~1.34x).
DEFAULT_SLOWDOWN = 1.35
# A power-capped straggler's limit, as a share of its model's, unless given.
DEFAULT_POWER_LIMIT_SHARE = 0.7
# A thermally throttled GPU runs this much hotter than its power explains (~85 C on an H200).
THERMAL_EXTRA_C = 28.0
# Straggler causes that leave the clock alone: the rank's own work or its host is slow.
NOT_THROTTLES = ("slow_compute", "host")

_REASON = {
    "thermal": ClockReason.SW_THERMAL,
    "power": ClockReason.SW_POWER_CAP,
    "hw_slowdown": ClockReason.HW_SLOWDOWN,
}


@dataclass
class TickEffects:
    """What the active faults do to every GPU (and job) during one tick."""

    clock_cap_mhz: np.ndarray
    reasons: np.ndarray
    extra_temp_c: np.ndarray
    power_limit_w: np.ndarray
    silent: np.ndarray
    xid: np.ndarray
    idle: np.ndarray
    stalled_jobs: np.ndarray
    compute_factor: np.ndarray  # each step's compute takes this much longer at the same clock
    host_factor: np.ndarray  # the GPU idles this share of its compute time each step, waiting on its host


@dataclass(frozen=True)
class _Window:
    first_tick: int
    end_tick: int  # exclusive

    def covers(self, k: int) -> bool:
        return self.first_tick <= k < self.end_tick


@dataclass(frozen=True)
class CompiledFault:
    fault: Fault
    window: _Window
    gpus: np.ndarray  # the GPUs it touches (empty for job-level faults)
    clock_mhz: np.ndarray | None = None  # per touched GPU, for throttles
    xid_ticks: frozenset[int] = field(default_factory=frozenset)


class FaultSchedule:
    """The scenario's faults resolved to GPU indices and tick windows."""

    def __init__(self, scenario: Scenario, layout: FleetLayout) -> None:
        self.scenario = scenario
        self.layout = layout
        self.tick_s = scenario.tick_s
        self.ticks = tick_count(scenario)
        self.job_index = {j.name: i for i, j in enumerate(scenario.jobs)}
        self._base_limit = layout.spec_array("power_limit_w")
        self.compiled = [self._compile(f) for f in scenario.faults]

    def _tick_at(self, t_s: float) -> int:
        return min(self.ticks, math.ceil(t_s / self.tick_s - 1e-9))

    def _window(self, start_s: float, end_s: float | None) -> _Window:
        return _Window(self._tick_at(start_s), self._tick_at(self.scenario.duration_s if end_s is None else end_s))

    def _target_gpu(self, fault: GpuTarget) -> int:
        if fault.node is not None and fault.gpu is not None:
            return self.layout.gpu_of(fault.node, fault.gpu)
        assert fault.job is not None and fault.rank is not None  # checked by the scenario model
        return int(self.layout.job_gpus[self.job_index[fault.job]][fault.rank])

    def _throttle_clock(self, fault: StragglerFault | SlowNodeFault, gpus: np.ndarray) -> np.ndarray:
        """The SM clock a throttle leaves: given, from a slowdown, or (power cause) from the lowered limit."""
        loaded = self.layout.spec_array("loaded_sm_clock_mhz")[gpus]
        if fault.clock_mhz is not None:
            return np.minimum(loaded, fault.clock_mhz)
        if fault.slowdown is None and isinstance(fault, StragglerFault) and fault.cause == "power":
            # The clock falls to the share of the loaded power range that the lowered limit leaves.
            idle = self.layout.spec_array("idle_w")[gpus]
            full = self.layout.spec_array("loaded_w")[gpus]
            share = (self._power_limit(fault, gpus) - idle) / (full - idle)
            return loaded * np.clip(share, 0.3, 1.0)
        return loaded / (fault.slowdown or DEFAULT_SLOWDOWN)

    def _power_limit(self, fault: StragglerFault, gpus: np.ndarray) -> np.ndarray:
        if fault.power_limit_w is not None:
            return np.full(len(gpus), fault.power_limit_w)
        return self._base_limit[gpus] * DEFAULT_POWER_LIMIT_SHARE

    def _compile(self, fault: Fault) -> CompiledFault:
        window = self._window(fault.start_s, fault.end_s)
        if isinstance(fault, StragglerFault):
            gpus = np.array([self._target_gpu(fault)])
            if fault.cause in NOT_THROTTLES:
                return CompiledFault(fault, window, gpus)
            return CompiledFault(fault, window, gpus, self._throttle_clock(fault, gpus))
        if isinstance(fault, SlowNodeFault):
            n = self.layout.nodes.index(fault.node)
            gpus = np.arange(self.layout.node_first_gpu[n], self.layout.node_first_gpu[n + 1])
            return CompiledFault(fault, window, gpus, self._throttle_clock(fault, gpus))
        if isinstance(fault, XidFault):
            end_s = self.scenario.duration_s if fault.end_s is None else fault.end_s
            times = [fault.start_s]
            while fault.repeat_s is not None and times[-1] + fault.repeat_s < end_s:
                times.append(times[-1] + fault.repeat_s)
            ticks = frozenset(self._tick_at(t) for t in times)
            return CompiledFault(fault, window, np.array([self._target_gpu(fault)]), xid_ticks=ticks)
        if isinstance(fault, SilentGpuFault):
            return CompiledFault(fault, window, np.array([self._target_gpu(fault)]))
        if isinstance(fault, IdleAllocatedFault):
            gpus = self.layout.job_gpus[self.job_index[fault.job]]
            return CompiledFault(fault, window, gpus if fault.ranks is None else gpus[fault.ranks])
        return CompiledFault(fault, window, np.array([], dtype=int))

    def effects(self, k: int) -> TickEffects:
        g = self.layout.gpu_count
        fx = TickEffects(
            clock_cap_mhz=np.full(g, np.inf),
            reasons=np.zeros(g, dtype=np.int64),
            extra_temp_c=np.zeros(g),
            power_limit_w=self._base_limit.copy(),
            silent=np.zeros(g, dtype=bool),
            xid=np.zeros(g, dtype=np.int64),
            idle=np.zeros(g, dtype=bool),
            stalled_jobs=np.zeros(len(self.layout.job_gpus), dtype=bool),
            compute_factor=np.ones(g),
            host_factor=np.zeros(g),
        )
        for c in self.compiled:
            if not c.window.covers(k):
                continue
            f = c.fault
            if isinstance(f, StragglerFault) and f.cause in NOT_THROTTLES:
                slowdown = f.slowdown or DEFAULT_SLOWDOWN
                if f.cause == "slow_compute":
                    fx.compute_factor[c.gpus] *= slowdown
                else:
                    fx.host_factor[c.gpus] += slowdown - 1.0
            elif isinstance(f, (StragglerFault, SlowNodeFault)):
                assert c.clock_mhz is not None
                fx.clock_cap_mhz[c.gpus] = np.minimum(fx.clock_cap_mhz[c.gpus], c.clock_mhz)
                cause = f.cause if isinstance(f, StragglerFault) else "hw_slowdown"
                fx.reasons[c.gpus] |= int(_REASON[cause])
                if cause == "thermal":
                    fx.extra_temp_c[c.gpus] += THERMAL_EXTRA_C
                if isinstance(f, StragglerFault) and cause == "power":
                    fx.power_limit_w[c.gpus] = self._power_limit(f, c.gpus)
            elif isinstance(f, XidFault):
                if k in c.xid_ticks:
                    fx.xid[c.gpus] = f.code
                elif f.then_silent:
                    fx.silent[c.gpus] = True
            elif isinstance(f, SilentGpuFault):
                fx.silent[c.gpus] = True
            elif isinstance(f, IdleAllocatedFault):
                fx.idle[c.gpus] = True
            elif isinstance(f, JobStalledFault):
                fx.stalled_jobs[self.job_index[f.job]] = True
        return fx

    def truth(self, start_ts: float) -> list[FaultTruth]:
        """Every injected fault, plus each mixed-generation job, in absolute unix time."""
        events: list[FaultTruth] = []
        duration = self.scenario.duration_s

        def add(kind: str, start_s: float, end_s: float | None, gpu: int | None = None, **rest: object) -> None:
            if gpu is not None:
                job, rank = self.layout.allocation(start_s)
                if job[gpu] >= 0:
                    rest.setdefault("job", self.scenario.jobs[job[gpu]].name)
                    rest.setdefault("rank", int(rank[gpu]))
                rest["node"] = self.layout.nodes[self.layout.gpu_node[gpu]]
                rest["gpu"] = int(self.layout.gpu_index[gpu])
            end = min(duration, duration if end_s is None else end_s)
            events.append(
                FaultTruth.model_validate(
                    {
                        "scenario": self.scenario.name,
                        "cluster": self.scenario.cluster,
                        "kind": kind,
                        "start": start_ts + start_s,
                        "end": start_ts + end,
                        **rest,
                    }
                )
            )

        for c in self.compiled:
            f = c.fault
            if isinstance(f, StragglerFault):
                owner = self.scenario.jobs[self.job_index[f.job]] if f.job is not None else None
                detail: dict[str, float | str] = {"cause": f.cause}
                if owner is not None:
                    detail["wait"] = owner.collective_wait
                if c.clock_mhz is None:
                    detail["slowdown"] = f.slowdown or DEFAULT_SLOWDOWN
                else:
                    detail["clock_mhz"] = round(float(c.clock_mhz[0]), 1)
                add("straggler", f.start_s, f.end_s, int(c.gpus[0]), detail=detail)
            elif isinstance(f, SlowNodeFault):
                assert c.clock_mhz is not None
                job, _ = self.layout.allocation(f.start_s)
                held = job[c.gpus[0]]
                rest = {"job": self.scenario.jobs[held].name} if held >= 0 else {}
                add("slow_node", f.start_s, f.end_s, node=f.node, detail={"clock_mhz": round(float(c.clock_mhz[0]), 1)}, **rest)
            elif isinstance(f, XidFault):
                add("xid", f.start_s, f.end_s, int(c.gpus[0]), detail={"code": f.code})
                if f.then_silent:
                    add("silent_gpu", f.start_s + self.tick_s, f.end_s, int(c.gpus[0]), detail={"after_xid": f.code})
            elif isinstance(f, SilentGpuFault):
                add("silent_gpu", f.start_s, f.end_s, int(c.gpus[0]))
            elif isinstance(f, IdleAllocatedFault) and f.ranks is not None:
                for gpu in c.gpus:
                    add("idle_allocated", f.start_s, f.end_s, int(gpu))
            elif isinstance(f, (IdleAllocatedFault, JobStalledFault)):
                add(f.kind, f.start_s, f.end_s, job=f.job)
        for j, gpus in enumerate(self.layout.job_gpus):
            models = sorted({self.layout.gpu_model[g] for g in gpus}, key=lambda m: MODELS[m].throughput)
            if len(models) > 1:
                slow, fast = MODELS[models[0]], MODELS[models[-1]]
                waste = round(1 - slow.throughput / fast.throughput, 3)
                detail = {"slow_model": slow.name, "fast_model": fast.name, "expected_waste": waste}
                job = self.scenario.jobs[j]
                add("mixed_generation", job.start_s, float(self.layout.job_end_s[j]), job=job.name, detail=detail)
        return sorted(events, key=lambda e: (e.start, e.kind, e.job or "", e.rank or 0))


def tick_count(scenario: Scenario) -> int:
    return max(1, math.ceil(scenario.duration_s / scenario.tick_s - 1e-9))
