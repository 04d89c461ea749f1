"""The worker's stage bookkeeping without Kafka: markers release complete windows only, and a
checkpointed sample stage rebuilt from its replay neither loses nor double-counts a sample."""

from __future__ import annotations

import json

from laggard.agents.outputs import window_outputs
from laggard.agents.stages import FleetStage, PendingWindows, SampleStage, parse_results
from laggard.agents.windows import Windower
from laggard.events import NodeSample
from tests.helpers.samples import gpu, node_sample


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


def test_window_outputs_group_ranks_by_job_and_mark_the_window_for_every_stage():
    t0 = 1_790_000_000.0
    windower = Windower(10.0)
    for t in range(10):
        windower.add(NodeSample(ts=t0 + t, cluster="c", node="a01",
                                gpus=[gpu(0, job="llm", rank=0), gpu(1, job="llm", rank=1)]))
        windower.add(NodeSample(ts=t0 + t, cluster="c", node="a02", gpus=[gpu(0, job="llm", rank=2), gpu(1)]))
    out = window_outputs(windower.flush()[0], partition=3)

    to_detect = {key: parse_results(value) for key, value in out.to_detect}
    assert sorted(to_detect) == [b"c/llm", b"c/node/a02"]  # the job's three ranks meet in one message
    assert sorted(r.labels.rank for r in to_detect[b"c/llm"]) == [0, 1, 2]
    assert json.loads(out.marker) == {"part": 3, "closed_before": t0 + 10, "heartbeat": False}
    assert [(key, json.loads(value)["part"], json.loads(value)["result"]["gpus"]) for key, value in out.fleet] == [(b"c", 3, 4)]
    measurements = sorted(line.split(",", 1)[0] for line in out.lines)
    assert measurements == ["gpu_window"] * 4 + ["node_window"] * 2


