"""Scoring rules on hand-built findings, then the detectors end to end on the shipped simulator
scenarios (in-process, no Kafka) against the simulator's ground truth."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from laggard.agents.detectors import FleetDetector, LowUtilizationBaseline
from laggard.agents.scoring import matches, percentile, score
from laggard.agents.windows import Windower, windows_of
from laggard.events import FaultTruth
from laggard.results import Finding

T0 = 1_790_000_000.0
W = 10.0


def finding(kind: str = "straggler", state: str = "firing", at: float = T0 + 30, **who: object) -> Finding:
    labels = {"job": "llm", "rank": 17, "node": "n2", "gpu": 1, **who}
    return Finding(kind=kind, state=state, cluster="c", window_start=at - W, window_end=at, summary="s", **labels)


def truth(kind: str = "straggler", start: float = T0 + 12, end: float | None = T0 + 80, **who: object) -> FaultTruth:
    labels = {"job": "llm", "rank": 17, "node": "n2", "gpu": 1, **who}
    return FaultTruth(scenario="t", kind=kind, cluster="c", start=start, end=end, **labels)


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.95) == 4.0


def test_match_needs_identity_and_time_inside_the_span_plus_two_windows() -> None:
    t = truth()
    assert matches(finding(), t, W)
    assert not matches(finding(rank=18), t, W)  # a victim
    assert not matches(finding(job="other"), t, W)
    assert not matches(finding(at=T0 + 10), t, W)  # before onset
    assert matches(finding(at=T0 + 100), t, W)  # end + 2 windows
    assert not matches(finding(at=T0 + 101), t, W)
    node_only = truth(kind="slow_node", rank=None, gpu=None)
    assert matches(finding(rank=3, gpu=5), node_only, W)  # any GPU of the slow node


def test_score_counts_victims_as_false_positives_and_measures_latencies() -> None:
    truths = [truth(), truth(job="other", rank=3, node="n9", gpu=0, start=T0 + 40, end=None)]
    fired = finding(at=T0 + 30)
    found = [fired, finding(rank=18, gpu=2), finding(state="resolved", at=T0 + 100)]
    baseline = [finding(kind="low_utilization", rank=r, gpu=r % 8) for r in range(10)]
    out = score(found, baseline, truths, W)
    lag = out["laggard"]["straggler"]
    assert (lag["truths"], lag["findings"], lag["true_positives"], lag["detected"]) == (2, 2, 1, 1)
    assert lag["precision"] == 0.5 and lag["recall"] == 0.5
    assert lag["detect_latency_s_p50"] == 18.0 and lag["detect_latency_windows_p50"] == pytest.approx(1.8)
    assert lag["clear_latency_s_p50"] == 20.0
    base = out["baseline"]["straggler"]
    assert base["findings"] == 10 and base["precision"] == 0.0 and base["recall"] == 0.0


def test_families_group_kinds_telemetry_cannot_separate() -> None:
    truths = [truth(kind="idle_allocated", rank=None, node=None, gpu=None)]
    out = score([finding(kind="job_stalled", rank=None, node=None, gpu=None)], [], truths, W)
    assert out["laggard"]["idle"]["precision"] == 1.0 and out["laggard"]["idle"]["recall"] == 1.0
    assert set(out["laggard"]) == {"idle"}


SCENARIOS = Path(__file__).resolve().parent.parent / "collectors" / "scenarios"


@lru_cache(maxsize=None)
def evaluate(name: str) -> tuple[dict, tuple[Finding, ...]]:
    """A shipped scenario (collectors/scenarios/<name>.yaml), evaluated once per test session."""
    from laggard.collectors.simulate import load_scenario

    return evaluate_scenario(load_scenario(SCENARIOS / f"{name}.yaml"))


def evaluate_scenario(scenario: object, window_s: float = W) -> tuple[dict, tuple[Finding, ...]]:
    """Run a scenario through windows, laggard's detectors and the baseline, in-process (no Kafka);
    score against the simulator's truth."""
    from laggard.collectors.simulate import FleetSimulator

    sim = FleetSimulator(scenario, start_ts=T0)
    windower = Windower(window_s, grace_s=5.0)
    detector, baseline = FleetDetector(), LowUtilizationBaseline()
    laggard_findings: list[Finding] = []
    baseline_findings: list[Finding] = []

    samples = (sample for tick in sim.ticks() for sample in tick)
    for closed in windows_of(samples, windower):
        gpus = closed.gpu_results()
        laggard_findings.extend(detector.observe(closed.window_start, closed.window_s, gpus))
        baseline_findings.extend(baseline.observe(closed.window_start, closed.window_s, gpus))
    assert windower.late_samples == 0
    return score(laggard_findings, baseline_findings, sim.truth(), window_s), tuple(laggard_findings)


