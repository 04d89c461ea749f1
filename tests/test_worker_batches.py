"""The worker on schema-2 batches (one message per node per flush interval), on the real broker:
the same findings as `laggard detect` makes of the same fleet's version-1 messages, and a bad
batch dead-lettered with the field, GPU row, tick and value that are wrong."""

from __future__ import annotations

import json
from pathlib import Path

from laggard.agents.offline import detect_offline
from laggard.collectors.publisher import Publisher
from laggard.collectors.simulate import FleetSimulator, load_scenario
from laggard.commands.pipeline_run import PipelineRun
from laggard.results import Finding

SCENARIO = "tests/scenarios/small_eval.yaml"


def identity(f: Finding) -> tuple[object, ...]:
    return f.kind, f.state, f.job, f.rank, f.node, f.gpu, f.window_start


def test_the_worker_finds_on_batches_what_it_finds_on_samples(stack, tmp_path: Path) -> None:
    with PipelineRun(stack, prefix="test-batches") as run:
        run.start_worker(tmp_path / "worker.log")
        run.publish_scenario(SCENARIO, flush_s=stack.window_s)
        batch = next(value for _ts, batch in FleetSimulator(load_scenario(Path(SCENARIO)), start_ts=run.start_ts)
                     .encoded_batches(stack.window_s) for _key, value in batch)
        bad = json.loads(batch)
        bad["power_w"][1][0] = -7  # GPU row 1, the first tick (a batch may hold one)
        with Publisher(stack, topic=run.settings.topic_samples) as publisher:
            publisher.publish_raw(b"bad-batch", json.dumps(bad).encode())
        run.published += 1
        stats = run.wait_until_quiet(timeout_s=240)
        findings = run.findings()
        letters = [d for d in run.dead_letters() if d.get("topic") == run.settings.topic_samples]

    assert stats["rejected"] == 1 and stats["accepted"] == run.published - 1
    assert [letter["reason"] for letter in letters] == [
        "power_w.1.0 = -7: Input should be greater than or equal to 0"]
    spec = load_scenario(Path(SCENARIO))
    samples = (value for _ts, batch in FleetSimulator(spec, start_ts=run.start_ts).encoded_ticks()
               for _key, value in batch)
    offline = list(detect_offline(samples, stack.window_s, stack.late_grace_s))
    assert {f.kind for f in offline} >= {"straggler"}
    assert sorted(map(identity, findings)) == sorted(map(identity, offline))
