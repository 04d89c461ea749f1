"""`laggard eval SCENARIO...`: score the real pipeline (simulator -> Kafka -> Faust worker) against
the simulator's ground truth, next to the naive "low utilization" baseline.

Per scenario, a laggard.commands.pipeline_run.PipelineRun (its own topics `eval-<scenario>-<id>.*`, consumer
group, port and state folder): the simulator's messages are published as fast as possible with
event time in the past (first tick at now - duration - 60 s), so every window closes by event time
or by the worker's idle timer; the truth goes to the run's truth topic. Then one worker (`laggard
worker`, subprocess, baseline detector on) consumes it all; the run is over when the worker has
taken every message, holds no work (its /stats backlog) and its counts have stood still for a few
seconds (PipelineRun.wait_until_quiet). The findings topic is
read back, split into laggard's findings and the baseline's (`low_utilization`), and scored with
agents.scoring.

The overall figures pool every scenario: each finding's and truth's cluster is prefixed with its
scenario name (so nothing matches across scenarios) and everything is scored together, which gives
pooled precision, recall and latency percentiles (not averages of per-scenario figures).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from laggard.agents.scoring import score, straggler_cells
from laggard.collectors.cli import FlushInterval
from laggard.collectors.simulate import load_scenario
from laggard.commands.pipeline_run import PipelineError, PipelineRun, messages_taken
from laggard.events import FaultTruth
from laggard.logs import print_table
from laggard.results import Finding
from laggard.settings import Settings, get_settings

BASELINE_KIND = "low_utilization"
# Settings of every eval run's worker (bench/agents.py measures the worker the same way).
EVAL_OVERRIDES = {"baseline_detector": True}

Status = Callable[[str], None]
Scores = dict[str, dict[str, dict[str, float | int | None]]]


@dataclass
class ScenarioRun:
    name: str
    laggard: list[Finding]
    baseline: list[Finding]
    truths: list[FaultTruth]
    messages: int
    gpu_samples: int
    worker_stats: dict[str, Any]
    seconds: float

    def scores(self, window_s: float) -> Scores:
        return score(self.laggard, self.baseline, self.truths, window_s)

    def cells(self, window_s: float) -> Scores:
        return straggler_cells(self.laggard, self.baseline, self.truths, window_s)


def evaluate_scenario(scenario_path: Path, base: Settings, workdir: Path, status: Status = lambda _: None,
                      timeout_s: float = 900.0, flush_s: float | None = None) -> ScenarioRun:
    """Run one scenario through a fresh worker and collect its findings (see the module docstring)."""
    started = time.monotonic()
    name = load_scenario(scenario_path).name
    run = PipelineRun(base, prefix=f"eval-{scenario_path.stem}", state_root=workdir, overrides=EVAL_OVERRIDES)

    def show(stats: dict[str, Any]) -> None:
        status(f"worker: taken {messages_taken(stats):,}/{run.published:,} messages, "
               f"{stats.get('findings', 0)} findings, {stats.get('windows_closed', 0)} windows closed")

    with run:
        run.publish_scenario(scenario_path, lambda n: status(f"{name}: published {n:,} messages"),
                             flush_s=base.window_s if flush_s is None else flush_s)
        status(f"{name}: starting the worker")
        run.start_worker()
        stats = run.wait_until_quiet(timeout_s, progress=show)
    findings = run.findings()
    return ScenarioRun(
        name=name,
        laggard=[f for f in findings if f.kind != BASELINE_KIND],
        baseline=[f for f in findings if f.kind == BASELINE_KIND],
        truths=run.truth, messages=run.published, gpu_samples=run.gpu_samples, worker_stats=stats,
        seconds=round(time.monotonic() - started, 1),
    )


def pooled_scores(runs: Sequence[ScenarioRun], window_s: float) -> Scores:
    """All scenarios scored together, each one's clusters prefixed with its name so none match across."""
    def tag(items: Sequence[Any], name: str) -> list[Any]:
        return [item.model_copy(update={"cluster": f"{name}/{item.cluster}"}) for item in items]

    return score(
        [f for r in runs for f in tag(r.laggard, r.name)],
        [f for r in runs for f in tag(r.baseline, r.name)],
        [t for r in runs for t in tag(r.truths, r.name)],
        window_s,
    )


