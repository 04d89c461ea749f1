"""What `laggard` commands print, for people and for programs (issue #16, CLI rough edges): every
listing command has `--json` (valid JSON, its fields checked); a table piped or redirected is plain,
every value whole on its row (rich cut columns to 80 characters); `-v`/`-q` and `--log-format json`
apply to every subcommand, the worker's Faust log included, whose lines carry no cursor or colour
codes when they go to a file. Each runs the real `laggard` command with stdout and stderr pipes."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from laggard import logs
from laggard.commands.cli import app
from laggard.commands.pipeline_run import PipelineRun
from laggard.commands.stack.process import free_port, wait_until
from laggard.events import encode
from laggard.logs import LogFormat
from laggard.rules.alert_lifecycle import AlertState
from laggard.rules.shared_state import ALERTS_KEY, board_record
from laggard.settings import Settings
from tests.helpers.faults import produce
from tests.helpers.samples import node_sample
from tests.helpers.telemetry import STRAGGLER_RANK, write_recent_run
from tests.test_cli_errors import ROOT, laggard

LONG = "a value longer than any terminal " + "x" * 150 + " and its end"
JSON_KEYS = {"time", "level", "logger", "message"}
RULES = ROOT / "rules" / "default.yaml"


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON object (fails on any line that is not one)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- --json on every listing command -------------------------------------------------------------

def test_silence_list_json_lists_each_silence_with_its_state(tmp_path: Path, shared_state_env: dict[str, str]) -> None:
    added = laggard("silence", "add", "--match", "job=train", "--match", "rank=~1.", "--comment", "parked",
                    "--author", "ops", "--for", "1h", cwd=tmp_path, **shared_state_env)
    assert added.returncode == 0, added.stderr
    done = laggard("silence", "list", "--json", cwd=tmp_path, **shared_state_env)
    assert done.returncode == 0, done.stderr
    [silence] = json.loads(done.stdout)
    assert added.stdout.startswith(f"silence {silence['id']} until ")
    assert silence["state"] == "active" and silence["comment"] == "parked" and silence["created_by"] == "ops"
    assert silence["matchers"] == [{"name": "job", "op": "=", "value": "train"},
                                   {"name": "rank", "op": "=~", "value": "1."}]
    assert silence["ends_at"] - silence["starts_at"] == pytest.approx(3600)


def test_rules_check_json_gives_each_file_its_counts_and_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("receivers: []\nroute: {receiver: nowhere}\nrules: 3\n")
    done = laggard("rules", "check", "--json", "--no-secrets", str(RULES), str(bad), cwd=tmp_path)
    assert done.returncode == 1 and done.stderr == "", done.stderr
    good, broken = json.loads(done.stdout)
    assert good["file"] == str(RULES) and good["ok"] is True and good["rules"] > 0 and good["errors"] == []
    assert broken["file"] == str(bad) and broken["ok"] is False and broken["rules"] is None
    assert broken["errors"] and all(e["file"] == str(bad) and e["line"] > 0 for e in broken["errors"])
    assert {"field", "message"} <= broken["errors"][0].keys()


def test_stack_status_json_names_each_service_and_exits_1_while_one_is_down(tmp_path: Path) -> None:
    ports = {"kafka": free_port(), "influx": free_port()}  # nothing listens on either
    done = laggard("stack", "status", "--json", cwd=tmp_path, LAGGARD_KAFKA_PORT=str(ports["kafka"]),
                   LAGGARD_INFLUX_PORT=str(ports["influx"]))
    assert done.returncode == 1, done.stderr
    stopped = {"pid": None, "healthy": False, "state": "stopped"}
    assert json.loads(done.stdout) == [{"service": name, "port": port, **stopped} for name, port in ports.items()]


@pytest.mark.stack
def test_report_json_summarises_what_the_page_shows(stack: Settings, unique: str, tmp_path: Path) -> None:
    """On data written with the real sink to the real InfluxDB (its own cluster name)."""
    cluster = f"report-json-{unique}"
    run, _ = write_recent_run(stack, cluster, windows_ago=30)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["report", "--since", "1h", "--cluster", cluster, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert Path(summary["page"]) == out / "report.html" and Path(summary["page"]).is_file()
    assert summary["since"] == "1h" and summary["findings"] == len({f.fingerprint for f in run.findings})
    assert "llm" in [job["job"] for job in summary["worst_jobs"]]
    straggler = next(f for f in run.findings if f.kind == "straggler")
    [episode] = [e for e in summary["episodes"] if e["kind"] == "straggler"]
    assert (episode["job"], episode["rank"], episode["node"], episode["active"]) == ("llm", str(STRAGGLER_RANK), "n0", True)
    waste = {w["kind"]: w for w in summary["waste"]}
    # Fired at window 2 and still firing at the last window (5): 4 windows of per-window cost.
    assert waste["straggler"]["count"] == 1
    assert waste["straggler"]["gpu_h"] == pytest.approx(4 * straggler.cost["peer_gpu_s_wasted"] / 3600, rel=1e-3)


# --- plain tables when piped ---------------------------------------------------------------------

def test_silence_list_piped_keeps_every_value_whole_on_its_row(tmp_path: Path, shared_state_env: dict[str, str]) -> None:
    added = laggard("silence", "add", "--match", "job=train", "--comment", LONG, cwd=tmp_path, **shared_state_env)
    assert added.returncode == 0, added.stderr
    done = laggard("silence", "list", cwd=tmp_path, **shared_state_env)
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["id", "state", "matchers", "starts", "ends", "created", "by", "comment"]
    assert row.endswith(LONG) and "job=train" in row and " active " in row
    assert not set("│┃━─┏└") & set(done.stdout)  # no box drawing


def test_alerts_list_piped_keeps_the_long_summary_whole(tmp_path: Path, shared_state_env: dict[str, str],
                                                        stack: Settings) -> None:
    now = time.time()
    alert = AlertState(fingerprint="f1", rule="StragglerRank", status="firing", active_since=now - 90,
                       last_true_at=now, starts_at=now - 60, annotations={"summary": LONG},
                       labels={"alertname": "StragglerRank", "severity": "warning", "job": "train", "rank": "17"})
    produce(stack, shared_state_env["LAGGARD_TOPIC_ALERTS"], [(ALERTS_KEY, board_record([alert], now, "host:1"))])
    done = laggard("alerts", "list", cwd=tmp_path, **shared_state_env)
    assert done.returncode == 0, done.stderr
    [row] = [line for line in done.stdout.splitlines() if line.startswith("firing")]
    assert "StragglerRank" in row and "rank=17" in row and row.endswith(LONG)


def test_simulate_piped_prints_its_summary_alone(tmp_path: Path) -> None:
    """No progress bar when stderr is not a terminal, and no blank line where it was."""
    done = laggard("simulate", str(ROOT / "collectors" / "scenarios" / "quiet.yaml"), "--discard",
                   "--as-fast-as-possible", "--duration", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("simulate quiet: ") and done.stderr.count("\n") == 1, repr(done.stderr)


def test_status_lines_follow_log_format_json(tmp_path: Path) -> None:
    """A collector's or the simulator's own lines (its summary, its one-line errors) are JSON records
    like its logs under --log-format json: a service's stderr stays one format."""
    done = laggard("--log-format", "json", "simulate", str(ROOT / "collectors" / "scenarios" / "quiet.yaml"),
                   "--discard", "--as-fast-as-possible", "--duration", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [summary] = json_lines(done.stderr)
    assert JSON_KEYS <= summary.keys() and summary["logger"] == "laggard.simulate" and summary["level"] == "INFO"
    assert summary["message"].startswith("simulate quiet: ")
    bad = laggard("--log-format", "json", "collect", "dcgm", "--url", "ftp://exporter:9400/metrics", "--count", "1",
                  cwd=tmp_path)
    assert bad.returncode == 2
    [error] = json_lines(bad.stderr)
    assert error["level"] == "ERROR" and error["message"].startswith("laggard collect: ")


# --- logging: -v / -q / --log-format --------------------------------------------------------------

@pytest.mark.parametrize("verbose,quiet,level", [
    (0, 0, None), (1, 0, logging.INFO), (2, 0, logging.DEBUG), (5, 0, logging.DEBUG),
    (0, 1, logging.ERROR), (0, 2, logging.CRITICAL), (0, 9, logging.CRITICAL), (1, 1, logging.WARNING),
])
def test_each_v_is_one_level_down_and_each_q_one_up(verbose: int, quiet: int, level: int | None) -> None:
    assert logs.level_for(verbose, quiet) == level


def test_a_json_record_carries_its_exception_and_no_secret() -> None:
    stream, log = io.StringIO(), logging.getLogger("laggard.test.json")
    handler = logs.handler(LogFormat.json, stream)
    log.addHandler(handler)
    log.propagate = False
    try:
        raise ConnectionError("refused at http://alice:pw-123456@db:1/write")
    except ConnectionError:
        log.exception("write to %s failed", "http://alice:pw-123456@db:1")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    [record] = json_lines(stream.getvalue())
    assert record.keys() == JSON_KEYS | {"exception"} and record["time"].endswith("+00:00")
    assert (record["level"], record["logger"]) == ("ERROR", "laggard.test.json")
    assert record["message"] == "write to http://***@db:1 failed"
    assert record["exception"].endswith("ConnectionError: refused at http://***@db:1/write")
    assert "pw-123456" not in stream.getvalue()


def test_a_command_run_in_process_leaves_logging_as_it_found_it() -> None:
    root = logging.getLogger()
    handlers, level, setup = list(root.handlers), root.level, logs.current()
    result = CliRunner().invoke(app, ["-vv", "--log-format", "json", "rules", "check", "--no-secrets", str(RULES)])
    assert result.exit_code == 0, result.output
    assert root.handlers == handlers and root.level == level and logs.current() == setup


@pytest.fixture
def samples_with_a_bad_line(tmp_path: Path) -> Path:
    """A samples file whose second line the replay rejects with a warning."""
    good = json.loads(encode(node_sample(ts=1_700_000_000.0)))
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "ts": "later"}) + "\n")
    return path


