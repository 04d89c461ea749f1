"""A known failure of a `laggard` command is one line on stderr naming the input and what is wrong,
and a non-zero exit, never a traceback (issue #18): a broker that cannot be reached, an invalid
setting, a rules file that is not UTF-8, a receiver without its webhook URL, an InfluxDB that
`laggard report` cannot query (issue #16); records on the shared-state topics that are not silences
or alerts: tests/test_rules_silences.py. The worker, which goes on past a bad rules file and a bad
silence record by design, says each in one log line, and no secret appears in its log. Each runs
the real `laggard` command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from laggard.commands.pipeline_run import PipelineRun
from laggard.commands.stack.process import free_port
from laggard.settings import Settings
from tests.helpers.faults import produce

ROOT = Path(__file__).resolve().parents[1]
LAGGARD = [sys.executable, "-m", "laggard.commands.cli"]
SCENARIO = ROOT / "collectors" / "scenarios" / "quiet.yaml"
NOT_UTF8 = b"receivers: []\nroute: {receiver: caf\xe9}\n"
RULES = """\
receivers:
  - name: chat
    kind: slack
    url_env: T18_CHAT_URL
  - name: pager
    kind: webhook
    url_file: {url_file}
route:
  receiver: chat
rules:
  - name: Straggler
    finding: {{kind: straggler}}
    annotations:
      summary: "rank {{{{ labels.rank }}}} is slow"
"""


def laggard(*args: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """`laggard ARGS` with only `env` as laggard settings (none from this shell or a laggard.env)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LAGGARD_")}
    return subprocess.run([*LAGGARD, *args], cwd=cwd, env={**clean, "LAGGARD_STATE_DIR": str(cwd), **env},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_failure(done: subprocess.CompletedProcess[str], *names: str, max_lines: int = 2) -> str:
    """The failure's stderr, checked: non-zero exit, no traceback, a few lines naming every `names`."""
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert 0 < len(done.stderr.strip().splitlines()) <= max_lines, done.stderr
    for name in names:
        assert name in done.stderr, (name, done.stderr)
    return done.stderr


@pytest.mark.parametrize("command", [["worker"], ["simulate", str(SCENARIO)]], ids=["worker", "simulate"])
def test_an_unreachable_broker_is_one_line_naming_its_address(command: list[str], tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    # Generous for a loaded machine; the command gives up after LAGGARD_KAFKA_BOOTSTRAP_TIMEOUT_S (10 s).
    done = laggard(*command, cwd=tmp_path, timeout=240, LAGGARD_KAFKA_BOOTSTRAP_SERVERS=address)
    line = one_line_failure(done, f"cannot reach Kafka at {address}", "LAGGARD_KAFKA_BOOTSTRAP_SERVERS", max_lines=1)
    assert done.returncode == 2, line


def test_report_with_influxdb_down_is_one_line_naming_its_redacted_url(tmp_path: Path) -> None:
    """Not 40 s of retries and a 300-line traceback (issue #16): the report retries for a moment,
    then says which InfluxDB it could not query and why; the URL's password is not shown."""
    password = f"S3cret-{uuid.uuid4().hex[:12]}"
    port = free_port()  # nothing listens there
    done = laggard("report", "--out", str(tmp_path / "out"), cwd=tmp_path,
                   LAGGARD_INFLUX_URL=f"http://alice:{password}@127.0.0.1:{port}")
    line = one_line_failure(done, f"laggard report: cannot query InfluxDB at http://***@127.0.0.1:{port} "
                                  "(LAGGARD_INFLUX_URL): ConnectError:", max_lines=1)
    assert done.returncode == 2 and password not in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [
    ["worker"], ["simulate", str(SCENARIO)], ["alerts", "list"], ["silence", "list"], ["detect", "-"],
    ["collect", "replay", str(SCENARIO), "--stdout"],
], ids=lambda c: " ".join(c[:2]))
def test_an_invalid_setting_is_one_line_naming_it(command: list[str], tmp_path: Path) -> None:
    done = laggard(*command, cwd=tmp_path, LAGGARD_WINDOW_S="-1")
    line = one_line_failure(done, max_lines=1)
    assert line == "laggard: invalid setting LAGGARD_WINDOW_S=-1: must be > 0\n"
    assert done.returncode == 2


def test_several_invalid_settings_are_named_on_one_line(tmp_path: Path) -> None:
    done = laggard("alerts", "list", cwd=tmp_path, LAGGARD_TOPIC_PARTITIONS="many",
                   LAGGARD_KAFKA_SECURITY_PROTOCOL="TLS")
    one_line_failure(done, "LAGGARD_TOPIC_PARTITIONS=many: must be a valid integer",
                     "LAGGARD_KAFKA_SECURITY_PROTOCOL=TLS: must be 'PLAINTEXT'", max_lines=1)


def test_a_rules_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_bytes(NOT_UTF8)
    done = laggard("rules", "check", str(rules), cwd=tmp_path)
    assert done.returncode == 1
    one_line_failure(done, f"{rules}:2: <file>: not UTF-8 text (byte 0xe9)", "1 error(s)")


def test_rules_check_is_not_ok_while_a_receivers_webhook_url_is_missing(tmp_path: Path) -> None:
    url_file = tmp_path / "pager-url"
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(url_file=url_file))
    missing = laggard("rules", "check", str(rules), cwd=tmp_path)
    assert missing.returncode == 1, missing.stdout
    assert "NOT OK" in missing.stdout and ": OK" not in missing.stdout
    assert f"{rules}: receiver 'chat': environment variable T18_CHAT_URL is not set" in missing.stderr
    assert f"{rules}: receiver 'pager': cannot read url_file {url_file}" in missing.stderr
    assert "Traceback" not in missing.stderr

    secret = f"https://hooks.example.com/services/T0/B0/{uuid.uuid4().hex}"
    url_file.write_text(secret + "\n")
    ok = laggard("rules", "check", str(rules), cwd=tmp_path, T18_CHAT_URL=secret)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{rules}: OK (1 rules, 2 receivers)\n"
    assert secret not in ok.stdout + ok.stderr

    unchecked = laggard("rules", "check", "--no-secrets", str(rules), cwd=tmp_path)
    assert unchecked.returncode == 0 and unchecked.stdout == ok.stdout, unchecked.stderr


