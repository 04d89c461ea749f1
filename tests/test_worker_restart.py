"""A worker killed with SIGKILL mid-stream and started again: window results and findings are
neither lost nor doubled. Open windows are rebuilt from the per-partition checkpoint by re-reading
the input; the at-least-once repeats carry the same ids, so InfluxDB overwrites them and the
findings' idempotency keys make them harmless."""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import pytest

from laggard.collectors.simulate import load_scenario
from laggard.commands.pipeline_run import PipelineRun
from laggard.commands.stack.process import wait_until
from laggard.results import Finding
from laggard.topics import read_topic
from tests.helpers.faults import (
    commit_report,
    expected_gpu_windows,
    gpu_windows_in_influx,
    scenario_for_run,
    uncommitted,
)

DEMO = Path("collectors/scenarios/demo.yaml")


@pytest.mark.timeout(600)
def test_sigkill_mid_stream_loses_and_doubles_nothing(stack, tmp_path):
    with PipelineRun(stack, prefix="test-restart") as run:
        scenario = scenario_for_run(DEMO, run.run_id, tmp_path)
        run.start_worker(tmp_path / "first.log")
        run.publish_scenario(scenario)
        assert wait_until(lambda: run.stats().get("accepted", 0) >= run.published // 3, 120, 0.2), run.describe()
        os.killpg(run.worker.pid, signal.SIGKILL)
        run.worker.wait()
        lag = uncommitted(run.settings, run.run_id)
        assert lag > 0, (run.published, lag)  # it really died mid-stream, with input left to take

        run.start_worker(tmp_path / "second.log", log_level="info")
        # Faust's commit must drain too (a hole it never delivered would hold it back for good).
        assert wait_until(lambda: uncommitted(run.settings, run.run_id) == 0, 300, 0.5), (
            f"committed/end per partition:\n{commit_report(run.settings, run.run_id)}\n"
            f"worker stats: {run.stats()}\n" + "\n".join(
                [line for line in (tmp_path / "second.log").read_text().splitlines() if "HTTP Request" not in line][-40:]))
        # The restarted worker counts only what it took itself: settled = no input left, no work held.
        run.wait_until_quiet(timeout_s=120, must_take=0)
        raw_findings = [Finding.model_validate_json(v) for v in read_topic(run.settings, run.settings.topic_findings)]

    # Every GPU window of the scenario is in InfluxDB exactly once (same series + time = overwrite).
    spec = load_scenario(scenario)
    expected = expected_gpu_windows(stack, scenario, run.start_ts)
    assert gpu_windows_in_influx(stack, spec.cluster, run.start_ts, spec.duration_s) == expected

    # Each finding transition once; repeats only as exact copies (same idempotency key).
    firing = collections.Counter((f.kind, f.fingerprint, f.window_start) for f in raw_findings if f.state == "firing")
    by_key = collections.defaultdict(set)
    for f in raw_findings:
        by_key[f.idempotency_key].add(f.model_dump_json())
    assert all(len(versions) == 1 for versions in by_key.values())
    starts_per_fingerprint = collections.Counter(fp for _kind, fp, _start in firing)
    assert all(n == 1 for n in starts_per_fingerprint.values()), starts_per_fingerprint
    stragglers = {(f.job, f.rank) for f in raw_findings if f.kind == "straggler" and f.state == "firing"}
    assert stragglers == {(t.job, t.rank) for t in run.truth if t.kind == "straggler"}