@pytest.mark.parametrize("options,logged", [([], True), (["-q"], False)], ids=["default", "-q"])
def test_a_collectors_warning_shows_by_default_and_not_with_q(
        options: list[str], logged: bool, samples_with_a_bad_line: Path, tmp_path: Path) -> None:
    done = laggard(*options, "collect", "replay", str(samples_with_a_bad_line), "--format", "samples", "--speed", "0",
                   "--stdout", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "rejected samples.jsonl:2" in line]
    assert len(warnings) == (1 if logged else 0), done.stderr
    assert all("[WARNING] laggard.collectors:" in line for line in warnings)
    assert "replay: 1 ticks, 1 node samples" in done.stderr  # the summary is output, not a log: shown with -q


def test_log_format_json_is_one_object_per_line_with_secrets_redacted(tmp_path: Path) -> None:
    """`-v --log-format json report` against an InfluxDB that is down: each retry the sink logs (at
    info for the report, so seen with -v) is a JSON object; the credentials in the URL are not in it."""
    password = f"S3cret-{uuid.uuid4().hex[:12]}"
    url = f"http://alice:{password}@127.0.0.1:{free_port()}"
    done = laggard("-v", "--log-format", "json", "report", "--out", str(tmp_path / "out"), cwd=tmp_path,
                   LAGGARD_INFLUX_URL=url)
    assert done.returncode == 2 and password not in done.stderr, done.stderr
    *log_lines, error = done.stderr.splitlines()
    records = json_lines("\n".join(log_lines))
    assert records and all(record.keys() >= JSON_KEYS for record in records)
    retries = [r for r in records if r["logger"] == "laggard.agents.sink"]
    assert retries and all(r["level"] == "INFO" and "InfluxDB at http://***@127.0.0.1" in r["message"]
                           for r in retries), records
    assert error.startswith("laggard report: cannot query InfluxDB at http://***@127.0.0.1")


# --- the worker's log ------------------------------------------------------------------------------

@pytest.mark.parametrize("log_format,level", [("text", "warn"), ("json", "info")])
def test_the_worker_log_follows_log_format_and_has_no_terminal_codes(
        log_format: str, level: str, stack: Settings, tmp_path: Path) -> None:
    with PipelineRun(stack, prefix="t16-log", state_root=tmp_path, extra_env={"LAGGARD_LOG_FORMAT": log_format}) as run:
        run.start_worker(log_level=level)
        assert wait_until(lambda: bool(run.stats()), 120, 0.5), f"the worker never answered:\n{run.describe()}"
        run.stop_worker()
    log = run.log_path.read_text()
    assert "\x1b" not in log and "\b" not in log, repr(log[:2000])  # no cursor, colour or spinner codes
    if log_format == "json":
        records = json_lines(log)  # the banner is left out: every line is a record
        assert all(record.keys() >= JSON_KEYS for record in records)
        assert any(r["logger"].startswith("faust") and r["level"] == "INFO" for r in records), log[-2000:]
    else:
        assert "| id          | " + run.run_id in log  # Faust's banner, in ASCII when not on a terminal
