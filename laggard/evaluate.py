"""`laggard eval SCENARIO...`: score the real pipeline (simulator -> Kafka -> Faust worker) against
the simulator's ground truth, next to the naive "low utilization" baseline.

Per scenario, with a unique run id so nothing is shared with other runs: topics `eval.<run>.*`;
the simulator's messages are published as fast as possible with event time in the past (first
tick at now - duration - 60 s), so every window closes by event time or by the worker's idle
timer; the truth goes to the run's truth topic. Then one worker (`laggard worker`, subprocess,
baseline detector on) consumes it all; the run is over when the worker has taken every message and
its findings count has not moved for window_hold_s + 5 s. The findings topic is read back with
kafka-python, split into laggard's findings and the baseline's (`low_utilization`), and scored
with agents.scoring.

The overall figures pool every scenario: each finding's and truth's cluster is prefixed with its
scenario name (so nothing matches across scenarios) and everything is scored together, which gives
pooled precision, recall and latency percentiles (not averages of per-scenario figures).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from kafka import KafkaConsumer, TopicPartition
from rich.console import Console
from rich.table import Table

from agents.findings import Finding
from agents.scoring import score
from collectors.publisher import Publisher
from collectors.simulate import FleetSimulator, load_scenario
from laggard.events import EARLIEST_TS, FaultTruth, encode
from laggard.kafka_config import client_config
from laggard.settings import Settings, get_settings
from laggard.stack.process import log_tail
from laggard.topics import ensure_topics

BASELINE_KIND = "low_utilization"
# Event time of the first tick lies this far before (now - duration): all of it is in the past.
PAST_MARGIN_S = 60.0
# Beyond the worker's window hold, how long the findings count must stay put before the run is over.
SETTLE_EXTRA_S = 5.0
STOP_GRACE_S = 20.0  # Faust can hang on shutdown: SIGKILL after this

Status = Callable[[str], None]
Scores = dict[str, dict[str, dict[str, float | int | None]]]


class EvalError(RuntimeError):
    """A run that could not be completed; the message says which step and why."""


def run_settings(base: Settings, run_id: str, state_dir: Path, web_port: int) -> Settings:
    """`base` with this run's own topics, consumer group, web port and state folder."""
    prefix = f"eval.{run_id}"
    return base.model_copy(update={
        "topic_samples": f"{prefix}.samples", "topic_windows": f"{prefix}.windows",
        "topic_fleet": f"{prefix}.fleet", "topic_findings": f"{prefix}.findings",
        "topic_deadletter": f"{prefix}.deadletter", "topic_truth": f"{prefix}.truth",
        "worker_app_id": f"laggard-eval-{run_id}", "worker_web_port": web_port,
        "state_dir": state_dir, "baseline_detector": True,
    })


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment that points a `laggard worker` at `settings`' topics, group, port and state."""
    names = ("topic_samples", "topic_windows", "topic_fleet", "topic_findings", "topic_deadletter",
             "topic_truth", "worker_app_id", "worker_web_port", "state_dir", "baseline_detector",
             "kafka_bootstrap_servers", "window_s", "window_hold_s", "topic_partitions")
    return {**os.environ, **{f"LAGGARD_{name.upper()}": str(getattr(settings, name)) for name in names}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def past_start_ts(duration_s: float, now: float | None = None) -> float:
    """First tick's event time: the whole run ends PAST_MARGIN_S before now, and is still a valid timestamp."""
    start = (time.time() if now is None else now) - duration_s - PAST_MARGIN_S
    if start < EARLIEST_TS:
        raise EvalError(f"scenario duration {duration_s} s reaches before 2020-01-01, which events reject")
    return start


def gpus_in(value: bytes) -> int:
    """GPU samples in one encoded NodeSample (each GPU entry carries one "index")."""
    return value.count(b'"index"')


@dataclass
class Published:
    messages: int
    gpu_samples: int
    truths: list[FaultTruth]
    duration_s: float


def publish_scenario(settings: Settings, scenario_path: Path, status: Status = lambda _: None,
                     limit: int | None = None) -> Published:
    """Publish the scenario's messages (at most `limit`) and its truth to `settings`' topics."""
    scenario = load_scenario(scenario_path)
    sim = FleetSimulator(scenario, start_ts=past_start_ts(scenario.duration_s))
    messages = gpu_samples = 0
    every_message = (message for _ts, batch in sim.encoded_ticks() for message in batch)
    with Publisher(settings, topic=settings.topic_samples) as publisher:
        for key, value in itertools.islice(every_message, limit):
            publisher.publish_raw(key, value)
            messages += 1
            gpu_samples += gpus_in(value)
            if messages % 5000 == 0:
                status(f"{scenario.name}: published {messages:,} messages")
        truths = sim.truth()
        for truth in truths:
            publisher.publish_raw((truth.job or truth.node or truth.scenario).encode(), encode(truth),
                                  topic=settings.topic_truth)
    if publisher.stats.failed:
        raise EvalError(f"{publisher.stats.failed} messages failed to publish: {publisher.stats.last_error}")
    return Published(messages, gpu_samples, truths, scenario.duration_s)


class Worker:
    """One `laggard worker` subprocess for `settings`; `with Worker(...) as w: w.stats()`."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings, self.log_path = settings, log_path
        self.url = f"http://127.0.0.1:{settings.worker_web_port}/stats"
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from laggard.cli import main; main()", "worker", "-l", "warn"],
            env=worker_env(settings), stdout=subprocess.DEVNULL, stderr=log_path.open("w"),
            start_new_session=True,
        )

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any] | None:
        """The worker's /stats, or None while it is not answering yet; EvalError if it has exited."""
        if self.process.poll() is not None:
            raise EvalError(f"worker exited with {self.process.returncode}:\n{log_tail(self.log_path)}")
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                return json.load(response)
        except OSError:
            return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_until_settled(worker: Worker, messages: int, settle_s: float, timeout_s: float,
                       status: Status = lambda _: None) -> dict[str, Any]:
    """Poll /stats until every message is taken (accepted, rejected or late) and the findings count
    has not changed for `settle_s`; returns the last stats. EvalError past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_findings, still_since = -1, time.monotonic()
    while True:
        now = time.monotonic()
        stats = worker.stats() or {}
        taken = stats.get("accepted", 0) + stats.get("rejected", 0) + stats.get("late", 0)
        findings = stats.get("findings", 0)
        if taken < messages or findings != last_findings:
            last_findings, still_since = findings, now
        status(f"worker: taken {taken:,}/{messages:,} messages, {findings} findings, "
               f"{stats.get('windows_closed', 0)} windows closed")
        if taken >= messages and now - still_since >= settle_s:
            return stats
        if now > deadline:
            raise EvalError(f"worker did not settle within {timeout_s:.0f} s (last stats {stats}):\n"
                            f"{log_tail(worker.log_path)}")
        time.sleep(0.5)


def read_findings(settings: Settings, timeout_s: float = 60.0) -> list[Finding]:
    """Every finding on the findings topic, once each (a replayed one has the same idempotency key)."""
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False, group_id=None)
    try:
        partitions = [TopicPartition(settings.topic_findings, p)
                      for p in sorted(consumer.partitions_for_topic(settings.topic_findings) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        found: dict[str, Finding] = {}
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise EvalError(f"reading {settings.topic_findings} took over {timeout_s:.0f} s")
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    finding = Finding.model_validate_json(record.value)
                    found[finding.idempotency_key] = finding
        return list(found.values())
    finally:
        consumer.close()


@dataclass
class ScenarioRun:
    name: str
    laggard: list[Finding]
    baseline: list[Finding]
    truths: list[FaultTruth]
    published: Published
    worker_stats: dict[str, Any]
    seconds: float

    def scores(self, window_s: float) -> Scores:
        return score(self.laggard, self.baseline, self.truths, window_s)


def evaluate_scenario(scenario_path: Path, base: Settings, workdir: Path, status: Status = lambda _: None,
                      timeout_s: float = 900.0) -> ScenarioRun:
    """Run one scenario through a fresh worker and collect its findings (see the module docstring)."""
    started = time.monotonic()
    run_id = f"{scenario_path.stem}-{uuid.uuid4().hex[:8]}"
    settings = run_settings(base, run_id, workdir / run_id, free_port())
    settings.state_dir.mkdir(parents=True)
    ensure_topics(settings)
    published = publish_scenario(settings, scenario_path, status)
    status(f"{scenario_path.stem}: starting the worker")
    with Worker(settings, settings.state_dir / "worker.log") as worker:
        stats = wait_until_settled(worker, published.messages, settings.window_hold_s + SETTLE_EXTRA_S,
                                   timeout_s, status)
    findings = read_findings(settings)
    return ScenarioRun(
        name=load_scenario(scenario_path).name,
        laggard=[f for f in findings if f.kind != BASELINE_KIND],
        baseline=[f for f in findings if f.kind == BASELINE_KIND],
        truths=published.truths, published=published, worker_stats=stats,
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


def evaluate(scenarios: Sequence[Path], settings: Settings, console: Console) -> dict[str, Any]:
    """Run every scenario, print its table, and return the report written by `laggard eval`."""
    runs: list[ScenarioRun] = []
    with tempfile.TemporaryDirectory(prefix="laggard-eval-") as tmp, console.status("starting") as progress:
        for path in scenarios:
            run = evaluate_scenario(path, settings, Path(tmp), lambda text: progress.update(text))
            runs.append(run)
            console.print(scores_table(
                f"{run.name}: {run.published.messages:,} messages, {run.published.gpu_samples:,} GPU samples, "
                f"{run.seconds:.0f} s", run.scores(settings.window_s)))
    pooled = pooled_scores(runs, settings.window_s)
    if len(runs) > 1:
        console.print(scores_table("all scenarios, pooled", pooled))
    return {
        **pooled,
        "window_s": settings.window_s,
        "scenarios": {
            r.name: {**r.scores(settings.window_s), "messages": r.published.messages,
                     "gpu_samples": r.published.gpu_samples, "seconds": r.seconds, "worker": r.worker_stats}
            for r in runs
        },
    }


def eval_command(
    scenarios: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="Scenario YAML files.")],
    out: Annotated[Path | None, typer.Option("--out", dir_okay=False, help="Write the scores here as JSON.")] = None,
) -> None:
    """Run scenarios through the real pipeline (Kafka + one worker) and score laggard's findings and
    the naive low-utilization baseline against the simulator's ground truth."""
    console = Console()
    try:
        report = evaluate(scenarios, get_settings(), console)
    except EvalError as err:
        console.print(f"[red]laggard eval failed:[/red] {err}", highlight=False)
        raise typer.Exit(1) from None
    if out is not None:
        out.write_text(json.dumps(report, indent=2))
        console.print(f"scores written to {out}")
