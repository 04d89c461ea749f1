"""Secrets never leave the process, and the worker's HTTP endpoints are not public.

One real pipeline run (simulator -> Kafka -> worker -> InfluxDB + a webhook) with secret values
in every secret setting the local plaintext stack tolerates: InfluxDB token and password (the
v1 sink then sends basic auth, which an auth-disabled InfluxDB ignores), a Kafka SASL password
(unused without a mechanism) and a Slack webhook URL whose path is the credential, pointing at a
real local server that answers 500 and echoes the path, as framework error pages do. Then every
place a secret could surface is searched: the worker's log, the CLI's output, every Kafka topic of
the run (dead letters and Faust's changelogs included) and every file in its state folder.

Rule templates cannot execute code: tests/test_rules_check.py (`sandbox-attr`) and
rules/templating.py's ImmutableSandboxedEnvironment cover it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from kafka import KafkaAdminClient

from laggard.commands.pipeline_run import PipelineRun
from laggard.commands.stack.process import wait_until
from laggard.kafka_config import client_config
from laggard.rules.receivers.delivery import redact
from laggard.settings import Settings
from laggard.topics import read_topic
from tests.helpers.webhook_server import Reply, WebhookServer

SCENARIO = "tests/scenarios/small_eval.yaml"
HOOK_PATH = "/hooks/T0LAGGARD/B0LAGGARD"
# Every alert goes to Slack at once, with a quick retry budget, so the 500s are seen in seconds.
RULES = """
receivers:
  - {name: slack, kind: slack, url_env: LAGGARD_SLACK_WEBHOOK_URL, rate_per_s: 50, burst: 50,
     max_attempts: 2, backoff_initial: 0.05s, backoff_max: 0.1s, timeout: 2s}
route: {receiver: slack, group_by: [alertname, job], group_wait: 0s, group_interval: 1s, repeat_interval: 1h}
rules:
  - name: StragglerRank
    finding: {kind: straggler}
    annotations: {summary: "rank {{ labels.rank }} of {{ labels.job }} paces its peers"}
  - name: IdleAllocatedGpu
    finding: {kind: idle_allocated}
    annotations: {summary: "{{ labels.job }} holds idle GPUs"}
