"""Alertmanager as a receiver (issue #17): laggard posts its alerts to a real Alertmanager 0.35.0
(built from the Go module proxy by commands/stack/alertmanager.py) through its own delivery, and
Alertmanager hands them to a real local webhook (tests/helpers/webhook_server.py): labels and
annotations as laggard made them from real detector findings, resolved on clear, kept firing by
laggard's re-sends (and resolved by Alertmanager itself once they stop), and muted by an `amtool`
silence. The payload's shape is checked without any process."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from laggard.commands.stack.alertmanager import Alertmanager
from laggard.commands.stack.process import free_port, wait_until
from laggard.results import Finding
from laggard.rules.alert_lifecycle import AlertEngine, AlertSnapshot, Notification
from laggard.rules.loader import DEFAULT_RULES, load_rules
from laggard.rules.model import ReceiverConfig, RootRoute, RulesConfig
from laggard.rules.receivers import PAYLOAD_BUILDERS
from laggard.rules.receivers.delivery import DeadLetter, DeliveryOutcome, Dispatcher, SentLog, json_safe
from laggard.rules.receivers.text import dashboard_link, iso_utc
from tests.helpers.webhook_server import WebhookServer, webhook_server  # noqa: F401 (fixture)
from tests.test_rules_samples import _real_findings

HOOK = "/alertmanager-webhook"
URL_ENV = "LAGGARD_ALERTMANAGER_URL"
RESOLVE_TIMEOUT_S = 2.0  # Alertmanager resolves an alert not posted again for this long
REPEAT_S = 0.5  # laggard's route re-sends firing alerts this often (well below RESOLVE_TIMEOUT_S)
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
E_NOTATION = re.compile(r"\d[eE][+-]\d")


# -- the payload, no process ---------------------------------------------------------------------


def notifications_of_real_findings() -> list[Notification]:
    """What the engine makes of every real finding under the default rules (fire at once), then
    of their clearing (stale): firing and resolved notifications of every rule the findings hit."""
    engine, out = AlertEngine(am_rules()), []
    findings = sorted(_real_findings(), key=lambda f: f.window_end or 0.0)
    for f in findings:
        now = (f.window_end or 0.0) + 1.0
        engine.observe_finding(f, now)
        out += engine.advance(now)
    last = (findings[-1].window_end or 0.0) + 1.0
    for step in range(1, 60):
        out += engine.advance(last + 10.0 * step)
    return out


def test_payload_is_alertmanagers_postable_alerts_for_every_real_notification() -> None:
    notes = notifications_of_real_findings()
    assert {n.status for n in notes} == {"firing", "resolved"}
    for n in notes:
        body = PAYLOAD_BUILDERS["alertmanager"](n)
        assert isinstance(body, list) and len(body) == len(n.alerts)
        assert json_safe(body) == body
        json.dumps(body, allow_nan=False)  # strict JSON as sent
        for alert, snapshot in zip(body, n.alerts):
            expected_keys = {"labels", "annotations", "startsAt", "generatorURL"}
            if snapshot.status == "resolved":
                expected_keys.add("endsAt")
                assert alert["endsAt"] == iso_utc(snapshot.ends_at or n.created_at)
                assert ISO_UTC.match(alert["endsAt"]) and alert["endsAt"] >= alert["startsAt"]
            assert set(alert) == expected_keys  # no endsAt while firing: Alertmanager's resolve_timeout applies
            assert alert["labels"] == snapshot.labels and alert["labels"]["alertname"]
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in alert["labels"].items())
            annotations = alert["annotations"]
            assert annotations["summary"] == snapshot.annotations["summary"]
            for key, text in annotations.items():
                assert isinstance(text, str) and text and text != "None", (key, text)
                assert not E_NOTATION.search(text), (key, text)
                assert "nan" not in text.split() and "inf" not in text.split(), (key, text)
            if snapshot.evidence:
                assert annotations["evidence"]  # in human units, not raw floats
            assert ISO_UTC.match(alert["startsAt"]) and alert["startsAt"] == iso_utc(snapshot.starts_at)
            assert alert["generatorURL"] == dashboard_link(snapshot, n.created_at, n.external_url)
            assert alert["generatorURL"].startswith(n.external_url)


def test_payload_of_a_resolved_alert_without_an_end_time_ends_at_the_notification() -> None:
    snapshot = AlertSnapshot(fingerprint="f", status="resolved", labels={"alertname": "X", "gpu": "3"},
                             annotations={"summary": "s", "description": ""}, starts_at=1_790_000_000.0,
                             evidence={"score": math.nan, "util_pct": 12345.678})
    n = Notification(idempotency_key="k", receiver="am", group_key="g", group_labels={}, status="resolved",
                     alerts=[snapshot], common_labels={}, common_annotations={}, external_url="http://dash/d/x",
                     sequence=1, created_at=1_790_000_060.0)
    (alert,) = PAYLOAD_BUILDERS["alertmanager"](n)
    assert alert["endsAt"] == iso_utc(1_790_000_060.0)
    assert set(alert["annotations"]) == {"summary", "evidence"}  # the empty description is left out
    assert not E_NOTATION.search(alert["annotations"]["evidence"])


def test_rules_accept_an_alertmanager_receiver_and_route() -> None:
    config = am_rules()
    assert config.receiver("alertmanager").kind == "alertmanager"
    assert config.route.repeat_interval < RESOLVE_TIMEOUT_S


# -- through a real Alertmanager ----------------------------------------------------------------


def am_rules() -> RulesConfig:
    """The default rules (fire on the first finding) routed to one Alertmanager receiver, with a
    repeat_interval below Alertmanager's resolve_timeout."""
    config = load_rules(DEFAULT_RULES)
    receiver = ReceiverConfig.model_validate({
        "name": "alertmanager", "kind": "alertmanager", "url_env": URL_ENV, "rate_per_s": 50, "burst": 20,
        "timeout": "5s", "max_attempts": 3, "backoff_initial": 0.1, "backoff_max": 0.5,
    })
    route = RootRoute.model_validate({"receiver": "alertmanager", "group_by": ["alertname", "cluster", "job"],
                                      "group_wait": "0s", "group_interval": 0.1, "repeat_interval": REPEAT_S})
    rules = [r.model_copy(update={"for_": 0.0, "keep_firing_for": 0.0}) for r in config.rules]
    return RulesConfig.model_validate({**config.model_dump(by_alias=True), "receivers": [receiver.model_dump()],
                                       "route": route.model_dump(by_alias=True),
                                       "rules": [r.model_dump(by_alias=True) for r in rules]})


