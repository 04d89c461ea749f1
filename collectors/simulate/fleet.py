"""The fleet simulator: every GPU of every node, one numpy pass per tick.

Jobs run synchronous data-parallel steps. Each rank computes for
`step_s * (1 - comm_share) / throughput(model) * (normal clock / its clock)` (longer for a
slow_compute straggler), idles while its host is late (a host straggler), waits for the slowest
rank and then runs the collective (`step_s * comm_share`). NVML utilization per sample is the
share of the sample interval a kernel ran, so where the wait happens decides what it shows
(`collective_wait` of the job):
- `kernel` (NCCL, the usual case): the waiting rank spins inside the collective kernel on a few
  SMs: util reads ~100%, power sits SPIN_W above idle, the clock boosts as when idle.
- `host`: the wait is idle: util drops by the wait share.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from laggard.collectors.base import Source, Tick
from laggard.collectors.simulate.batch_encode import BatchEncoder
from laggard.collectors.simulate.encode import SOURCE, NodeEncoder
from laggard.collectors.simulate.faults import FaultSchedule, TickEffects, tick_count
from laggard.collectors.simulate.frame import Frame
from laggard.collectors.simulate.layout import FleetLayout, build_layout
from laggard.collectors.simulate.physics import (
    CAP_INTENSITY,
    POWER_EXPONENT,
    SM_ACTIVE_COLLECTIVE,
    SM_ACTIVE_COMPUTE,
    TENSOR_ACTIVE_COMPUTE,
    PowerCurve,
    busy_integral,
    power_cap_reason,
    sm_clock_mhz,
    temperature_step,
)
from laggard.collectors.simulate.scenario import Scenario
from laggard.events import FaultTruth, GpuSample, NodeSample

IDLE_MEM_MIB = 615.0  # driver context on an idle H200 (fixture)
# A rank spinning in a collective kernel draws this much above idle: an H100 blocked in allgather
# read 152 W against 129-137 W idle (NVIDIA/nccl#1550).
SPIN_W = 20.0


class FleetSimulator(Source):
    """Deterministic for a scenario, seed and start time: the same bytes every run."""

    name = SOURCE

    def __init__(self, scenario: Scenario, start_ts: float | None = None) -> None:
        super().__init__()
        self.scenario = scenario
        start = start_ts if start_ts is not None else scenario.start
        self.start_ts = round(time.time() if start is None else start, 3)
        self.layout: FleetLayout = build_layout(scenario)
        self.schedule = FaultSchedule(scenario, self.layout)
        self.tick_count = tick_count(scenario)
        self.encoder = NodeEncoder(scenario, self.layout)
        self._mem_clock_mhz = self.layout.spec_array("mem_clock_mhz")
        self._mem_total_mib = self.layout.spec_array("mem_total_mib")

    @property
    def gpu_count(self) -> int:
        return self.layout.gpu_count

    def truth(self) -> list[FaultTruth]:
        return self.schedule.truth(self.start_ts)

    def frames(self) -> Iterator[Frame]:
        """Every tick's values, vectorised over all GPUs; ticks() and encoded_ticks() format these."""
        return _FramePhysics(self).run()

    def ticks(self) -> Iterator[Tick]:
        for f in self.frames():
            yield [s for n in range(len(self.layout.nodes)) if (s := self._node_sample(f, n)) is not None]

    def encoded_ticks(self) -> Iterator[tuple[float, list[tuple[bytes, bytes]]]]:
        """(tick ts, [(node key, NodeSample JSON)]) without building pydantic models: the fast path."""
        for f in self.frames():
            yield f.ts, self.encoder.encode(f)

    def encoded(self, flush_s: float) -> Iterator[tuple[float, list[tuple[bytes, bytes]]]]:
        """`encoded_batches(flush_s)`, or `encoded_ticks()` (version 1) for a flush interval of 0."""
        return self.encoded_batches(flush_s) if flush_s > 0 else self.encoded_ticks()

    def encoded_batches(self, flush_s: float) -> Iterator[tuple[float, list[tuple[bytes, bytes]]]]:
        """(tick ts, [(node key, NodeBatch JSON)]): the batches each tick completes (schema 2, one
        message per node per flush interval), the last tick with what is still held."""
        encoder = BatchEncoder(self.scenario, self.layout, flush_s)
        last: tuple[float, list[tuple[bytes, bytes]]] | None = None
        for f in self.frames():
            if last is not None:
                yield last
            last = (f.ts, encoder.add(f))
        if last is not None:
            yield last[0], last[1] + encoder.flush()

    def _node_sample(self, f: Frame, n: int) -> NodeSample | None:
        lay, jobs = self.layout, self.scenario.jobs
        gpus = [
            GpuSample(
                index=int(lay.gpu_index[g]),
                uuid=lay.gpu_uuid[g],
                model=lay.gpu_model[g],
                job=jobs[f.job[g]].name if f.job[g] >= 0 else None,
                rank=int(f.rank[g]) if f.job[g] >= 0 else None,
                util_gpu=float(f.util_gpu[g]),
                util_mem=float(f.util_mem[g]),
                power_w=float(f.power_w[g]),
                power_limit_w=float(f.power_limit_w[g]),
                sm_clock_mhz=float(f.sm_clock_mhz[g]),
                mem_clock_mhz=float(self._mem_clock_mhz[g]),
                temp_c=float(f.temp_c[g]),
                mem_used_mib=float(f.mem_used_mib[g]),
                mem_total_mib=float(self._mem_total_mib[g]),
                clocks_event_reasons=int(f.reasons[g]),
                energy_j=float(f.energy_j[g]),
                xid=int(f.xid[g]) or None,
                **({"sm_active": round(float(f.sm_active[g]), 3), "tensor_active": round(float(f.tensor_active[g]), 3),
                    "dram_active": round(float(f.dram_active[g]), 3)} if self.scenario.dcgm_profiling else {}),
            )
            for g in range(lay.node_first_gpu[n], lay.node_first_gpu[n + 1])
            if f.present[g]
        ]
        if not gpus:
            return None
        return NodeSample(ts=f.ts, cluster=self.scenario.cluster, node=lay.nodes[n], source=SOURCE, gpus=gpus)


