"""Delivery against a real local HTTP server: payloads, retries, 429, timeouts, dead letters,
rate limits, URL redaction, and no duplicate sends after a restart."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from laggard.rules.alert_lifecycle import AlertEngine, EngineState, Notification
from laggard.rules.cli import alerts_app
from laggard.rules.model import ReceiverConfig, RulesConfig
from laggard.rules.receivers import discord
from laggard.rules.receivers.delivery import RETRY_DEFERRED_S, DeadLetter, Dispatcher, RateLimiter, SentLog, redact
from tests.helpers.webhook_server import HANG, Reply, WebhookServer, webhook_server  # noqa: F401 (fixture)

SECRET = "T000/B000/s3cr3t-t0ken"

FAST = {"rate_per_s": 1000.0, "burst": 100, "timeout": 0.3, "max_attempts": 3, "backoff_initial": 0.01, "backoff_max": 0.05}


def receiver(name: str, kind: str, **overrides: Any) -> ReceiverConfig:
    return ReceiverConfig.model_validate({"name": name, "kind": kind, "url_env": f"HOOK_{name.upper()}", **FAST, **overrides})


def hook_path(name: str) -> str:
    return f"/hooks/{name}/{SECRET}"


def environ(server: WebhookServer, *names: str) -> dict[str, str]:
    return {f"HOOK_{n.upper()}": server.url(hook_path(n)) for n in names}


def rules_config(receivers: list[ReceiverConfig]) -> RulesConfig:
    return RulesConfig.model_validate({
        "external_url": "http://dash.example/d/laggard",
        "receivers": [r.model_dump(by_alias=True) for r in receivers],
        "route": {"receiver": receivers[0].name, "group_wait": "0s", "group_interval": "1m", "repeat_interval": "1h"},
        "rules": [{
            "name": "Straggler",
            "finding": {"kind": "straggler"},
            "severity": "critical",
            "annotations": {"summary": "rank {{ labels.rank }} of {{ labels.job }} paces its peers",
                            "description": "score {{ evidence.score }}"},
        }],
    })


def finding(rank: int, state: str = "firing") -> dict[str, Any]:
    return {"kind": "straggler", "state": state, "cluster": "c1", "job": "train-1", "rank": rank, "node": f"n{rank}",
            "gpu": 0, "model": "H100", "evidence": {"score": 0.61, "util": 97.0}, "cost": {"gpu_hours_lost": 3.2}}


def notification(config: RulesConfig, ranks: tuple[int, ...] = (1, 2), now: float = 1_700_000_000.0) -> Notification:
    engine = AlertEngine(config)
    for rank in ranks:
        engine.observe_finding(finding(rank), now)
    (sent,) = engine.advance(now)
    return sent


def deliver(server: WebhookServer, recv: ReceiverConfig, notes: list[Notification], sent_log: SentLog | None = None,
            transport: httpx.AsyncBaseTransport | None = None) -> tuple[list[Any], list[DeadLetter], Dispatcher]:
    letters: list[DeadLetter] = []

    async def go() -> tuple[list[Any], Dispatcher]:
        async with Dispatcher([recv], dead_letter=letters.append, environ=environ(server, recv.name), sent_log=sent_log,
                              transport=transport) as d:
            return [await d.dispatch(n) for n in notes], d

    outcomes, dispatcher = asyncio.run(go())
    return outcomes, letters, dispatcher


def test_slack_payload(webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack")
    (outcome,), _, _ = deliver(webhook_server, recv, [notification(rules_config([recv]))])
    assert outcome.status == "sent"
    (req,) = webhook_server.requests(hook_path("slack"))
    body = req.json
    assert req.headers["content-type"] == "application/json"
    assert body["text"].startswith("[FIRING:2] Straggler")
    assert body["blocks"][0]["type"] == "header"
    assert [a["color"] for a in body["attachments"]] == ["#D32F2F", "#D32F2F"]  # critical: red
    sections = [b["text"]["text"] for a in body["attachments"] for b in a["blocks"] if b["type"] == "section"]
    assert len(sections) == 2
    assert "rank 1 of train-1 paces its peers" in sections[0]
    for needle in ("*Where:* cluster=c1, job=train-1, rank=1, node=n1, gpu=0", "*Since:* 22:13:20 UTC (0s ago)",
                   "*Evidence:* score 0.61, util 97", "*Cost:* GPU hours lost 3.2",
                   "*Dashboard:* http://dash.example/d/laggard?var-cluster=c1&amp;var-job=train-1&amp;from=",
                   "*Silence:* `laggard silence add -m alertname=Straggler -m cluster=c1 -m job=train-1 -m rank=1 "
                   "-m node=n1 -m gpu=0 --for 2h --comment 'your reason'`"):
        assert needle in sections[0]
    assert "var-node" not in sections[0] and "var-gpu" not in sections[0]


def test_discord_payload(webhook_server: WebhookServer) -> None:
    recv = receiver("discord", "discord")
    deliver(webhook_server, recv, [notification(rules_config([recv]))])
    (req,) = webhook_server.requests(hook_path("discord"))
    body = req.json
    assert body["content"].startswith("[FIRING:2] Straggler") and len(body["content"]) <= 2000
    assert len(body["embeds"]) == 2
    embed = body["embeds"][0]
    assert embed["title"] == "rank 1 of train-1 paces its peers"
    assert embed["url"].startswith("http://dash.example/d/laggard?")
    assert {f["name"] for f in embed["fields"]} >= {"Where", "Since", "Evidence", "Cost"}
    assert body["allowed_mentions"] == {"parse": []}


def test_discord_limits_hold_for_many_long_alerts() -> None:
    recv = receiver("discord", "discord")
    config = rules_config([recv])
    note = notification(config, ranks=tuple(range(30)))
    long_alerts = [a.model_copy(update={"annotations": {"summary": "s" * 500, "description": "d" * 3000}}) for a in note.alerts]
    body = discord.payload(note.model_copy(update={"alerts": long_alerts, "group_labels": {"job": "j" * 3000}}))
    assert len(body["content"]) <= 2000
    assert len(body["embeds"]) == 10
    total = sum(len(e["title"]) + sum(len(f["name"]) + len(f["value"]) for f in e["fields"]) for e in body["embeds"])
    assert total <= 6000
    assert all(len(e["title"]) <= 256 for e in body["embeds"])


def test_teams_payload_is_an_adaptive_card(webhook_server: WebhookServer) -> None:
    recv = receiver("teams", "teams")
    deliver(webhook_server, recv, [notification(rules_config([recv]), ranks=(4,))])
    body = webhook_server.requests(hook_path("teams"))[0].json
    assert body["type"] == "message"
    (attachment,) = body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    [container] = [block for block in card["body"] if block["type"] == "Container"]
    assert container["style"] == "attention" and container["items"][0]["color"] == "Attention"  # critical
    facts = {f["title"]: f["value"] for block in container["items"] if block["type"] == "FactSet" for f in block["facts"]}
    assert facts["Cost"] == "GPU hours lost 3.2" and "rank=4" in facts["Where"]
    assert facts["Silence"].startswith("laggard silence add -m alertname=Straggler -m cluster=c1")
    assert card["actions"][0]["type"] == "Action.OpenUrl"
    assert "var-job=train-1&from=" in card["actions"][0]["url"] and "var-node" not in card["actions"][0]["url"]


def test_mattermost_payload_is_slack_compatible_markdown(webhook_server: WebhookServer) -> None:
    recv = receiver("mm", "mattermost")
    deliver(webhook_server, recv, [notification(rules_config([recv]))])
    body = webhook_server.requests(hook_path("mm"))[0].json
    assert body["text"].startswith("*[FIRING:2] Straggler")
    assert "• rank 1 of train-1 paces its peers" in body["text"]
    assert [a["color"] for a in body["attachments"]] == ["#D32F2F", "#D32F2F"]
    assert "• Evidence: score 0.61, util 97" in body["attachments"][0]["text"]


def test_webhook_payload_is_alertmanager_v4(webhook_server: WebhookServer) -> None:
    recv = receiver("am", "webhook")
    deliver(webhook_server, recv, [notification(rules_config([recv]))])
    body = webhook_server.requests(hook_path("am"))[0].json
    assert body["version"] == "4" and body["status"] == "firing" and body["receiver"] == "am"
    assert set(body) >= {"groupKey", "groupLabels", "commonLabels", "commonAnnotations", "externalURL", "alerts"}
    assert body["groupLabels"] == {"alertname": "Straggler", "cluster": "c1", "job": "train-1"}
    assert body["commonLabels"]["severity"] == "critical" and "rank" not in body["commonLabels"]
    assert body["externalURL"] == "http://dash.example/d/laggard"
    alert = body["alerts"][0]
    assert set(alert) >= {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
    assert alert["startsAt"] == "2023-11-14T22:13:20.000Z"
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert re.fullmatch(r"[0-9a-f]{16}", alert["fingerprint"])


def test_5xx_is_retried_until_success(webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack")
    webhook_server.script(hook_path("slack"), Reply(status=503, body="busy"), times=2)
    (outcome,), letters, dispatcher = deliver(webhook_server, recv, [notification(rules_config([recv]))])
    assert outcome.status == "sent" and outcome.attempts == 3 and letters == []
    assert len(webhook_server.requests()) == 3
    assert dispatcher.stats.get("slack", "retry") == 2 and dispatcher.stats.get("slack", "sent") == 1


def test_429_waits_for_retry_after_header(webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack")
    webhook_server.script(hook_path("slack"), Reply(status=429, body="rate_limited", retry_after_header="0.4"))
    (outcome,), _, dispatcher = deliver(webhook_server, recv, [notification(rules_config([recv]))])
    first, second = webhook_server.requests()
    assert outcome.status == "sent" and outcome.attempts == 2
    assert second.received_at - first.received_at >= 0.39  # honoured, not the 10 ms backoff
    assert dispatcher.stats.get("slack", "rate_limited") == 1


def test_429_waits_for_discord_retry_after_json(webhook_server: WebhookServer) -> None:
    recv = receiver("discord", "discord")
    webhook_server.script(hook_path("discord"), Reply(status=429, retry_after_json=0.35, retry_after_header="1"))
    (outcome,), _, _ = deliver(webhook_server, recv, [notification(rules_config([recv]))])
    first, second = webhook_server.requests()
    assert outcome.status == "sent"
    gap = second.received_at - first.received_at
    assert 0.34 <= gap < 1.0  # the precise JSON value wins over the rounded header


def test_429_asking_for_too_long_is_deferred_until_then_not_dead_lettered(webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack", max_retry_after="5s")
    webhook_server.script(hook_path("slack"), Reply(status=429, retry_after_header="3600"))
    (outcome,), letters, dispatcher = deliver(webhook_server, recv, [notification(rules_config([recv]))])
    assert outcome.status == "deferred" and outcome.attempts == 1 and letters == []
    assert "asked to wait 3600s" in (outcome.reason or "")
    (_, retry_at), = dispatcher.deferred.values()
    assert retry_at - time.monotonic() > 3500  # not before the receiver said


def test_hanging_server_times_out_and_is_retried(webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack")
    webhook_server.script(hook_path("slack"), HANG)
    (outcome,), _, _ = deliver(webhook_server, recv, [notification(rules_config([recv]))])
    assert outcome.status == "sent" and outcome.attempts == 2
    assert len(webhook_server.requests()) == 2


def test_a_retry_after_a_timeout_carries_the_same_idempotency_key_and_is_counted(webhook_server: WebhookServer) -> None:
    recv = receiver("am", "webhook")
    note = notification(rules_config([recv]))
    webhook_server.script(hook_path("am"), HANG)  # takes the request, never answers in time
    (outcome,), _, dispatcher = deliver(webhook_server, recv, [note])
    first, retry = webhook_server.requests()
    assert outcome.status == "sent" and outcome.attempts == 2
    for request in (first, retry):  # a receiver can drop the repeat by either
        assert request.headers["idempotency-key"] == note.idempotency_key
        assert request.json["idempotencyKey"] == note.idempotency_key
    assert first.raw == retry.raw
    assert dispatcher.stats.get("am", "timeout") == 1 and dispatcher.stats.get("am", "retry") == 1


def test_a_receiver_refusing_for_a_phase_gets_every_notification_in_order_once_it_recovers(
        webhook_server: WebhookServer) -> None:
    recv = receiver("am", "webhook", max_retry_after="5s")
    engine = AlertEngine(rules_config([recv]))
    t0 = 1_700_000_000.0
    engine.observe_finding(finding(1), t0)
    engine.observe_finding({**finding(2), "job": "train-2"}, t0)
    first_a, first_b = engine.advance(t0)  # one group per job
    engine.observe_finding(finding(1, state="resolved"), t0 + 30)
    engine.advance(t0 + 30)
    (resolved_a,) = engine.advance(t0 + 60)
    assert (first_a.group_key, first_a.status) == (resolved_a.group_key, "firing") and resolved_a.status == "resolved"
    path = hook_path("am")
    webhook_server.script(path, Reply(status=500, body="down"), times=3)  # first_a: all its attempts
    webhook_server.script(path, Reply(status=429, retry_after_header="600"))  # first_b: longer than max_retry_after
    letters: list[DeadLetter] = []
    now = [0.0]

    async def go() -> list[list[str]]:
        async with Dispatcher([recv], dead_letter=letters.append, environ=environ(webhook_server, "am"),
                              clock=lambda: now[0]) as d:
            during = [(await d.dispatch(n)).status for n in (first_a, first_b, resolved_a)]
            now[0] += RETRY_DEFERRED_S
            early = [o.status for o in await d.retry_deferred()]  # the receiver is back; b asked for 600 s
            now[0] += 600
            late = [o.status for o in await d.retry_deferred()]
            return [during, early, late, [str(len(d.deferred))]]

    during, early, late, left = asyncio.run(go())
    assert during == ["deferred"] * 3 and early == ["sent", "sent"] and late == ["sent"] and left == ["0"]
    assert letters == []
    requests = webhook_server.requests(path)
    for request in requests:  # a repeat carries the key of what it repeats
        assert request.json["idempotencyKey"] == request.headers["idempotency-key"]
    delivered = [r.headers["idempotency-key"] for r in requests[4:]]  # after the 3 x 500 and the 429
    assert delivered == [first_a.idempotency_key, resolved_a.idempotency_key, first_b.idempotency_key]


def test_a_webhook_down_past_the_retries_gets_the_notification_later_once(webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack")
    webhook_server.script(hook_path("slack"), Reply(status=500, body="oops"), times=3)
    note = notification(rules_config([recv]))
    letters: list[DeadLetter] = []
    now = [0.0]

    async def go() -> tuple[list[Any], list[dict[str, Any]]]:
        async with Dispatcher([recv], dead_letter=letters.append, environ=environ(webhook_server, "slack"),
                              clock=lambda: now[0]) as d:
            first = await d.dispatch(note)
            too_soon = await d.retry_deferred()
            state = d.deferred_state()
            now[0] += RETRY_DEFERRED_S
            later = await d.retry_deferred()
            return [first, too_soon, later, await d.retry_deferred(), d.stats.get("slack", "deferred")], state

    (first, too_soon, later, after, deferred), state = asyncio.run(go())
    assert first.status == "deferred" and first.attempts == 3 and first.reason == "HTTP 500: oops"
    assert too_soon == [] and [n["idempotency_key"] for n in state] == [note.idempotency_key]
    assert [o.status for o in later] == ["sent"] and after == [] and deferred == 1
    assert letters == [] and len(webhook_server.requests()) == 4  # 3 tries, then once more, delivered


def test_a_deferred_notification_survives_a_restart_and_a_newer_one_of_its_group_follows_it(
        webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack", max_attempts=1)
    config = rules_config([recv])
    engine = AlertEngine(config)
    engine.observe_finding(finding(1), 1_700_000_000.0)
    (older,) = engine.advance(1_700_000_000.0)
    engine.observe_finding(finding(2), 1_700_000_100.0)
    (newer,) = engine.advance(1_700_000_100.0)
    webhook_server.script(hook_path("slack"), Reply(status=503), times=1)

    async def go() -> tuple[list[str], list[str]]:
        async with Dispatcher([recv], dead_letter=lambda _: None, environ=environ(webhook_server, "slack")) as d:
            assert (await d.dispatch(older)).status == "deferred"
            saved = d.deferred_state()
        async with Dispatcher([recv], dead_letter=lambda _: None, environ=environ(webhook_server, "slack"),
                              deferred=saved) as restarted:
            resent = [o.status for o in await restarted.retry_deferred()]  # due at once after a restart
        async with Dispatcher([recv], dead_letter=lambda _: None, environ=environ(webhook_server, "slack"),
                              deferred=saved) as again:
            statuses = [(await again.dispatch(newer)).status] + [o.status for o in await again.retry_deferred()]
        return resent, statuses

    resent, statuses = asyncio.run(go())
    assert resent == ["sent"]
    assert statuses == ["deferred", "sent", "sent"]  # the newer one waits for the older, then both go
    keys = [r.headers["idempotency-key"] for r in webhook_server.requests()]
    assert keys == [older.idempotency_key] * 2 + [older.idempotency_key, newer.idempotency_key]


def test_a_trickling_webhook_is_cut_at_the_receiver_timeout(webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack", max_attempts=1)  # timeout 0.3 s; each byte comes within 0.2 s
    webhook_server.script(hook_path("slack"), Reply(body="x" * 200, trickle_s=0.2))
    (outcome,), letters, _ = deliver(webhook_server, recv, [notification(rules_config([recv]))])
    assert outcome.status == "deferred" and outcome.reason.startswith("timed out after 0.3s")


def test_nan_evidence_is_sent_as_text_and_an_unusable_url_is_dead_lettered_without_it(
        webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack")
    config = rules_config([recv])
    engine = AlertEngine(config)
    engine.observe_finding({**finding(1), "evidence": {"score": float("nan")}}, 1_700_000_000.0)
    (note,) = engine.advance(1_700_000_000.0)
    (outcome,), _, _ = deliver(webhook_server, recv, [note])
    assert outcome.status == "sent"
    letters: list[DeadLetter] = []

    async def go() -> Any:
        bad_url = {"HOOK_SLACK": "http://[::1/hooks/" + SECRET}  # httpx cannot build it
        async with Dispatcher([recv], dead_letter=letters.append, environ=bad_url) as d:
            return await d.dispatch(note)

    bad = asyncio.run(go())
    assert bad.status == "dead_lettered" and letters[0].reason == "cannot send: InvalidURL"


def test_a_notification_the_dead_letter_sink_cannot_take_is_deferred_not_lost(webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack")
    note = notification(rules_config([recv]))
    webhook_server.script(hook_path("slack"), Reply(status=404, body="no_service"))

    def broken_sink(letter: DeadLetter) -> None:
        raise ConnectionError("broker away")

    async def go() -> tuple[str, list[dict[str, Any]]]:
        async with Dispatcher([recv], dead_letter=broken_sink, environ=environ(webhook_server, "slack")) as d:
            return (await d.dispatch(note)).status, d.deferred_state()

    status, deferred = asyncio.run(go())
    assert status == "deferred" and [n["idempotency_key"] for n in deferred] == [note.idempotency_key]


def test_client_error_is_not_retried(webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack")
    webhook_server.script(hook_path("slack"), Reply(status=404, body="no_service"))
    (outcome,), letters, _ = deliver(webhook_server, recv, [notification(rules_config([recv]))])
    assert outcome.status == "dead_lettered" and outcome.attempts == 1
    assert letters[0].reason == "HTTP 404: no_service"


def test_unconfigured_receiver_is_dead_lettered_naming_the_variable() -> None:
    recv = receiver("slack", "slack")
    letters: list[DeadLetter] = []

    async def go() -> Any:
        async with Dispatcher([recv], dead_letter=letters.append, environ={}) as d:
            return await d.dispatch(notification(rules_config([recv])))

    outcome = asyncio.run(go())
    assert outcome.status == "dead_lettered" and outcome.attempts == 0
    assert "HOOK_SLACK is not set" in letters[0].reason


class SendTimes(httpx.AsyncHTTPTransport):
    """The real HTTP transport, noting when each request leaves (the limiter schedules sends; on a
    busy machine their arrivals at the server jitter by more than any spacing tolerance)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[float] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(time.monotonic())
        return await super().handle_async_request(request)