def _fmt(value: float | int | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def scores_table(title: str, scores: Scores) -> Table:
    """Family x (laggard, baseline) precision, recall and median detection latency."""
    table = Table(title=title, caption="L: laggard, B: naive baseline (low utilization); "
                  "detect: median detection latency in seconds of event time")
    table.add_column("family", no_wrap=True)
    table.add_column("truths", justify="right")
    for who in ("L", "B"):
        for column in ("found", "prec", "recall", "detect"):
            table.add_column(f"{who} {column}", justify="right")
    for family, ours in scores["laggard"].items():
        theirs = scores["baseline"].get(family, {})
        row = [family, str(ours["truths"])]
        for metrics in (ours, theirs):
            row += [str(metrics.get("findings", "-")), _fmt(metrics.get("precision")),
                    _fmt(metrics.get("recall")), _fmt(metrics.get("detect_latency_s_p50"), 1)]
        table.add_row(*row)
    return table


def cells_table(title: str, cells: Scores) -> Table:
    """Straggler cause x wait mode: how many laggard and the baseline found, and how fast."""
    table = Table(title=title, caption="wait: where peers wait for the straggler (kernel: spinning in the "
                  "collective; host: idle); detect: median windows from onset")
    for column in ("cause/wait", "truths", "L recall", "L detect", "B recall"):
        table.add_column(column, justify="left" if column == "cause/wait" else "right")
    for cell, both in cells.items():
        ours, theirs = both["laggard"], both["baseline"]
        table.add_row(cell, str(ours["truths"]), _fmt(ours["recall"]), _fmt(ours["detect_latency_windows_p50"], 1),
                      _fmt(theirs["recall"]))
    return table


def evaluate(scenarios: Sequence[Path], settings: Settings, console: Console,
             flush_s: float | None = None) -> dict[str, Any]:
    """Run every scenario, print its table, and return the report written by `laggard eval`:
    published as batches of `flush_s` seconds (default: the window; 0: version-1 messages)."""
    runs: list[ScenarioRun] = []
    with tempfile.TemporaryDirectory(prefix="laggard-eval-") as tmp, console.status("starting") as progress:
        for path in scenarios:
            run = evaluate_scenario(path, settings, Path(tmp), lambda text: progress.update(text), flush_s=flush_s)
            runs.append(run)
            print_table(console, scores_table(
                f"{run.name}: {run.messages:,} messages, {run.gpu_samples:,} GPU samples, "
                f"{run.seconds:.0f} s", run.scores(settings.window_s)))
            if cells := run.cells(settings.window_s):
                print_table(console, cells_table(f"{run.name}: stragglers by cause and wait mode", cells))
    pooled = pooled_scores(runs, settings.window_s)
    if len(runs) > 1:
        print_table(console, scores_table("all scenarios, pooled", pooled))
    return {
        **pooled,
        "window_s": settings.window_s,
        "scenarios": {
            r.name: {**r.scores(settings.window_s), "straggler_cells": r.cells(settings.window_s), "messages": r.messages,
                     "gpu_samples": r.gpu_samples, "seconds": r.seconds, "worker": r.worker_stats}
            for r in runs
        },
    }


def eval_command(
    scenarios: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="Scenario YAML files.")],
    out: Annotated[Path | None, typer.Option("--out", dir_okay=False, help="Write the scores here as JSON.")] = None,
    flush_interval: FlushInterval = None,
) -> None:
    """Run scenarios through the real pipeline (Kafka + one worker) and score laggard's findings and
    the naive low-utilization baseline against the simulator's ground truth."""
    console = Console()
    try:
        report = evaluate(scenarios, get_settings(), console, flush_s=flush_interval)
    except PipelineError as err:
        console.print(f"[red]laggard eval failed:[/red] {err}", highlight=False)
        raise typer.Exit(1) from None
    if out is not None:
        out.write_text(json.dumps(report, indent=2))
        console.print(f"scores written to {out}")
