"""Schema version 2 (laggard/batches.py): encode/decode, rejects, and the columnar window path
(`Windower.add_batch`) against the per-sample one (`Windower.add`) on the same samples."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laggard.agents.windows import Windower
from laggard.batches import NodeBatch, batch_of, decode_event
from laggard.events import EventRejected, GpuSample, NodeSample, encode

T0 = 1_790_000_000.0


def gpu(index: int, util: float = 90.0, **over: object) -> GpuSample:
    fields = {"index": index, "uuid": f"GPU-{index}", "model": "H200", "job": "llm", "rank": index,
              "util_gpu": util, "power_w": 600.0, "power_limit_w": 700.0} | over
    return GpuSample(**fields)


def samples_of(ticks: int, gpus: int = 4, step: float = 1.0, start: float = T0) -> list[NodeSample]:
    return [NodeSample(ts=start + i * step, cluster="c", node="n0", source="test",
                       gpus=[gpu(g, util=float((i * 7 + g * 13) % 101), energy_j=1000.0 * i + g, temp_c=50.0 + g)
                             for g in range(gpus)])
            for i in range(ticks)]


def test_a_batch_round_trips_to_the_same_samples() -> None:
    samples = samples_of(10)
    raw = encode(batch_of(samples, until=T0 + 10))
    assert raw.startswith(b'{"v":2,')
    decoded = decode_event(raw)
    assert isinstance(decoded, NodeBatch) and decoded.until == T0 + 10
    assert decoded.samples() == samples and decoded.sample_count == 40


def test_version_1_messages_are_still_accepted() -> None:
    sample = samples_of(1)[0]
    assert decode_event(encode(sample)) == sample


def test_a_batch_whose_version_is_not_written_first_is_still_a_batch() -> None:
    data = json.loads(encode(batch_of(samples_of(3))))
    data["v"] = data.pop("v")
    assert isinstance(decode_event(json.dumps(data)), NodeBatch)


def _reject(data: dict) -> str:
    with pytest.raises(EventRejected) as err:
        decode_event(json.dumps(data).encode())
    return err.value.reason


def test_rejects_name_the_column_the_tick_and_the_value() -> None:
    data = json.loads(encode(batch_of(samples_of(3))))
    data["util_gpu"][1][2] = 104.5
    assert _reject(data) == "util_gpu.1.2 = 104.5: Input should be less than or equal to 100"


@pytest.mark.parametrize(("change", "words"), [
    (lambda d: d["power_w"][0].pop(), "power_w.0 has 2 values for 3 ticks"),
    (lambda d: d["power_w"].pop(), "power_w has 3 rows for 4 GPUs"),
    (lambda d: d["ts"].reverse(), "ts[1] = 1790000001.0 does not come after ts[0] = 1790000002.0"),
    (lambda d: d["power_w"][0].__setitem__(1, None), "must be present or null (a silent GPU) at the same ticks"),
    (lambda d: d.__setitem__("until", d["ts"][0]), "until = 1790000000.0 must lie within"),
    (lambda d: d["gpus"].append(dict(d["gpus"][0])), "GPU 0 appears twice in one batch"),
    (lambda d: d["util_gpu"][0].__setitem__(0, "97"), "util_gpu.0.0 = '97': Input should be a valid number"),
    (lambda d: d.__setitem__("v", True), "schema version must be the integer 1, got True"),
])
def test_malformed_batches_are_rejected_with_what_is_wrong(change, words: str) -> None:
    data = json.loads(encode(batch_of(samples_of(3))))
    change(data)
    assert words in _reject(data)


def test_a_gpu_silent_at_some_ticks_has_nulls_there() -> None:
    samples = samples_of(3)
    samples[1] = samples[1].model_copy(update={"gpus": samples[1].gpus[1:]})
    batch = decode_event(encode(batch_of(samples)))
    assert batch.util_gpu[0][1] is None and batch.power_w[0][1] is None and batch.sample_count == 11
    assert batch.samples() == samples


# --- the columnar window path gives what the per-sample path gives ---------------------------------

_optional = st.none() | st.integers(0, 100).map(float)


@st.composite
def node_runs(draw: st.DrawFn) -> list[NodeSample]:
    """One node's samples: ticks a random step apart (crossing windows), GPUs silent at random,
    optional columns present or not, counters that sometimes go back, throttles and XIDs."""
    gpus = draw(st.integers(1, 4))
    ticks = draw(st.integers(1, 25))
    step = draw(st.sampled_from([0.5, 1.0, 3.0, 7.0, 150.0]))
    models = draw(st.lists(st.sampled_from(["H200", "H100", "GB200"]), min_size=gpus, max_size=gpus))
    out = []
    for i in range(ticks):
        row = []
        for g in range(gpus):
            if draw(st.booleans()) and draw(st.booleans()) and draw(st.booleans()):
                continue  # silent this tick
            row.append(GpuSample(
                index=g, uuid=f"GPU-{g}", model=models[g], job="llm" if g % 2 == 0 else None,
                rank=g if g % 2 == 0 else None, power_estimated=g == 3,
                util_gpu=draw(st.floats(0, 100, allow_nan=False)), power_w=draw(st.floats(0, 900, allow_nan=False)),
                power_limit_w=draw(st.sampled_from([100.0, 500.0, 700.0, 1000.0])),
                sm_clock_mhz=draw(_optional), temp_c=draw(_optional),
                sm_active=draw(st.none() | st.floats(0, 1)),
                energy_j=draw(st.none() | st.floats(0, 1e6, allow_nan=False)),
                clocks_event_reasons=draw(st.sampled_from([0, 0x4, 0x20 | 0x1, 0x48, 0x80])),
                xid=draw(st.sampled_from([None, None, 0, 79, 13])),
            ))
        if row:
            out.append(NodeSample(ts=T0 + 3.0 + i * step, cluster="c", node="n0", source="t", gpus=row))
    return out


def _results(windower: Windower, closed: list) -> dict[tuple[float, str], dict]:
    closed += windower.flush()
    return {(w.window_start, r.id): r.model_dump() for w in closed for r in w.results()}


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=node_runs(), chunk=st.integers(1, 12), grace=st.sampled_from([0.0, 5.0]))
def test_batches_give_the_results_samples_give(samples: list[NodeSample], chunk: int, grace: float) -> None:
    if not samples:
        return
    one_by_one, batched = Windower(10.0, grace), Windower(10.0, grace)
    closed_a: list = []
    closed_b: list = []
    for sample in samples:
        one_by_one.add(sample)
        closed_a += one_by_one.pop_closed()
    for i in range(0, len(samples), chunk):
        fed, late = batched.add_batch(batch_of(samples[i : i + chunk]))
        assert late == 0 and fed
        closed_b += batched.pop_closed()
    expected, got = _results(one_by_one, closed_a), _results(batched, closed_b)
    assert expected.keys() == got.keys()
    for key in expected:
        differ = {k: (v, got[key][k]) for k, v in expected[key].items() if not _same(v, got[key][k])}
        assert not differ, (key, differ)
    assert batched._last == one_by_one._last


def test_late_samples_of_a_batch_are_counted_and_the_rest_is_taken() -> None:
    windower = Windower(10.0, 0.0)
    windower.add_batch(batch_of(samples_of(12, gpus=2, start=T0 + 20)))  # ticks 20..31: window 20 closes
    assert [w.window_start for w in windower.pop_closed()] == [T0 + 20]
    fed, late = windower.add_batch(batch_of(samples_of(10, gpus=2, start=T0 + 25)))  # ticks 25..34
    assert (fed, late, windower.late_samples) == ([T0 + 30], 2 * 5, 2 * 5)


# --- the per-node watermark ---------------------------------------------------------------------------

def _node_batch(node: str, start: float, ticks: int = 10, until: float | None = None) -> NodeBatch:
    samples = [s.model_copy(update={"node": node}) for s in samples_of(ticks, gpus=2, start=start)]
    return batch_of(samples, until=until)


def _started(nodes: tuple[str, ...] = ("a", "b", "c")) -> Windower:
    """Every node has sent window T0 and the first node window T0 + 10: T0 closed by the grace
    (the first window does: a worker that just started has not heard from every node)."""
    windower = Windower(10.0, grace_s=5.0)
    for node in nodes:
        windower.add_batch(_node_batch(node, T0, until=T0 + 10))
        assert windower.pop_closed() == []
    windower.add_batch(_node_batch(nodes[0], T0 + 10, until=T0 + 20))
    assert [w.window_start for w in windower.pop_closed()] == [T0]
    return windower


def test_a_window_closes_once_every_node_has_reported_past_its_end() -> None:
    windower = _started()
    windower.add_batch(_node_batch("b", T0 + 10, until=T0 + 20))
    assert windower.pop_closed() == []
    windower.add_batch(_node_batch("c", T0 + 10, until=T0 + 20))
    # the grace alone would wait for a sample stamped T0 + 25, a flush interval later
    assert [w.window_start for w in windower.pop_closed()] == [T0 + 10]
    assert windower.watermark < T0 + 20


def test_a_quiet_node_holds_one_window_back_until_the_grace_then_no_more() -> None:
    windower = _started()
    windower.add_batch(_node_batch("b", T0 + 10, until=T0 + 20))  # c says nothing more
    assert windower.pop_closed() == []
    windower.add_batch(_node_batch("a", T0 + 20, until=T0 + 30))  # ticks to 29: the grace closes T0 + 10
    assert [w.window_start for w in windower.pop_closed()] == [T0 + 10]
    windower.add_batch(_node_batch("b", T0 + 20, until=T0 + 30))  # c no longer counts
    assert [w.window_start for w in windower.pop_closed()] == [T0 + 20]


def test_a_worker_that_just_started_waits_out_the_grace_once() -> None:
    windower = Windower(10.0, grace_s=5.0)
    windower.add_batch(_node_batch("a", T0, until=T0 + 10))
    assert windower.pop_closed() == []  # b, not heard from yet, may still send window T0


def test_a_version_1_node_keeps_the_grace() -> None:
    windower = _started(("a", "b"))
    windower.add(samples_of(1, start=T0 + 19)[0].model_copy(update={"node": "old"}))
    windower.add_batch(_node_batch("b", T0 + 10, until=T0 + 20))
    assert windower.pop_closed() == []  # every batch node is past T0 + 20, but "old" promised nothing
    windower.add(samples_of(1, start=T0 + 25)[0].model_copy(update={"node": "old"}))
    assert [w.window_start for w in windower.pop_closed()] == [T0 + 10]


@pytest.mark.parametrize("scenario", ["straggler", "all_faults"])
def test_detection_on_batches_finds_what_it_finds_on_samples(scenario: str) -> None:
    """The whole offline pipeline (windows, outputs, stage 2) on the simulator's batches and on its
    version-1 messages: the same findings, in the same windows."""
    from pathlib import Path

    from laggard.agents.offline import detect_offline
    from laggard.collectors.simulate import FleetSimulator, load_scenario

    spec = load_scenario(Path(__file__).parents[1] / f"collectors/scenarios/{scenario}.yaml")

    def findings(flush_s: float) -> list[tuple]:
        messages = (value for _ts, batch in FleetSimulator(spec, start_ts=T0).encoded(flush_s) for _key, value in batch)
        return sorted((f.kind, f.state, f.job, f.rank, f.node, f.gpu, f.window_start)
                      for f in detect_offline(messages, 10.0, 5.0))

    on_samples = findings(0.0)
    assert on_samples and findings(10.0) == on_samples
    assert {"straggler"} <= {kind for kind, *_ in on_samples}


# --- the collectors' batcher ------------------------------------------------------------------------

def test_the_batcher_flushes_each_node_at_the_end_of_its_interval() -> None:
    from laggard.collectors.batching import Batcher

    batcher = Batcher(10.0)
    a = samples_of(25, gpus=2, start=T0 + 3)  # ticks 3..27
    b = [s.model_copy(update={"node": "n1"}) for s in a]
    out = [batch for sa, sb in zip(a, b) for batch in batcher.add([sa, sb])]
    assert [(x.node, x.ts[0], x.ts[-1], x.until) for x in out] == [
        ("n0", T0 + 3, T0 + 9, T0 + 10), ("n1", T0 + 3, T0 + 9, T0 + 10),
        ("n0", T0 + 10, T0 + 19, T0 + 20), ("n1", T0 + 10, T0 + 19, T0 + 20)]
    rest = batcher.flush()  # the source stopped: what is held goes, promising nothing past its last tick
    assert [(x.node, x.ts[0], x.ts[-1], x.until) for x in rest] == [("n0", T0 + 20, T0 + 27, None),
                                                                    ("n1", T0 + 20, T0 + 27, None)]
    assert [s for x in out + rest for s in x.samples() if s.node == "n0"] == a
    assert batcher.flush() == []


def test_the_batcher_flushes_early_when_a_gpu_changes_job_or_the_batch_is_full() -> None:
    from laggard.collectors.batching import Batcher

    samples = samples_of(6, gpus=2)
    relabelled = samples[3].model_copy(update={"gpus": [samples[3].gpus[0].model_copy(update={"job": "other"}),
                                                        samples[3].gpus[1]]})
    batcher = Batcher(10.0)
    out = [batch for s in [*samples[:3], relabelled, *samples[4:]] for batch in batcher.add([s])]
    # GPU 0 ran another job for one tick: a batch ends each time its labels change
    assert [(len(x.ts), x.gpus[0].job, x.until) for x in out] == [(3, "llm", None), (1, "other", None)]
    assert [(len(x.ts), x.gpus[0].job) for x in batcher.flush()] == [(2, "llm")]
    full = Batcher(10.0, max_samples=4)  # two ticks of two GPUs
    sizes = [len(x.ts) for s in samples for x in full.add([s])] + [len(x.ts) for x in full.flush()]
    assert sizes == [2, 2, 2]