def test_rate_limit_spaces_sends(webhook_server: WebhookServer) -> None:
    recv = receiver("slack", "slack", rate_per_s=5.0, burst=1)
    config = rules_config([recv])
    notes = [notification(config, ranks=(r,)) for r in range(4)]
    transport = SendTimes()
    before = time.monotonic()
    deliver(webhook_server, recv, notes, transport=transport)
    assert len(webhook_server.requests()) == 4
    # The k-th send waits for its slot, k x 1/5 s after the first reservation (a send can leave late,
    # so two sends can be closer than 1/5 s; none leaves before its slot).
    assert all(sent - before >= k * 0.2 - 0.001 for k, sent in enumerate(transport.sent)), (before, transport.sent)


def test_rate_limiter_is_a_token_bucket() -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.reserve(0.0) for _ in range(5)] == [0.0, 0.0, 0.0, 0.5, 1.0]
    assert limiter.reserve(10.0) == 0.0  # refilled while idle
    limiter.block_until(20.0)
    assert limiter.reserve(10.0) == 10.0


def test_webhook_urls_never_reach_logs_errors_or_dead_letters(webhook_server: WebhookServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    recv = receiver("slack", "slack")
    config = rules_config([recv])
    url = webhook_server.url(hook_path("slack"))
    # A service that echoes the URL in its error body, then a server error, then success.
    webhook_server.script(hook_path("slack"), Reply(status=502, body=f"bad gateway for {url}"))
    webhook_server.script(hook_path("slack"), Reply(status=403, body=f"invalid token in {url}"))
    outcomes, letters, _ = deliver(webhook_server, recv, [notification(config)])
    with socket.socket() as sock:  # a port with nothing listening: connection refused
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    refused: list[DeadLetter] = []

    async def go() -> Any:
        env = {"HOOK_SLACK": f"http://127.0.0.1:{dead_port}{hook_path('slack')}"}
        async with Dispatcher([recv], dead_letter=refused.append, environ=env) as d:
            return await d.dispatch(notification(config))

    refused_outcome = asyncio.run(go())
    assert outcomes[0].status == "dead_lettered" and refused_outcome.status == "deferred"  # down: tried later
    assert "network error: ConnectError" in refused_outcome.reason
    texts = [caplog.text, *(r.getMessage() for r in caplog.records), *(o.model_dump_json() for o in [*outcomes, refused_outcome]),
             *(letter.model_dump_json() for letter in [*letters, *refused])]
    assert "HTTP Request: POST http://127.0.0.1" in caplog.text  # httpx did log the request...
    for text in texts:
        assert "s3cr3t" not in text  # ...but never the path that is the credential
    assert "<redacted" in letters[0].reason


def test_a_redacted_http_log_line_formats_under_the_workers_log_formatter() -> None:
    """The worker logs through mode's formatter (Faust's), which turns a record's args of None into
    (None,): the redacted httpx line must still format, not print a 'Logging error' traceback."""
    from mode.utils.logging import ExtensionFormatter

    record = logging.getLogger("httpx").makeRecord(
        "httpx", logging.INFO, __file__, 1, 'HTTP Request: %s %s "%s %d %s"',
        ("POST", "http://127.0.0.1:8086/api/v2/write?org=o&bucket=b&token=s3cr3t-token", "HTTP/1.1", 204, "No Content"),
        None)
    assert all(f.filter(record) for f in logging.getLogger("httpx").filters)
    line = ExtensionFormatter().format(record)
    assert "HTTP Request: POST http://127.0.0.1:8086/<redacted> \"HTTP/1.1 204" in line and "s3cr3t" not in line


def test_redact_finds_a_credential_echoed_json_escaped_or_alone() -> None:
    url = "http://127.0.0.1:42295/hooks/T0123/B0456/SuperSecretToken"
    echoed = '{"error": "channel archived", "url": "http:\\/\\/127.0.0.1:42295\\/hooks\\/T0123\\/B0456\\/SuperSecretToken"}'
    assert "SuperSecretToken" not in redact(echoed, [url]) and "channel archived" in redact(echoed, [url])
    teams = "https://example.logic.azure.com/workflows/1/triggers/manual/paths/invoke?api-version=1&sig=S3cr3tSigValue"
    assert "S3cr3tSigValue" not in redact("signature 'sig=S3cr3tSigValue' is invalid", [teams])


def test_redact_keeps_host_and_drops_credential_parts() -> None:
    text = "failed for 'https://user:pw@hooks.slack.com:8443/services/T/B/XYZ?x=1' now"
    assert redact(text) == "failed for 'https://hooks.slack.com:8443/<redacted>' now"
    assert redact("a SECRETVALUE b", ["SECRETVALUE"]) == "a <redacted-url> b"


def test_restart_replaying_input_sends_nothing_twice(webhook_server: WebhookServer, tmp_path: Path) -> None:
    recv = receiver("slack", "slack")
    config = rules_config([recv])
    env = environ(webhook_server, "slack")

    def step(engine: AlertEngine, sent_log: SentLog, t: float, state: str = "firing") -> list[str]:
        engine.observe_finding(finding(1, state), t)

        async def go() -> list[str]:
            async with Dispatcher([recv], dead_letter=lambda letter: None, environ=env, sent_log=sent_log) as d:
                return [(await d.dispatch(n)).status for n in engine.advance(t)]

        return asyncio.run(go())

    engine, sent_log = AlertEngine(config), SentLog()
    assert step(engine, sent_log, 0) == ["sent"]
    # The worker persists its engine state after t=0; at t=60 it sends (the sent log is durable)
    # and crashes before persisting the engine state again. On restart it replays t=60.
    saved_state = json.dumps(engine.snapshot())
    assert step(engine, sent_log, 60, "resolved") == ["sent"]
    (tmp_path / "sent.json").write_text(json.dumps(sent_log.to_dict()))

    restarted = AlertEngine(config, EngineState.model_validate_json(saved_state))
    restored_log = SentLog(json.loads((tmp_path / "sent.json").read_text()))
    assert step(restarted, restored_log, 60, "resolved") == ["duplicate"]
    statuses = [r.json["text"][:10] for r in webhook_server.requests()]
    assert statuses == ["[FIRING:1]", "[RESOLVED]"]
    # New input after the replay is delivered normally.
    assert step(restarted, restored_log, 120) == ["sent"]
    assert len(webhook_server.requests()) == 3


def test_alerts_test_command_sends_through_the_configured_receiver(webhook_server: WebhookServer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        "receivers:\n  - {name: chat, kind: mattermost, url_env: HOOK_CHAT}\nroute: {receiver: chat}\n"
        "rules:\n  - name: Xid\n    finding: {kind: xid}\n    annotations: {summary: 'xid {{ labels.node }}'}\n"
    )
    monkeypatch.setenv("HOOK_CHAT", webhook_server.url(hook_path("chat")))
    result = CliRunner().invoke(alerts_app, ["test", "chat", "--config", str(rules_file)])
    assert result.exit_code == 0, result.output
    assert "test notification delivered" in result.output and "s3cr3t" not in result.output
    (req,) = webhook_server.wait_for(1, hook_path("chat"))
    assert "Test notification from laggard" in req.json["text"]
    monkeypatch.delenv("HOOK_CHAT")
    failed = CliRunner().invoke(alerts_app, ["test", "chat", "--config", str(rules_file)])
    assert failed.exit_code == 1 and "HOOK_CHAT is not set" in failed.output
