"""The worker's stage bookkeeping without Kafka: markers release complete windows only, and a
checkpointed sample stage rebuilt from its replay neither loses nor double-counts a sample."""

from __future__ import annotations

from agents.stages import PendingWindows, SampleStage
from agents.windows import Windower
from tests.helpers.samples import node_sample


def _result(node: str, start: float):
    windower = Windower(10.0)
    for t in range(10):
        windower.add(node_sample(node=node, gpus=1, ts=start + t))
    return windower.flush()[0].gpu_results()[0]


def test_window_released_only_when_every_upstream_partition_marked_it():
    pending = PendingWindows(window_s=10.0, hold_s=60.0, parts=2)
    pending.add(_result("a", 1_790_000_000.0), "a", offset=0)
    assert pending.mark(0, 1_790_000_010.0, offset=1) == []  # partition 1 has not closed it yet
    pending.add(_result("b", 1_790_000_000.0), "b", offset=2)
    released = pending.mark(1, 1_790_000_010.0, offset=3)
    assert [sorted(r.labels.node for r in window) for window in released] == [["a", "b"]]
    pending.add(_result("c", 1_790_000_000.0), "c", offset=4)  # arrives after release
    assert pending.too_late == 1 and pending.pending == {}


def test_restored_stage_rebuilds_open_windows_exactly():
    t0 = 1_790_000_000.0
    messages = [node_sample(node=f"n{i % 3}", gpus=2, ts=t0 + i // 3, util_gpu=float(i % 100)).model_dump_json().encode()
                for i in range(3 * 25)]  # 25 ticks of 3 nodes: windows [0,10) [10,20) [20,30)
    whole = SampleStage(window_s=10.0, grace_s=2.0)
    for offset, raw in enumerate(messages):
        whole.add(raw, offset)
    expected = {(w.window_start, k): a.samples for w in whole.closed() + whole.windower.flush() for k, a in w.series.items()}

    first = SampleStage(window_s=10.0, grace_s=2.0)
    emitted = {}
    for offset, raw in enumerate(messages[:50]):
        first.add(raw, offset)
        for w in first.closed():
            emitted.update({(w.window_start, k): a.samples for k, a in w.series.items()})
    checkpoint = first.checkpoint()
    assert 0 < checkpoint["replay_from"] < 50  # a window was still open when it "crashed"

    second = SampleStage(window_s=10.0, grace_s=2.0)
    second.restore(checkpoint)
    outcomes = [second.add(raw, offset) for offset, raw in enumerate(messages) if offset >= checkpoint["replay_from"] - 5]
    assert not any(o.late or o.rejected for o in outcomes)  # re-taken samples are 'seen', not late
    for w in second.closed() + second.windower.flush():
        for k, a in w.series.items():
            assert (w.window_start, k) not in emitted
            emitted[(w.window_start, k)] = a.samples
    assert emitted == expected



def _fast_and_normal(stage: SampleStage, now: dict[str, float], ticks: int = 40) -> tuple[list, list]:
    """`ticks` seconds of a normal node (0.5 s behind `now`) and one 5 minutes ahead, on one
    partition; returns every outcome and the windows closed meanwhile."""
    outcomes, closed = [], []
    for _tick in range(ticks):
        now["t"] += 1.0
        for node, skew in (("normal", -0.5), ("fast", 300.0)):
            raw = node_sample(node=node, gpus=2, ts=now["t"] + skew).model_dump_json().encode()
            outcomes.append(stage.add(raw, len(outcomes)))
        closed += stage.closed()
    return outcomes, closed


def test_a_collector_minutes_ahead_does_not_make_its_partition_mates_late():
    """Samples stamped minutes ahead of the worker's clock do not move event time: the fast node's
    samples wait in their (future) windows, the normal node's windows close on time and none of
    its samples is late."""
    now = {"t": 1_790_000_000.0}
    stage = SampleStage(window_s=10.0, grace_s=2.0, clock=lambda: now["t"])
    outcomes, closed = _fast_and_normal(stage, now)
    assert not any(o.late or o.rejected for o in outcomes)
    normal = [a.samples for w in closed for k, a in w.series.items() if k[1] == "normal"]
    assert len(normal) >= 3 and set(normal) == {10}
    assert not any(key[1] == "fast" for w in closed for key in w.series)  # its windows are minutes ahead
    fast = [a.samples for w in stage.windower.flush() for k, a in w.series.items() if k[1] == "fast"]
    assert sum(fast) == 80  # ...and held, every sample, until their time


def test_without_a_clock_a_collector_minutes_ahead_makes_its_mates_late():
    """The same input with no clock to compare with: what the test above is protected from."""
    stage = SampleStage(window_s=10.0, grace_s=2.0)
    stage.windower.clock = None
    outcomes, _closed = _fast_and_normal(stage, {"t": 1_790_000_000.0})
    assert any(o.late for o in outcomes)
