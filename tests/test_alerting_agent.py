"""The alerting agent's own functions (agents/alerting.py) without Kafka: a bad rules file at
startup keeps the findings until it is fixed (then they are alerted on, into a real local HTTP
server). Silences and published alerts need the broker: tests/test_alerting_worker.py."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from laggard.agents.alerting import AlertingStage
from laggard.agents.core import WorkerCore
from laggard.results import Finding
from laggard.settings import Settings
from tests.helpers.webhook_server import WebhookServer

RULES = """\
receivers:
  - {name: hook, kind: webhook, url_env: ALERTING_AGENT_TEST_URL}
route: {receiver: hook, group_wait: 0s, group_interval: 1s, repeat_interval: 1h}
rules:
  - name: StragglerRank
    finding: {kind: straggler}
    annotations: {summary: "rank {{ labels.rank }}"}
"""


def straggler() -> Finding:
    return Finding.model_validate({
        "kind": "straggler", "state": "firing", "cluster": "c1", "job": "j1", "rank": 3, "node": "n1", "gpu": 0,
        "window_start": 1.0, "window_end": 11.0, "evidence": {}, "cost": {}, "summary": "rank 3 paces j1"})


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    return tmp_path / "rules.yaml"


@pytest.fixture
def alerting(rules_file: Path, tmp_path: Path) -> AlertingStage:
    """The stage on a worker that is built, not started (no broker needed)."""
    return AlertingStage(WorkerCore(Settings(rules_file=rules_file, state_dir=tmp_path)))


def test_a_bad_rules_file_at_startup_keeps_the_firing_findings_until_it_is_fixed(rules_file: Path,
                                                                                 alerting: AlertingStage) -> None:
    rules_file.write_text(RULES.replace("group_wait", "group_wiat"))
    current = alerting.make_alerting({})  # no checkpoint to fall back on
    assert alerting.counters.rules_reload_failures == 1 and current.engine.config.rules == []
    current.take(straggler(), 100.0)

    rules_file.write_text(RULES)
    os.utime(rules_file, (current.rules_mtime + 1, current.rules_mtime + 1))
    fixed = asyncio.run(alerting.reload_rules(current))
    assert [r.name for r in fixed.engine.config.rules] == ["StragglerRank"]
    assert list(fixed.firing) == [straggler().fingerprint]  # alerted on at the next tick


def test_findings_taken_while_the_rules_file_is_bad_are_alerted_on_once_fixed(
        rules_file: Path, tmp_path: Path, alerting: AlertingStage, monkeypatch: pytest.MonkeyPatch) -> None:
    """A straggler that fired and resolved while the rules file was bad (no checkpoint to fall back
    on): once the rules are fixed it is announced firing, then resolved."""
    with WebhookServer() as server:
        monkeypatch.setenv("ALERTING_AGENT_TEST_URL", server.url("/hook"))
        rules_file.write_text(RULES.replace("group_wait", "group_wiat"))
        current = alerting.make_alerting({})
        current.take(straggler(), time.time())
        current.take(straggler().model_copy(update={"state": "resolved", "window_start": 11.0}), time.time())
        asyncio.run(alerting.send_due_notifications(current, time.time()))  # a tick: nothing to alert with
        saved = json.loads(json.dumps(current.state()))  # a restart on the same bad file keeps them too
        current = alerting.make_alerting(saved)

        rules_file.write_text(RULES)
        os.utime(rules_file, (current.rules_mtime + 1, current.rules_mtime + 1))

        async def ticks() -> None:
            fixed = await alerting.reload_rules(current)
            deadline = time.monotonic() + 10
            while len(server.requests("/hook")) < 2 and time.monotonic() < deadline:
                await alerting.send_due_notifications(fixed, time.time())
                await asyncio.sleep(0.1)  # the next tick (group_interval 1s)
            await fixed.dispatcher.aclose()

        asyncio.run(ticks())
        sent = [(r.json["status"], r.json["alerts"][0]["labels"]["rank"]) for r in server.requests("/hook")]
    assert sent == [("firing", "3"), ("resolved", "3")]
    assert alerting.counters.rules_reload_failures == 2  # at start, and at the restart
    assert alerting.counters.notifications == 2