@pytest.mark.parametrize("name", ["straggler", "all_faults"])
def test_shipped_scenarios_stragglers_found_within_two_windows_and_baseline_misses_them(name: str) -> None:
    pytest.importorskip("laggard.collectors.simulate")
    out, _ = evaluate(name)
    lag = out["laggard"]["straggler"]
    assert lag["precision"] >= 0.95 and lag["recall"] >= 0.95, lag
    assert lag["detect_latency_windows_p95"] <= 2.0, lag
    base = out["baseline"]["straggler"]
    assert base["recall"] < lag["recall"] and (base["precision"] or 0.0) < lag["precision"], base


def test_shipped_all_faults_scenario_every_family_found() -> None:
    pytest.importorskip("laggard.collectors.simulate")
    out, _ = evaluate("all_faults")
    for family, metrics in out["laggard"].items():
        assert metrics["recall"] == 1.0, (family, metrics)
        assert metrics["precision"] >= 0.9, (family, metrics)


def test_shipped_quiet_scenario_raises_nothing() -> None:
    pytest.importorskip("laggard.collectors.simulate")
    out, found = evaluate("quiet")
    assert found == (), [f.summary for f in found]


def unseen_scenario() -> object:
    """Not shipped: small and odd jobs, 2 s ticks, mild-to-severe slowdowns at onsets off window bounds."""
    from laggard.collectors.simulate import Scenario

    return Scenario.model_validate({
        "name": "unseen", "seed": 5, "duration_s": 160, "tick_s": 2.0, "cluster": "u",
        "nodes": [
            {"prefix": "a-", "count": 12, "model": "H100"},
            {"prefix": "p-", "count": 4, "model": "H100", "gpus_per_node": 1},
            {"prefix": "g-", "count": 6, "model": "GB200"},
        ],
        "jobs": [
            {"name": "big", "nodes": [{"group": "a-", "first": 0, "count": 10}], "step_s": 2.5, "comm_share": 0.25},
            {"name": "pair", "nodes": [{"group": "p-", "first": 0, "count": 2}], "step_s": 0.7},
            {"name": "trio", "nodes": [{"group": "p-", "first": 2, "count": 2}], "step_s": 1.1, "comm_share": 0.3},
            {"name": "gb", "nodes": [{"group": "g-", "first": 0, "count": 6}], "step_s": 1.0},
            {"name": "spare", "nodes": [{"group": "a-", "first": 10, "count": 2}], "step_s": 1.0},
        ],
        "faults": [
            {"kind": "straggler", "job": "big", "rank": 61, "cause": "thermal", "slowdown": 1.15, "start_s": 27},
            {"kind": "straggler", "job": "pair", "rank": 1, "cause": "power", "slowdown": 1.4, "start_s": 44, "end_s": 110},
            {"kind": "straggler", "job": "gb", "rank": 9, "cause": "hw_slowdown", "slowdown": 2.5, "start_s": 71},
            {"kind": "straggler", "job": "trio", "rank": 0, "cause": "thermal", "slowdown": 1.25, "start_s": 93},
            {"kind": "slow_node", "node": "a-0011", "slowdown": 1.3, "start_s": 15, "end_s": 120},
        ],
    })


def test_unseen_scenario_stragglers_found_within_two_windows_of_the_onset_window() -> None:
    pytest.importorskip("laggard.collectors.simulate")
    out, found = evaluate_scenario(unseen_scenario())
    lag = out["laggard"]["straggler"]
    assert lag["precision"] >= 0.95 and lag["recall"] >= 0.95, lag
    # Onsets fall inside windows: a fault covering only the end of its first window is seen from
    # the next one, so the bound is 2 windows after the start of the window holding the onset.
    assert lag["detect_latency_windows_p50"] <= 2.0 and lag["detect_latency_windows_p95"] < 3.0, lag


SIGNATURE_OF = {"thermal": {"throttled"}, "power": {"throttled"}, "hw_slowdown": {"throttled"},
                "slow_compute": {"slow_compute", "busier"}, "host": {"host"}}


@pytest.mark.parametrize("dcgm", [False, True], ids=["nvml", "dcgm"])
def test_every_straggler_cause_is_named_whether_peers_spin_in_the_collective_or_idle_on_the_host(dcgm: bool) -> None:
    """The shipped matrix, from NVML's counters alone and with DCGM's SM_ACTIVE: each cause x wait
    mode cell found within two windows by the signature that fits its cause, the control jobs
    quiet; the one cell no telemetry can see stays unseen."""
    pytest.importorskip("laggard.collectors.simulate")
    from laggard.agents.scoring import straggler_cells
    from laggard.collectors.simulate import load_scenario

    spec = load_scenario(SCENARIOS / "straggler_matrix.yaml").model_copy(update={"dcgm_profiling": dcgm})
    out, found = evaluate_scenario(spec)
    truths_sim = load_matrix_truths()
    cells = straggler_cells(found, [], truths_sim, W)
    for cell, both in cells.items():
        recall = both["laggard"]["recall"]
        if cell == "host/host":  # its peers idle on the host too: nothing tells them apart
            assert recall == 0.0, both
        else:
            assert recall == 1.0 and both["laggard"]["detect_latency_windows_p50"] <= 2.0, (cell, both)
    assert out["laggard"]["straggler"]["precision"] == 1.0, out["laggard"]["straggler"]
    firing = [f for f in found if f.kind == "straggler" and f.state == "firing"]
    assert not [f for f in firing if f.job.startswith("control")]
    for f in firing:
        assert f.evidence["signature"] in SIGNATURE_OF[f.job.split("-")[0]], f.summary


