"""Alerting inside the real worker: a simulated fleet goes through Kafka and `laggard worker`, and
its alerts arrive at a real local HTTP server. One firing notification per alert group while the
straggler persists, a resolved one after it ends, nothing sent twice across a SIGKILL restart,
retries through 500 and 429, silences, a bad rules file refused on reload, `laggard alerts list`.

The scenario is published in two parts (up to FAULT_ON_S while the straggler is on, then the
rest), so the fault ends when the test says so."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from laggard.collectors.publisher import Publisher
from laggard.collectors.simulate import FleetSimulator, load_scenario
from laggard.commands.pipeline_run import PipelineRun, past_start_ts
from laggard.commands.stack.process import wait_until
from laggard.rules.shared_state import read_alert_board
from laggard.settings import Settings
from laggard.topics import changelog_name, read_records, read_topic
from tests.helpers.faults import produce
from tests.helpers.webhook_server import RecordedRequest, Reply, WebhookServer

SCENARIO = Path(__file__).parent / "scenarios" / "alerting.yaml"
FAULT_ON_S = 50.0  # a window boundary (the start is aligned) while rank 13 straggles (20-60 s)
GROUP_INTERVAL_S = 5.0  # RULES' group_interval

RULES = """
external_url: http://127.0.0.1:3000/d/laggard
receivers:
  - {name: hook, kind: webhook, url_env: ALERT_TEST_HOOK_URL, rate_per_s: 50, burst: 10,
     backoff_initial: 0.2s, backoff_max: 1s}
  - {name: chat, kind: slack, url_env: ALERT_TEST_CHAT_URL, rate_per_s: 50, burst: 10,
     backoff_initial: 0.2s, backoff_max: 1s}
route:
  receiver: hook
  group_by: [alertname, cluster, job]
  group_wait: 1s
  group_interval: 5s
  repeat_interval: 1h
rules:
  - name: StragglerRank
    finding: {kind: straggler}
    receivers: [hook, chat]
    annotations:
      summary: "Rank {{ labels.rank }} of job {{ labels.job }} paces its peers"
  - name: IdleAllocatedGpu
    finding: {kind: idle_allocated}
    annotations:
      summary: "Job {{ labels.job }} holds GPUs it does not use"
"""


# A threshold rule on the fleet KPI that holds for any fleet (effective utilization is 0-1).
CLUSTER_RULE = """
  - name: ClusterBelowTarget
    threshold: {metric: effective_util, scope: cluster, op: "<", threshold: 2.0}
    annotations:
      summary: "Cluster {{ labels.cluster }} effective utilization {{ value | pct }}"
"""


class AlertingRun:
    """A pipeline run whose worker alerts into `server` with `rules`, and its scenario."""

    def __init__(self, stack: Settings, tmp_path: Path, server: WebhookServer, prefix: str, rules: str = RULES) -> None:
        self.rules_file = tmp_path / "rules.yaml"
        self.rules_file.write_text(rules)
        env = {"ALERT_TEST_HOOK_URL": server.url("/hook"), "ALERT_TEST_CHAT_URL": server.url("/chat")}
        self.run = PipelineRun(stack, prefix=prefix, extra_env=env, state_root=tmp_path,
                               overrides={"rules_file": self.rules_file})
        spec = load_scenario(SCENARIO)
        # Window-aligned start: the first part ends on a window boundary, so nothing of the second
        # part falls into a window the worker closed while it waited.
        window_s = stack.window_s
        self.run.start_ts = math.floor(past_start_ts(spec.duration_s) / window_s) * window_s
        self.sim = FleetSimulator(spec, start_ts=self.run.start_ts)

    def publish(self, from_s: float, until_s: float) -> None:
        """The scenario's ticks in [from_s, until_s) seconds from its start."""
        start, end = self.run.start_ts + from_s, self.run.start_ts + until_s
        with Publisher(self.run.settings) as publisher:
            for ts, batch in self.sim.encoded_ticks():
                if start <= ts < end:
                    for key, value in batch:
                        publisher.publish_raw(key, value)
                        self.run.published += 1
        assert not publisher.stats.failed, publisher.stats.last_error

    def published_at(self) -> float:
        board = read_alert_board(self.run.settings)
        return board.written_at if board else float("-inf")

    def alerts(self) -> dict[str, dict[str, Any]]:
        """The published live alerts by alertname/job, {} until the first board."""
        board = read_alert_board(self.run.settings)
        return {f"{a.labels['alertname']}/{a.labels.get('job')}": a.model_dump(mode="json")
                for a in (board.alerts if board else [])}

    def checkpointed_sent(self) -> set[str]:
        """Idempotency keys in the newest alert-state checkpoint on the table's changelog in Kafka."""
        changelog = read_topic(self.run.settings, changelog_name(self.run.settings, "alert-state"))
        return set(json.loads(changelog[-1])["sent"]) if changelog else set()


