"""`laggard simulate SCENARIO.yaml`: drive the fleet simulator into Kafka, stdout or nowhere.

Samples go out as schema-2 batches, one message per node per flush interval (`--flush-interval`,
aligned to its multiples in event time; default the workers' window), or with
`--flush-interval 0` one version-1 message per node per tick; each
ground-truth event goes out when the simulation reaches its start, to `topic_truth` (or, with
--stdout, to --truth-file or stderr). --discard sends nothing and reports the simulator's own rate.
SIGTERM/SIGINT stop it before the next tick in every mode (a second one interrupts at once); the
publisher is closed (flushed) either way and the last line says what Kafka acknowledged.
With --stdout, a reader that goes away (`| head -1`) ends the run like a signal does, not as an error.
Exit codes: 0 done or stopped, 1 some messages failed to publish, 2 the scenario or options cannot be used.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Annotated, Protocol

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from laggard import logs
from laggard.collectors.base import SystemClock, sleep_until, stdout_to_devnull
from laggard.collectors.cli import FlushInterval, StopSignals, err_console, flush_s, kafka_counts
from laggard.collectors.simulate import FleetSimulator, Scenario, ScenarioError, load_scenario
from laggard.collectors.simulate.scenario import revalidated, shortened
from laggard.batches import gpu_sample_count
from laggard.events import PLAUSIBLE_TS_RANGE, FaultTruth, encode, plausible_ts
from laggard.settings import get_settings


class _Sink(Protocol):
    failed: int

    def summary(self) -> str: ...

    def sample(self, key: bytes, value: bytes) -> None: ...

    def truth(self, event: FaultTruth) -> None: ...

    def close(self) -> None: ...


class _Discard:
    """Counts nothing, sends nothing: what is left is the simulator's own cost."""

    failed = 0

    def summary(self) -> str:
        return ""

    def sample(self, key: bytes, value: bytes) -> None:
        pass

    def truth(self, event: FaultTruth) -> None:
        pass

    def close(self) -> None:
        pass


class _Stdout:
    def __init__(self, truth_file: Path | None) -> None:
        self.failed = 0
        self.out = sys.stdout.buffer
        self.truth_out: IO[str] = truth_file.open("w", encoding="utf-8") if truth_file else sys.stderr

    def summary(self) -> str:
        return ""

    def sample(self, key: bytes, value: bytes) -> None:
        self.out.write(value + b"\n")

    def truth(self, event: FaultTruth) -> None:
        self.truth_out.write(encode(event).decode() + "\n")

    def close(self) -> None:
        try:
            self.out.flush()
        except BrokenPipeError:  # the reader left before the last lines
            stdout_to_devnull()
        self.truth_out.flush()
        if self.truth_out is not sys.stderr:
            self.truth_out.close()


class _Kafka:
    def __init__(self) -> None:
        from laggard.collectors.publisher import Publisher  # Kafka only when publishing

        self.settings = get_settings()
        self.publisher = Publisher(self.settings)

    @property
    def failed(self) -> int:
        return self.publisher.stats.failed

    def summary(self) -> str:
        return f", {kafka_counts(self.publisher.stats)}"

    def sample(self, key: bytes, value: bytes) -> None:
        self.publisher.publish_raw(key, value)

    def truth(self, event: FaultTruth) -> None:
        key = (event.job or event.node or event.scenario).encode()
        self.publisher.publish_raw(key, encode(event), topic=self.settings.topic_truth)

    def close(self) -> None:
        self.publisher.close()


def _fail(message: str) -> typer.Exit:
    logs.say(err_console, f"laggard simulate: {message}", "laggard.simulate", logging.ERROR)
    return typer.Exit(2)


def _start_ts(start: str | None, scenario_start: float | None) -> float:
    """Unix seconds of the first tick: --start ('now' or seconds), else the scenario's, else now."""
    if start is None:
        return time.time() if scenario_start is None else scenario_start
    if start == "now":
        return time.time()
    try:
        ts = float(start)
    except ValueError:
        ts = None
    if ts is None or not plausible_ts(ts):  # NaN fails the comparison too
        raise _fail(f"--start must be 'now' or unix seconds within {PLAUSIBLE_TS_RANGE}, got {start!r}")
    return ts


