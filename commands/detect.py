"""`laggard detect FILE... | -`: the worker's windows and detectors over recorded node samples
(JSON lines in the event schema, as `laggard collect ... --stdout` prints them), offline: findings
come out as JSON lines. For checking a recorded incident, and for tests without a broker."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from laggard.agents.offline import OfflineCounts, detect_offline
from laggard.settings import get_settings


def recorded_lines(paths: list[str]) -> Iterator[bytes]:
    """Each file's lines in turn ('-' is standard input); blank lines skipped."""
    for path in paths:
        stream = sys.stdin.buffer if path == "-" else Path(path).open("rb")
        try:
            for line in stream:
                if line.strip():
                    yield line.rstrip(b"\r\n")
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()


def detect_command(
    files: Annotated[list[str], typer.Argument(help="Node-sample JSON lines files; '-' reads standard input.")],
) -> None:
    """Run the worker's windows and detectors over recorded node samples, offline, and print the
    findings as JSON lines (firing and resolved); bad or late samples are counted on stderr."""
    for path in files:
        if path != "-" and not Path(path).is_file():
            typer.echo(f"laggard detect: {path}: no such file", err=True)
            raise typer.Exit(2)
    settings = get_settings()
    counts = OfflineCounts()
    findings = 0
    for finding in detect_offline(recorded_lines(files), settings.window_s, settings.late_grace_s, counts):
        sys.stdout.write(finding.model_dump_json() + "\n")
        findings += 1
    sys.stdout.flush()
    for reason in counts.reasons:
        typer.echo(f"laggard detect: skipped {reason}", err=True)
    typer.echo(f"laggard detect: {counts.accepted} samples, {counts.rejected} rejected, {counts.late} late, "
               f"{findings} findings", err=True)
