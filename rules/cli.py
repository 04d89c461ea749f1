"""CLI pieces for the lead to mount: `laggard rules …`, `laggard alerts …`, `laggard silence …`.

Silences and the live alerts are on their compacted Kafka topics (rules/shared_state.py), so these
commands see what every worker sees, from any machine that reaches the broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Column, Table

from laggard import logs
from laggard.rules.alert_lifecycle import AlertSnapshot, Notification, dashboard_url, fingerprint
from laggard.rules.evaluate import sample_contexts
from laggard.rules.loader import DEFAULT_RULES, RulesFileInvalid, check_file, load_rules
from laggard.rules.model import Matcher, RulesConfig, parse_duration
from laggard.rules.receivers.delivery import DeadLetter, DeliveryOutcome, Dispatcher
from laggard.rules.receivers.text import human_duration, iso_utc, pairs
from laggard.rules.shared_state import AlertBoard, SilenceBook, read_alert_board, read_silences, write_silence
from laggard.rules.silences import Silence
from laggard.settings import get_settings

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)

rules_app = typer.Typer(help="Check alert rule files.", no_args_is_help=True)
alerts_app = typer.Typer(help="Active alerts and test notifications.", no_args_is_help=True)
silence_app = typer.Typer(help="Mute alerts by label for a while.", no_args_is_help=True)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", envvar="LAGGARD_RULES_FILE", help="rules file with receivers and routes")
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON (a list of objects) instead of a table")]


def failed(message: str) -> NoReturn:
    """One line on stderr, exit 1."""
    errors.print(f"laggard: {message}", markup=False, highlight=False)
    raise typer.Exit(1)


def current_silences() -> SilenceBook:
    """The silences on the topic; records that are not silences are named on stderr and skipped."""
    book, problems = read_silences(get_settings())
    for problem in problems:
        errors.print(f"laggard: {problem}", markup=False, highlight=False)
    return book


@rules_app.callback()
def rules_group() -> None:
    """Check alert rule files."""  # a callback keeps `rules` a group even with one command


@rules_app.command("check")
def check(
    files: Annotated[list[Path], typer.Argument(help="rule files to check")],
    no_secrets: Annotated[bool, typer.Option(
        "--no-secrets", help="skip the check that each receiver's webhook URL (its url_env or url_file) can be "
                             "read here, e.g. in CI, where the secrets are not")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print JSON instead: per file, ok, rules, receivers, errors (file, line, field, message) "
                       "and receivers_without_url")] = False,
) -> None:
    """Validate rule files; print each error as FILE:LINE: FIELD: MESSAGE; exit 1 on any error. A
    receiver whose webhook URL cannot be read (url_env not set, url_file missing) is an error too,
    unless --no-secrets."""
    failed, results = 0, []
    for path in files:
        config, problems = check_file(path)
        unresolved = [] if no_secrets or config is None else receivers_without_url(config)
        failed += len(problems) + len(unresolved)
        results.append({"file": str(path), "ok": config is not None and not unresolved,
                        "rules": len(config.rules) if config else None,
                        "receivers": len(config.receivers) if config else None,
                        "errors": [dataclasses.asdict(problem) for problem in problems],
                        "receivers_without_url": unresolved})
        if as_json:
            continue
        for line in [*map(str, problems), *(f"{path}: {why}" for why in unresolved)]:
            errors.print(line, markup=False, highlight=False)
        if config is None:
            continue
        counts = f"{len(config.rules)} rules, {len(config.receivers)} receivers"
        if unresolved:
            console.print(f"{path}: NOT OK ({counts}; {len(unresolved)} receiver(s) without a webhook URL)", markup=False)
        else:
            console.print(f"{path}: OK ({counts})", markup=False)
    if as_json:
        logs.print_json(results)
    elif failed:
        errors.print(f"{failed} error(s)", markup=False)
    if failed:
        raise typer.Exit(1)


def receivers_without_url(config: RulesConfig) -> list[str]:
    """Why each receiver whose webhook URL cannot be read here cannot send (names the receiver and
    its variable or file, never a URL)."""
    problems = []
    for receiver in config.receivers:
        try:
            receiver.resolve_url()
        except LookupError as err:
            problems.append(f"{err} (--no-secrets skips this check)")
    return problems


def test_notification(config: RulesConfig, receiver: str, now: float) -> Notification:
    """A firing notification built from the first rule's sample, marked as a test."""
    if not config.rules:
        raise typer.BadParameter("the rules file has no rules to build a sample from")
    rule = config.rules[0]
    context = sample_contexts(rule, config.external_url)[0]
    labels = {**context["labels"], "test": "true"}
    alert = AlertSnapshot(
        fingerprint=fingerprint(labels),
        status="firing",
        labels=labels,
        annotations={"summary": f"Test notification from laggard (sample of rule {rule.name})"},
        starts_at=now - 60,
        evidence=context["evidence"],
        cost=context["cost"],
        generator_url=dashboard_url(config.external_url, labels),
    )
    return Notification(
        idempotency_key=f"test-{int(now * 1000)}",
        receiver=receiver,
        group_key=f"test/{receiver}",
        group_labels={"alertname": labels["alertname"]},
        status="firing",
        alerts=[alert],
        common_labels=labels,
        common_annotations=alert.annotations,
        external_url=config.external_url,
        sequence=1,
        created_at=now,
    )