def _with_options(spec: Scenario, seed: int | None, duration: float | None) -> Scenario:
    """The scenario with --seed and --duration applied, validated like the file."""
    option = "--seed"
    try:
        if seed is not None:
            spec = revalidated(spec, seed=seed)
        option = "--duration"
        if duration is not None:
            spec = shortened(spec, duration)
    except ScenarioError as err:
        raise _fail(f"{option}: {err}") from None
    return spec


def simulate(
    scenario: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Scenario YAML (examples in collectors/scenarios/).")
    ],
    speed: Annotated[float, typer.Option(min=0.001, help="Simulated seconds per wall-clock second.")] = 1.0,
    as_fast_as_possible: Annotated[bool, typer.Option("--as-fast-as-possible", help="Do not pace ticks.")] = False,
    to_stdout: Annotated[
        bool, typer.Option("--stdout", help="Print the messages as JSON lines instead of publishing to Kafka.")
    ] = False,
    truth_file: Annotated[
        Path | None, typer.Option(dir_okay=False, help="With --stdout: ground truth JSON lines here [default: stderr].")
    ] = None,
    discard: Annotated[
        bool, typer.Option("--discard", help="Generate and encode but send nothing; reports the simulator's rate.")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Override the scenario's seed.")] = None,
    start: Annotated[
        str | None, typer.Option(help="'now' or unix seconds of the first tick [default: the scenario's, else now].")
    ] = None,
    duration: Annotated[float | None, typer.Option(min=0.001, help="Override the scenario's duration, seconds.")] = None,
    flush_interval: FlushInterval = None,
) -> None:
    """Simulate a GPU fleet running synchronous jobs with injected faults, and publish its ground truth."""
    try:
        spec = load_scenario(scenario)
    except ScenarioError as err:
        raise _fail(str(err)) from None
    spec = _with_options(spec, seed, duration)
    sim = FleetSimulator(spec, start_ts=_start_ts(start, spec.start))
    sink: _Sink = _Discard() if discard else _Stdout(truth_file) if to_stdout else _Kafka()
    truth = deque(sim.truth())
    clock = SystemClock(threading.Event())
    interval = 0.0 if as_fast_as_possible else spec.tick_s / speed
    gpu_samples = 0
    began = clock.monotonic()
    progress = Progress(
        TextColumn(f"{spec.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ticks {task.fields[rate]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,  # piped or in a log: the last line only, no blank line before it
    )
    try:
        with StopSignals(clock.stop), progress:
            task = progress.add_task("simulate", total=sim.tick_count, rate="")
            for k, (ts, messages) in enumerate(sim.encoded(flush_s(flush_interval))):
                if clock.stop.is_set() or (interval and sleep_until(clock, began + k * interval)):
                    break
                while truth and truth[0].start <= ts:
                    sink.truth(truth.popleft())
                for key, value in messages:
                    sink.sample(key, value)
                gpu_samples += sum(gpu_sample_count(value) for _, value in messages)
                rate = gpu_samples / max(clock.monotonic() - began, 1e-9)
                progress.update(task, advance=1, rate=f"{rate:,.0f} GPU samples/s")
            else:
                while truth:  # faults that start after the last tick still count
                    sink.truth(truth.popleft())
    except BrokenPipeError:  # `--stdout | head`: the reader is gone, which is a normal end
        stdout_to_devnull()
        clock.stop.set()
    finally:
        sink.close()  # flushes: the summary below counts every ack
    elapsed = max(clock.monotonic() - began, 1e-9)
    stopped = " (stopped)" if clock.stop.is_set() else ""
    logs.say(err_console, f"simulate {spec.name}{stopped}: {sim.gpu_count} GPUs, {gpu_samples:,} GPU samples in "
        f"{elapsed:.1f} s ({gpu_samples / elapsed:,.0f} GPU samples/s){sink.summary()}", "laggard.simulate")
    if sink.failed:
        logs.say(err_console, f"laggard simulate: {sink.failed} messages failed to publish", "laggard.simulate", logging.ERROR)
        raise typer.Exit(1)
