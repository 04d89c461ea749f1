"""The `laggard` command. Each room contributes its own typer app; this module only composes."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.table import Table

from laggard import logs
from laggard.logs import LogFormat
from laggard.settings import Settings, get_settings

app = typer.Typer(
    help="laggard: GPU cluster telemetry that names the rank, node and GPU pacing each job.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from laggard import __version__

        typer.echo(f"laggard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print laggard's version and exit."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, show_default=False,
                                help="Log more: -v info, -vv debug (default: warnings and errors)."),
    quiet: int = typer.Option(0, "--quiet", "-q", count=True, show_default=False,
                              help="Log less: -q errors only, -qq critical only."),
    log_format: LogFormat = typer.Option(LogFormat.text, "--log-format", envvar="LAGGARD_LOG_FORMAT",
                                         help="Log lines on stderr as text or JSON (one object per line)."),
) -> None:
    """laggard: GPU cluster telemetry that names the rank, node and GPU pacing each job."""
    ctx.with_resource(logs.configured(logs.level_for(verbose, quiet), log_format))
    # kafka-python's connection retries are detail (shown with -v): what a Kafka failure means, laggard
    # says itself in one line (main() below; the publisher's counts).
    ctx.with_resource(logs.demoted("kafka"))


stack_app = typer.Typer(help="Run the local stack (Apache Kafka + InfluxDB) on this machine.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")


def _add_room_commands() -> None:
    """Each room's commands live in that room; imported here so `--help` lists them all."""
    from laggard.collectors.cli import collect_app
    from laggard.collectors.simulate_cli import simulate
    from laggard.commands.detect import detect_command
    from laggard.commands.detection_eval import eval_command
    from laggard.commands.report import report
    from laggard.rules.cli import alerts_app, rules_app, silence_app

    app.add_typer(collect_app, name="collect")
    app.command("simulate")(simulate)
    app.command("eval")(eval_command)
    app.command("detect")(detect_command)
    app.command("report")(report)
    app.add_typer(rules_app, name="rules")
    app.add_typer(alerts_app, name="alerts")
    app.add_typer(silence_app, name="silence")


_add_room_commands()
console = Console(soft_wrap=True)  # a long line stays one line, on a terminal and in a log


@stack_app.command("up")
def stack_up(
    reset: bool = typer.Option(False, "--reset", help="Stop and wipe all stack data first."),
    influx: int | None = typer.Option(
        None, "--influx", min=1, max=2, show_default=False,
        help="1: Debian's InfluxDB 1.6.7; 2: InfluxDB 2.7 on LAGGARD_INFLUX2_PORT, built from source the "
             "first time (~13 CPU-minutes). Default: LAGGARD_LOCAL_INFLUX_VERSION (1).",
    ),
) -> None:
    """Start Kafka and InfluxDB (idempotent) and wait until each answers."""
    bring_stack_up(reset=reset, influx=influx)


def bring_stack_up(reset: bool = False, influx: int | None = None) -> None:
    """`stack up` for any command that needs the local stack; exits 1 with the reason on failure."""
    from laggard.commands import stack

    settings = get_settings() if influx is None else Settings(local_influx_version=influx)
    try:
        for line in stack.up(settings, reset=reset):
            console.print(line)
        if settings.local_influx_version != get_settings().local_influx_version:
            console.print(f"Other laggard commands use InfluxDB {settings.local_influx_version} at "
                          f"{settings.influx_url} with: export LAGGARD_LOCAL_INFLUX_VERSION={influx}")
    except stack.StackError as err:
        console.print(f"[red]stack up failed:[/red] {err}", highlight=False)
        raise typer.Exit(1) from None


@stack_app.command("down")
def stack_down() -> None:
    """Stop the services that `stack up` started (by pid); their data stays."""
    from laggard.commands import stack

    for line in stack.down(get_settings()):
        console.print(line)


