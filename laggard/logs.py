"""What every laggard command writes to the terminal, configured in one place.

Logs: `configure(level, fmt)` gives the root logger one handler on stderr, in text or in JSON (one
object per line: time, level, logger, message, and exception when there is one), with the redaction
filter of laggard/redaction.py on it, so a secret never reaches a line whatever the format. The
`laggard` command calls it from its callback (`-v`/`-q`, `--log-format`), so every subcommand runs
with it; the worker puts the same handler back on the root logger after Faust (mode) replaced it
with its coloured one (`attach`). `demoted(name)` shows a library's warnings as detail for a while
(kafka-python's and the InfluxDB sink's retries, when the command says what failed in its own line).

Output: `say` writes a command's own status line, in the log format; `print_table` prints a rich table as it is on a terminal and plain when piped or redirected
(no box, no colour, every value whole: rich would cut columns to 80 characters); `print_json` is the
`--json` of every listing command.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from io import StringIO
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from laggard.redaction import RedactSecrets


class LogFormat(str, Enum):
    text = "text"
    json = "json"


DEFAULT_LEVEL = logging.WARNING
TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
# `-l` names (the worker's; Faust's and logging's spellings).
LEVEL_NAMES = {"crit": logging.CRITICAL, "critical": logging.CRITICAL, "error": logging.ERROR,
               "warn": logging.WARNING, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


@dataclass(frozen=True)
class LogSetup:
    level: int = DEFAULT_LEVEL
    fmt: LogFormat = LogFormat.text
    chosen: bool = False  # the level was asked for (-v, -q, -l), not the default


_setup = LogSetup()


def level_for(verbose: int, quiet: int) -> int | None:
    """The level `-v` and `-q` (each repeatable) ask for: WARNING one step down per -v, one up per
    -q, within DEBUG..CRITICAL; None when neither is given."""
    if not verbose and not quiet:
        return None
    return min(max(DEFAULT_LEVEL + 10 * (quiet - verbose), logging.DEBUG), logging.CRITICAL)


def parse_level(name: str) -> int:
    """'info', 'WARN', 'crit', ... -> the logging level; ValueError naming the choices."""
    try:
        return LEVEL_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"{name!r} is not one of {', '.join(LEVEL_NAMES)}") from None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message[, exception, stack]."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str)


_demotions: list[tuple[str, int]] = []  # (logger name, highest level its records keep), innermost last


class _Demote(logging.Filter):
    """On laggard's handler: a record of a demoted logger (or of one below it) is lowered to the
    demotion's level, then shown only if the configured level still lets it through."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, level in list(_demotions):
            if record.levelno > level and (record.name == name or record.name.startswith(name + ".")):
                record.levelno, record.levelname = level, logging.getLevelName(level)
        return record.levelno >= _setup.level


@contextmanager
def demoted(name: str, level: int = logging.INFO) -> Iterator[None]:
    """While inside, the records of logger `name` and those below it are shown at `level` at most: a
    command's view of a library's retries (detail, seen with -v; the command's own line says what failed)."""
    _demotions.append((name, level))
    try:
        yield
    finally:
        _demotions.remove((name, level))


class _Handler(logging.StreamHandler[IO[str]]):
    """laggard's handler: `configure` replaces only this one, leaving any other (pytest's) in place."""


def handler(fmt: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """A handler on `stream` (stderr) in `fmt`, redacting secrets; never coloured."""
    made = _Handler(stream or sys.stderr)
    made.setFormatter(JsonFormatter() if fmt is LogFormat.json else logging.Formatter(TEXT_FORMAT))
    made.addFilter(_Demote())
    made.addFilter(RedactSecrets())
    return made


def configure(level: int | None = None, fmt: LogFormat = LogFormat.text) -> LogSetup:
    """The root logger at `level` (default WARNING) with laggard's one handler in `fmt`; remembered
    for `current()` and `attach()`."""
    global _setup
    _setup = LogSetup(DEFAULT_LEVEL if level is None else level, fmt, chosen=level is not None)
    attach(logging.getLogger(), only_laggards=True)
    return _setup


@contextmanager
def configured(level: int | None = None, fmt: LogFormat = LogFormat.text) -> Iterator[LogSetup]:
    """`configure` until the end of the block, then logging as it was: laggard's handler removed, the
    root level and the setup before restored (a command run in-process, as tests do, leaves nothing)."""
    global _setup
    root, before = logging.getLogger(), _setup
    level_before = root.level
    try:
        yield configure(level, fmt)
    finally:
        for old in [h for h in root.handlers if isinstance(h, _Handler)]:
            root.removeHandler(old)
        root.setLevel(level_before)
        _setup = before


def current() -> LogSetup:
    return _setup


def attach(logger: logging.Logger, only_laggards: bool = False) -> int:
    """Replace `logger`'s handlers (or only laggard's own) with laggard's, in the current format, and
    set its level; returns the level."""
    for old in list(logger.handlers):
        if not only_laggards or isinstance(old, _Handler):
            logger.removeHandler(old)
    logger.addHandler(handler(_setup.fmt))
    logger.setLevel(_setup.level)
    return _setup.level


def print_table(console: Console, table: Table) -> None:
    """`table` on `console`: as rich draws it on a terminal; plain when piped or redirected (no box,
    columns two spaces apart, no trailing spaces, no value cut or wrapped at any width)."""
    if console.is_terminal:
        console.print(table)
        return
    table.box, table.pad_edge = None, False
    text = StringIO()
    Console(file=text, width=1_000_000, color_system=None, soft_wrap=False).print(table)
    console.file.write("".join(line.rstrip() + "\n" for line in text.getvalue().splitlines()))
    console.file.flush()


def say(console: Console, message: str, logger: str = "laggard", level: int = logging.INFO) -> None:
    """A command's own status or error line on `console` (stderr), whatever the log level: plain in
    text, a JSON record like the logs' (secrets redacted) under `--log-format json`, so a service's
    stderr stays one format."""
    if _setup.fmt is not LogFormat.json:
        console.print(message, highlight=False, soft_wrap=True)
        return
    record = logging.LogRecord(logger, level, "", 0, message, None, None)
    RedactSecrets().filter(record)
    console.file.write(JsonFormatter().format(record) + "\n")
    console.file.flush()


def print_json(data: Any) -> None:
    """`data` as one JSON document on stdout (the `--json` of listing commands)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()
