"""A small cluster run through the real windows and detectors, as the points the sink writes.

Three jobs on 5 nodes of 8 GPUs, 1 s ticks: `llm` (16 H200 ranks, rank 5 thermally throttled from
window 1, so a straggler fires), `mix` (8 H100 ranks pacing 8 H200 ranks: mixed generation) and
`notebook` (4 idle ranks: allocated but idle), plus 4 unallocated GPUs.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from influxdb_client import Point

from laggard.agents.detectors import FleetDetector
from laggard.agents.points import finding_point, fleet_point, window_line
from laggard.agents.sink import InfluxSink
from laggard.agents.stages import FleetKpi, merge_fleet
from laggard.agents.windows import ClosedWindow, Windower
from laggard.events import ClockReason, GpuSample, NodeSample
from laggard.results import Finding, WindowResult
from laggard.settings import Settings
from tests.helpers.samples import gpu

WINDOW_S = 10.0
STRAGGLER_RANK = 5


@dataclass
class SimulatedRun:
    gpu_results: list[WindowResult] = field(default_factory=list)
    node_results: list[WindowResult] = field(default_factory=list)
    fleet: list[FleetKpi] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    active: list[Finding] = field(default_factory=list)  # going on, window by window

    def points(self) -> list[Point | str]:
        return ([window_line(r) for r in self.gpu_results + self.node_results]
                + [fleet_point(k) for k in self.fleet] + [finding_point(f) for f in self.findings]
                + [finding_point(f, "finding_active") for f in self.active])


def _placement(node: int, index: int) -> tuple[str | None, int | None]:
    """(job, rank) of GPU `index` on node n`node`."""
    if node < 2:
        return "llm", node * 8 + index
    if node < 4:
        return "mix", (node - 2) * 8 + index
    return ("notebook", index) if index < 4 else (None, None)


def _gpu(node: int, index: int, window: int, rng: random.Random) -> GpuSample:
    job, rank = _placement(node, index)
    base = dict(uuid=f"GPU-n{node}-{index}", job=job, rank=rank)
    noise = rng.uniform(-3.0, 3.0)
    if job == "llm" and rank == STRAGGLER_RANK and window >= 1:
        return gpu(index, **base, util_gpu=88.0 + noise, sm_clock_mhz=1300.0, temp_c=83.0,
                   clocks_event_reasons=int(ClockReason.SW_THERMAL))
    if job == "llm":
        return gpu(index, **base, util_gpu=(63.0 if window >= 1 else 80.0) + noise)
    if job == "mix":
        slow = rank < 8
        return gpu(index, **base, model="H100" if slow else "H200", util_gpu=(90.0 if slow else 64.0) + noise)
    return gpu(index, **base, util_gpu=0.0, power_w=125.0)  # notebook ranks and free GPUs


def simulate(cluster: str, t0: float, windows: int = 6, seed: int = 7) -> SimulatedRun:
    """`windows` windows from `t0` (a multiple of WINDOW_S) of cluster `cluster`, judged like the worker does."""
    rng = random.Random(seed)
    windower, detector, run = Windower(WINDOW_S, grace_s=1.0), FleetDetector(), SimulatedRun()

    def judge(closed: ClosedWindow) -> None:
        gpu_results = closed.gpu_results()
        rollups = closed.rollup_results()
        run.gpu_results += gpu_results
        run.node_results += [r for r in rollups if r.scope == "node"]
        run.fleet += [merge_fleet([r]) for r in rollups if r.scope == "cluster"]
        run.findings += detector.observe(closed.window_start, closed.window_s, gpu_results)
        run.active += detector.active()

    for tick in range(int(windows * WINDOW_S)):
        for node in range(5):
            gpus = [_gpu(node, i, int(tick // WINDOW_S), rng) for i in range(8)]
            windower.add(NodeSample(ts=t0 + tick, cluster=cluster, node=f"n{node}", source="test", gpus=gpus))
        for closed in windower.pop_closed():
            judge(closed)
    for closed in windower.flush():
        judge(closed)
    return run


def write_recent_run(settings: Settings, cluster: str, windows_ago: int = 20) -> tuple[SimulatedRun, float]:
    """`simulate` a run that started `windows_ago` windows before now and write it with the real sink;
    returns the run and its start."""
    t0 = (time.time() // WINDOW_S - windows_ago) * WINDOW_S
    run = simulate(cluster, t0)
    sink = InfluxSink(settings, give_up_after_s=30)
    try:
        sink.write(run.points(), "ms")
    finally:
        sink.close()
    return run, t0