def test_restored_stage_rebuilds_open_windows_exactly():
    t0 = 1_790_000_000.0
    messages = [node_sample(node=f"n{i % 3}", gpus=2, ts=t0 + i // 3, util_gpu=float(i % 100)).model_dump_json().encode()
                for i in range(3 * 25)]  # 25 ticks of 3 nodes: windows [0,10) [10,20) [20,30)
    whole = SampleStage(window_s=10.0, grace_s=2.0)
    for offset, raw in enumerate(messages):
        whole.add(raw, offset)
    # Samples and energy per window and GPU: energy needs each GPU's previous sample, which after a
    # restart comes from the replayed end of the last emitted window.
    expected = {(w.window_start, k): (a.samples, round(a.energy_wh, 9))
                for w in whole.closed() + whole.windower.flush() for k, a in w.series.items()}

    first = SampleStage(window_s=10.0, grace_s=2.0)
    emitted = {}
    for offset, raw in enumerate(messages[:50]):
        first.add(raw, offset)
        for w in first.closed():
            emitted.update({(w.window_start, k): (a.samples, round(a.energy_wh, 9)) for k, a in w.series.items()})
    checkpoint = first.checkpoint()
    assert checkpoint["replay_from"] < 50 and first.windower.open_windows  # a window was open when it "crashed"

    second = SampleStage(window_s=10.0, grace_s=2.0)
    second.restore(checkpoint)
    outcomes = [second.add(raw, offset) for offset, raw in enumerate(messages) if offset >= checkpoint["replay_from"] - 5]
    assert not any(o.late or o.rejected for o in outcomes)  # re-taken samples are 'seen', not late
    for w in second.closed() + second.windower.flush():
        for k, a in w.series.items():
            assert (w.window_start, k) not in emitted
            emitted[(w.window_start, k)] = (a.samples, round(a.energy_wh, 9))
    assert emitted == expected



def test_a_message_delivered_again_is_counted_once():
    """Around a rebalance Faust can hand a stage messages it already took: they are `seen`, and
    the window's sample counts are those of one delivery."""
    t0 = 1_790_000_000.0
    messages = [node_sample(node=f"n{i % 2}", gpus=2, ts=t0 + i // 2).model_dump_json().encode() for i in range(2 * 12)]
    stage = SampleStage(window_s=10.0, grace_s=1.0)
    for offset, raw in enumerate(messages[:16]):
        stage.add(raw, offset)
    again = [stage.add(raw, offset) for offset, raw in list(enumerate(messages))[10:16]]
    assert all(o.seen and not (o.late or o.rejected) for o in again)
    for offset, raw in list(enumerate(messages))[16:]:
        stage.add(raw, offset)
    windows = stage.closed() + stage.windower.flush()
    assert {a.samples for w in windows for a in w.series.values()} == {10, 2}  # not 10 + the 6 again
    assert sum(a.samples for w in windows for a in w.series.values()) == 2 * 2 * 12


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


def test_a_partition_whose_collectors_all_run_fast_still_closes_its_windows():
    """Only samples 90 s ahead of the worker's clock: once that has lasted a minute of wall time,
    event time follows the clock, and the windows close as real time reaches their end."""
    now = {"t": 1_790_000_000.0}
    stage = SampleStage(window_s=10.0, grace_s=2.0, clock=lambda: now["t"])
    closed = []
    for _tick in range(300):
        now["t"] += 1.0
        stage.add(node_sample(node="fast", gpus=1, ts=now["t"] + 90.0).model_dump_json().encode(), _tick)
        closed += stage.closed()
    assert len(closed) >= 10 and all(w.window_end <= now["t"] for w in closed)
    assert stage.windower.late_samples == 0


def test_a_heartbeat_mark_from_a_partition_without_data_completes_the_windows():
    pending = PendingWindows(window_s=10.0, hold_s=15.0, parts=2)
    pending.add(_result("a", 1_790_000_000.0), "a", offset=0)
    assert pending.mark(0, 1_790_000_010.0, offset=1) == []  # partition 1 has said nothing yet
    quiet_since = pending.last_arrival
    released = pending.mark(1, 1_790_000_500.0, offset=2, heartbeat=True)  # its heartbeat: nothing before then
    assert [len(window) for window in released] == [1] and pending.too_late == 0
    assert pending.last_arrival == quiet_since  # a heartbeat is not activity: the quiet flush still comes


def test_the_fleet_stage_completes_a_cluster_window_once_every_partition_marked_it():
    fleet = FleetStage(window_s=10.0, hold_s=15.0, parts=3)
    start = 1_790_000_000.0
    fleet.pending("test").add(_result("a", start), "0", 0)  # partition 0 has nodes of cluster "test"
    assert fleet.mark(0, start + 10) == [] and fleet.mark(1, start + 10) == []
    fleet.pending("test").add(_result("b", start), "2", 0)  # partition 2's partial, before its mark
    [window] = fleet.mark(2, start + 10)
    assert sorted(r.labels.node for r in window) == ["a", "b"]


def test_a_gpu_that_changes_rank_within_a_window_is_two_series_to_stage_two():
    windower = Windower(10.0)
    for t in range(10):
        windower.add(node_sample(node="a", gpus=1, ts=1_790_000_000.0 + t, job="llm", rank=3 if t < 5 else 5))
    results = windower.flush()[0].gpu_results()
    assert sorted(r.labels.rank for r in results) == [3, 5] and len({r.id for r in results}) == 2


def test_a_sample_stamped_a_day_ahead_is_rejected_and_does_not_pin_the_replay_offset():
    """now + 23 h passes the schema (a day of tolerance for any reader) but not the worker's clock:
    windowed, it would hold its window open for 23 h, and with it where a restart re-reads from."""
    now = {"t": 1_790_000_000.0}
    stage = SampleStage(window_s=10.0, grace_s=2.0, clock=lambda: now["t"])
    outcome = stage.add(node_sample(node="broken", gpus=1, ts=now["t"] + 23 * 3600).model_dump_json().encode(), 0)
    assert outcome.rejected is not None and outcome.sample is None
    assert "stamped 82800 s ahead of the worker's clock" in outcome.rejected.reason
    assert "'broken'" in outcome.rejected.reason
    for offset in range(1, 40):
        now["t"] += 1.0
        assert not stage.add(node_sample(node="ok", gpus=1, ts=now["t"]).model_dump_json().encode(), offset).rejected
        stage.closed()
    assert stage.checkpoint()["replay_from"] >= 20  # the last closed window's first offset, not 0
    assert stage.add(node_sample(node="late-ok", gpus=1, ts=now["t"] + 600).model_dump_json().encode(), 40).sample


def test_messages_delivered_again_do_not_keep_a_quiet_partition_from_closing():
    """After a broker outage Faust's commit can stall behind what the stage has taken, and the worker
    seeks back to it every few seconds (`unstick`): those messages come again and again, but they are
    not news, so the partition's last windows still close on wall time (it held them for ever)."""
    t0 = 1_790_000_000.0
    stage = SampleStage(window_s=10.0, grace_s=2.0, clock=lambda: t0 + 60)
    raws = [node_sample(node="a", gpus=1, ts=t0 + t).model_dump_json().encode() for t in range(15)]
    for offset, raw in enumerate(raws):
        assert stage.add(raw, offset).sample is not None
    quiet_since = stage.last_arrival
    assert [w.window_end for w in stage.closed()] == [t0 + 10]
    for offset, raw in enumerate(raws):  # the seek back: all of it again
        assert stage.add(raw, offset).seen
    assert stage.last_arrival == quiet_since
    [last] = stage.close_idle(hold_s=15.0, now=quiet_since + 15.0)
    assert (last.window_start, sum(a.samples for a in last.series.values())) == (t0 + 10, 5)