@stack_app.command("status")
def stack_status(as_json: bool = typer.Option(False, "--json", help="Print JSON: service, pid, port, state, healthy.")
                 ) -> None:
    """Show each service, its pid, port and health. Exits 1 unless all are healthy."""
    from laggard.commands import stack

    rows = stack.status(get_settings())
    states = [{"service": row.name, "pid": row.pid, "port": row.port, "healthy": row.healthy,
               "state": "healthy" if row.healthy else ("running, not answering" if row.running else "stopped")}
              for row in rows]
    if as_json:
        logs.print_json(states)
    else:
        table = Table("service", "pid", "port", "state")
        for state in states:
            table.add_row(state["service"], str(state["pid"] or "-"), str(state["port"]), state["state"])
        logs.print_table(console, table)
    if not all(row.healthy for row in rows):
        raise typer.Exit(1)


# Faust's --loglevel choices (its CRIT is no level mode knows: the worker puts laggard's level back).
FAUST_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error",
                logging.CRITICAL: "error"}


@app.command("worker")
def worker(
    loglevel: str | None = typer.Option(
        None, "--loglevel", "-l", show_default=False,
        help="crit, error, warn, info or debug [default: info, or what laggard -v/-q ask for]"),
) -> None:
    """Run a laggard worker (Faust): windows, detectors, InfluxDB sink, alerts. Start several to
    share the partitions; give each its own LAGGARD_WORKER_WEB_PORT. Its log lines follow laggard's
    --log-format; Faust's banner is left out in JSON and at levels above warn."""
    import sys

    from laggard.agents.worker import build_worker
    from laggard.topics import ensure_topics

    setup = logs.current()
    try:
        level = logs.parse_level(loglevel) if loglevel else setup.level if setup.chosen else logging.INFO
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--loglevel") from None
    logs.configure(level, setup.fmt)
    # kafka-python (the worker's own offset reads and re-reads) logs every connection at info.
    logging.getLogger("kafka").setLevel(max(level, logging.WARNING))
    settings = get_settings()
    _register_webhook_secrets(settings)
    with logs.demoted("kafka", logging.DEBUG):  # a broker that does not answer is main()'s one line
        ensure_topics(settings)  # Faust ignores a missing input topic instead of waiting for it
    quiet = ["--quiet"] if setup.fmt is LogFormat.json or level > logging.WARNING else []
    sys.argv = ["laggard worker", *quiet, "worker", "--loglevel", FAUST_LEVELS[level],
                "--web-host", settings.worker_web_host, "--web-port", str(settings.worker_web_port)]
    build_worker(settings).app.main()


@app.command("demo")
def demo() -> None:
    """Bring the local stack up and run the demo end to end, printing what it found."""
    from laggard.commands.demo import run_demo

    bring_stack_up()
    run_demo(get_settings(), console)


def _register_webhook_secrets(settings: Settings) -> None:
    """The webhook URLs of the worker's receivers are secrets: redacted from every log line."""
    from laggard import redaction
    from laggard.rules.loader import DEFAULT_RULES, RulesFileInvalid, load_rules

    try:
        receivers = load_rules(settings.rules_file or DEFAULT_RULES).receivers
    except RulesFileInvalid:
        return  # the worker says what is wrong with the file and goes on without it
    for receiver in receivers:
        try:
            redaction.add_secret_url(receiver.resolve_url().get_secret_value())
        except LookupError:
            pass  # the worker warns that this receiver cannot send


def main() -> None:
    """The `laggard` command: a known failure (no broker, an invalid setting) is one line on stderr
    and exit 2, never a traceback; no log line of any command shows a secret."""
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError
    from pydantic import ValidationError

    from laggard import redaction
    from laggard.kafka_config import unreachable
    from laggard.settings import describe_invalid
    from laggard.topics import TopicsUnavailable

    redaction.install()
    errors = Console(stderr=True, soft_wrap=True)
    try:
        app()
    except (KafkaTimeoutError, KafkaConnectionError) as err:
        # Any command's first Kafka client (topics, publisher, worker): one line, not a traceback.
        errors.print(f"laggard: {redaction.redact(unreachable(get_settings(), err))}", highlight=False, markup=False)
        raise SystemExit(2) from None
    except TopicsUnavailable as err:
        errors.print(f"laggard: {err}", highlight=False, markup=False)
        raise SystemExit(2) from None
    except ValidationError as err:
        if err.title != Settings.__name__:
            raise
        errors.print(f"laggard: {describe_invalid(err)}", highlight=False, markup=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