def load_matrix_truths() -> list[FaultTruth]:
    from laggard.collectors.simulate import FleetSimulator, load_scenario

    return FleetSimulator(load_scenario(SCENARIOS / "straggler_matrix.yaml"), start_ts=T0).truth()


def test_jobs_starting_and_ending_raise_nothing() -> None:
    """A job's GPUs leave its stage-2 key as a whole when it ends (and join one when it starts):
    none of them is a silent GPU, and nothing else fires on a healthy fleet."""
    from laggard.collectors.simulate import Scenario

    spec = Scenario.model_validate({
        "name": "churn", "seed": 3, "duration_s": 200, "cluster": "c", "nodes": [{"prefix": "n", "count": 8, "model": "H100"}],
        "jobs": [{"name": "a", "nodes": [{"group": "n", "count": 4}], "step_s": 1.0, "end_s": 70},
                 {"name": "b", "nodes": [{"group": "n", "first": 0, "count": 2}], "step_s": 1.0, "start_s": 95},
                 {"name": "c", "nodes": [{"group": "n", "first": 4, "count": 4}], "step_s": 1.0, "start_s": 30,
                  "end_s": 150}]})
    _, found = evaluate_scenario(spec)
    assert found == (), [f.summary for f in found]


@pytest.mark.parametrize("wait", ["kernel", "host"])
def test_throttles_shorter_than_the_persistence_never_fire_even_across_a_window_boundary(wait: str) -> None:
    """2x slowdowns of 7 s and 9 s, each straddling a window boundary: two windows see them, but
    they hold 12 s of fault between them only if they are longer (the throttle reason's share of
    each window's samples says how much of it the fault covered)."""
    from laggard.collectors.simulate import Scenario

    spec = Scenario.model_validate({
        "name": "blips", "seed": 4, "duration_s": 140, "cluster": "c", "nodes": [{"prefix": "n", "count": 16, "model": "H100"}],
        "jobs": [{"name": "a", "nodes": [{"group": "n", "count": 16}], "step_s": 1.0, "collective_wait": wait}],
        "faults": [
            {"kind": "straggler", "job": "a", "rank": 7, "cause": "thermal", "slowdown": 2.0, "start_s": 36, "end_s": 43},
            {"kind": "straggler", "job": "a", "rank": 50, "cause": "hw_slowdown", "slowdown": 2.0, "start_s": 75, "end_s": 84},
            {"kind": "straggler", "job": "a", "rank": 90, "cause": "thermal", "slowdown": 2.0, "start_s": 95, "end_s": 110},
        ]})
    _, found = evaluate_scenario(spec)
    assert [(f.rank, f.state) for f in found] == [(90, "firing"), (90, "resolved")]  # only the 15 s one


def test_ranks_that_differ_by_design_or_by_chance_are_not_stragglers() -> None:
    """Pipeline stages, MoE-like spread and step jitter, both wait modes: nothing fires."""
    pytest.importorskip("laggard.collectors.simulate")
    _, found = evaluate("not_stragglers")
    assert found == (), [f.summary for f in found][:5]


def test_a_straggler_inside_a_shaped_job_is_still_named() -> None:
    """Each shaped job gets stragglers on a pipeline-edge rank and on middle ones, one minute in: the
    ranks' usual shape is subtracted, their new slowness is not."""
    from laggard.collectors.simulate import Scenario, load_scenario

    spec = load_scenario(SCENARIOS / "not_stragglers.yaml")
    faults = [{"kind": "straggler", "job": job.name, "rank": rank, "cause": cause, "slowdown": 1.3,
               "start_s": 60 + rank % 5, "end_s": 130 + rank % 5}
              for job in spec.jobs for rank, cause in ((3, "slow_compute"), (60, "slow_compute"), (70, "thermal"),
                                                       (100, "host"))
              if not (cause == "host" and job.collective_wait == "host")]  # invisible there (see the matrix)
    out, found = evaluate_scenario(Scenario.model_validate({**spec.model_dump(), "faults": faults}))
    lag = out["laggard"]["straggler"]
    assert lag["precision"] == 1.0 and lag["recall"] == 1.0 and lag["detect_latency_windows_p50"] <= 2.0, lag