def cli(*args: str, run: PipelineRun) -> subprocess.CompletedProcess[str]:
    """`laggard ARGS` in another process, on the run's topics (silences, alerts)."""
    return subprocess.run([sys.executable, "-m", "laggard.commands.cli", *args], env={**run.env, "COLUMNS": "250"},
                          capture_output=True, text=True, timeout=60, check=True)


def key_of(request: RecordedRequest) -> str:
    return request.headers["idempotency-key"]


def delivered(requests: list[RecordedRequest], refused: int) -> list[RecordedRequest]:
    """The requests answered 200: all but the first `refused` (the server's scripted refusals)."""
    return requests[refused:]


def describe(request: RecordedRequest) -> tuple[str, str, str]:
    """(path, alertname, status) of a recorded notification, Alertmanager webhook or Slack."""
    body = request.json
    if "groupLabels" in body:
        return request.path, body["groupLabels"]["alertname"], body["status"]
    state, alertname = body["blocks"][0]["text"]["text"].split()[:2]  # "[FIRING:1] StragglerRank (...)"
    return request.path, alertname, "resolved" if state == "[RESOLVED]" else "firing"


def wait_for(condition: Any, timeout_s: float, what: str, run: PipelineRun) -> None:
    if not wait_until(condition, timeout_s, 0.2):
        raise AssertionError(f"{what} within {timeout_s:.0f} s; worker log tail:\n{run.log_path.read_text()[-3000:]}")


HOOK_FIRING = ("/hook", "StragglerRank", "firing")


