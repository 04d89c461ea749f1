"""Collector sources: scheduler, replay of the real H200 trace, dcgm-exporter over real HTTP,
NVML without a driver, job/rank attribution, and the CLI loop that drives them."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from laggard.collectors.attribution import (
    Assignment,
    Attribution,
    AttributionError,
    MappingFile,
    SlurmDir,
    k8s_assignments,
    pod_owner,
)
from laggard.collectors.base import FixedRateScheduler, Rejects, build_node_sample, short_model
from laggard.collectors.cli import collect_app
from laggard.collectors.dcgm import DcgmSource, parse_exporter_text
from laggard.collectors.replay import ReplaySource
from laggard.events import NodeSample, decode_node_sample
from tests.helpers.fixtures import NVML_TRACE as FIXTURES
from tests.helpers.samples import printed_batches, printed_samples

TRACE = FIXTURES / "trace.jsonl"
REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


class FakeClock:
    """Monotonic time that only moves when waited on (plus `overshoot` per wait) or worked on."""

    def __init__(self, overshoot: float = 0.0) -> None:
        self.now = 1000.0
        self.overshoot = overshoot
        self.stopped = False

    def monotonic(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += max(0.0, seconds) + (self.overshoot if seconds > 0 else 0.0)
        return self.stopped

    def work(self, seconds: float) -> None:
        self.now += seconds


# --- scheduler ------------------------------------------------------------------------------


def test_scheduler_is_drift_free_despite_work_and_late_wakeups() -> None:
    clock = FakeClock(overshoot=0.01)  # every sleep wakes 10 ms late
    times = []
    for k in FixedRateScheduler(1.0, clock):
        times.append(clock.now - 1000.0)
        clock.work(0.3)  # each tick's reading takes 300 ms
        if k == 99:
            break
    # Deadlines are start + k: lateness stays one overshoot, never 100 x (0.3 + 0.01).
    assert times[0] == 0.0
    assert all(abs(t - k - 0.01) < 1e-9 for k, t in enumerate(times[1:], 1))


def test_scheduler_skips_and_counts_missed_ticks() -> None:
    clock = FakeClock()
    scheduler = FixedRateScheduler(1.0, clock)
    seen = []
    for k in scheduler:
        seen.append((k, clock.now - 1000.0))
        if k == 2:
            clock.work(2.5)  # overruns ticks 3 and most of 4
        if k >= 6:
            break
    assert seen == [(0, 0.0), (1, 1.0), (2, 2.0), (4, 4.5), (5, 5.0), (6, 6.0)]
    assert scheduler.missed == 1


def test_scheduler_stops_when_clock_says_stop() -> None:
    clock = FakeClock()
    ticks = []
    for k in FixedRateScheduler(0.5, clock):
        ticks.append(k)
        clock.stopped = k == 3
    assert ticks == [0, 1, 2, 3]


def test_scheduler_rejects_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        FixedRateScheduler(0.0, FakeClock())


# --- shared helpers -------------------------------------------------------------------------


def test_short_model_names() -> None:
    assert short_model("NVIDIA H100 80GB HBM3") == "H100"
    assert short_model("NVIDIA H200") == "H200"
    assert short_model("NVIDIA GB200") == "GB200"
    assert short_model("NVIDIA A100-SXM4-80GB") == "A100"
    assert short_model("NVIDIA RTX A6000") == "RTX A6000"


def test_build_node_sample_skips_bad_gpu_counts_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    rejects = Rejects("test")
    good = {"index": 0, "uuid": "GPU-a", "model": "H100", "util_gpu": 50, "util_mem": 1, "power_w": 300}
    good |= {"power_limit_w": 700, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "temp_c": 50}
    good |= {"mem_used_mib": 1, "mem_total_mib": 80_000}
    bad = good | {"index": 1, "power_w": -3.0}
    with caplog.at_level("WARNING", logger="laggard.collectors"):
        sample = build_node_sample(rejects, ts=time.time(), cluster="c", node="n7", gpus=[good, bad])
    assert sample is not None and [g.index for g in sample.gpus] == [0]
    assert rejects.by_category == {"power_w:greater_than_equal": 1}
    line = caplog.records[-1].getMessage()
    assert "test rejected node n7 gpu 1" in line and "power_w = -3.0" in line
    assert build_node_sample(rejects, ts=time.time(), cluster="c", node="n7", gpus=[bad]) is None
    assert rejects.total == 2


# --- replay ---------------------------------------------------------------------------------


def replay_all(**options: object) -> tuple[ReplaySource, list[NodeSample]]:
    source = ReplaySource(TRACE, cluster="lab", node="h200-box", speed=0, **options)  # type: ignore[arg-type]
    return source, [sample for tick in source.ticks() for sample in tick]


def test_replay_h200_trace_counts_and_units() -> None:
    source, samples = replay_all()
    lines = [json.loads(line) for line in TRACE.read_text().splitlines()]
    assert len(samples) == len(lines) == 1220
    assert source.rejects.total == 0
    first, raw = samples[0].gpus[0], lines[0]
    assert samples[0].ts == raw["ts"] and samples[0].node == "h200-box" and samples[0].cluster == "lab"
    assert first.model == "H200" and first.uuid == "GPU-h200-box-0"
    assert first.power_w == pytest.approx(raw["power_mw"] / 1000)  # 79.847 W
    assert first.power_limit_w == 700.0
    assert first.energy_j == pytest.approx(raw["energy_mj"] / 1000)
    assert first.mem_total_mib == pytest.approx(raw["mem_total_bytes"] / 2**20)  # 143771 MiB
    assert first.mem_used_mib == pytest.approx(raw["mem_used_bytes"] / 2**20)
    assert first.clocks_event_reasons == raw["clock_event_reasons"]


def test_replay_phase_means_match_the_fixture_readme() -> None:
    _, samples = replay_all()
    phases = [json.loads(line) for line in (FIXTURES / "phases.jsonl").read_text().splitlines()]
    expected = {  # README table: util_gpu %, power W
        "idle": (0.0, 119),
        "compute_full": (97.5, 680),
        "duty_cycle_30pct": (29.1, 370),
        "memory_bound_copy": (97.2, 457),
        "idle_end": (0.0, 137),
    }
    for phase, following in zip(phases, phases[1:]):
        if phase["phase"] not in expected:
            continue
        inside = [s.gpus[0] for s in samples if phase["ts"] <= s.ts < following["ts"]]
        util, power = expected[phase["phase"]]
        assert statistics.mean(g.util_gpu for g in inside) == pytest.approx(util, abs=0.6), phase["phase"]
        assert statistics.mean(g.power_w for g in inside) == pytest.approx(power, abs=1.0), phase["phase"]
    full = [s.gpus[0] for s in samples if phases[1]["ts"] + 2 <= s.ts < phases[2]["ts"]]
    assert all(g.clocks_event_reasons & 0x4 for g in full[len(full) // 2 :])  # power-capped


def test_replay_speed_factor_on_real_clock() -> None:
    speed = 200.0
    source = ReplaySource(TRACE, cluster="lab", speed=speed)
    started = time.monotonic()
    early = []
    first_ts = None
    for tick in source.ticks():
        ts = tick[0].ts
        first_ts = first_ts if first_ts is not None else ts
        due = (ts - first_ts) / speed
        elapsed = time.monotonic() - started
        if elapsed < due - 0.002:
            early.append((ts, elapsed, due))
    assert first_ts is not None
    assert early == []  # no tick came before its scheduled time
    assert time.monotonic() - started >= (ts - first_ts) / speed


def test_replay_schedule_is_exact_on_fake_clock() -> None:
    clock = FakeClock(overshoot=0.003)
    source = ReplaySource(TRACE, cluster="lab", speed=10.0, clock=clock)
    emitted = [(clock.now - 1000.0, tick[0].ts) for tick in source.ticks()]
    first_ts = emitted[0][1]
    # Each tick is due at (ts - ts0) / speed; lateness is one overshoot at most, never accumulated.
    assert all(0 <= at - (ts - first_ts) / 10.0 <= 0.003 + 1e-9 for at, ts in emitted)


@pytest.mark.parametrize("anchor", ["start", "end"])
def test_replay_shift_to_now(anchor: str) -> None:
    now = 1_790_000_000.0
    _, samples = replay_all(shift=anchor, now=lambda: now)
    lines = [json.loads(line) for line in TRACE.read_text().splitlines()]
    duration = lines[-1]["ts"] - lines[0]["ts"]
    pinned = samples[0] if anchor == "start" else samples[-1]
    assert pinned.ts == pytest.approx(now)
    assert samples[-1].ts - samples[0].ts == pytest.approx(duration)


def test_replay_groups_gpus_of_a_tick_and_counts_bad_lines(tmp_path: Path) -> None:
    base = json.loads(TRACE.read_text().splitlines()[0])
    rows = [base | {"gpu": 0}, base | {"gpu": 1, "ts": base["ts"] + 0.001}]
    rows += [base | {"gpu": 0, "ts": base["ts"] + 0.1}, base | {"gpu": 1, "ts": base["ts"] + 0.1, "power_mw": -5}]
    trace = tmp_path / "two-gpus.jsonl"
    lines = [json.dumps(r) for r in rows]
    trace.write_text("\n".join([*lines[:2], "not json", *lines[2:]]) + "\n")
    source = ReplaySource(trace, cluster="lab", node="n2", speed=0)
    ticks = list(source.ticks())
    assert [[g.index for s in tick for g in s.gpus] for tick in ticks] == [[0, 1], [0]]
    assert ticks[0][0].ts == base["ts"]
    assert source.rejects.by_category == {"not_json": 1, "power_w:greater_than_equal": 1}


@pytest.mark.parametrize("flush", ["10", "0"], ids=["batches", "version-1"])
def test_replay_of_stdout_output_round_trips(tmp_path: Path, flush: str) -> None:
    result = runner.invoke(collect_app, ["replay", str(TRACE), "--speed", "0", "--count", "50", "--stdout",
                                         "--flush-interval", flush])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    samples = printed_samples(result.stdout)
    assert len(samples) == 50 and len(lines) == (50 if flush == "0" else len(printed_batches(result.stdout)))
    recorded = tmp_path / "samples.jsonl"
    recorded.write_text("\n".join(lines) + "\n")
    source = ReplaySource(recorded, cluster="ignored", speed=0)
    replayed = [sample for tick in source.ticks() for sample in tick]
    assert replayed == samples
    assert source.fmt == "samples"


def test_batches_hold_the_ticks_of_one_flush_interval_each() -> None:
    result = runner.invoke(collect_app, ["replay", str(TRACE), "--speed", "0", "--count", "50", "--stdout"])
    batches = printed_batches(result.stdout)
    one_tick = [sample for sample in printed_samples(result.stdout)]
    assert len(batches) < len(one_tick) / 10  # the trace samples at ~10 Hz: ~100 ticks per 10 s
    for batch in batches[:-1]:  # the last went out when the source stopped: no promise past its ticks
        assert batch.until is not None and batch.until % 10 == 0 and batch.ts[-1] < batch.until <= batch.ts[0] + 10
    assert batches[-1].until is None


def test_replay_samples_rejects_unknown_version_and_shifts_before_validating(tmp_path: Path) -> None:
    printed = runner.invoke(collect_app, ["replay", str(TRACE), "--speed", "0", "--count", "1", "--stdout",
                                          "--flush-interval", "0"])
    good = json.loads(printed.stdout.splitlines()[0])
    old = good | {"ts": 1_400_000_000.0}  # 2014: only valid once shifted to now
    recorded = tmp_path / "old.jsonl"
    recorded.write_text(json.dumps(old) + "\n" + json.dumps(old | {"v": 9, "ts": 1_400_000_001.0}) + "\n")
    source = ReplaySource(recorded, cluster="x", speed=0, shift="start", now=lambda: 1_790_000_000.0)
    samples = [s for tick in source.ticks() for s in tick]
    assert [s.ts for s in samples] == [1_790_000_000.0]
    assert source.rejects.by_category == {"v:literal_error": 1}


# --- dcgm-exporter over real HTTP -----------------------------------------------------------

G0 = (
    'gpu="0",UUID="GPU-5f2c8a3e-1b2d-4c1e-9a77-0c6f3b1e2d44",pci_bus_id="00000000:18:00.0",device="nvidia0",'
    'modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-07",DCGM_FI_DRIVER_VERSION="550.54.15",'
    'container="pytorch",namespace="ml-train",pod="llama-pretrain-worker-3"'
)
G1 = G0.replace('gpu="0"', 'gpu="1"').replace("GPU-5f2c", "GPU-77aa").replace("18:00.0", "2a:00.0")
G1 = G1.replace("nvidia0", "nvidia1")
G2 = (
    'gpu="2",UUID="GPU-c0ffee00-0000-4000-8000-000000000002",pci_bus_id="00000000:3a:00.0",device="nvidia2",'
    'modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-07",DCGM_FI_DRIVER_VERSION="550.54.15"'
)

# dcgm-exporter 3.3 with dcp-metrics-included.csv plus the power limit, in Kubernetes.
H100_HOSTNAME = f"""\
# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{{{G0}}} 1410
DCGM_FI_DEV_SM_CLOCK{{{G1}}} 1980
DCGM_FI_DEV_SM_CLOCK{{{G2}}} 345
# HELP DCGM_FI_DEV_MEM_CLOCK Memory clock frequency (in MHz).
# TYPE DCGM_FI_DEV_MEM_CLOCK gauge
DCGM_FI_DEV_MEM_CLOCK{{{G0}}} 2619
DCGM_FI_DEV_MEM_CLOCK{{{G1}}} 2619
DCGM_FI_DEV_MEM_CLOCK{{{G2}}} 2619
# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).
# TYPE DCGM_FI_DEV_GPU_TEMP gauge
DCGM_FI_DEV_GPU_TEMP{{{G0}}} 71
DCGM_FI_DEV_GPU_TEMP{{{G1}}} 58
DCGM_FI_DEV_GPU_TEMP{{{G2}}} 33
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{{{G0}}} 690.512
DCGM_FI_DEV_POWER_USAGE{{{G1}}} 421.25
DCGM_FI_DEV_POWER_USAGE{{{G2}}} 71.3
# HELP DCGM_FI_DEV_POWER_MGMT_LIMIT Power management limit (in W).
# TYPE DCGM_FI_DEV_POWER_MGMT_LIMIT gauge
DCGM_FI_DEV_POWER_MGMT_LIMIT{{{G0}}} 700
DCGM_FI_DEV_POWER_MGMT_LIMIT{{{G1}}} 700
DCGM_FI_DEV_POWER_MGMT_LIMIT{{{G2}}} 700
# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{G0}}} 8123456789
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{G1}}} 7012345678
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{G2}}} 1500000000
# HELP DCGM_FI_DEV_PCIE_REPLAY_COUNTER Total number of PCIe retries.
# TYPE DCGM_FI_DEV_PCIE_REPLAY_COUNTER counter
DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{{G0}}} 0
DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{{G1}}} 0
DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{{G2}}} 0
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{{{G0}}} 99
DCGM_FI_DEV_GPU_UTIL{{{G1}}} 71
DCGM_FI_DEV_GPU_UTIL{{{G2}}} 0
# HELP DCGM_FI_DEV_MEM_COPY_UTIL Memory utilization (in %).
# TYPE DCGM_FI_DEV_MEM_COPY_UTIL gauge
DCGM_FI_DEV_MEM_COPY_UTIL{{{G0}}} 45
DCGM_FI_DEV_MEM_COPY_UTIL{{{G1}}} 33
DCGM_FI_DEV_MEM_COPY_UTIL{{{G2}}} 0
# HELP DCGM_FI_DEV_XID_ERRORS Value of the last XID error encountered.
# TYPE DCGM_FI_DEV_XID_ERRORS gauge
DCGM_FI_DEV_XID_ERRORS{{{G0}}} 0
DCGM_FI_DEV_XID_ERRORS{{{G1}}} 0
DCGM_FI_DEV_XID_ERRORS{{{G2}}} 0
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{{{G0}}} 1024
DCGM_FI_DEV_FB_FREE{{{G1}}} 2048
DCGM_FI_DEV_FB_FREE{{{G2}}} 80587
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{{{G0}}} 80048
DCGM_FI_DEV_FB_USED{{{G1}}} 79024
DCGM_FI_DEV_FB_USED{{{G2}}} 485
# HELP DCGM_FI_DEV_FB_RESERVED Framebuffer memory reserved (in MiB).
# TYPE DCGM_FI_DEV_FB_RESERVED gauge
DCGM_FI_DEV_FB_RESERVED{{{G0}}} 487
DCGM_FI_DEV_FB_RESERVED{{{G1}}} 487
DCGM_FI_DEV_FB_RESERVED{{{G2}}} 487
# HELP DCGM_FI_DEV_CLOCK_THROTTLE_REASONS Current clock throttle reasons.
# TYPE DCGM_FI_DEV_CLOCK_THROTTLE_REASONS gauge
DCGM_FI_DEV_CLOCK_THROTTLE_REASONS{{{G0}}} 4
DCGM_FI_DEV_CLOCK_THROTTLE_REASONS{{{G1}}} 0
DCGM_FI_DEV_CLOCK_THROTTLE_REASONS{{{G2}}} 1
# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is active.
# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{G0}}} 0.990123
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{G1}}} 0.702345
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{G2}}} 0.000000
# HELP DCGM_FI_PROF_SM_ACTIVE The ratio of cycles an SM has at least 1 warp assigned.
# TYPE DCGM_FI_PROF_SM_ACTIVE gauge
DCGM_FI_PROF_SM_ACTIVE{{{G0}}} 0.931207
DCGM_FI_PROF_SM_ACTIVE{{{G1}}} 0.654321
DCGM_FI_PROF_SM_ACTIVE{{{G2}}} 0.000000
# HELP DCGM_FI_PROF_PIPE_TENSOR_ACTIVE Ratio of cycles the tensor (HMMA) pipe is active.
# TYPE DCGM_FI_PROF_PIPE_TENSOR_ACTIVE gauge
DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{G0}}} 0.612004
DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{G1}}} 0.401200
DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{G2}}} 0.000000
# HELP DCGM_FI_PROF_DRAM_ACTIVE Ratio of cycles the device memory interface is active sending or receiving data.
# TYPE DCGM_FI_PROF_DRAM_ACTIVE gauge
DCGM_FI_PROF_DRAM_ACTIVE{{{G0}}} 0.421000
DCGM_FI_PROF_DRAM_ACTIVE{{{G1}}} 0.300100
DCGM_FI_PROF_DRAM_ACTIVE{{{G2}}} 0.000000
"""

# Newest dcgm-exporter (lower-case `hostname`), default-counters.csv only: no power limit, no
# profiling ratios, the renamed clocks-event reasons field.
H = (
    'gpu="0",UUID="GPU-9e8d7c6b-5a49-4838-a2b1-c0d9e8f7a6b5",pci_bus_id="00000000:19:00.0",device="nvidia0",'
    'modelName="NVIDIA H200",hostname="h200-node-2",DCGM_FI_DRIVER_VERSION="580.159.04"'
)
H200_LOWER_HOSTNAME = f"""\
# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{{{H}}} 1467
# HELP DCGM_FI_DEV_MEM_CLOCK Memory clock frequency (in MHz).
# TYPE DCGM_FI_DEV_MEM_CLOCK gauge
DCGM_FI_DEV_MEM_CLOCK{{{H}}} 3201
# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).
# TYPE DCGM_FI_DEV_GPU_TEMP gauge
DCGM_FI_DEV_GPU_TEMP{{{H}}} 62
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{{{H}}} 680.4
# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{H}}} 55689787
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{{{H}}} 97
# HELP DCGM_FI_DEV_MEM_COPY_UTIL Memory utilization (in %).
# TYPE DCGM_FI_DEV_MEM_COPY_UTIL gauge
DCGM_FI_DEV_MEM_COPY_UTIL{{{H}}} 38
# HELP DCGM_FI_DEV_XID_ERRORS Value of the last XID error encountered.
# TYPE DCGM_FI_DEV_XID_ERRORS gauge
DCGM_FI_DEV_XID_ERRORS{{{H},err_code="79",err_msg="GPU has fallen off the bus"}} 79
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{{{H}}} 123771
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{{{H}}} 20000
# HELP DCGM_FI_DEV_CLOCKS_EVENT_REASONS Current clock event reasons.
# TYPE DCGM_FI_DEV_CLOCKS_EVENT_REASONS gauge
DCGM_FI_DEV_CLOCKS_EVENT_REASONS{{{H}}} 4
"""

# One H100 split into two MIG 3g.40gb instances: device-level series carry no GPU_I labels,
# utilization exists only as the profiling ratios of each instance.
M = (
    'gpu="0",UUID="GPU-1d2c3b4a-0000-4000-8000-00000000aaaa",pci_bus_id="00000000:18:00.0",device="nvidia0",'
    'modelName="NVIDIA H100 80GB HBM3",Hostname="mig-node-1",DCGM_FI_DRIVER_VERSION="550.54.15"'
)
M1 = M + ',GPU_I_PROFILE="3g.40gb",GPU_I_ID="1"'
M2 = M + ',GPU_I_PROFILE="3g.40gb",GPU_I_ID="2"'
MIG = f"""\
# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{{{M}}} 1755
# HELP DCGM_FI_DEV_MEM_CLOCK Memory clock frequency (in MHz).
# TYPE DCGM_FI_DEV_MEM_CLOCK gauge
DCGM_FI_DEV_MEM_CLOCK{{{M}}} 2619
# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).
# TYPE DCGM_FI_DEV_GPU_TEMP gauge
DCGM_FI_DEV_GPU_TEMP{{{M}}} 49
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{{{M}}} 402.1
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{{{M1}}} 30000
DCGM_FI_DEV_FB_FREE{{{M2}}} 40000
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{{{M1}}} 10192
DCGM_FI_DEV_FB_USED{{{M2}}} 192
# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is active.
# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{M1}}} 0.85
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{M2}}} 0.0
# HELP DCGM_FI_PROF_DRAM_ACTIVE Ratio of cycles the device memory interface is active sending or receiving data.
# TYPE DCGM_FI_PROF_DRAM_ACTIVE gauge
DCGM_FI_PROF_DRAM_ACTIVE{{{M1}}} 0.25
DCGM_FI_PROF_DRAM_ACTIVE{{{M2}}} 0.0
"""


class Exporter:
    """A real HTTP server on 127.0.0.1 answering every GET with `status` and `body`."""

    def __init__(self) -> None:
        self.status = 200
        self.body = ""
        self.requests = 0
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                exporter.requests += 1
                data = exporter.body.encode()
                self.send_response(exporter.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    server = Exporter()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def scrape(exporter: Exporter, body: str, source: DcgmSource | None = None, **options: object) -> list[NodeSample]:
    exporter.body = body
    source = source or DcgmSource(exporter.url, cluster="k8s", **options)  # type: ignore[arg-type]
    with httpx.Client(timeout=5) as client:
        return source.scrape(client)


def test_dcgm_maps_fields_units_and_k8s_attribution(exporter: Exporter) -> None:
    samples = scrape(exporter, H100_HOSTNAME)
    assert [s.node for s in samples] == ["gpu-node-07"]
    gpus = {g.index: g for g in samples[0].gpus}
    g0 = gpus[0]
    assert (g0.model, g0.uuid) == ("H100", "GPU-5f2c8a3e-1b2d-4c1e-9a77-0c6f3b1e2d44")
    assert (g0.util_gpu, g0.util_mem, g0.power_w, g0.power_limit_w) == (99, 45, 690.512, 700)
    assert (g0.sm_clock_mhz, g0.mem_clock_mhz, g0.temp_c) == (1410, 2619, 71)
    assert (g0.mem_used_mib, g0.mem_total_mib) == (80048, 80048 + 1024 + 487)
    assert g0.energy_j == pytest.approx(8_123_456.789)
    assert (g0.sm_active, g0.tensor_active, g0.dram_active) == (0.931207, 0.612004, 0.421)
    assert g0.clocks_event_reasons == 4 and g0.xid is None
    # pod llama-pretrain-worker-3 holds GPUs 0 and 1: ranks 3*2+0 and 3*2+1; GPU 2 has no pod.
    assert (g0.job, g0.rank) == ("ml-train/llama-pretrain-worker", 6)
    assert (gpus[1].job, gpus[1].rank) == ("ml-train/llama-pretrain-worker", 7)
    assert gpus[2].job is None and gpus[2].rank is None


def test_dcgm_lower_case_hostname_board_power_default_and_xid_once(exporter: Exporter) -> None:
    source = DcgmSource(exporter.url, cluster="k8s")
    first = scrape(exporter, H200_LOWER_HOSTNAME, source)
    assert [s.node for s in first] == ["h200-node-2"]
    gpu = first[0].gpus[0]
    assert (gpu.model, gpu.power_limit_w, gpu.clocks_event_reasons) == ("H200", 700.0, 4)
    assert gpu.power_estimated  # the board default, not what the GPU is set to
    assert gpu.sm_active is None and gpu.mem_total_mib == 143771
    assert gpu.xid == 79
    again = scrape(exporter, H200_LOWER_HOSTNAME, source)
    assert again[0].gpus[0].xid is None  # the same sticky XID is not a new event
    assert source.rejects.total == 0


def test_dcgm_trimmed_counters_without_memory_fields_still_give_every_gpu(exporter: Exporter) -> None:
    """A counter list cut down to utilization and power (no framebuffer, memory clock, copy
    utilization, SM clock or temperature) gives every GPU, those fields left out (util_mem falls back to DRAM_ACTIVE where
    exported); an exported limit is no estimate."""
    memory = ("DCGM_FI_DEV_FB_", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_SM_CLOCK",
              "DCGM_FI_DEV_GPU_TEMP")
    trimmed = "\n".join(line for line in H100_HOSTNAME.splitlines() if not line.startswith(memory)) + "\n"
    full = scrape(exporter, H100_HOSTNAME)
    samples = scrape(exporter, trimmed)
    assert [len(s.gpus) for s in samples] == [len(s.gpus) for s in full] and samples[0].gpus
    for g in samples[0].gpus:
        assert (g.mem_used_mib, g.mem_total_mib, g.mem_clock_mhz, g.sm_clock_mhz, g.temp_c) == (None,) * 5
    assert not any(g.power_estimated for s in full for g in s.gpus if g.model == "H100")


def test_dcgm_node_option_overrides_label(exporter: Exporter) -> None:
    samples = scrape(exporter, H200_LOWER_HOSTNAME, node="node-from-option")
    assert [s.node for s in samples] == ["node-from-option"]


def test_dcgm_mig_instances(exporter: Exporter) -> None:
    samples = scrape(exporter, MIG)
    assert [s.node for s in samples] == ["mig-node-1"]
    instances = samples[0].gpus
    assert [(g.index, g.mig_instance, g.mig_profile) for g in instances] == [(0, 1, "3g.40gb"), (0, 2, "3g.40gb")]
    first = instances[0]
    assert first.util_gpu == pytest.approx(85.0) and first.util_mem == pytest.approx(25.0)
    assert (first.temp_c, first.sm_clock_mhz) == (49, 1755)  # the parent GPU's: one chip
    # Not the whole GPU's power: its 3 of 7 compute slices' share, marked as an estimate; likewise
    # the board default limit for the H100 SXM.
    assert first.power_w == pytest.approx(402.1 * 3 / 7) and first.power_limit_w == pytest.approx(700.0 * 3 / 7)
    assert first.power_estimated
    assert (first.mem_used_mib, first.mem_total_mib) == (10192, 40192)


def test_dcgm_missing_and_bad_fields_reject_that_gpu_only(exporter: Exporter, caplog: pytest.LogCaptureFixture) -> None:
    lines = H100_HOSTNAME.splitlines()
    no_power = "\n".join(line for line in lines if not line.startswith('DCGM_FI_DEV_POWER_USAGE{gpu="1"'))
    unknown = no_power.replace(G2, G2.replace("NVIDIA H100 80GB HBM3", "NVIDIA Quadro X1"))  # no board default
    without_limit = "\n".join(line for line in unknown.splitlines() if 'POWER_MGMT_LIMIT{gpu="2"' not in line)
    source = DcgmSource(exporter.url, cluster="k8s")
    with caplog.at_level("WARNING", logger="laggard.collectors"):
        samples = scrape(exporter, without_limit, source)
    assert [g.index for g in samples[0].gpus] == [0]
    assert source.rejects.by_category == {"power_w:missing": 1, "power_limit_w:missing": 1}
    logged = " | ".join(r.getMessage() for r in caplog.records)
    assert "node gpu-node-07 gpu 1: power_w" in logged and "node gpu-node-07 gpu 2: power_limit_w" in logged


def test_dcgm_out_of_range_value_is_named(exporter: Exporter) -> None:
    hot = H200_LOWER_HOSTNAME.replace(f"DCGM_FI_DEV_GPU_TEMP{{{H}}} 62", f"DCGM_FI_DEV_GPU_TEMP{{{H}}} NaN")
    source = DcgmSource(exporter.url, cluster="k8s")
    assert scrape(exporter, hot, source) == []
    assert source.rejects.by_category == {"temp_c:finite_number": 1}


def test_dcgm_server_down_http_error_and_garbage_are_counted(exporter: Exporter) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/metrics"
    down = DcgmSource(dead, cluster="k8s", timeout_s=1)
    with httpx.Client(timeout=1) as client:
        assert down.scrape(client) == []
    assert down.rejects.by_category == {"scrape_failed": 1}

    source = DcgmSource(exporter.url, cluster="k8s")
    exporter.status = 500
    assert scrape(exporter, "oops", source) == []
    exporter.status = 200
    assert scrape(exporter, "DCGM_FI_DEV_GPU_UTIL{gpu=\"0\" 12\n", source) == []
    assert source.rejects.by_category == {"scrape_failed": 1, "parse_failed": 1}
    assert scrape(exporter, H200_LOWER_HOSTNAME, source)  # and it goes on


def test_parse_exporter_text_accepts_both_hostname_labels() -> None:
    keys = set(parse_exporter_text(H100_HOSTNAME)) | set(parse_exporter_text(H200_LOWER_HOSTNAME))
    assert keys == {("gpu-node-07", i, None) for i in range(3)} | {("h200-node-2", 0, None)}


def test_dcgm_cli_stdout_against_server(exporter: Exporter) -> None:
    exporter.body = H100_HOSTNAME
    args = ["dcgm", "--url", exporter.url, "--interval", "0.05", "--count", "3", "--stdout", "--cluster", "c9"]
    result = runner.invoke(collect_app, args)
    assert result.exit_code == 0, result.output
    samples = printed_samples(result.stdout)
    assert len(samples) == 3 and {s.cluster for s in samples} == {"c9"}
    assert len(printed_batches(result.stdout)) == 1  # 3 ticks 0.05 s apart: one flush interval
    assert exporter.requests == 3


def test_dcgm_cli_keeps_going_when_server_is_down() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/metrics"
    result = runner.invoke(collect_app, ["dcgm", "--url", dead, "--interval", "0.05", "--count", "2", "--stdout"])
    # Every tick was tried (no crash at the first failure); a run that collected nothing exits 1.
    assert "2 ticks" in result.stderr and "2 rejected" in result.stderr
    assert result.exit_code == 1 and "no sample in 2 tick(s)" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_loop_cleanly(signum: int) -> None:
    command = [sys.executable, "-m", "laggard.collectors.cli", "replay", str(TRACE), "--speed", "1", "--stdout",
               "--flush-interval", "0"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert decode_node_sample(first).node == "replay"
        proc.send_signal(signum)
        rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    printed = 1 + len(rest.splitlines())
    assert printed < 1220  # stopped long before the 122 s trace ended
    assert f"replay: {printed} ticks" in err


def test_a_signal_sends_what_the_batcher_still_holds() -> None:
    command = [sys.executable, "-m", "laggard.collectors.cli", "replay", str(TRACE), "--speed", "1", "--stdout",
               "--flush-interval", "1"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        first = proc.stdout.readline()  # type: ignore[union-attr]  # the first flush interval is over
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    batches = printed_batches(first + rest)
    ticks = int(err.split("replay: ")[1].split(" ticks")[0])
    assert len(batches) >= 2 and batches[-1].until is None  # the held one went out at the signal
    assert sum(len(b.ts) for b in batches) == ticks  # every tick read was sent


# --- nvml -----------------------------------------------------------------------------------


def nvml_works() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(nvml_works(), reason="this machine has an NVIDIA driver")
def test_nvml_without_driver_exits_2_with_one_line() -> None:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "laggard.collectors.cli", "nvml", "--stdout", "--count", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "NVML unavailable" in lines[0] and "driver" in lines[0]


# --- attribution ----------------------------------------------------------------------------


def test_mapping_file_by_uuid_and_index(tmp_path: Path) -> None:
    mapping = tmp_path / "jobs.yaml"
    mapping.write_text("GPU-abc: {job: llm-pretrain, rank: 12}\n3: {job: eval}\n")
    lookup = MappingFile(mapping)
    assert lookup.lookup(0, "GPU-abc") == Assignment(job="llm-pretrain", rank=12)
    assert lookup.lookup(3, "GPU-other") == Assignment(job="eval")
    assert lookup.lookup(4, "GPU-other") is None


def test_mapping_file_errors_name_file_and_field(tmp_path: Path) -> None:
    mapping = tmp_path / "jobs.json"
    mapping.write_text(json.dumps({"0": {"job": "x", "rank": -1}}))
    with pytest.raises(AttributionError, match=r"jobs.json.*0\.rank = -1"):
        MappingFile(mapping)
    mapping.write_text("[1, 2]")
    with pytest.raises(AttributionError, match="expected a mapping"):
        MappingFile(mapping)
    result = runner.invoke(collect_app, ["replay", str(TRACE), "--attribution", str(mapping), "--stdout"])
    assert result.exit_code == 2 and "expected a mapping" in result.stderr


def test_slurm_dir_reads_and_refreshes_prolog_files(tmp_path: Path) -> None:
    slurm = SlurmDir(tmp_path)
    assert slurm.lookup(0, "GPU-a") is None
    gpu0 = tmp_path / "gpu-0.json"
    gpu0.write_text('{"job": "4242", "rank": 5}')
    assert slurm.lookup(0, "GPU-a") == Assignment(job="4242", rank=5)
    gpu0.write_text('{"job": "4243", "rank": 0}')
    os.utime(gpu0, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # a later mtime, as the next job's prolog
    assert slurm.lookup(0, "GPU-a") == Assignment(job="4243", rank=0)
    (tmp_path / "gpu-1.json").write_text("{broken")
    assert slurm.lookup(1, "GPU-b") is None


def test_attribution_order_mapping_before_slurm(tmp_path: Path) -> None:
    mapping = tmp_path / "map.yaml"
    mapping.write_text("0: {job: from-file, rank: 1}\n")
    (tmp_path / "gpu-0.json").write_text('{"job": "from-slurm"}')
    (tmp_path / "gpu-1.json").write_text('{"job": "from-slurm", "rank": 2}')
    both = Attribution.from_options(mapping, tmp_path)
    assert both.fields(0, "GPU-a") == {"job": "from-file", "rank": 1}
    assert both.fields(1, "GPU-b") == {"job": "from-slurm", "rank": 2}
    assert both.fields(2, "GPU-c") == {}


def test_replay_applies_attribution(tmp_path: Path) -> None:
    mapping = tmp_path / "map.yaml"
    mapping.write_text("GPU-box-0: {job: trainer, rank: 3}\n")
    source = ReplaySource(TRACE, cluster="lab", node="box", speed=0, attribution=Attribution(MappingFile(mapping)))
    first = next(iter(source.ticks()))[0].gpus[0]
    assert (first.job, first.rank) == ("trainer", 3)


@pytest.mark.parametrize(
    ("pod", "owner"),
    [
        ("trainer-7d9f8b6c4-x2k9q", "trainer"),  # Deployment: template hash + random suffix
        ("trainer-3", "trainer"),  # StatefulSet ordinal
        ("trainer-3-x7k2p", "trainer"),  # indexed Job
        ("pretrain-x7k2p", "pretrain"),  # Job
        ("my-train", "my-train"),  # a real word is not a random suffix
    ],
)
def test_pod_owner(pod: str, owner: str) -> None:
    assert pod_owner(pod) == owner


def test_k8s_assignments_prefer_job_labels_and_index_labels() -> None:
    labels = {"namespace": "ml", "pod": "pt-worker-x7k2p", "training_kubeflow_org_job_name": "gpt"}
    found = k8s_assignments(
        {
            (0, None): labels | {"training_kubeflow_org_replica_index": "2"},
            (1, None): labels | {"training_kubeflow_org_replica_index": "2"},
            (2, None): {"namespace": "ml", "pod": "notebook-x7k2p"},
        }
    )
    assert found[(0, None)] == Assignment(job="ml/gpt", rank=4)
    assert found[(1, None)] == Assignment(job="ml/gpt", rank=5)
    assert found[(2, None)] == Assignment(job="ml/notebook", rank=None)
