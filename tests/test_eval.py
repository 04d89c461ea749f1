"""`laggard eval` end to end: a small scenario through the real broker and a real worker,
scored against the simulator's truth next to the naive baseline."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from laggard.commands.detection_eval import evaluate

SCENARIO = Path(__file__).parent / "scenarios" / "small_eval.yaml"


def test_eval_finds_the_straggler_that_the_baseline_misses(stack):
    report = evaluate([SCENARIO], stack, Console(quiet=True))

    run = report["scenarios"]["small_eval"]
    assert run["worker"]["accepted"] == run["messages"] > 0
    straggler = run["laggard"]["straggler"]
    assert straggler["truths"] == 1
    assert straggler["precision"] >= 0.95
    assert straggler["recall"] >= 0.95
    assert run["laggard"]["idle"]["recall"] >= 0.95
    baseline = run["baseline"]["straggler"]
    assert baseline["findings"] > 0  # it does page, about something else
    assert baseline["precision"] < straggler["precision"]
    assert report["laggard"] == run["laggard"]  # pooling one scenario changes nothing
