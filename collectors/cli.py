"""`laggard collect ...`: run one source and publish its samples to Kafka, or print them.

Every command builds a Source and hands it to `run_source`, the one loop that drives any source
into stdout (`--stdout`, JSON lines) or the Kafka publisher, stops on --count / --duration /
SIGTERM / SIGINT, and always closes the publisher so buffered samples are flushed. Samples go
out as schema-2 batches, one message per node per `--flush-interval` (collectors/batching.py),
or with `--flush-interval 0` as version-1 messages, one per node per tick.
Exit codes: 0 done, 1 some samples failed to publish, 2 the source or its options cannot be used.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from contextlib import closing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, Protocol

import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from laggard import logs
from laggard.batches import NodeBatch
from laggard.collectors.attribution import DEFAULT_SLURM_DIR, Attribution, AttributionError
from laggard.collectors.base import Source, SystemClock, stdout_to_devnull
from laggard.collectors.batching import Batcher
from laggard.events import NodeSample, encode
from laggard.settings import get_settings

collect_app = typer.Typer(
    help="Collect GPU telemetry from one source (NVML, dcgm-exporter, a recorded trace) and publish "
    "it to Kafka, one message per node per flush interval. Use --stdout to print JSON lines instead.",
    no_args_is_help=True,
    add_completion=False,
)
err_console = Console(stderr=True)

# Print a status line this often when stderr is not a terminal (logs of a service).
STATUS_EVERY_S = 60.0

Cluster = Annotated[
    str | None, typer.Option(help="Cluster name stamped on every sample (default: LAGGARD_CLUSTER, else local).")
]
Count = Annotated[int | None, typer.Option(min=1, help="Stop after this many ticks.")]
Duration = Annotated[float | None, typer.Option(min=0.0, help="Stop after this many seconds.")]
ToStdout = Annotated[
    bool, typer.Option("--stdout", help="Print the messages as JSON lines on stdout instead of publishing to Kafka.")
]
FlushInterval = Annotated[
    float | None,
    typer.Option(min=0.0, help="Seconds of samples per message (one per node), aligned to multiples of it "
                 "[default: LAGGARD_WINDOW_S, the workers' window]; 0: one message per node per tick (schema 1)."),
]
MappingOpt = Annotated[
    Path | None,
    typer.Option(
        "--attribution",
        exists=True,
        dir_okay=False,
        help="YAML/JSON file mapping GPU UUID or index to {job, rank} (see collectors/attribution.py).",
    ),
]


def flush_s(flush_interval: float | None) -> float:
    """The flush interval in seconds: the option's, else the workers' window."""
    return get_settings().window_s if flush_interval is None else flush_interval


class Sink(Protocol):
    def publish(self, sample: NodeSample | NodeBatch) -> None: ...

    def close(self) -> None: ...


class StdoutSink:
    """JSON lines on stdout, each flushed at once so `| jq` and `| head` see it."""

    def publish(self, sample: NodeSample | NodeBatch) -> None:
        sys.stdout.write(encode(sample).decode() + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.flush()


class StopSignals:
    """SIGTERM/SIGINT set `stop` (the source's waits end at once); a second signal interrupts hard."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class PublisherCounts(Protocol):
    sent: int
    acked: int
    failed: int


def kafka_counts(stats: PublisherCounts) -> str:
    """'kafka sent 120 acked 118 failed 2': the publisher's counters in every final status line."""
    return f"kafka sent {stats.sent} acked {stats.acked} failed {stats.failed}"


class StatusLine:
    """'nvml: 120 ticks, 120 node samples, 960 GPU readings, 2.0 ticks/s, 0 rejected, 0 missed[, kafka ...]'."""

    def __init__(self, source: Source, sink: Sink) -> None:
        self.source = source
        self.sink = sink
        self.started = time.monotonic()
        self.last_printed = self.started
        self.ticks = self.samples = self.gpus = 0
        self.live = Live(console=err_console, refresh_per_second=2, transient=True) if err_console.is_terminal else None

    def add(self, tick: list[NodeSample]) -> None:
        self.ticks += 1
        self.samples += len(tick)
        self.gpus += sum(len(sample.gpus) for sample in tick)
        if self.live is not None:
            self.live.update(Text(self.text()))
        elif time.monotonic() - self.last_printed >= STATUS_EVERY_S:
            self.last_printed = time.monotonic()
            logs.say(err_console, self.text(), "laggard.collect")

    def text(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        line = (
            f"{self.source.name}: {self.ticks} ticks, {self.samples} node samples, {self.gpus} GPU readings, "
            f"{self.ticks / elapsed:.1f} ticks/s, {self.source.rejects.total} rejected, "
            f"{self.source.missed_ticks} missed"
        )
        stats = getattr(self.sink, "stats", None)
        if stats is not None:
            line += f", {kafka_counts(stats)}"
        return line

    def __enter__(self) -> StatusLine:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()


def _open_sink(to_stdout: bool) -> Sink:
    if to_stdout:
        return StdoutSink()
    from laggard.collectors.publisher import Publisher  # Kafka only when publishing
    from laggard.kafka_config import unreachable

    settings = get_settings()
    try:
        return Publisher(settings)
    except Exception as err:  # any client error at connect time: say it in one line
        fail(unreachable(settings, err))


def fail(message: str) -> NoReturn:
    """Print one line on stderr and exit 2 (the source or its options cannot be used)."""
    logs.say(err_console, f"laggard collect: {message}", "laggard.collect", logging.ERROR)
    raise typer.Exit(2)


def run_source(
    source: Source, clock: SystemClock, *, to_stdout: bool, count: int | None = None, duration: float | None = None,
    flush_interval: float | None = None,
) -> None:
    """Drive `source` into stdout or Kafka until it ends, --count ticks, --duration seconds or a signal."""
    interval = flush_s(flush_interval)
    batcher = Batcher(interval) if interval > 0 else None
    sink = _open_sink(to_stdout)
    status = StatusLine(source, sink)
    timer = threading.Timer(duration, clock.stop.set) if duration is not None else None
    try:
        with StopSignals(clock.stop), status, closing(source.ticks()) as ticks:
            if timer:
                timer.start()
            for tick in ticks:
                for message in batcher.add(tick) if batcher is not None else tick:
                    sink.publish(message)
                status.add(tick)
                if count is not None and status.ticks >= count:
                    break
            for message in batcher.flush() if batcher is not None else ():
                sink.publish(message)
    except BrokenPipeError:  # `--stdout | head`: the reader is gone, which is a normal end
        stdout_to_devnull()
    finally:
        if timer:
            timer.cancel()
        sink.close()  # flushes: the summary below counts every ack
        logs.say(err_console, status.text(), "laggard.collect")
    failed = getattr(getattr(sink, "stats", None), "failed", 0)
    if failed:
        logs.say(err_console, f"laggard collect: {failed} samples failed to publish", "laggard.collect", logging.ERROR)
        raise typer.Exit(1)
    if status.ticks and not status.samples and source.rejects.total:
        reasons = ", ".join(f"{n} {category}" for category, n in source.rejects.by_category.most_common())
        logs.say(err_console, f"laggard collect: no sample in {status.ticks} tick(s): every read was refused ({reasons})",
            "laggard.collect", logging.ERROR)
        raise typer.Exit(1)


def _attribution(mapping_file: Path | None, slurm_dir: Path | None = None) -> Attribution:
    try:
        return Attribution.from_options(mapping_file, slurm_dir)
    except AttributionError as err:
        fail(str(err))


@collect_app.command("nvml")
def nvml_command(
    interval: Annotated[float, typer.Option(min=0.01, help="Seconds between ticks (fast counters).")] = 1.0,
    slow_interval: Annotated[
        float, typer.Option(min=0.01, help="Seconds between reads of slow counters (total energy, ~4 ms per GPU).")
    ] = 10.0,
    node: Annotated[str | None, typer.Option(help="Node name [default: this host's name].")] = None,
    cluster: Cluster = None,
    attribution: MappingOpt = None,
    slurm_dir: Annotated[
        Path, typer.Option(help="Folder of gpu-<index>.json files written by a Slurm prolog (job, rank).")
    ] = DEFAULT_SLURM_DIR,
    count: Count = None,
    duration: Duration = None,
    flush_interval: FlushInterval = None,
    to_stdout: ToStdout = False,
) -> None:
    """Read this machine's GPUs through NVML at a fixed rate (needs the NVIDIA driver)."""
    from laggard.collectors.nvml import NvmlSource, NvmlUnavailable

    clock = SystemClock()
    cluster = cluster or get_settings().cluster  # outside the try: an invalid setting is main()'s to say
    lookup = _attribution(attribution, slurm_dir)
    try:
        source = NvmlSource(
            cluster=cluster,
            node=node,
            interval_s=interval,
            slow_interval_s=slow_interval,
            attribution=lookup,
            clock=clock,
        )
    except NvmlUnavailable as err:
        fail(str(err))
    run_source(source, clock, to_stdout=to_stdout, count=count, duration=duration,
                   flush_interval=flush_interval)


@collect_app.command("dcgm")
def dcgm_command(
    url: Annotated[
        list[str] | None,
        typer.Option(help="dcgm-exporter metrics URL; repeat for several exporters [default: "
                     "http://127.0.0.1:9400/metrics unless --file-sd is given]."),
    ] = None,
    file_sd: Annotated[
        list[Path] | None,
        typer.Option("--file-sd", dir_okay=False, help="Prometheus file_sd file (JSON, or YAML) listing targets "
                     "(host:port, with __scheme__ / __metrics_path__ labels); re-read when it changes. Repeatable."),
    ] = None,
    interval: Annotated[
        float, typer.Option(min=0.01, help="Seconds between scrapes of every target. Any interval works (the "
                           "workers learn each GPU's); dcgm-exporter refreshes every 30 s unless run with -c.")
    ] = 10.0,
    timeout: Annotated[float, typer.Option(min=0.1, help="HTTP timeout per scrape, seconds.")] = 5.0,
    node: Annotated[
        str | None, typer.Option(help="Node name, overriding the exporter's Hostname/hostname label (one --url only).")
    ] = None,
    cluster: Cluster = None,
    attribution: MappingOpt = None,
    count: Count = None,
    duration: Duration = None,
    flush_interval: FlushInterval = None,
    to_stdout: ToStdout = False,
) -> None:
    """Scrape dcgm-exporter endpoints; job and rank come from their Kubernetes pod labels."""
    from laggard.collectors.dcgm import DEFAULT_URL, DcgmSource

    clock = SystemClock()
    cluster = cluster or get_settings().cluster  # outside the try: an invalid setting is main()'s to say
    try:
        source = DcgmSource(
            url or ([] if file_sd else [DEFAULT_URL]),
            file_sd=file_sd or [],
            interval_s=interval,
            timeout_s=timeout,
            cluster=cluster,
            node=node,
            attribution=_attribution(attribution),
            clock=clock,
        )
    except ValueError as err:
        fail(str(err))
    try:
        run_source(source, clock, to_stdout=to_stdout, count=count, duration=duration,
                   flush_interval=flush_interval)
    finally:
        if len(source.targets) > 1 or file_sd:  # one line per target: which of them gave what
            for target in source.targets.values():
                logs.say(err_console, target.summary(), "laggard.collect")


class TraceFormat(str, Enum):
    auto = "auto"
    nvml_trace = "nvml-trace"
    samples = "samples"


class ShiftTo(str, Enum):
    none = "none"
    start = "start"
    end = "end"


@collect_app.command("replay")
def replay_command(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Trace file (JSON lines).")],
    fmt: Annotated[
        TraceFormat,
        typer.Option("--format", help="nvml-trace (fixtures/h200-nvml-trace) or samples (--stdout output)."),
    ] = TraceFormat.auto,
    speed: Annotated[
        float, typer.Option(min=0.0, help="1 = real time, N = N times faster, 0 or inf = no waiting.")
    ] = 1.0,
    shift_to_now: Annotated[
        ShiftTo, typer.Option(help="Move all timestamps so the trace starts or ends now.")
    ] = ShiftTo.none,
    node: Annotated[str, typer.Option(help="Node name for nvml-trace records.")] = "replay",
    cluster: Cluster = None,
    model: Annotated[str, typer.Option(help="GPU model for nvml-trace records.")] = "H200",
    uuid_template: Annotated[str, typer.Option(help="GPU UUID for nvml-trace records; {node} and {gpu} filled in.")] = (
        "GPU-{node}-{gpu}"
    ),
    attribution: MappingOpt = None,
    count: Count = None,
    duration: Duration = None,
    flush_interval: FlushInterval = None,
    max_wait: Annotated[
        float, typer.Option(min=0.0, help="Longest wait between two ticks, seconds; a longer break is not waited out.")
    ] = 600.0,
    to_stdout: ToStdout = False,
) -> None:
    """Play a recorded trace back on its own schedule, optionally faster and shifted to now."""
    from laggard.collectors.replay import ReplaySource

    clock = SystemClock()
    cluster = cluster or get_settings().cluster  # outside the try: an invalid setting is main()'s to say
    try:
        source = ReplaySource(
            path,
            cluster=cluster,
            node=node,
            fmt=fmt.value,  # type: ignore[arg-type]
            speed=speed,
            max_wait_s=max_wait,
            shift=shift_to_now.value,  # type: ignore[arg-type]
            model=model,
            uuid_template=uuid_template,
            attribution=_attribution(attribution),
            clock=clock,
        )
    except ValueError as err:
        fail(str(err))
    run_source(source, clock, to_stdout=to_stdout, count=count, duration=duration,
                   flush_interval=flush_interval)


if __name__ == "__main__":
    logs.configure()  # as `laggard collect` has it from the laggard command's -v/-q/--log-format
    collect_app()
