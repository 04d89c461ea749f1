"""The fleet simulator: determinism, the fast encoder, ground truth, physics and calibration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from laggard.agents.scoring import families
from laggard.collectors.simulate import FleetSimulator, Frame, Scenario, ScenarioError, load_scenario
from laggard.collectors.simulate.physics import (
    MODELS,
    POWER_EXPONENT,
    PhaseMean,
    PowerCurve,
    fit_power_curve,
    sm_clock_mhz,
)
from laggard.collectors.simulate.scenario import fault_kinds, shortened
from laggard.collectors.simulate_cli import simulate
from laggard.events import ClockReason, FaultTruth, decode_node_sample

SCENARIOS = Path(__file__).resolve().parents[1] / "collectors" / "scenarios"
from tests.helpers.fixtures import NVML_TRACE
from tests.helpers.samples import printed_batches, printed_samples

START = 1_795_665_000.0


def scenario(**overrides: Any) -> Scenario:
    """A small fleet: 4 H100 nodes and 2 H200 nodes; one 32-rank job on the H100s."""
    base: dict[str, Any] = {
        "name": "mini",
        "seed": 5,
        "duration_s": 60,
        "nodes": [{"prefix": "h100-", "count": 4, "model": "H100"}, {"prefix": "h200-", "count": 2, "model": "H200"}],
        "jobs": [{"name": "train", "nodes": [{"group": "h100-", "count": 4}], "step_s": 1.0}],
    }
    return Scenario.model_validate({**base, **overrides})


def frames(s: Scenario) -> list[Frame]:
    return list(FleetSimulator(s, start_ts=START).frames())


def mean(fs: list[Frame], attr: str, gpus: Any) -> float:
    return float(np.mean([getattr(f, attr)[gpus] for f in fs]))


# --- determinism and encoding -------------------------------------------------------------------


def test_same_scenario_and_seed_give_identical_bytes() -> None:
    s = shortened(load_scenario(SCENARIOS / "all_faults.yaml"), 20)
    first = list(FleetSimulator(s, start_ts=START).encoded_ticks())
    second = list(FleetSimulator(s, start_ts=START).encoded_ticks())
    assert first == second
    other_seed = list(FleetSimulator(s.model_copy(update={"seed": 43}), start_ts=START).encoded_ticks())
    assert other_seed != first


@pytest.mark.parametrize("dcgm", [False, True])
def test_encoded_ticks_decode_to_the_same_samples_as_ticks(dcgm: bool) -> None:
    s = scenario(
        faults=[
            {"kind": "straggler", "job": "train", "rank": 3, "start_s": 2, "cause": "power"},
            {"kind": "xid", "node": "h200-0001", "gpu": 2, "code": 79, "then_silent": True, "start_s": 3},
            {"kind": "silent_gpu", "job": "train", "rank": 9, "start_s": 1, "end_s": 4},
        ],
        duration_s=6,
        dcgm_profiling=dcgm,
    )
    sim = FleetSimulator(s, start_ts=START)
    encoded, samples = list(sim.encoded_ticks()), list(sim.ticks())
    assert len(encoded) == len(samples) == 6
    for (ts, messages), tick in zip(encoded, samples):
        assert [k for k, _ in messages] == [n.node.encode() for n in tick]
        assert [decode_node_sample(v) for _, v in messages] == tick
        assert all(n.ts == ts for n in tick)
    assert any(g.xid == 79 for tick in samples for n in tick for g in n.gpus)
    assert all((g.sm_active is not None) == dcgm for tick in samples for n in tick for g in n.gpus)


# --- ground truth -------------------------------------------------------------------------------


def test_truth_names_every_injected_fault_in_absolute_time() -> None:
    s = load_scenario(SCENARIOS / "all_faults.yaml")
    truth = FleetSimulator(s, start_ts=START).truth()
    assert {t.kind for t in truth} == fault_kinds()
    assert fault_kinds() <= families().keys()  # a detector is registered to find each (laggard eval scores it)
    assert all(t.scenario == "all_faults" and t.cluster == "sim-all" for t in truth)

    def one(kind: str, **match: Any) -> FaultTruth:
        found = [t for t in truth if t.kind == kind and all(getattr(t, k) == v for k, v in match.items())]
        assert len(found) == 1, (kind, match, found)
        return found[0]

    hot = one("straggler", job="llm-405b", rank=300)
    assert (hot.node, hot.gpu, hot.start, hot.end) == ("h100-0037", 4, START + 20, START + 140)
    assert hot.detail["cause"] == "thermal"
    capped = one("straggler", job="rl-h200", rank=77)
    assert (capped.node, capped.gpu, capped.end) == ("h200-0041", 5, START + 150)  # no end_s: scenario end
    assert one("slow_node", node="h100-0050").job == "llm-405b"
    xid = one("xid", node="gb200-0010", gpu=2)
    assert (xid.job, xid.rank, xid.detail["code"]) == ("gb-train", 42, 48)
    fell_off = one("silent_gpu", job="rl-h200", rank=300)
    assert fell_off.start == START + 91  # the tick after its XID 79
    assert one("silent_gpu", node="h100-0170", gpu=3).job == "ckpt-heavy"
    assert one("idle_allocated", job="notebook", rank=None).start == START
    assert [t.rank for t in truth if t.kind == "idle_allocated" and t.job == "gb-train"] == [380, 381, 382, 383]
    stall = one("job_stalled", job="ckpt-heavy")
    assert (stall.start, stall.end) == (START + 60, START + 100)
    mixed = one("mixed_generation", job="mixgen")
    assert mixed.detail["slow_model"] == "H100" and mixed.detail["fast_model"] == "H200"


def test_shipped_scenarios_load_and_the_straggler_fleet_is_large() -> None:
    loaded = {p.stem: load_scenario(p) for p in SCENARIOS.glob("*.yaml")}
    assert {"straggler", "mixed_generation", "all_faults", "quiet"} <= set(loaded)
    sims = {name: FleetSimulator(s, start_ts=START) for name, s in loaded.items()}
    assert sims["straggler"].gpu_count >= 1024
    assert len({t.start for t in sims["straggler"].truth() if t.kind == "straggler"}) >= 3
    assert sims["quiet"].truth() == []


# --- physics ------------------------------------------------------------------------------------


def train_job(wait: str) -> list[dict[str, Any]]:
    return [{"name": "train", "nodes": [{"group": "h100-", "count": 4}], "step_s": 1.0, "collective_wait": wait}]


THERMAL_RANK_5 = {"kind": "straggler", "job": "train", "rank": 5, "cause": "thermal", "clock_mhz": 1100, "start_s": 20,
                  "end_s": 50}


@pytest.mark.parametrize("wait", ["kernel", "host"])
def test_a_throttled_rank_paces_its_job_while_its_peers_wait(wait: str) -> None:
    s = scenario(jobs=train_job(wait), faults=[THERMAL_RANK_5])
    fs = frames(s)
    sim = FleetSimulator(s, start_ts=START)
    job_gpus = sim.layout.job_gpus[0]
    slow, peers = job_gpus[5], np.delete(job_gpus, 5)
    before, during = fs[10:20], fs[30:50]  # after the temperature has settled

    step_before, step_during = mean(before, "job_step_s", 0), mean(during, "job_step_s", 0)
    expected = 0.9 * MODELS["H100"].loaded_sm_clock_mhz / 1100 + 0.1
    assert step_during == pytest.approx(expected, rel=0.01) and step_before == pytest.approx(1.0, rel=0.01)

    assert mean(during, "util_gpu", slow) >= 95
    assert mean(during, "sm_clock_mhz", slow) < 1120 < mean(during, "sm_clock_mhz", peers)
    assert all(f.reasons[slow] & ClockReason.SW_THERMAL for f in during)
    assert not any((f.reasons[peers] & ClockReason.SW_THERMAL).any() for f in during)
    assert mean(during, "temp_c", slow) > mean(during, "temp_c", peers) + 15
    # The peers compute 0.9 s of each ~1.33 s step and wait the rest.
    assert mean(during, "busy", peers) == pytest.approx(1.0 / expected, abs=0.03)
    if wait == "host":  # the wait reads idle
        assert mean(during, "util_gpu", peers) < mean(before, "util_gpu", peers) - 20
        assert mean(during, "util_gpu", peers) < mean(during, "util_gpu", slow) - 20
    else:  # spinning in the collective: busy-looking, at a lower power and a boosted clock
        assert mean(during, "util_gpu", peers) >= 97
        assert mean(during, "power_w", peers) < mean(before, "power_w", peers) - 60
        assert mean(during, "sm_clock_mhz", peers) > mean(before, "sm_clock_mhz", peers) + 50


def test_dcgm_sees_spinning_peers_use_a_few_sms_while_the_straggler_computes() -> None:
    s = scenario(dcgm_profiling=True, faults=[THERMAL_RANK_5])
    during = frames(s)[30:50]
    job_gpus = FleetSimulator(s, start_ts=START).layout.job_gpus[0]
    slow, peers = job_gpus[5], np.delete(job_gpus, 5)
    # It computes 1.35 s of each 1.45 s step; its peers compute 0.9 s of it, the rest on a few SMs.
    assert mean(during, "sm_active", slow) == pytest.approx(0.9 * 1.35 / 1.45 + 0.12 * 0.1 / 1.45, abs=0.01)
    assert mean(during, "sm_active", peers) == pytest.approx(0.9 * 0.9 / 1.45 + 0.12 * 0.55 / 1.45, abs=0.01)
    assert mean(during, "util_gpu", peers) >= 97  # what NVML alone shows


def test_a_slow_compute_rank_works_longer_at_full_clock_while_its_peers_spin() -> None:
    s = scenario(faults=[{"kind": "straggler", "job": "train", "rank": 5, "cause": "slow_compute", "slowdown": 1.3,
                          "start_s": 20}])
    fs = frames(s)[30:]
    job_gpus = FleetSimulator(s, start_ts=START).layout.job_gpus[0]
    slow, peers = job_gpus[5], np.delete(job_gpus, 5)
    assert mean(fs, "job_step_s", 0) == pytest.approx(0.9 * 1.3 + 0.1, rel=0.01)
    assert not any(f.reasons[slow] & ~ClockReason.SW_POWER_CAP for f in fs)  # no throttle flag of its own
    assert mean(fs, "util_gpu", slow) >= 97 and mean(fs, "util_gpu", peers) >= 97
    assert mean(fs, "power_w", slow) > mean(fs, "power_w", peers) + 40  # it works; they spin
    assert mean(fs, "sm_clock_mhz", slow) < mean(fs, "sm_clock_mhz", peers) - 30  # they boost while spinning


def test_a_host_straggler_idles_on_its_gpu_while_its_peers_spin() -> None:
    s = scenario(faults=[{"kind": "straggler", "job": "train", "rank": 5, "cause": "host", "slowdown": 1.3,
                          "start_s": 20}])
    fs = frames(s)[30:]
    sim = FleetSimulator(s, start_ts=START)
    job_gpus = sim.layout.job_gpus[0]
    slow, peers = job_gpus[5], np.delete(job_gpus, 5)
    step = 0.9 * 1.3 + 0.1
    assert mean(fs, "job_step_s", 0) == pytest.approx(step, rel=0.01)
    assert mean(fs, "util_gpu", slow) == pytest.approx(100 * 1.0 / step, abs=4)  # idle while its host prepares
    assert mean(fs, "util_gpu", peers) >= 97
    assert [t.detail for t in sim.truth()] == [{"cause": "host", "wait": "kernel", "slowdown": 1.3}]


def test_a_slow_node_slows_all_its_gpus_and_its_job() -> None:
    s = scenario(faults=[{"kind": "slow_node", "node": "h100-0002", "slowdown": 1.5, "start_s": 20}])
    fs = frames(s)
    node = np.arange(16, 24)  # h100-0002's GPUs
    assert all((f.reasons[node] & ClockReason.HW_SLOWDOWN).all() for f in fs[20:])
    assert not any((f.reasons & ClockReason.HW_SLOWDOWN).any() for f in fs[:20])
    assert mean(fs[25:], "sm_clock_mhz", node) < MODELS["H100"].loaded_sm_clock_mhz / 1.5 + 10
    assert mean(fs[25:], "job_step_s", 0) == pytest.approx(0.9 * 1.5 + 0.1, rel=0.01)


def test_the_quiet_scenario_carries_no_fault_signature() -> None:
    fs = list(FleetSimulator(load_scenario(SCENARIOS / "quiet.yaml"), start_ts=START).frames())
    assert all(f.present.all() and not f.xid.any() for f in fs)
    assert all(not (f.reasons & ~int(ClockReason.SW_POWER_CAP)).any() for f in fs)
    steps = np.array([f.job_step_s for f in fs])
    assert np.allclose(steps, steps[0])  # every job steps at its healthy pace throughout


def test_mixed_generation_the_faster_model_waits() -> None:
    s = scenario(
        jobs=[
            {"name": "mixed", "nodes": [{"group": "h100-", "count": 2}, {"group": "h200-", "count": 2}], "step_s": 1.0,
             "collective_wait": "host"}
        ]
    )
    fs = frames(s)[5:60]
    gpus = FleetSimulator(s, start_ts=START).layout.job_gpus[0]
    h100, h200 = gpus[:16], gpus[16:]
    assert mean(fs, "util_gpu", h100) > 95
    # H200 computes 0.9 s / 1.4 then waits for the H100s: busy (0.643 + 0.1) of each 1 s step.
    assert mean(fs, "util_gpu", h200) == pytest.approx(100 * (0.9 / 1.4 + 0.1), abs=4)
    truth = FleetSimulator(s, start_ts=START).truth()
    assert [(t.kind, t.job, t.detail["expected_waste"]) for t in truth] == [("mixed_generation", "mixed", round(1 - 1 / 1.4, 3))]


def test_idle_allocated_gpus_keep_their_job_and_draw_idle_power() -> None:
    s = scenario(faults=[{"kind": "idle_allocated", "job": "train", "ranks": [0, 1], "start_s": 10}])
    sim = FleetSimulator(s, start_ts=START)
    during = [t for t in sim.ticks() if t[0].ts >= START + 10]
    idle = [g for tick in during for g in tick[0].gpus if g.rank in (0, 1)]
    working = [g for tick in during for g in tick[0].gpus if g.rank not in (0, 1)]
    assert idle and all(g.job == "train" and g.util_gpu <= 2 for g in idle)
    assert np.mean([g.power_w for g in idle]) < MODELS["H100"].idle_w + 15
    assert np.mean([g.util_gpu for g in working]) > 80  # the rest of the job keeps stepping


def test_a_stalled_job_goes_idle_on_every_rank_together() -> None:
    s = scenario(faults=[{"kind": "job_stalled", "job": "train", "start_s": 20, "end_s": 40}])
    fs = frames(s)
    gpus = FleetSimulator(s, start_ts=START).layout.job_gpus[0]
    stalled = fs[20:40]
    assert all(f.util_gpu[gpus].max() <= 2 for f in stalled)
    assert sum(f.job_steps[0] for f in stalled) == 0
    assert mean(fs[5:20], "util_gpu", gpus) > 90 and mean(fs[45:60], "util_gpu", gpus) > 90


def test_a_silent_gpu_vanishes_from_its_nodes_messages() -> None:
    s = scenario(faults=[{"kind": "silent_gpu", "node": "h100-0001", "gpu": 6, "start_s": 10, "end_s": 20}])
    for tick in FleetSimulator(s, start_ts=START).ticks():
        node = next(n for n in tick if n.node == "h100-0001")
        silent = START + 10 <= node.ts < START + 20
        assert (6 in [g.index for g in node.gpus]) is not silent
        assert len(node.gpus) == (7 if silent else 8)


def test_a_node_with_no_reporting_gpu_sends_no_message() -> None:
    faults = [{"kind": "silent_gpu", "node": "h200-0000", "gpu": g, "start_s": 5, "end_s": 6} for g in range(8)]
    ticks = list(FleetSimulator(scenario(faults=faults, duration_s=8), start_ts=START).encoded_ticks())
    assert [b"h200-0000" in [k for k, _ in msgs] for _, msgs in ticks] == [True] * 5 + [False] + [True] * 2


def test_xid_appears_then_the_gpu_falls_silent() -> None:
    s = scenario(faults=[{"kind": "xid", "job": "train", "rank": 10, "code": 79, "then_silent": True, "start_s": 7, "end_s": 30}])
    seen = []
    for tick in FleetSimulator(s, start_ts=START).ticks():
        gpu = next((g for n in tick for g in n.gpus if g.rank == 10), None)
        seen.append(None if gpu is None else gpu.xid or 0)
    assert seen[:7] == [0] * 7 and seen[7] == 79
    assert seen[8:30] == [None] * 22 and seen[30] == 0


# --- calibration against the real H200 trace ----------------------------------------------------


def fixture_phase_means() -> dict[str, dict[str, float]]:
    if not NVML_TRACE.is_dir():
        pytest.skip(f"fixture {NVML_TRACE} not present")
    trace = [json.loads(line) for line in (NVML_TRACE / "trace.jsonl").read_text().splitlines()]
    phases = [json.loads(line) for line in (NVML_TRACE / "phases.jsonl").read_text().splitlines()]
    out = {}
    for phase, nxt in zip(phases, phases[1:]):
        inside = [r for r in trace if phase["ts"] <= r["ts"] < nxt["ts"]]
        out[phase["phase"]] = {
            "util": float(np.mean([r["util_gpu"] for r in inside])),
            "power": float(np.mean([r["power_mw"] for r in inside]) / 1000),
            "clock": float(np.mean([r["sm_clock_mhz"] for r in inside])),
        }
    return out


def test_power_curve_fitted_on_the_fixture_matches_the_h200_model() -> None:
    phases = fixture_phase_means()
    compute = {k: v for k, v in phases.items() if k != "memory_bound_copy"}
    curve = fit_power_curve([PhaseMean(v["util"], v["power"]) for v in compute.values()])
    h200 = MODELS["H200"]
    assert curve.idle_w == pytest.approx(h200.idle_w, abs=5)
    assert curve.loaded_w == pytest.approx(h200.loaded_w, abs=5)
    assert curve.exponent == pytest.approx(POWER_EXPONENT, abs=0.03)
    model = PowerCurve(h200.idle_w, h200.loaded_w, POWER_EXPONENT)
    for name, v in compute.items():
        assert float(model.power_w(v["util"] / 100)) == pytest.approx(v["power"], abs=40), name
        busy = np.array(v["util"] / 100)
        clock = float(sm_clock_mhz(np.array(h200.max_sm_clock_mhz), np.array(h200.loaded_sm_clock_mhz), busy, busy > 0))
        assert clock == pytest.approx(v["clock"], abs=50), name
    # The memory-bound copy is as busy as full compute but draws ~60% of its dynamic power.
    copy = phases["memory_bound_copy"]
    intensity = (copy["power"] - h200.idle_w) / (float(model.power_w(copy["util"] / 100)) - h200.idle_w)
    assert 0.5 < intensity < 0.7


def test_a_simulated_h200_at_full_compute_matches_the_fixture() -> None:
    compute_full = fixture_phase_means()["compute_full"]
    s = scenario(
        nodes=[{"prefix": "h200-", "count": 1, "model": "H200"}],
        jobs=[{"name": "gemm", "nodes": [{"group": "h200-", "count": 1}], "step_s": 1.0, "comm_share": 0.0}],
    )
    fs = frames(s)[30:60]
    assert mean(fs, "power_w", slice(None)) == pytest.approx(compute_full["power"], abs=20)
    assert mean(fs, "sm_clock_mhz", slice(None)) == pytest.approx(compute_full["clock"], abs=30)
    assert all((f.reasons & ClockReason.SW_POWER_CAP).all() for f in fs)


# --- scenario files and CLI ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("jobs:\n  - {name: a, nodes: [{group: h100-, count: 1}], step_s: fast}\n", "jobs.0.step_s"),
        ("jobs: []\nfaults:\n  - {kind: straggler, job: a, rank: 0, start_s: 1, clockmhz: 9}\n", "clockmhz"),
        ("jobs: []\nfaults:\n  - {kind: job_stalled, job: nope, start_s: 1}\n", "faults.0.job"),
        ("jobs: []\nfaults:\n  - {kind: meteor, start_s: 1}\n", "faults.0"),
    ],
)
def test_a_bad_scenario_names_the_file_and_the_field(tmp_path: Path, body: str, field: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: b\nduration_s: 10\nnodes: [{prefix: h100-, count: 1, model: H100}]\n" + body)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_cli_prints_samples_and_writes_truth(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: cli\nduration_s: 5\nnodes: [{prefix: n-, count: 2, model: GB200}]\n"
        "jobs: [{name: j, nodes: [{group: n-, count: 2}], step_s: 1}]\n"
        "faults: [{kind: straggler, job: j, rank: 1, start_s: 2}]\n"
    )
    app = typer.Typer()
    app.command()(simulate)
    truth_file = tmp_path / "truth.jsonl"
    args = [str(path), "--stdout", "--as-fast-as-possible", "--start", str(START), "--truth-file", str(truth_file)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    samples = printed_samples(result.stdout)
    assert len(samples) == 10 and {len(s.gpus) for s in samples} == {4}
    assert len(printed_batches(result.stdout)) == 2  # each node's 5 ticks, within one flush interval
    truth = [FaultTruth.model_validate_json(line) for line in truth_file.read_text().splitlines()]
    assert [(t.kind, t.rank, t.start) for t in truth] == [("straggler", 1, START + 2)]
