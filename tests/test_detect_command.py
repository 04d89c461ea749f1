"""`laggard detect`: recorded node samples in (files or stdin), findings out as JSON lines; bad lines
are counted on stderr and skipped, never fatal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from laggard.collectors.simulate import FleetSimulator, Scenario
from laggard.results import Finding

START = 1_790_000_000.0
THERMAL = Scenario.model_validate({
    "name": "detect-cmd", "seed": 2, "duration_s": 70, "cluster": "rec",
    "nodes": [{"prefix": "n", "count": 4, "model": "H100"}],
    "jobs": [{"name": "llm", "nodes": [{"group": "n", "count": 4}], "step_s": 1.0}],
    "faults": [{"kind": "straggler", "job": "llm", "rank": 9, "cause": "thermal", "slowdown": 1.3, "start_s": 15}],
})


def detect(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "laggard.commands.cli", "detect", *args], input=stdin,
                          capture_output=True, timeout=120)


def recording(tmp_path: Path) -> Path:
    path = tmp_path / "incident.jsonl"
    lines = [value for _ts, batch in FleetSimulator(THERMAL, start_ts=START).encoded_ticks() for _key, value in batch]
    lines.insert(40, b'{"not": "a node sample"}')
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_recorded_straggler_is_named_from_a_file_and_from_stdin(tmp_path: Path) -> None:
    path = recording(tmp_path)
    from_file, from_stdin = detect(str(path)), detect("-", stdin=path.read_bytes())
    assert from_file.returncode == 0, from_file.stderr.decode()
    assert from_file.stdout == from_stdin.stdout
    findings = [Finding.model_validate_json(line) for line in from_file.stdout.splitlines()]
    firing = [(f.kind, f.job, f.rank, f.evidence["signature"]) for f in findings if f.state == "firing"]
    assert firing == [("straggler", "llm", 9, "throttled")]
    err = from_file.stderr.decode()
    assert "message 41: " in err and "1 rejected" in err and f"{len(findings)} findings" in err


def test_a_missing_file_is_named_and_exits_2(tmp_path: Path) -> None:
    done = detect(str(tmp_path / "nope.jsonl"))
    assert done.returncode == 2 and b"nope.jsonl: no such file" in done.stderr and done.stdout == b""
