"""`laggard simulate` with bad options and scenario files: one line on stderr naming the option or
the field (and the line of the file), exit 2, nothing printed; a reader that leaves is a normal end."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from laggard.batches import decode_event
from laggard.collectors.simulate import ScenarioError, load_scenario
from laggard.collectors.simulate.scenario import shortened
from laggard.collectors.simulate_cli import simulate
from tests.helpers.samples import printed_samples

REPO = Path(__file__).resolve().parent.parent
SMALL = "name: t\nduration_s: 2\nnodes: [{prefix: h, count: 1, model: H100}]\n"


def run(*args: str) -> tuple[int, str, str]:
    app = typer.Typer()
    app.command()(simulate)
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def scenario_file(tmp_path: Path, text: str = SMALL) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("start", ["inf", "nan", "-inf", "0", "1e12", "soon"])
def test_an_unusable_start_is_refused(tmp_path: Path, start: str) -> None:
    code, out, err = run(scenario_file(tmp_path), "--stdout", "--as-fast-as-possible", "--start", start)
    assert code == 2
    assert out == ""  # no '"ts":inf', no sample every consumer rejects
    assert "--start" in err and repr(start) in err and len(err.strip().splitlines()) == 1


def test_a_plausible_start_is_used(tmp_path: Path) -> None:
    start = math.floor(time.time()) - 3600
    code, out, _ = run(scenario_file(tmp_path), "--stdout", "--as-fast-as-possible", "--start", str(start))
    assert code == 0
    assert sorted({s.ts for s in printed_samples(out)}) == [start, start + 1]


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--seed", "-1", "seed = -1"),
        ("--duration", "inf", "duration_s = inf"),
        ("--duration", str(31 * 86_400), "less than or equal to 2592000"),
    ],
)
def test_seed_and_duration_options_are_validated_like_the_file(
    tmp_path: Path, option: str, value: str, said: str
) -> None:
    code, out, err = run(scenario_file(tmp_path), "--stdout", "--as-fast-as-possible", option, value)
    assert code == 2 and out == ""
    assert err.startswith(f"laggard simulate: {option}: ") and said in err
    assert len(err.strip().splitlines()) == 1


def test_shortened_validates_the_new_duration(tmp_path: Path) -> None:
    spec = load_scenario(scenario_file(tmp_path))
    with pytest.raises(ScenarioError, match="duration_s"):
        shortened(spec, math.inf)
    assert shortened(spec, 1.0).duration_s == 1.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("seed: -1\n", ":4: seed = -1: Input should be greater than or equal to 0"),
        ("start: 0\n", ":4: start = 0: "),
        ("start: 1.0e+12\n", ":4: start = 1000000000000.0: "),
    ],
)
def test_the_scenario_seed_and_start_are_bounded(tmp_path: Path, body: str, expected: str) -> None:
    path = scenario_file(tmp_path, SMALL + body)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert str(err.value).startswith(path + expected)
    code, out, stderr = run(path, "--stdout", "--as-fast-as-possible")
    assert code == 2 and out == "" and "Traceback" not in stderr


def test_a_job_starting_after_the_end_says_so_on_its_line(tmp_path: Path) -> None:
    path = scenario_file(
        tmp_path,
        "name: t\nduration_s: 10\nnodes: [{prefix: h, count: 1, model: H100}]\n"
        "jobs:\n  - name: late\n    nodes: [{group: h, count: 1}]\n    step_s: 1\n    start_s: 20\n",
    )
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert str(err.value) == f"{path}:8: jobs.0.start_s: 20.0 is not before duration_s 10.0"


@pytest.mark.parametrize(
    ("faults", "line", "field"),
    [
        ("  - {kind: straggler, job: j, rank: 0, start_s: 2}\n  - kind: straggler\n    job: j\n    rank: 0\n"
         "    start_s: 2\n    slowdwn: 2\n", 13, "faults.1.straggler.slowdwn"),
        ("  - {kind: xid, node: h0000, gpu: 9, start_s: 1}\n", 8, "faults.0.gpu: 9 is not below"),
        ("  - {kind: xid, node: h0000, gpu: 0, start_s: 3, end_s: 2}\n", 8, "end_s (2.0) must be after start_s (3.0)"),
    ],
)
def test_scenario_errors_name_the_line(tmp_path: Path, faults: str, line: int, field: str) -> None:
    path = scenario_file(
        tmp_path,
        "name: t\nduration_s: 10\nnodes: [{prefix: h, count: 1, model: H100}]\n"
        "jobs: [{name: j, nodes: [{group: h, count: 1}], step_s: 1}]\n"
        "\n# faults follow\nfaults:\n" + faults,
    )
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert str(err.value).startswith(f"{path}:{line}: ") and field in str(err.value)


def test_a_reader_that_leaves_ends_the_run_normally(tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    command = [
        sys.executable, "-m", "laggard.commands.cli", "simulate", str(REPO / "collectors" / "scenarios" / "demo.yaml"),
        "--stdout", "--as-fast-as-possible", "--truth-file", str(truth),
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()  # `| head -1`
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
    assert decode_event(first).cluster == "demo"
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Broken pipe" not in err
    assert "simulate demo (stopped)" in err