TINY = """\
name: t18
seed: 1
duration_s: 60
tick_s: 1.0
cluster: sim-t18
nodes:
  - {prefix: h100-, count: 8, model: H100}
jobs:
  - {name: train, nodes: [{group: h100-, first: 0, count: 8}], step_s: 1.0}
faults: []
"""


def test_the_worker_says_each_bad_input_in_one_log_line_and_no_secret(stack: Settings, tmp_path: Path) -> None:
    """A rules file that is not UTF-8 and a record on the silences topic that is not a silence are
    refused in one log line each (the worker goes on: last good rules, the other silences); InfluxDB's
    credentials, in its URL, appear in none of the lines httpx and the sink's retries log at -l info."""
    password = f"S3cret-{uuid.uuid4().hex[:12]}"
    rules = tmp_path / "rules.yaml"
    rules.write_bytes(NOT_UTF8)
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(TINY)
    influx_url = stack.influx_url.replace("://", f"://alice:{password}@", 1)
    # A database that does not exist: InfluxDB answers 404, which the sink retries and logs.
    overrides = {"influx_url": influx_url, "influx_database": f"t18_missing_{uuid.uuid4().hex[:8]}",
                 "influx_bucket": f"t18_missing_{uuid.uuid4().hex[:8]}", "rules_file": rules}
    with PipelineRun(stack, prefix="t18-logs", state_root=tmp_path / "state", overrides=overrides) as run:
        produce(run.settings, run.settings.topic_silences, [(b"s1", b'[{"id": ')])
        silences = f"{run.settings.topic_silences}@0"
        run.start_worker(log_level="info")
        run.publish_scenario(scenario)
        wanted = {"rules": "not UTF-8 text (byte 0xe9)", "silences": "not a silence, skipped: not valid JSON",
                  "retry": "unavailable (InfluxUnavailable: HTTP 404", "httpx": "HTTP Request: POST"}
        deadline = time.monotonic() + 180
        while not all(text in (log := run.log_path.read_text(errors="replace")) for text in wanted.values()):
            assert time.monotonic() < deadline, f"not all of {wanted} logged:\n{run.describe()}"
            run.stats()  # raises if the worker exited
            time.sleep(0.5)  # polled against the deadline above
        # Stopped by SIGKILL: SIGTERM waits for the sink's retries, which never end (issue #18; agents/sink.py).
        run.stop_worker(grace_s=1)
    lines = log.splitlines()
    assert password not in log and "Logging error" not in log and "Traceback (most recent call last)" not in log
    for text in ("rules", "silences"):
        [index] = [i for i, line in enumerate(lines) if wanted[text] in line]
        assert str(rules if text == "rules" else silences) in lines[index]
        # One line: what follows (if anything) is the next record.
        assert all(line.startswith("[") for line in lines[index + 1:index + 2]), lines[index: index + 3]
    assert any("InfluxDB at http://***@127.0.0.1" in line and wanted["retry"] in line for line in lines), log[-3000:]