def test_slowdowns_of_five_percent_lasting_four_windows_are_found() -> None:
    """The matrix at 1.05x for 40 s from an onset off the window bounds: under one window's noise
    floor, each cause is named from weak evidence that adds up over about three windows."""
    from laggard.agents.scoring import straggler_cells
    from laggard.collectors.simulate import FleetSimulator, Scenario, load_scenario

    spec = load_scenario(SCENARIOS / "straggler_matrix.yaml")
    faults = [{**f.model_dump(exclude_none=True), "start_s": 73, "end_s": 113,
               **({"slowdown": 1.05} if f.slowdown is not None else {})} for f in spec.faults]
    spec = Scenario.model_validate({**spec.model_dump(), "faults": faults})
    out, found = evaluate_scenario(spec)
    cells = straggler_cells(found, [], FleetSimulator(spec, start_ts=T0).truth(), W)
    missed = {cell: both["laggard"] for cell, both in cells.items()
              if cell != "host/host" and both["laggard"]["recall"] < 1.0}
    assert not missed, missed
    assert out["laggard"]["straggler"]["precision"] == 1.0, out["laggard"]["straggler"]


def test_jobs_whose_steps_are_longer_than_a_window_are_found() -> None:
    """24 s steps in 10 s windows: a peer waits once a step, so in one window of two or three, and a
    straggler that only shows in those (slow compute, host-side) flapped or went unnamed for minutes.
    Compared over a span of windows too, every detectable cell is named within four windows."""
    from laggard.agents.scoring import straggler_cells
    from laggard.collectors.simulate import FleetSimulator, Scenario, load_scenario

    spec = load_scenario(SCENARIOS / "straggler_matrix.yaml")
    jobs = [{**j.model_dump(exclude_none=True), "step_s": 24.0} for j in spec.jobs]
    faults = [{**f.model_dump(exclude_none=True), "start_s": 73, "end_s": 273} for f in spec.faults]
    spec = Scenario.model_validate({**spec.model_dump(), "seed": 3, "duration_s": 300, "jobs": jobs, "faults": faults})
    out, found = evaluate_scenario(spec)
    cells = straggler_cells(found, [], FleetSimulator(spec, start_ts=T0).truth(), W)
    slow = {cell: both["laggard"] for cell, both in cells.items() if cell != "host/host"
            and (both["laggard"]["recall"] < 1.0 or both["laggard"]["detect_latency_windows_p50"] > 4.0)}
    assert not slow, slow
    assert out["laggard"]["straggler"]["precision"] == 1.0, out["laggard"]["straggler"]


def test_jobs_whose_ranks_are_mostly_on_slow_nodes_are_found_and_their_healthy_ranks_are_not_named() -> None:
    """A 1-node job on a slow node and a 3-node job with 2 nodes slow (HW slowdown, 1.3x) have no
    healthy majority to compare with: each slow node is named against the same model in the other
    jobs, and the 3-node job's healthy node (which now waits) is not called a straggler."""
    from laggard.collectors.simulate import Scenario

    spec = Scenario.model_validate({
        "name": "whole_job_slow", "seed": 7, "duration_s": 150, "tick_s": 1.0, "cluster": "w",
        "nodes": [{"prefix": "h100-", "count": 16, "model": "H100"}],
        "jobs": [
            {"name": "solo", "nodes": [{"group": "h100-", "first": 0, "count": 1}], "step_s": 1.0},
            {"name": "trio", "nodes": [{"group": "h100-", "first": 1, "count": 3}], "step_s": 1.5},
            {"name": "big", "nodes": [{"group": "h100-", "first": 4, "count": 8}], "step_s": 2.0},
            {"name": "pair", "nodes": [{"group": "h100-", "first": 12, "count": 2}], "step_s": 1.0,
             "collective_wait": "host"},
        ],
        "faults": [
            {"kind": "slow_node", "node": "h100-0000", "slowdown": 1.3, "start_s": 33, "end_s": 120},
            {"kind": "slow_node", "node": "h100-0001", "slowdown": 1.3, "start_s": 47},
            {"kind": "slow_node", "node": "h100-0002", "slowdown": 1.3, "start_s": 47},
        ],
    })
    out, found = evaluate_scenario(spec)
    lag = out["laggard"]["straggler"]
    assert lag["precision"] == 1.0 and lag["recall"] == 1.0 and lag["detect_latency_windows_p50"] <= 2.5, lag
    named = {(f.kind, f.job, f.node) for f in found if f.state == "firing"}
    assert named == {("slow_node", "solo", "h100-0000"), ("slow_node", "trio", "h100-0001"),
                     ("slow_node", "trio", "h100-0002")}, named