@alerts_app.command("test")
def send_test(receiver: Annotated[str, typer.Argument(help="receiver name from the rules file")], config: ConfigOption = DEFAULT_RULES) -> None:
    """Send a test notification through a configured receiver (URL from its url_env/url_file)."""
    try:
        rules = load_rules(config)
        rules.receiver(receiver)
    except RulesFileInvalid as err:
        errors.print(str(err), markup=False)
        raise typer.Exit(1) from None
    except KeyError:
        names = ", ".join(r.name for r in rules.receivers)
        errors.print(f"unknown receiver {receiver!r}; defined: {names}", markup=False)
        raise typer.Exit(1) from None
    letters: list[DeadLetter] = []

    async def send() -> DeliveryOutcome:
        async with Dispatcher(rules.receivers, dead_letter=letters.append) as dispatcher:
            return await dispatcher.dispatch(test_notification(rules, receiver, time.time()))

    outcome = asyncio.run(send())
    if outcome.status != "sent":
        errors.print(f"receiver {receiver}: not delivered: {outcome.reason or outcome.status}", markup=False)
        raise typer.Exit(1)
    console.print(f"receiver {receiver}: test notification delivered", markup=False)


@alerts_app.command("list")
def list_alerts(as_json: JsonOption = False) -> None:
    """Active (pending and firing) alerts, as the alerting worker last published them; exit 1 when
    none has, or when the newest board is stale (no worker alerts now)."""
    settings = get_settings()
    try:
        board = read_alert_board(settings)
    except ValueError as err:
        failed(str(err))
    if board is None:
        failed(f"no alerts published on {settings.topic_alerts} yet (is a worker running?)")
    now = time.time()
    stale = board.stale(now)
    if as_json:
        logs.print_json([{**a.model_dump(mode="json"), "stale": stale} for a in board.alerts])
    else:
        print_alerts(board, stale, now)
    if board.left_off:
        errors.print(f"laggard: {board.left_off} more alert(s) left off the board (too many to publish)", markup=False)
    if stale:
        failed(f"these alerts were published {human_duration(now - board.written_at)} ago "
               f"({iso_utc(board.written_at)}, by {board.writer}) and no worker has published since: "
               "they may have ended (is a worker running?)")


def print_alerts(board: AlertBoard, stale: bool, now: float) -> None:
    table = Table("status", Column("alert", no_wrap=True), "severity", "where", "since", "muted", "summary")
    for a in board.alerts:
        since = a.starts_at if a.starts_at is not None else a.active_since
        where = pairs({k: v for k, v in a.labels.items() if k in ("cluster", "job", "rank", "node", "gpu")})
        muted = "silenced" if a.silenced_by else "inhibited" if a.inhibited else ""
        table.add_row(f"{a.status} (stale)" if stale else a.status, a.labels.get("alertname", a.rule),
                      a.labels.get("severity", ""), where, f"{iso_utc(since)} ({human_duration(now - since)})", muted,
                      a.annotations.get("summary", ""))
    logs.print_table(console, table)


@silence_app.command("add")
def silence_add(
    match: Annotated[list[str], typer.Option("--match", "-m", help="label matcher: k=v, k!=v, k=~regex, k!~regex")],
    comment: Annotated[str, typer.Option("--comment", help="why (required)")],
    duration: Annotated[str, typer.Option("--for", help="how long, e.g. 30m, 2h")] = "2h",
    author: Annotated[str | None, typer.Option("--author", help="who (default: your user name)")] = None,
) -> None:
    """Add a silence starting now."""
    try:
        matchers = [Matcher.model_validate(text) for text in match]
        seconds = parse_duration(duration)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    now = time.time()
    silence = Silence.new(matchers, starts_at=now, ends_at=now + seconds, comment=comment,
                          created_by=author or getpass.getuser(), now=now)
    write_silence(get_settings(), silence, forget=current_silences().forgettable(now))
    console.print(f"silence {silence.id} until {iso_utc(silence.ends_at)}", markup=False)


@silence_app.command("list")
def silence_list(
    include_expired: Annotated[bool, typer.Option("--all", help="include expired silences")] = False,
    as_json: JsonOption = False,
) -> None:
    """Pending and active silences (all with --all)."""
    now = time.time()
    silences = current_silences().listed(now, include_expired)
    if as_json:
        logs.print_json([{**s.model_dump(mode="json"), "state": s.state(now)} for s in silences])
        return
    table = Table(Column("id", no_wrap=True), "state", "matchers", "starts", "ends", "created by", "comment")
    for s in silences:
        table.add_row(s.id, s.state(now), " ".join(str(m) for m in s.matchers), iso_utc(s.starts_at),
                      iso_utc(s.ends_at), s.created_by, s.comment)
    logs.print_table(console, table)


@silence_app.command("expire")
def silence_expire(silence_id: Annotated[str, typer.Argument(help="silence id from `silence list`")]) -> None:
    """End a silence now (every worker stops applying it at its next tick)."""
    book, now = current_silences(), time.time()
    found = book.silences.get(silence_id)
    if found is None:
        failed(f"no silence with id {silence_id!r}")
    silence = found.ended(now)
    if silence is not found:
        write_silence(get_settings(), silence, forget=book.forgettable(now))
    console.print(f"silence {silence.id} expired at {iso_utc(silence.ends_at)}", markup=False)