class _FramePhysics:
    """The state carried from tick to tick (job phases, temperatures, energy) and one tick's physics."""

    def __init__(self, sim: FleetSimulator) -> None:
        self.sim = sim
        s, lay = sim.scenario, sim.layout
        self.rng = np.random.default_rng(s.seed)
        spec = lay.spec_array
        self.curve = PowerCurve(spec("idle_w"), spec("loaded_w"), POWER_EXPONENT)
        self.max_clock, self.loaded_clock = spec("max_sm_clock_mhz"), spec("loaded_sm_clock_mhz")
        self.throughput, self.mem_total = spec("throughput"), spec("mem_total_mib")
        self.idle_temp, self.temp_per_w = spec("idle_temp_c"), spec("temp_c_per_w")
        jobs = s.jobs
        self.compute_s = np.array([j.step_s * (1 - j.comm_share) for j in jobs] + [0.0])  # index -1: no job
        self.comm_s = np.array([j.step_s * j.comm_share for j in jobs] + [0.0])
        self.intensity = np.array([j.intensity for j in jobs] + [0.0])
        self.mem_util = np.array([j.mem_util_pct for j in jobs] + [0.0])
        self.mem_share = np.array([j.mem_share for j in jobs] + [0.0])
        self.spins = np.array([j.collective_wait == "kernel" for j in jobs] + [False])
        self.job_size = np.array([len(g) for g in sim.layout.job_gpus] + [1])
        self.stages = np.array([j.pipeline_stages for j in jobs] + [1])
        self.stage_extra = np.array([j.pipeline_imbalance for j in jobs] + [0.0])
        self.rank_jitter = np.array([j.rank_jitter for j in jobs] + [0.0])
        self.step_jitter = np.array([j.step_jitter for j in jobs] + [0.0])
        self.phase = self.rng.random(len(jobs))  # jobs do not step in lockstep with each other
        self.temp: np.ndarray | None = None  # set to the first tick's steady state
        self.energy = self.rng.uniform(1e6, 1e8, lay.gpu_count)  # counters since the driver loaded

    def run(self) -> Iterator[Frame]:
        s = self.sim.scenario
        for k in range(self.sim.tick_count):
            t_s = k * s.tick_s
            job, rank = self.sim.layout.allocation(t_s)
            yield self.tick(self.sim.start_ts + round(t_s, 6), job, rank, self.sim.schedule.effects(k))

    def by_design(self, job: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Each rank's compute relative to its job's healthy step, by the job's shape: its first and last
        pipeline stages do more, MoE-like ranks spread and the whole job jitters from tick to tick."""
        stages = self.stages[job]
        stage = rank * stages // self.job_size[job]
        edge = (stages > 1) & ((stage == 0) | (stage == stages - 1))
        factor = 1.0 + np.where(edge, self.stage_extra[job], 0.0)
        if self.rank_jitter.any() or self.step_jitter.any():
            per_rank = self.rng.standard_normal(len(job)) * self.rank_jitter[job]
            per_job = np.append(self.rng.standard_normal(len(self.step_jitter) - 1), 0.0) * self.step_jitter
            factor = factor * np.clip(1.0 + per_rank + per_job[job], 0.5, 2.0)
        return factor

    def step_times(self, job: np.ndarray, fx: TickEffects, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(per-job step time, inf where no step progresses; which GPUs take part): the slowest rank paces."""
        stalled = np.append(fx.stalled_jobs, False)[job]
        taking_part = (job >= 0) & ~fx.idle & ~stalled
        step = np.full(len(self.phase), -np.inf)
        np.maximum.at(step, job[taking_part], (compute + self.comm_s[job])[taking_part])
        return np.where(np.isfinite(step), step, np.inf), taking_part

    def tick(self, ts: float, job: np.ndarray, rank: np.ndarray, fx: TickEffects) -> Frame:
        tick_s = self.sim.scenario.tick_s
        noise = self.rng.standard_normal((4, len(job)))
        clock_ratio = np.minimum(1.0, fx.clock_cap_mhz / self.loaded_clock)
        healthy = self.compute_s[job] / self.throughput * self.by_design(job, rank)
        compute = healthy / clock_ratio * fx.compute_factor
        host = healthy * fx.host_factor
        step, taking_part = self.step_times(job, fx, compute + host)

        # Job phase counts steps; each rank's busy share is its busy time over this tick's phase span.
        p0, p1 = self.phase, self.phase + tick_s / step
        rank_step = np.append(step, np.inf)[job]
        gp0, gp1 = np.append(p0, 0.0)[job], np.append(p1, 0.0)[job]
        a, b = compute / rank_step, self.comm_s[job] / rank_step
        busy_steps = busy_integral(gp1, a, b) - busy_integral(gp0, a, b)
        busy = np.where(taking_part, np.clip(busy_steps / np.maximum(gp1 - gp0, 1e-12), 0.0, 1.0), 0.0)
        computing = np.where(taking_part, np.clip(
            (busy_integral(gp1, a, np.zeros_like(b)) - busy_integral(gp0, a, np.zeros_like(b)))
            / np.maximum(gp1 - gp0, 1e-12), 0.0, busy), 0.0)
        # The rest of the step is waiting for the slowest rank (spinning where the job's waits do)
        # or, for a rank whose host is late, idle.
        between = np.maximum(1.0 - a - b, 1e-12)
        waiting = np.clip(1.0 - a - b - host / rank_step, 0.0, None) / between
        spin = np.where(taking_part & self.spins[job], (1.0 - busy) * np.minimum(waiting, 1.0), 0.0)
        steps_done = np.floor(p1) - np.floor(p0)
        self.phase = p1 - np.floor(p1)
        running = np.zeros(len(step), dtype=bool)
        running[job[job >= 0]] = True

        intensity = np.where(taking_part, self.intensity[job], 0.0)
        capped = intensity >= CAP_INTENSITY
        normal_clock = sm_clock_mhz(self.max_clock, self.loaded_clock, busy, capped)
        clock = np.minimum(normal_clock, fx.clock_cap_mhz)
        power = self.curve.power_w(busy, intensity * clock / normal_clock) + SPIN_W * spin
        power = np.clip(power + noise[0] * (3.0 + 0.015 * power), 0.0, fx.power_limit_w)
        target = self.idle_temp + self.temp_per_w * (power - self.curve.idle_w) + fx.extra_temp_c
        self.temp = target if self.temp is None else temperature_step(self.temp, target, tick_s)
        self.energy = self.energy + power * tick_s
        working = busy + spin > 0
        holds_memory = (job >= 0) & ~fx.idle

        return Frame(
            ts=ts,
            job=job,
            rank=rank,
            present=~fx.silent,
            util_gpu=np.rint(np.clip(100 * (busy + spin) + working * noise[1], 0, 100)).astype(np.int64),
            util_mem=np.rint(np.clip(self.mem_util[job] * busy + working * noise[2] * 0.5, 0, 100)).astype(np.int64),
            power_w=np.rint(power).astype(np.int64),
            power_limit_w=np.rint(fx.power_limit_w).astype(np.int64),
            sm_clock_mhz=np.rint(clock + working * noise[3] * 6.0).astype(np.int64),
            temp_c=np.rint(self.temp).astype(np.int64),
            mem_used_mib=np.rint(np.where(holds_memory, self.mem_share[job] * self.mem_total, IDLE_MEM_MIB)).astype(
                np.int64
            ),
            reasons=power_cap_reason(busy, capped) | fx.reasons,
            energy_j=np.rint(self.energy).astype(np.int64),
            xid=fx.xid,
            busy=busy,
            sm_active=SM_ACTIVE_COMPUTE * computing + SM_ACTIVE_COLLECTIVE * (busy - computing + spin),
            tensor_active=TENSOR_ACTIVE_COMPUTE * computing * intensity,
            dram_active=computing * self.mem_util[job] / 100.0,
            job_step_s=np.where(running, step, np.nan),
            job_steps=steps_done,
        )