@pytest.mark.timeout(240)
def test_straggler_alert_is_sent_once_survives_sigkill_and_resolves(stack, tmp_path):
    with WebhookServer() as server:
        server.script("/hook", Reply(status=500, body="upstream down"), times=2)
        server.script("/chat", Reply(status=429, body="slow down", retry_after_header="1"))
        alerting = AlertingRun(stack, tmp_path, server, "test-alerting")
        with alerting.run as run:
            run.start_worker(tmp_path / "first.log")
            alerting.publish(0, FAULT_ON_S)

            # Firing: the webhook after two 500s, Slack after a 429 (Retry-After: 1).
            def straggler_sent() -> bool:
                hook = map(describe, delivered(server.requests("/hook"), 2))
                return HOOK_FIRING in hook and len(server.requests("/chat")) >= 2
            wait_for(straggler_sent, 90, "no straggler notification on both receivers", run)

            listed = json.loads(cli("alerts", "list", "--json", run=run).stdout)
            table = cli("alerts", "list", run=run).stdout

            sent_keys = {key_of(r) for r in delivered(server.requests("/hook"), 2) + delivered(server.requests("/chat"), 1)}
            wait_for(lambda: sent_keys <= alerting.checkpointed_sent(), 120, "sent log not checkpointed", run)
            before_kill = alerting.alerts()["StragglerRank/train-a"]
            requests_before_kill = len(server.requests())
            os.killpg(run.worker.pid, signal.SIGKILL)
            run.worker.wait()

            killed_at = time.time()
            run.start_worker(tmp_path / "second.log")
            wait_for(lambda: alerting.published_at() > killed_at, 90, "the restarted worker never published", run)
            first_tick = alerting.published_at()
            # Past group_interval on the restarted worker: a forgotten group would have flushed again.
            wait_for(lambda: alerting.published_at() >= first_tick + GROUP_INTERVAL_S + 1, 30,
                     "the restarted worker stopped publishing", run)
            after_restart = alerting.alerts()["StragglerRank/train-a"]
            requests_after_restart = len(server.requests())

            alerting.publish(FAULT_ON_S, 100)  # rank 13 recovers at 60 s
            resolved = {("/hook", "StragglerRank", "resolved"), ("/chat", "StragglerRank", "resolved")}
            wait_for(lambda: resolved <= set(map(describe, server.requests())), 90,
                     "no resolved notification on both receivers", run)
    hook, chat = server.requests("/hook"), server.requests("/chat")

    # The webhook speaks Alertmanager's format and names the culprit; the refused try is retried as is.
    assert [key_of(r) for r in hook[:3]] == [key_of(hook[0])] * 3 and hook[0].raw == hook[2].raw
    firing = next(r.json for r in hook[2:] if describe(r) == HOOK_FIRING)
    assert firing["version"] == "4" and firing["receiver"] == "hook"
    assert firing["groupLabels"] == {"alertname": "StragglerRank", "cluster": "sim-alerting", "job": "train-a"}
    [alert] = firing["alerts"]
    assert alert["labels"]["rank"] == "13" and alert["labels"]["job"] == "train-a"
    assert alert["annotations"]["summary"] == "Rank 13 of job train-a paces its peers"
    assert alert["endsAt"] == "0001-01-01T00:00:00Z" and alert["evidence"] and "var-job=train-a" in alert["generatorURL"]
    # Slack: text + blocks naming rank 13, sent again only after the Retry-After second.
    assert key_of(chat[0]) == key_of(chat[1]) and chat[1].received_at - chat[0].received_at >= 0.95
    assert "Rank 13 of job train-a" in chat[1].json["text"] and chat[1].json["blocks"][0]["type"] == "header"

    # One firing and one resolved notification per group and receiver although the finding held
    # through many windows and ticks, and a SIGKILL and restart, in between.
    assert requests_after_restart == requests_before_kill
    sent = delivered(hook, 2) + delivered(chat, 1)
    assert len({key_of(r) for r in sent}) == len(sent), [describe(r) for r in sent]
    assert Counter(map(describe, sent)) == {
        HOOK_FIRING: 1, ("/chat", "StragglerRank", "firing"): 1,
        ("/hook", "StragglerRank", "resolved"): 1, ("/chat", "StragglerRank", "resolved"): 1,
        ("/hook", "IdleAllocatedGpu", "firing"): 1,  # the notebook job, idle to the end
    }
    [ended] = [r.json["alerts"][0] for r in hook if r.json["status"] == "resolved"]
    assert ended["labels"]["rank"] == "13" and ended["endsAt"] != "0001-01-01T00:00:00Z"

    # The restarted worker kept the firing alert (same start), and `alerts list` showed it.
    assert after_restart["status"] == before_kill["status"] == "firing"
    assert after_restart["starts_at"] == before_kill["starts_at"]
    [straggler] = [a for a in listed if a["labels"]["alertname"] == "StragglerRank"]
    assert straggler["status"] == "firing" and straggler["labels"]["rank"] == "13"
    assert "StragglerRank" in table and "rank=13" in table and "firing" in table


