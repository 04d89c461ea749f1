"""Event-time windows: assignment, closing by watermark, late samples, metrics, roll-ups, merging."""

from __future__ import annotations

import pytest

from laggard.agents.windows import GpuAccumulator, Windower, windows_of
from laggard.events import ClockReason, GpuSample, NodeSample

T0 = 1_790_000_000.0  # a window boundary for 10 s windows


def gpu_sample(index: int = 0, util: float = 50.0, **over: object) -> GpuSample:
    fields: dict[str, object] = dict(
        index=index, uuid=f"GPU-{index}", model="H200", job=None, rank=None, util_gpu=util, util_mem=10.0,
        power_w=400.0, power_limit_w=700.0, sm_clock_mhz=1980.0, mem_clock_mhz=3201.0, temp_c=50.0,
        mem_used_mib=1000.0, mem_total_mib=143_771.0,
    )
    fields.update(over)
    return GpuSample(**fields)


def node_sample(ts: float, *gpus: GpuSample, node: str = "n0", cluster: str = "c") -> NodeSample:
    return NodeSample(ts=ts, cluster=cluster, node=node, gpus=list(gpus))


def test_window_start_is_floor_of_event_time() -> None:
    w = Windower(10.0)
    assert w.window_start(T0 + 9.999) == T0
    assert w.window_start(T0 + 10.0) == T0 + 10.0
    assert w.window_start(T0 - 0.5) == T0 - 10.0


def test_window_closes_only_when_watermark_passes_its_end() -> None:
    w = Windower(10.0, grace_s=3.0)
    w.add(node_sample(T0 + 1, gpu_sample()))
    w.add(node_sample(T0 + 12, gpu_sample()))  # watermark 9: first window still open
    assert w.pop_closed() == []
    w.add(node_sample(T0 + 13, gpu_sample()))  # watermark 10 = end of the first window
    closed = w.pop_closed()
    assert [c.window_start for c in closed] == [T0]
    assert w.pop_closed() == []  # returned once


def test_late_sample_within_grace_lands_in_its_window_and_later_ones_are_counted() -> None:
    w = Windower(10.0, grace_s=3.0)
    w.add(node_sample(T0 + 1, gpu_sample(util=10)))
    w.add(node_sample(T0 + 12, gpu_sample(util=10)))
    assert w.add(node_sample(T0 + 9, gpu_sample(util=90))) is True  # within grace
    w.add(node_sample(T0 + 14, gpu_sample(util=10)))
    [closed] = w.pop_closed()
    [res] = closed.gpu_results()
    assert res.samples == 2 and res.util_mean == pytest.approx(50.0)
    late = node_sample(T0 + 5, gpu_sample(0), gpu_sample(1))
    assert w.add(late) is False
    assert w.late_samples == 2


def test_flush_closes_everything_and_later_samples_for_those_windows_are_late() -> None:
    w = Windower(10.0, grace_s=100.0)
    for t in (1, 11, 21):
        w.add(node_sample(T0 + t, gpu_sample()))
    assert [c.window_start for c in w.flush()] == [T0, T0 + 10, T0 + 20]
    assert w.add(node_sample(T0 + 25, gpu_sample())) is False
    assert w.late_samples == 1


def test_gpu_metrics_over_a_window() -> None:
    w = Windower(10.0)
    utils = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    for i, u in enumerate(utils):
        reasons = int(ClockReason.SW_POWER_CAP) if i < 3 else int(ClockReason.GPU_IDLE)
        if i == 9:
            reasons = int(ClockReason.HW_THERMAL | ClockReason.HW_SLOWDOWN)
        w.add(node_sample(T0 + i, gpu_sample(util=u, power_w=120 + 58 * i, sm_clock_mhz=1500 + i * 10,
                                             temp_c=40 + i, clocks_event_reasons=reasons, xid=79 if i == 4 else None)))
    [closed] = w.flush()
    [r] = closed.gpu_results()
    assert r.samples == 10
    assert r.util_mean == pytest.approx(45.0)
    assert (r.util_min, r.util_max) == (0.0, 90.0)
    assert r.util_p50 == 40.0 and r.util_p95 == 90.0
    assert r.sm_clock_mhz_mean == pytest.approx(1545.0)
    assert r.temp_c_max == 49.0
    assert r.throttled_share == pytest.approx(0.4)
    assert r.throttle_share["power_cap"] == pytest.approx(0.3)
    assert r.throttle_share["hw_thermal"] == pytest.approx(0.1)
    assert r.throttle_share["hw_slowdown"] == pytest.approx(0.1)
    assert (r.xid_count, r.xid_last) == (1, 79)
    # power share mean = mean(58 i) / 580 = 0.45; util mean 0.45: effective is the lower, 0.45.
    assert r.effective_util == pytest.approx(0.45)
    # no energy counter: power x 1 s intervals for the 9 samples after the first
    assert r.energy_wh == pytest.approx(sum(120 + 58 * i for i in range(1, 10)) / 3600)