def am_config(webhook_url: str) -> dict[str, Any]:
    return {
        "global": {"resolve_timeout": f"{RESOLVE_TIMEOUT_S:g}s"},
        "route": {"receiver": "hook", "group_by": ["alertname", "cluster", "job"],
                  "group_wait": "0s", "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "hook", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }


@pytest.fixture
def alertmanager(tmp_path: Path, webhook_server: WebhookServer) -> Iterator[Alertmanager]:  # noqa: F811
    config = tmp_path / "alertmanager.yml"
    config.write_text(json.dumps(am_config(webhook_server.url(HOOK))))  # JSON is YAML
    am = Alertmanager(tmp_path, free_port(), config)
    am.start()  # builds alertmanager/amtool first on a fresh machine
    try:
        yield am
    finally:
        am.stop()


class Laggard:
    """The worker's alerting in small: the engine on real findings at wall-clock time, its
    notifications delivered by the real Dispatcher to the Alertmanager receiver."""

    def __init__(self, am: Alertmanager) -> None:
        self.config = am_rules()
        self.engine = AlertEngine(self.config)
        self.environ = {URL_ENV: am.alerts_url}
        self.sent_log = SentLog()
        self.notifications: list[Notification] = []
        self.outcomes: list[DeliveryOutcome] = []
        self.dead_letters: list[DeadLetter] = []

    def observe(self, finding: Finding) -> None:
        self.engine.observe_finding(finding, time.time())

    def run_until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Advance and deliver every 0.1 s until `condition` holds or the deadline passes."""

        async def loop() -> bool:
            async with Dispatcher(self.config.receivers, dead_letter=self.dead_letters.append, environ=self.environ,
                                  sent_log=self.sent_log) as dispatcher:
                deadline = time.monotonic() + timeout_s
                while True:
                    for n in self.engine.advance(time.time()):
                        self.notifications.append(n)
                        self.outcomes.append(await dispatcher.dispatch(n))
                    if condition():
                        return True
                    if time.monotonic() >= deadline:
                        return False
                    await asyncio.sleep(0.1)

        return asyncio.run(loop())

    def last(self, alertname: str) -> AlertSnapshot:
        return [a for n in self.notifications for a in n.alerts if a.labels["alertname"] == alertname][-1]


def real(kind: str, state: str = "firing") -> Finding:
    return next(f for f in _real_findings() if f.kind == kind and f.state == state)


def delivered(server: WebhookServer, alertname: str, status: str | None = None) -> list[dict[str, Any]]:
    """The alerts Alertmanager's webhook notifications carried, of one rule (and status)."""
    return [a for r in server.requests(HOOK) for a in r.json["alerts"]
            if a["labels"].get("alertname") == alertname and (status is None or a["status"] == status)]


def am_alerts(am: Alertmanager, alertname: str) -> list[dict[str, Any]]:
    """What Alertmanager itself holds for one rule (GET /api/v2/alerts: active, silenced, inhibited)."""
    reply = httpx.get(f"{am.url}/api/v2/alerts", params={"filter": f'alertname="{alertname}"'}, timeout=5)
    reply.raise_for_status()
    return reply.json()


def instant(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.stack
def test_laggard_alerts_reach_the_webhook_through_alertmanager_and_resolve(
        alertmanager: Alertmanager, webhook_server: WebhookServer) -> None:  # noqa: F811
    laggard = Laggard(alertmanager)
    laggard.observe(real("xid"))
    assert laggard.run_until(lambda: bool(delivered(webhook_server, "GpuXidError", "firing")), 20), \
        f"no firing GpuXidError from Alertmanager; laggard's deliveries: {laggard.outcomes}"
    (alert,) = delivered(webhook_server, "GpuXidError", "firing")
    sent = laggard.last("GpuXidError")
    assert alert["labels"] == sent.labels  # alertname, severity, cluster, job, node, gpu, ... as laggard made them
    assert {"cluster": "c", "job": "llm", "node": "n0", "gpu": "2", "severity": "critical"}.items() <= alert["labels"].items()
    assert alert["annotations"]["summary"] == sent.annotations["summary"] == "XID 79 on n0 GPU 2"
    assert alert["annotations"]["description"] == sent.annotations["description"]
    assert "79" in alert["annotations"]["evidence"]
    assert alert["generatorURL"].startswith(laggard.config.external_url)
    assert abs(instant(alert["startsAt"]) - sent.starts_at) < 0.002
    assert webhook_server.requests(HOOK)[0].json["status"] == "firing"

    laggard.observe(real("xid", "resolved"))
    assert laggard.run_until(lambda: bool(delivered(webhook_server, "GpuXidError", "resolved")), 20), \
        f"no resolved GpuXidError from Alertmanager; laggard's deliveries: {laggard.outcomes}"
    (resolved,) = delivered(webhook_server, "GpuXidError", "resolved")
    ended = laggard.last("GpuXidError")
    assert ended.status == "resolved" and ended.ends_at is not None
    assert abs(instant(resolved["endsAt"]) - ended.ends_at) < 0.002
    assert resolved["labels"] == alert["labels"]
    assert {o.status for o in laggard.outcomes} == {"sent"} and not laggard.dead_letters


@pytest.mark.stack
def test_laggard_re_sends_a_firing_alert_so_alertmanager_keeps_it_firing(
        alertmanager: Alertmanager, webhook_server: WebhookServer) -> None:  # noqa: F811
    laggard = Laggard(alertmanager)
    laggard.observe(real("straggler"))
    assert laggard.run_until(lambda: bool(delivered(webhook_server, "StragglerRank", "firing")), 20)
    # Three resolve_timeouts of laggard re-sending: Alertmanager never resolves it.
    laggard.run_until(lambda: bool(delivered(webhook_server, "StragglerRank", "resolved")), 3 * RESOLVE_TIMEOUT_S)
    assert not delivered(webhook_server, "StragglerRank", "resolved")
    posts = [n for n in laggard.notifications if any(a.labels["alertname"] == "StragglerRank" for a in n.alerts)]
    assert len(posts) >= 3 * RESOLVE_TIMEOUT_S / REPEAT_S - 2, len(posts)
    assert all(n.status == "firing" for n in posts) and {o.status for o in laggard.outcomes} == {"sent"}
    (held,) = am_alerts(alertmanager, "StragglerRank")
    assert held["status"]["state"] == "active" and instant(held["endsAt"]) > time.time()
    # laggard stops (a crashed worker): Alertmanager resolves it by itself after resolve_timeout.
    assert wait_until(lambda: bool(delivered(webhook_server, "StragglerRank", "resolved")), 5 * RESOLVE_TIMEOUT_S, 0.1), \
        "Alertmanager did not resolve it on its own"


@pytest.mark.stack
def test_an_amtool_silence_suppresses_matching_alerts_only(
        alertmanager: Alertmanager, webhook_server: WebhookServer) -> None:  # noqa: F811
    silence_id = alertmanager.amtool("silence", "add", "alertname=StragglerRank", "--comment=laggard test: rank is drained",
                                     "--author=laggard-tests", "--duration=1h").strip()
    assert silence_id and silence_id in alertmanager.amtool("silence", "query", "--quiet")
    laggard = Laggard(alertmanager)
    laggard.observe(real("straggler"))  # silenced in Alertmanager

    def suppressed() -> bool:
        held = am_alerts(alertmanager, "StragglerRank")
        return bool(held) and held[0]["status"]["state"] == "suppressed"

    assert laggard.run_until(suppressed, 20), "Alertmanager never held the straggler alert as suppressed"
    assert am_alerts(alertmanager, "StragglerRank")[0]["status"]["silencedBy"] == [silence_id]
    laggard.observe(real("slow_node"))  # not matched by the silence: delivered
    assert laggard.run_until(lambda: bool(delivered(webhook_server, "SlowNode", "firing")), 20), \
        f"no SlowNode from Alertmanager; laggard's deliveries: {laggard.outcomes}"
    assert not delivered(webhook_server, "StragglerRank")
    assert any(a.labels["alertname"] == "StragglerRank" for n in laggard.notifications for a in n.alerts)
    assert {o.status for o in laggard.outcomes} == {"sent"}
