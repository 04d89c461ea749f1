"""Scale-out on the real stack: workers started together in one consumer group on a backlog share
its partitions, every partition makes progress and every GPU window lands once. (A worker joining
a busy group and one killed in it: tests/test_faults.py.)"""

from __future__ import annotations

from laggard.collectors.simulate import load_scenario
from laggard.commands.pipeline_run import PipelineRun, messages_taken
from laggard.commands.stack.process import wait_until
from tests.helpers.faults import (
    commit_report,
    expected_gpu_windows,
    gpu_windows_in_influx,
    missing_gpu_windows,
    scenario_for_run,
)

DEMO = "collectors/scenarios/demo.yaml"


def observed(runs: list[PipelineRun]) -> str:
    """For a failure message: what each worker reports and logs, and the group's commits."""
    workers = "\n".join(run.describe() for run in runs)
    return f"{workers}\n{commit_report(runs[0].settings, runs[0].settings.worker_app_id)}"


def test_two_workers_started_on_a_backlog_share_it_and_take_all_of_it(stack, tmp_path):
    with PipelineRun(stack, prefix="test-scale-out", state_root=tmp_path) as first, first.member() as second:
        runs = [first, second]
        scenario = scenario_for_run(DEMO, first.run_id, tmp_path)
        first.publish_scenario(scenario)
        for run in runs:
            run.start_worker(log_level="info")

        def taken() -> list[int]:
            return [messages_taken(run.stats()) for run in runs]

        assert wait_until(lambda: sum(taken()) >= first.published, 180, 0.5), observed(runs)
        shares = taken()
        for run in runs:
            run.wait_until_quiet(timeout_s=120, must_take=0)
        spec = load_scenario(scenario)
        expected = expected_gpu_windows(stack, scenario, first.start_ts)
        in_influx = gpu_windows_in_influx(stack, spec.cluster, first.start_ts, spec.duration_s)
        findings = first.findings()
    print(f"SCALE | 2 workers | messages {first.published} | shares {shares} | GPU windows {in_influx}/{expected}")
    assert min(shares) > 0, (shares, observed(runs))  # both took part
    assert in_influx == expected, (missing_gpu_windows(stack, scenario, first.start_ts), observed(runs))
    stragglers = {(f.job, f.rank) for f in findings if f.kind == "straggler" and f.state == "firing"}
    assert stragglers == {(t.job, t.rank) for t in first.truth if t.kind == "straggler"}