@pytest.mark.timeout(180)
def test_silence_mutes_and_a_bad_rules_file_keeps_the_last_good_rules(stack, tmp_path):
    with WebhookServer() as server:
        alerting = AlertingRun(stack, tmp_path, server, "test-alert-silence", rules=RULES + CLUSTER_RULE)
        # Added from another process before any worker runs: it is on the silences topic, not in a worker.
        added = cli("silence", "add", "--match", "job=notebook", "--for", "1h", "--comment", "notebook is parked",
                    run=alerting.run).stdout
        silence_id = added.split()[1]  # "silence ID until ..."
        with alerting.run as run:
            run.start_worker(tmp_path / "first.log")
            alerting.publish(0, FAULT_ON_S)

            def silenced_while_straggler_sent() -> bool:
                idle = alerting.alerts().get("IdleAllocatedGpu/notebook", {})
                return idle.get("status") == "firing" and HOOK_FIRING in map(describe, server.requests("/hook"))
            wait_for(silenced_while_straggler_sent, 90, "no straggler notification and firing idle alert", run)
            cluster_sent = ("/hook", "ClusterBelowTarget", "firing")
            wait_for(lambda: cluster_sent in map(describe, server.requests("/hook")), 30,
                     "no notification from the threshold rule on the fleet KPI", run)
            idle = alerting.alerts()["IdleAllocatedGpu/notebook"]
            notebook_while_silenced = [r for r in server.requests() if b"notebook" in r.raw]

            # A bad file (a typo in a field, and no IdleAllocatedGpu rule) is refused while running...
            bad = RULES.split("  - name: IdleAllocatedGpu")[0].replace("group_wait:", "group_wiat:")
            alerting.rules_file.write_text(bad)
            wait_for(lambda: run.stats().get("rules_reload_failures", 0) >= 1, 30, "bad rules not refused", run)
            running_stats = run.stats()
            # ... and by the restarted worker, which goes on with the rules from its checkpoint.
            run.stop_worker()
            run.start_worker(tmp_path / "second.log")
            wait_for(lambda: run.stats().get("rules_reload_failures", 0) >= 1, 90, "restart: bad rules not refused", run)
            # The restarted worker holds the silence too (its own board says so), and sends nothing for it.
            restarted_at = time.time()
            wait_for(lambda: alerting.published_at() > restarted_at + GROUP_INTERVAL_S, 60,
                     "the restarted worker published no alerts", run)
            idle_after_restart = alerting.alerts()["IdleAllocatedGpu/notebook"]
            notebook_after_restart = [r for r in server.requests() if b"notebook" in r.raw]

            # The old rules hold: with the silence over, the idle alert goes out.
            cli("silence", "expire", silence_id, run=run)
            wait_for(lambda: any(b"notebook" in r.raw for r in server.requests("/hook")), 30,
                     "no notification once the silence expired", run)
            stats = run.stats()

    [cluster] = [r.json for r in server.requests("/hook") if describe(r)[1] == "ClusterBelowTarget"]
    assert cluster["groupLabels"] == {"alertname": "ClusterBelowTarget", "cluster": "sim-alerting", "job": ""}
    assert cluster["alerts"][0]["annotations"]["summary"].startswith("Cluster sim-alerting effective utilization ")
    assert idle["silenced_by"] == [silence_id] == idle_after_restart["silenced_by"]
    assert notebook_while_silenced == [] == notebook_after_restart
    [notebook] = [r.json for r in server.requests("/hook") if b"notebook" in r.raw]
    assert notebook["status"] == "firing" and notebook["alerts"][0]["labels"]["alertname"] == "IdleAllocatedGpu"
    assert running_stats["rules_reload_failures"] == stats["rules_reload_failures"] == 1
    assert stats["notifications_failed"] == 0
    for log in (tmp_path / "first.log", tmp_path / "second.log"):
        text = log.read_text()
        assert "keeping the last good rules" in text and "route.group_wiat: unknown field" in text, text[-2000:]


@pytest.mark.timeout(240)
def test_findings_after_the_last_checkpoint_are_read_again_after_a_restart(stack, tmp_path):
    """The alert state is checkpointed once a tick, with the input offsets it holds. A worker that
    starts from a checkpoint older than the group's commit (a crash between the two) re-reads the
    findings in between from Kafka: the straggler it had taken fires again, nothing is lost."""
    with WebhookServer() as server:
        alerting = AlertingRun(stack, tmp_path, server, "test-alert-catch-up")
        with alerting.run as run:
            changelog = changelog_name(run.settings, "alert-state")
            run.start_worker(tmp_path / "first.log")
            wait_for(lambda: read_records(run.settings, changelog), 60, "no checkpoint", run)
            early = read_records(run.settings, changelog)[0]  # before any finding
            assert not json.loads(early.value)["engine"]["alerts"] and "resume" in json.loads(early.value)
            alerting.publish(0, FAULT_ON_S)
            wait_for(lambda: "StragglerRank/train-a" in alerting.alerts(), 90, "no straggler alert", run)
            run.stop_worker()  # its group commit is past the straggler's finding
            produce(run.settings, changelog, [(early.key, early.value)])  # as if it had crashed after `early`
            restarted_at = time.time()
            run.start_worker(tmp_path / "second.log")

            def straggler_again() -> bool:
                return alerting.published_at() > restarted_at and "StragglerRank/train-a" in alerting.alerts()
            wait_for(straggler_again, 90, "the straggler's finding was not read again", run)
            stats = run.stats()
    assert stats["replayed"] >= 1