def test_energy_prefers_counter_deltas_and_falls_back_on_reset() -> None:
    w = Windower(10.0)
    w.add(node_sample(T0 + 0, gpu_sample(power_w=500, energy_j=1000.0)))
    w.add(node_sample(T0 + 1, gpu_sample(power_w=500, energy_j=1360.0)))  # 360 J = 0.1 Wh
    w.add(node_sample(T0 + 2, gpu_sample(power_w=720, energy_j=5.0)))  # counter reset: 720 W x 1 s
    [closed] = w.flush()
    [r] = closed.gpu_results()
    assert r.energy_wh == pytest.approx(0.1 + 0.2)


def test_sm_active_overrides_the_power_estimate() -> None:
    w = Windower(10.0)
    for i in range(4):
        w.add(node_sample(T0 + i, gpu_sample(util=97, power_w=680, sm_active=0.4)))
    [closed] = w.flush()
    assert closed.gpu_results()[0].effective_util == pytest.approx(0.4)


def test_rollups_and_fleet_kpi() -> None:
    w = Windower(10.0)
    for t in range(5):
        w.add(node_sample(T0 + t, gpu_sample(0, 90, job="j", rank=0), gpu_sample(1, 0, job="j", rank=1), node="a"))
        w.add(node_sample(T0 + t, gpu_sample(0, 30, model="H100"), node="b"))
    [closed] = w.flush()
    res = {(r.scope, r.key): r for r in closed.results()}
    assert len([k for k in res if k[0] == "gpu"]) == 3
    cluster = res[("cluster", "c")]
    assert cluster.gpus == 3 and cluster.allocated_gpus == 2 and cluster.idle_allocated_gpus == 1
    assert cluster.util_mean == pytest.approx(40.0)
    assert res[("job", "c/j")].gpus == 2 and res[("job", "c/j")].util_mean == pytest.approx(45.0)
    assert res[("node", "c/a")].labels.node == "a"
    assert res[("model", "c/H100")].gpus == 1
    # fleet effective utilization is the sample-weighted mean of per-GPU estimates
    gpus = [r for r in closed.gpu_results()]
    assert cluster.effective_util == pytest.approx(sum(g.effective_util for g in gpus) / 3)
    assert len({r.id for r in closed.results()}) == len(closed.results())


def test_ids_are_deterministic() -> None:
    def run() -> list[str]:
        w = Windower(10.0)
        w.add(node_sample(T0 + 3, gpu_sample(0, job="j", rank=0)))
        return sorted(r.id for c in w.flush() for r in c.results())

    assert run() == run()
    assert "gpu:c/n0/0@j#0:1790000000000" in run()


def test_accumulators_add_up_to_the_same_result_as_one_stream() -> None:
    samples = [node_sample(T0 + t, gpu_sample(util=10 * t, power_w=200 + 40 * t, temp_c=40 + t)) for t in range(10)]
    whole = next(iter(windows_of(samples, Windower(10.0)))).series
    halves = [next(iter(windows_of(part, Windower(10.0)))).series for part in (samples[:5], samples[5:])]
    [key] = halves[0]
    merged = GpuAccumulator.total([halves[0][key], halves[1][key]])
    expect = whole[key]
    assert merged.samples == expect.samples
    assert merged.util_hist == expect.util_hist
    assert (merged.util_min, merged.util_max, merged.temp_max) == (expect.util_min, expect.util_max, expect.temp_max)
    assert merged.power_share_sum == pytest.approx(expect.power_share_sum)
    assert merged.effective() == pytest.approx(expect.effective())


def test_empty_accumulator_has_zero_effective_utilization() -> None:
    assert GpuAccumulator().effective() == 0.0


def test_invalid_window_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="window_s"):
        Windower(0.0)


def test_estimated_power_is_carried_as_a_share_and_written_only_where_there_is_some() -> None:
    """A source that estimates power (a board-default limit, a MIG instance's share) says so, and
    the window and its InfluxDB point say how much of it was estimated."""
    from laggard.agents.points import window_line

    w = Windower(10.0)
    for t in range(10):
        w.add(node_sample(T0 + t, gpu_sample(0, power_estimated=t < 4), gpu_sample(1)))
    results = {r.labels.gpu: r for r in w.flush()[0].gpu_results()}
    assert results[0].power_estimated_share == pytest.approx(0.4) and results[1].power_estimated_share == 0.0
    assert "power_estimated_share=0.4" in window_line(results[0])
    assert "power_estimated" not in window_line(results[1])