"""


@dataclass
class SecureRun:
    secrets: list[str]
    webhook_requests: int
    stats: dict
    worker_log: str
    cli_output: dict[str, str]
    topics: dict[str, list[bytes]]
    state_files: dict[Path, bytes]
    listening: set[str]
    external_connect: dict[str, str]  # non-loopback address -> what connecting to the web port did
    local_status: dict[str, int]  # endpoint -> HTTP status on 127.0.0.1


def _proc_address(hex_addr: str) -> str:
    """An address from /proc/net/tcp{,6}: hex, each 32-bit word in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def listening_addresses(port: int, proc_files: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> set[str]:
    """Local addresses with a socket in LISTEN state (0A) on `port`, from the kernel's tables."""
    found = set()
    for name in proc_files:
        for line in Path(name).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(_proc_address(address))
    return found


def external_addresses() -> list[str]:
    """This machine's non-loopback addresses (`hostname -I`); empty on a machine without any."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [a for a in out.split() if not a.startswith("127.") and a != "::1"]


def try_connect(address: str, port: int) -> str:
    try:
        with socket.create_connection((address, port), timeout=3):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def cli(args: list[str], env: Mapping[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "laggard.commands.cli", *args], env=dict(env), capture_output=True,
                          text=True, timeout=120)
    return done.stdout + done.stderr


def run_topics(settings: Settings, run_id: str) -> dict[str, list[bytes]]:
    """Every message of every topic the run made (its own topics and Faust's changelogs)."""
    admin = KafkaAdminClient(**client_config(settings), client_id="laggard-security-test")
    try:
        names = sorted(t for t in admin.list_topics() if t.startswith(run_id))
    finally:
        admin.close()
    return {name: read_topic(settings, name) for name in names}


@pytest.fixture(scope="module")
def secure_run(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRun]:
    tmp = tmp_path_factory.mktemp("security")
    tag = uuid.uuid4().hex[:8]
    token = f"SECRET-xyz-{tag}"  # the credential part of the webhook URL
    secrets_env = {
        "LAGGARD_INFLUX_TOKEN": f"influx-token-SECRET-{tag}",
        "LAGGARD_INFLUX_USERNAME": "laggard",
        "LAGGARD_INFLUX_PASSWORD": f"influx-password-SECRET-{tag}",
        "LAGGARD_KAFKA_SASL_PASSWORD": f"sasl-password-SECRET-{tag}",
    }
    secrets = [secrets_env["LAGGARD_INFLUX_TOKEN"], secrets_env["LAGGARD_INFLUX_PASSWORD"],
               secrets_env["LAGGARD_KAFKA_SASL_PASSWORD"], token]
    rules_file = tmp / "rules.yaml"
    rules_file.write_text(RULES)
    with WebhookServer() as server:
        path = f"{HOOK_PATH}/{token}"
        # A server error (retried), then a refusal for good that echoes the secret path (dead-lettered).
        server.script(path, Reply(status=500, body=f"Cannot POST {path}"), times=1)
        server.script(path, Reply(status=404, body=f"Cannot POST {path}"), times=10_000)
        env = {**secrets_env, "LAGGARD_SLACK_WEBHOOK_URL": server.url(path), "LAGGARD_RULES_FILE": str(rules_file)}
        with PipelineRun(stack, prefix="test-security", extra_env=env, state_root=tmp) as run:
            run.start_worker()
            run.publish_scenario(SCENARIO)
            run.wait_until_quiet(timeout_s=180)
            assert wait_until(lambda: run.stats().get("notifications_failed", 0) >= 1, 60, 0.5), \
                "no notification was dead-lettered"
            port = run.settings.worker_web_port
            listening = listening_addresses(port)
            external = {address: try_connect(address, port) for address in external_addresses()}
            local = {page: httpx.get(f"http://127.0.0.1:{port}{page}", timeout=5).status_code
                     for page in ("/stats", "/metrics")}
            cli_env = {**os.environ, **env}
            cli_output = {
                "stack status": cli(["stack", "status"], cli_env),
                "alerts list": cli(["alerts", "list"], {**cli_env, **run.env}),
                "alerts test slack": cli(["alerts", "test", "slack", "--config", str(rules_file)], cli_env),
            }
            stats = run.stats()
            run.stop_worker()
            topics = run_topics(run.settings, run.run_id)
        state_files = {p: p.read_bytes() for p in Path(run.settings.state_dir).rglob("*") if p.is_file()}
        yield SecureRun(secrets, len(server.requests(path)), stats, run.log_path.read_text(errors="replace"),
                        cli_output, topics, state_files, listening, external, local)


def leaks(secrets: list[str], text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [s for s in secrets if s.encode() in data]


def test_the_secrets_were_used(secure_run: SecureRun) -> None:
    """Without this the searches below could pass on a run that never touched a secret."""
    assert secure_run.webhook_requests >= 2  # first attempt + retry, at the secret path
    assert secure_run.stats["notifications_failed"] >= 1
    assert secure_run.stats["influx_points_written"] > 0  # written with the basic-auth password
    assert "dead-lettered after 2 attempt(s): HTTP 404" in secure_run.worker_log
    assert "not delivered: HTTP 404" in secure_run.cli_output["alerts test slack"]
    assert any(b'"reason":"HTTP 404' in (v or b"").replace(b'": "', b'":"')
               for name, values in secure_run.topics.items() if name.endswith(".deadletter") for v in values)


def test_no_secret_in_the_worker_log(secure_run: SecureRun) -> None:
    assert leaks(secure_run.secrets, secure_run.worker_log) == []


def test_no_secret_in_cli_output(secure_run: SecureRun) -> None:
    found = {command: leaks(secure_run.secrets, out) for command, out in secure_run.cli_output.items()}
    assert found == {command: [] for command in secure_run.cli_output}


def test_no_secret_in_any_topic_of_the_run(secure_run: SecureRun) -> None:
    assert any(name.endswith(".deadletter") for name in secure_run.topics)
    found = {name: leaks(secure_run.secrets, b"\n".join(v or b"" for v in values))
             for name, values in secure_run.topics.items()}
    assert {name: hit for name, hit in found.items() if hit} == {}


def test_no_secret_in_the_state_folder(secure_run: SecureRun) -> None:
    assert secure_run.state_files  # the worker log and the alert state at least
    found = {path: leaks(secure_run.secrets, data) for path, data in secure_run.state_files.items()}
    assert {path: hit for path, hit in found.items() if hit} == {}


def test_worker_http_endpoints_listen_on_loopback_only(secure_run: SecureRun) -> None:
    assert secure_run.local_status == {"/stats": 200, "/metrics": 200}
    assert secure_run.listening == {"127.0.0.1"}
    assert all(outcome == "refused" for outcome in secure_run.external_connect.values()), secure_run.external_connect


def test_redaction_covers_an_echoed_webhook_path() -> None:
    url = "http://hooks.example:8443/services/T0/B0/SECRET-abc"
    assert "SECRET-abc" not in redact("HTTP 404: Cannot POST /services/T0/B0/SECRET-abc", [url])
    assert "SECRET-abc" not in redact(f"failed: {url}", [url])


def test_proc_net_parsing_reads_a_listening_socket() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert listening_addresses(sock.getsockname()[1]) == {"127.0.0.1"}
