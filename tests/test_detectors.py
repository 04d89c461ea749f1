"""Detectors on small hand-built jobs: the inverted straggler signature, persistence, resolution, costs,
small jobs, mixed generations, idle and stalled jobs, XIDs, silent GPUs, the baseline, and state
round-trips."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from laggard.agents.detector_views import Detector, DetectorConfig, JobView
from laggard.agents.detectors import DETECTORS, FleetDetector, LowUtilizationBaseline
from laggard.agents.scoring import score
from laggard.agents.windows import Windower
from laggard.events import ClockReason, FaultTruth, GpuSample, NodeSample
from laggard.results import Finding
from laggard.rules.loader import check_text
from tests.test_windows import T0, gpu_sample

WINDOW_S = 10.0
GPUS_PER_NODE = 8

# (rank, window index) -> GpuSample field overrides (util_gpu at least), or None for no sample
RankFn = Callable[[int, int], dict[str, object] | None]


def job_samples(ranks: int, windows: int, fn: RankFn, job: str = "llm", seed: int = 1, noise: float = 4.0,
                models: Callable[[int], str] = lambda r: "H200", node: str = "n") -> list[NodeSample]:
    """1 s ticks of a job whose rank r sits on node {node}{r // 8}, GPU r % 8; util gets uniform noise."""
    rng = random.Random(seed)
    out = []
    for t in range(int(windows * WINDOW_S)):
        w = int(t // WINDOW_S)
        nodes: dict[int, list[GpuSample]] = {}
        for r in range(ranks):
            over = fn(r, w)
            if over is None:
                continue
            over = dict(over)
            util = float(over.pop("util_gpu"))
            if util > 0:
                util = min(100.0, max(0.0, util + rng.uniform(-noise, noise)))
            over.setdefault("power_w", host_wait_power_w(util, float(over.get("sm_clock_mhz") or 1980.0)))
            nodes.setdefault(r // GPUS_PER_NODE, []).append(
                gpu_sample(r % GPUS_PER_NODE, util, job=job, rank=r, model=models(r), **over))
        for n, gpus in nodes.items():
            out.append(NodeSample(ts=T0 + t, cluster="c", node=f"{node}{n}", gpus=gpus))
    return out


def host_wait_power_w(util: float, sm_clock_mhz: float = 1980.0) -> float:
    """An H200's power when busy `util`% of the time and idle the rest (waits on the host): the
    measured curve idle + (loaded - idle) * busy ** 0.71, its dynamic part scaled by the clock."""
    return 120.0 + 560.0 * (util / 100.0) ** 0.71 * min(1.0, sm_clock_mhz / 1980.0)


def run(samples: list[NodeSample], detector: FleetDetector | LowUtilizationBaseline) -> list[tuple[int, Finding]]:
    """(window index, finding) for every transition, feeding windows in order as they close."""
    w = Windower(WINDOW_S, grace_s=2.0)
    out = []
    for sample in sorted(samples, key=lambda s: s.ts):
        w.add(sample)
        for closed in w.pop_closed():
            for f in detector.observe(closed.window_start, closed.window_s, closed.gpu_results()):
                out.append((int((closed.window_start - T0) // WINDOW_S), f))
    for closed in w.flush():
        for f in detector.observe(closed.window_start, closed.window_s, closed.gpu_results()):
            out.append((int((closed.window_start - T0) // WINDOW_S), f))
    return out


def straggler_job(culprit: int, onset: int, until: int, slowdown: float, healthy: float = 80.0) -> RankFn:
    """Healthy ranks busy `healthy`%; from `onset` to `until` the culprit computes `slowdown` times longer
    (busy ~ healthy * slowdown capped at 99, thermally throttled) and its peers wait (busy / slowdown)."""
    def fn(r: int, w: int) -> dict[str, object]:
        if not onset <= w < until:
            return {"util_gpu": healthy}
        if r == culprit:
            return {"util_gpu": min(99.0, healthy * 1.1), "sm_clock_mhz": 1980 / slowdown, "temp_c": 82.0,
                    "clocks_event_reasons": int(ClockReason.SW_THERMAL)}
        return {"util_gpu": min(99.0, healthy * 1.1) / slowdown}
    return fn


def firing(events: list[tuple[int, Finding]], kind: str) -> list[tuple[int, Finding]]:
    return [(w, f) for w, f in events if f.kind == kind and f.state == "firing"]


def resolved(events: list[tuple[int, Finding]], kind: str) -> list[tuple[int, Finding]]:
    return [(w, f) for w, f in events if f.kind == kind and f.state == "resolved"]


def test_straggler_is_named_after_two_windows_with_evidence_and_cost() -> None:
    events = run(job_samples(32, 10, straggler_job(culprit=17, onset=3, until=7, slowdown=1.4)), FleetDetector())
    [(w, f)] = firing(events, "straggler")
    assert w == 4  # onset window 3 + persistence of 2 windows
    assert (f.job, f.rank, f.node, f.gpu, f.model) == ("llm", 17, "n2", 1, "H200")
    assert f.evidence["rank_util_pct"] > f.evidence["peer_util_median_pct"] * 1.25
    assert f.evidence["sm_clock_mhz"] < f.evidence["peer_sm_clock_median_mhz"]
    assert f.evidence["throttle_reasons"] == "sw_thermal"
    assert f.evidence["peers"] == 31
    # peers wait ~ 1 - 1/1.4 = 29% of each step: 31 peers x 0.29 x 10 s ~ 88 GPU-seconds per window
    assert f.cost["peer_wait_share"] == pytest.approx(1 - 1 / 1.4, abs=0.03)
    assert f.cost["peer_gpu_s_wasted"] == pytest.approx(31 * (88 - 88 / 1.4) / 100 * 10, rel=0.1)
    assert f.cost["energy_wh_wasted"] == pytest.approx(f.cost["peer_gpu_s_wasted"] * 120 / 3600, rel=0.01)
    assert "paced by rank 17 on node n2" in f.summary and "SM clock 1414 MHz vs 1980 peers, thermal" in f.summary
    assert f.evidence["signature"] == "throttled"
    [(rw, r)] = resolved(events, "straggler")
    assert rw == 8 and r.fingerprint == f.fingerprint and r.idempotency_key != f.idempotency_key
    # the victims are never named
    assert all(f.rank == 17 for _, f in events if f.kind == "straggler")


def test_one_window_blip_does_not_fire() -> None:
    events = run(job_samples(16, 6, straggler_job(culprit=3, onset=2, until=3, slowdown=1.5)), FleetDetector())
    assert firing(events, "straggler") == []


def test_mild_fifteen_percent_straggler_is_found_in_a_noisy_job() -> None:
    events = run(job_samples(64, 8, straggler_job(culprit=40, onset=2, until=8, slowdown=1.15), noise=8.0),
                 FleetDetector())
    assert [(w, f.rank) for w, f in firing(events, "straggler")] == [(3, 40)]


def test_healthy_noisy_jobs_raise_nothing() -> None:
    for seed in range(5):
        for ranks in (2, 3, 8, 64):
            events = run(job_samples(ranks, 12, lambda r, w: {"util_gpu": 75.0}, seed=seed, noise=10.0), FleetDetector())
            assert events == [], (seed, ranks, events)


@pytest.mark.parametrize("ranks", [2, 3])
def test_small_jobs_need_a_clear_gap(ranks: int) -> None:
    severe = run(job_samples(ranks, 6, straggler_job(culprit=1, onset=1, until=6, slowdown=1.5)), FleetDetector())
    assert [f.rank for _, f in firing(severe, "straggler")] == [1]
    # A 5% thermal slowdown is a clear gap: a throttle reason the peers lack, at a lower clock.
    thermal = run(job_samples(ranks, 6, straggler_job(culprit=1, onset=1, until=6, slowdown=1.05)), FleetDetector())
    assert [f.evidence["signature"] for _, f in firing(thermal, "straggler")] == ["throttled"]
    # A rank a few points busier, at the same clock and flags, is noise in a job this small.
    nudge = run(job_samples(ranks, 6, lambda r, w: {"util_gpu": 80.0 * (1.03 if r == 1 else 1.0)}), FleetDetector())
    assert firing(nudge, "straggler") == []


def test_a_source_without_clock_or_temperature_still_names_a_straggler_by_its_work() -> None:
    """A trimmed exporter sends no SM clock and no temperature: the rank is still named by working
    more than its peers, its finding says nothing about clocks, and no window point has a clock."""
    from laggard.agents.points import window_line

    straggling = straggler_job(culprit=17, onset=3, until=8, slowdown=1.4)

    def without_readings(r: int, w: int) -> dict[str, object] | None:
        over = straggling(r, w)
        return None if over is None else {**over, "sm_clock_mhz": None, "temp_c": None}

    samples = job_samples(32, 10, without_readings)
    [(_, f)] = firing(run(samples, FleetDetector()), "straggler")
    assert (f.rank, f.evidence["signature"]) == (17, "busier")
    assert f.evidence["sm_clock_mhz"] is None and f.evidence["temp_c"] is None and "SM clock" not in f.summary
    w = Windower(WINDOW_S)
    for sample in samples[:40]:
        w.add(sample)
    result = w.flush()[0].gpu_results()[0]
    assert (result.sm_clock_mhz_mean, result.temp_c_mean, result.temp_c_max) == (None, None, None)
    assert "sm_clock_mhz_mean" not in window_line(result) and "temp_c" not in window_line(result)


def slowed(after: int, clock: float, flags: int = int(ClockReason.HW_SLOWDOWN)) -> RankFn:
    """Every rank busy; from window `after`, throttled to `clock` with `flags` (a slow node or rack)."""
    return lambda r, w: ({"util_gpu": 99.0, "sm_clock_mhz": clock, "clocks_event_reasons": flags} if w >= after
                         else {"util_gpu": 99.0})


def test_a_job_entirely_on_a_slow_node_is_found_against_the_same_model_elsewhere() -> None:
    """No healthy peer inside the job: its clock is compared with the other jobs' H200s."""
    fleet = job_samples(16, 6, lambda r, w: {"util_gpu": 95.0}, job="ref", node="r", seed=2)
    solo = job_samples(8, 6, slowed(after=0, clock=1400.0), job="solo", node="s")
    assert not firing(run(solo, FleetDetector()), "slow_node")  # alone, from its start: nothing to compare with
    events = run(fleet + solo, FleetDetector())
    [(w, f)] = firing(events, "slow_node")
    assert (w, f.job, f.node, f.rank) == (1, "solo", "s0", None)
    assert f.evidence["reference"] == "fleet" and f.evidence["reference_gpus"] == 16
    assert f.evidence["throttle_reasons"] == "hw_slowdown" and f.evidence["slow_gpus"] == 8
    assert "1400 MHz vs 1980 MHz for H200 elsewhere in the fleet" in f.summary and "HW slowdown" in f.summary
    assert f.cost["job_step_loss_share"] == pytest.approx(1 - 1400 / 1980, abs=0.01)
    assert not firing(events, "straggler")


def test_a_job_whose_ranks_all_slow_down_is_found_against_its_own_past() -> None:
    """The same job at the same work, its clock 29% lower from window 3 and no throttle reason (a
    lowered power limit on its nodes): found from its own usual clock, with no other job to go by."""
    events = run(job_samples(16, 8, slowed(after=3, clock=1400.0, flags=0), job="solo"), FleetDetector())
    found = firing(events, "slow_node")
    assert sorted((w, f.node) for w, f in found) == [(4, "n0"), (4, "n1")]
    assert all(f.evidence["reference"] == "past" and f.evidence["throttle_reasons"] is None for _, f in found)
    assert "vs 1980 MHz for this job before" in found[0][1].summary


def test_jobs_that_slow_at_full_clock_or_always_run_lower_are_not_slow_nodes() -> None:
    """A job slowing together at full clock (its input, a phase of its work), a heavy job that always
    runs 24% below the others under the routine power cap, and a 17% clock dip without a hardware
    reason are no slow node."""
    fleet = job_samples(16, 8, lambda r, w: {"util_gpu": 95.0}, job="ref", node="r", seed=2)
    phase = job_samples(8, 8, lambda r, w: {"util_gpu": 99.0 if w < 3 else 70.0}, job="phase", node="p")
    heavy = job_samples(8, 8, slowed(after=0, clock=1500.0, flags=int(ClockReason.SW_POWER_CAP)), job="heavy",
                        node="h")
    dip = job_samples(8, 8, slowed(after=3, clock=1650.0, flags=0), job="dip", node="d")
    assert not firing(run(fleet + phase + heavy + dip, FleetDetector()), "slow_node")


def test_mixed_generation_names_the_waiting_model_and_its_waste() -> None:
    # H100 ranks pace: busy 90%; H200 ranks (1.4x faster) are busy 90 / 1.4 = 64%.
    def fn(r: int, w: int) -> dict[str, object]:
        return {"util_gpu": 90.0 if r < 8 else 90.0 / 1.4}
    events = run(job_samples(24, 5, fn, models=lambda r: "H100" if r < 8 else "H200"), FleetDetector())
    [(w, f)] = firing(events, "mixed_generation")
    assert w == 1 and f.job == "llm" and f.rank is None
    assert (f.evidence["slow_model"], f.evidence["fast_model"]) == ("H100", "H200")
    assert f.cost["fast_rank_waste_share"] == pytest.approx(1 - 1 / 1.4, abs=0.03)
    assert firing(events, "straggler") == []  # the slower model is not a straggler among its own peers


def test_allocated_idle_gpu_and_stalled_job_are_told_apart() -> None:
    def fn(r: int, w: int) -> dict[str, object]:
        if r == 5:
            return {"util_gpu": 0.0, "power_w": 125.0}  # left out of the job from the start
        if 4 <= w < 8:
            return {"util_gpu": 0.0, "power_w": 125.0}  # whole job stalled
        return {"util_gpu": 80.0}
    events = run(job_samples(8, 12, fn), FleetDetector())
    idle = firing(events, "idle_allocated")
    assert [(w, f.rank) for w, f in idle] == [(1, 5)]
    [(w, stalled)] = firing(events, "job_stalled")
    assert w == 5 and stalled.job == "llm" and stalled.cost["gpu_s_idle"] == 80.0
    assert [w for w, _ in resolved(events, "job_stalled")] == [9]


def test_job_idle_from_its_start_is_one_allocated_idle_finding_not_a_stall() -> None:
    events = run(job_samples(4, 4, lambda r, w: {"util_gpu": 0.0}), FleetDetector())
    [(w, f)] = firing(events, "idle_allocated")
    assert w == 1 and (f.job, f.rank, f.gpu) == ("llm", None, None) and f.evidence["ranks"] == 4
    assert f.cost["gpu_s_idle"] == 40.0
    assert firing(events, "job_stalled") == []


def test_xid_fires_on_its_window_and_resolves_after_clean_windows() -> None:
    def fn(r: int, w: int) -> dict[str, object]:
        return {"util_gpu": 80.0, "xid": 79 if (r == 2 and w == 1) else None}
    events = run(job_samples(4, 7, fn), FleetDetector())
    [(w, f)] = firing(events, "xid")
    assert w == 1 and (f.node, f.gpu) == ("n0", 2) and f.evidence["xid"] == 79
    assert [w for w, _ in resolved(events, "xid")] == [4]


def test_gpu_that_stops_reporting_fires_after_n_windows_and_resolves_when_back() -> None:
    def fn(r: int, w: int) -> dict[str, object] | None:
        return None if (r == 3 and 2 <= w < 6) else {"util_gpu": 80.0}
    events = run(job_samples(8, 9, fn), FleetDetector())
    [(w, f)] = firing(events, "silent_gpu")
    assert w == 3 and (f.node, f.gpu, f.rank) == ("n0", 3, 3)
    assert [w for w, _ in resolved(events, "silent_gpu")] == [6]


def test_a_job_that_ends_is_not_a_set_of_silent_gpus() -> None:
    # Job "llm" (node n0) ends after 4 windows while job "keep" (node n1) runs on. Its GPUs then go on
    # unallocated, keyed by node in stage 2, so to another partition: this detector sees them no more.
    ended = job_samples(8, 4, lambda r, w: {"util_gpu": 80.0})
    kept = [NodeSample(ts=s.ts, cluster="c", node="n1", gpus=s.gpus)
            for s in job_samples(8, 10, lambda r, w: {"util_gpu": 80.0}, job="keep")]
    events = run(ended + kept, FleetDetector())
    assert firing(events, "silent_gpu") == []


def test_gpus_scraped_every_30_s_into_10_s_windows_are_not_silent_until_they_stop() -> None:
    # Three nodes scraped 10 s apart (dcgm-exporter every 30 s): each window holds one node.
    def scraped(samples: list[NodeSample]) -> list[NodeSample]:
        return [s for s in samples if int(s.ts - T0) % 30 == 1 + 10 * int(s.node[1:])]
    steady = scraped(job_samples(24, 12, lambda r, w: {"util_gpu": 80.0}))
    assert firing(run(steady, FleetDetector()), "silent_gpu") == []
    rank_2_stops = scraped(job_samples(24, 12, lambda r, w: None if (r == 2 and w >= 6) else {"util_gpu": 80.0}))
    assert [f.rank for _, f in firing(run(rank_2_stops, FleetDetector()), "silent_gpu")] == [2]


def test_a_job_stalled_longer_than_the_memory_horizon_stays_one_stall() -> None:
    config = DetectorConfig(forget_after_windows=5)
    events = run(job_samples(4, 14, lambda r, w: {"util_gpu": 80.0 if w < 2 else 0.0, "power_w": 125.0}),
                 FleetDetector(config))
    assert [w for w, _ in firing(events, "job_stalled")] == [3]
    assert resolved(events, "job_stalled") == [] and firing(events, "idle_allocated") == []


def test_baseline_pages_the_victims_not_the_culprit() -> None:
    samples = job_samples(16, 6, straggler_job(culprit=9, onset=1, until=6, slowdown=1.6, healthy=70.0))
    ranks = {f.rank for _, f in firing(run(samples, LowUtilizationBaseline(50.0)), "low_utilization")}
    assert 9 not in ranks and len(ranks) == 15
    assert {f.rank for _, f in firing(run(samples, FleetDetector()), "straggler")} == {9}


def test_detector_state_round_trips_through_a_dict_mid_episode() -> None:
    samples = job_samples(16, 8, straggler_job(culprit=4, onset=2, until=8, slowdown=1.3))
    w = Windower(WINDOW_S)
    closed = [c for s in samples for c in (w.add(s), w.pop_closed())[1]] + w.flush()
    first, restored_events = FleetDetector(), []
    for c in closed[:3]:  # onset window 2 seen once: not firing yet
        assert first.observe(c.window_start, c.window_s, c.gpu_results()) == []
    restored = FleetDetector.from_dict(first.to_dict(), DetectorConfig())
    for c in closed[3:]:
        restored_events += restored.observe(c.window_start, c.window_s, c.gpu_results())
    assert [(f.kind, f.rank, f.window_start) for f in restored_events] == [("straggler", 4, T0 + 30)]
    assert [f.rank for f in restored.firing()] == [4]


# --- the registry: a detector is one function and one entry ----------------------------------

def hot_ranks(job: JobView) -> list[Finding]:
    """A toy detector: every rank of a job above 95% util."""
    return [Finding(kind="hot_rank", state="firing", cluster=job.cluster, job=job.job, rank=r.labels.rank,
                    node=r.labels.node, gpu=r.labels.gpu, window_start=job.window.start, window_end=job.window.end,
                    summary=f"rank {r.labels.rank} runs hot", evidence={"util_pct": round(r.util_mean, 1)})
            for r in job.ranks if r.util_mean > 95.0]


HOT_RANK = Detector("hot_rank", hot_ranks, "job", fire_after=1, clear_after=1, samples=(
    ({"cluster": "c", "job": "j", "rank": 1, "node": "n0", "gpu": 1}, {"util_pct": 99.0}, {}),))


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> Detector:
    monkeypatch.setitem(DETECTORS, HOT_RANK.kind, HOT_RANK)
    return HOT_RANK


def test_a_registered_toy_detector_fires_and_resolves(toy_registered: Detector) -> None:
    events = run(job_samples(4, 6, lambda r, w: {"util_gpu": 99.0 if (r == 2 and 1 <= w < 4) else 60.0}, noise=0.5),
                 FleetDetector())
    assert [(w, f.rank) for w, f in firing(events, "hot_rank")] == [(1, 2)]  # fire_after 1: its first window
    assert [(w, f.rank) for w, f in resolved(events, "hot_rank")] == [(4, 2)]


def test_a_registered_toy_detector_is_accepted_by_rules_check_and_scored_by_eval(toy_registered: Detector) -> None:
    rule = ("receivers: [{name: hook, kind: webhook, url_env: X}]\nroute: {receiver: hook}\nrules:\n"
            "  - name: HotRank\n    finding: {kind: hot_rank}\n    annotations: {summary: '{{ evidence.util_pct - 95 }} over'}\n")
    config, errors = check_text(rule, "rules.yaml")
    assert errors == [] and config is not None
    _, errors = check_text(rule.replace("util_pct", "utilpct"), "rules.yaml")  # rendered on its samples' evidence
    assert [e.message for e in errors] == ["template failed on a sample: UndefinedError: 'dict object' has no "
                                           "attribute 'utilpct'"]

    truth = FaultTruth(scenario="s", kind="hot_rank", cluster="c", job="j", rank=2, start=T0, end=T0 + 30)
    [finding] = [f for _, f in firing(run(job_samples(4, 3, lambda r, w: {"util_gpu": 99.0 if r == 2 else 60.0},
                                                      job="j", noise=0.5), FleetDetector()), "hot_rank")]
    scores = score([finding], [], [truth], WINDOW_S)
    assert scores["laggard"]["hot_rank"]["recall"] == 1.0 and scores["laggard"]["hot_rank"]["precision"] == 1.0


def test_rules_on_an_unregistered_kind_are_refused() -> None:
    rule = ("receivers: [{name: hook, kind: webhook, url_env: X}]\nroute: {receiver: hook}\nrules:\n"
            "  - name: HotRank\n    finding: {kind: hot_rank}\n    annotations: {summary: hot}\n")
    _, errors = check_text(rule, "rules.yaml")
    assert "unknown finding kind 'hot_rank'" in str(errors[0])


def test_active_findings_are_each_window_a_finding_is_going_on_in_from_firing_to_its_last_hit() -> None:
    """What dashboards read as 'active' (a finding_active point per window): every window from the
    one it fires in to the last one its condition held, with that window's cost; none while it
    clears or after it resolved, and nothing before it fired."""
    detector, w = FleetDetector(), Windower(WINDOW_S, grace_s=2.0)
    active: dict[int, list[Finding]] = {}
    for sample in job_samples(32, 10, straggler_job(culprit=17, onset=3, until=7, slowdown=1.4)):
        w.add(sample)
        for closed in w.pop_closed():
            detector.observe(closed.window_start, closed.window_s, closed.gpu_results())
            active[int((closed.window_start - T0) // WINDOW_S)] = detector.active()
    assert {window for window, found in active.items() if found} == {4, 5, 6}
    assert all([(f.kind, f.rank) for f in active[window]] == [("straggler", 17)] for window in (4, 5, 6))
    assert [active[window][0].window_start for window in (4, 5, 6)] == [T0 + 40, T0 + 50, T0 + 60]
    assert all(active[window][0].cost["peer_gpu_s_wasted"] > 0 for window in (4, 5, 6))
