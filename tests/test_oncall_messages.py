"""Messages for on-call (issue #17): what, where, how bad, since when in UTC, evidence and cost in
human units, the runbook, a `laggard silence add` command that parses and mutes the alert, a
dashboard link that names the real dashboard and only its variables, and the severity's colour.
Every receiver's payload is rendered from notifications the alert engine made of real findings
(the detectors on small jobs through the real windower, tests/test_rules_samples.py), under the
default rules."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from typer.testing import CliRunner

from laggard.agents.detector_views import utc_clock
from laggard.rules.alert_lifecycle import AlertEngine, AlertSnapshot, Notification
from laggard.rules.cli import silence_app
from laggard.rules.loader import DEFAULT_RULES, load_rules
from laggard.rules.model import RulesConfig
from laggard.rules.receivers import PAYLOAD_BUILDERS
from laggard.rules.receivers.humanize import duration, evidence_item, evidence_text, number, utc_time
from laggard.rules.receivers.text import COLOURS, DASHBOARD_VARIABLES, colour, dashboard_link
from laggard.rules.routing import route_targets
from laggard.rules.silences import Silence
from laggard.settings import Settings, get_settings
from laggard.topics import read_topic
from tests.test_rules_samples import _real_findings

ROOT = Path(__file__).resolve().parents[1]
BOARD = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "laggard.json").read_text())
RUNBOOK = "https://runbooks.example/laggard/{{ rule.name }}"
TIME = re.compile(r"\b\d{2}:\d{2}:\d{2} UTC\b")
E_NOTATION = re.compile(r"\d[eE][+-]\d")  # Python's 1.41e+03 (not a colour like #2E7D32)
EPOCH = re.compile(r"(?<![\d.=])1\d{9}(?:\.\d+)?(?![\d])")  # a raw Unix time (2001-2033), not the link's ms


def oncall_rules() -> RulesConfig:
    """The default rules with a runbook on each rule and demo timings: fire on the first finding,
    send at once."""
    config = load_rules(DEFAULT_RULES)
    rules = [r.model_copy(update={"for_": 0.0, "keep_firing_for": 0.0,
                                  "annotations": r.annotations.model_copy(update={"runbook_url": RUNBOOK})})
             for r in config.rules]
    route = config.route.model_copy(update={"group_wait": 0.0, "group_interval": 10.0})
    return config.model_copy(update={"rules": rules, "route": route})


def notifications_of_real_findings() -> list[Notification]:
    engine, out = AlertEngine(oncall_rules()), []
    for f in sorted(_real_findings(), key=lambda f: f.window_end or 0.0):
        now = (f.window_end or 0.0) + 1.0
        engine.observe_finding(f, now)
        out += engine.advance(now)
    last = max(f.window_end or 0.0 for f in _real_findings())
    for step in range(1, 60):  # what is left resolves (stale) and is sent
        out += engine.advance(last + 10.0 * step)
    return out


@pytest.fixture(scope="module")
def notes() -> list[Notification]:
    return notifications_of_real_findings()


def slack_unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def strings(value: Any) -> list[str]:
    """Every string in a JSON payload."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def alert_texts(kind: str, body: dict[str, Any]) -> list[str]:
    """Per alert, the text of its part of the message (one block of rows each)."""
    if kind == "slack":
        return [slack_unescape(a["blocks"][0]["text"]["text"]) for a in body["attachments"]]
    if kind == "mattermost":
        return [slack_unescape(a["text"]) for a in body["attachments"]]
    if kind == "discord":
        return ["\n".join([e["title"], e.get("url", ""), *(f"{f['name']}: {f['value']}" for f in e["fields"])])
                for e in body["embeds"]]
    card = body["attachments"][0]["content"]
    containers = [b for b in card["body"] if b["type"] == "Container"]
    actions = " ".join(a["url"] for a in card["actions"])
    return ["\n".join([*strings(c), actions]) for c in containers]


def colours(kind: str, body: dict[str, Any]) -> list[Any]:
    if kind in ("slack", "mattermost"):
        return [a["color"] for a in body["attachments"]]
    if kind == "discord":
        return [e["color"] for e in body["embeds"]]
    return [c["style"] for c in body["attachments"][0]["content"]["body"] if c["type"] == "Container"]


EXPECTED_COLOUR = {
    "slack": COLOURS,
    "mattermost": COLOURS,
    "discord": {k: int(v[1:], 16) for k, v in COLOURS.items()},
    "teams": {"critical": "attention", "warning": "warning", "info": "accent", "resolved": "good"},
}
CHATS = ("slack", "mattermost", "discord", "teams")


def dashboard_links(text: str) -> list[str]:
    return re.findall(r"https?://[^\s`|>]*/d/[^\s`|>]+", text)


def check_dashboard_link(url: str, alert: AlertSnapshot) -> None:
    parts = urlsplit(url.replace("\u200b", ""))
    assert parts.path.rsplit("/d/", 1)[1].split("/")[0] == BOARD["uid"], url
    query = dict(parse_qsl(parts.query))
    variables = {v["name"] for v in BOARD["templating"]["list"]}
    assert {k.removeprefix("var-") for k in query if k.startswith("var-")} <= variables, url
    assert int(query["from"]) < alert.starts_at * 1000 < int(query["to"]), url
    for name in DASHBOARD_VARIABLES:
        if alert.labels.get(name):
            assert query[f"var-{name}"] == alert.labels[name]


def test_real_findings_make_firing_and_resolved_notifications_of_every_severity(notes: list[Notification]) -> None:
    assert {a.labels["alertname"] for n in notes for a in n.alerts} >= {
        "StragglerRank", "MixedGenerationJob", "IdleAllocatedGpu", "JobStalled", "GpuXidError", "SilentGpu"}
    assert {colour(a) for n in notes for a in n.alerts} == {"critical", "warning", "info", "resolved"}


@pytest.mark.parametrize("kind", CHATS)
def test_every_chat_message_is_fit_for_on_call(kind: str, notes: list[Notification]) -> None:
    for n in notes:
        body = PAYLOAD_BUILDERS[kind](n)
        everything = "\n".join(strings(body))
        assert not re.search(r"\bNone\b|=None|: None", everything), everything
        assert not E_NOTATION.search(everything), everything
        assert not EPOCH.search(everything), everything
        texts = alert_texts(kind, body)
        assert len(texts) == len(n.alerts)
        for alert, text, shown in zip(n.alerts, texts, colours(kind, body)):
            assert TIME.search(text), text  # since when, in UTC
            if alert.status == "resolved":
                assert re.search(r"UTC to .*UTC \(\d", text), text  # from, to, how long
            else:
                assert "ago)" in text
                assert "laggard silence add -m alertname=" in text
            assert f"https://runbooks.example/laggard/{alert.labels['alertname']}" in text
            [link, *_] = dashboard_links(text)
            check_dashboard_link(link, alert)
            assert shown == EXPECTED_COLOUR[kind][colour(alert)], (kind, alert.labels)


def test_evidence_reads_in_human_units_in_every_chat(notes: list[Notification]) -> None:
    stragglers = [n for n in notes if n.common_labels.get("alertname") == "StragglerRank" and n.status == "firing"]
    assert stragglers
    for kind in CHATS:
        text = "\n".join(alert_texts(kind, PAYLOAD_BUILDERS[kind](stragglers[0])))
        assert re.search(r"SM clock \d+ MHz", text) and re.search(r"temperature \d+(\.\d)? °C", text), text
        assert re.search(r"rank util \d+(\.\d+)?%", text) and re.search(r"energy wasted [\d.]+ Wh", text), text
        assert re.search(r"peer GPU time wasted (\d+m )?\d+s", text), text
    stalled = next(n for n in notes if n.common_labels.get("alertname") == "JobStalled")
    text = alert_texts("slack", PAYLOAD_BUILDERS["slack"](stalled))[0]
    assert re.search(r"busy until \d{2}:\d{2}:\d{2} UTC", text), text  # the evidence key, and the summary
    silent = next(n for n in notes if n.common_labels.get("alertname") == "SilentGpu")
    text = alert_texts("slack", PAYLOAD_BUILDERS["slack"](silent))[0]
    assert re.search(r"last sample \d{2}:\d{2}:\d{2} UTC, windows missing \d", text), text


def test_the_silence_command_parses_with_the_cli_and_mutes_exactly_its_alert(
    notes: list[Notification], shared_state_env: dict[str, str], stack: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in shared_state_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        firing = [(n, a) for n in notes for a in n.alerts if a.status == "firing"]
        others = [a for _, a in firing]
        for n, alert in firing[:12]:
            text = alert_texts("slack", PAYLOAD_BUILDERS["slack"](n))[n.alerts.index(alert)]
            [command] = re.findall(r"`(laggard silence add [^`]+)`", text)
            argv = shlex.split(command)
            assert argv[:3] == ["laggard", "silence", "add"]
            result = CliRunner().invoke(silence_app, argv[2:])
            assert result.exit_code == 0, result.output
            silence = Silence.model_validate_json(read_topic(stack, shared_state_env["LAGGARD_TOPIC_SILENCES"])[-1])
            assert silence.mutes(alert.labels, silence.starts_at + 1)
            assert silence.ends_at - silence.starts_at == 7200  # --for 2h
            assert not any(silence.mutes(o.labels, silence.starts_at + 1) for o in others
                           if o.labels != alert.labels and o.labels["alertname"] == alert.labels["alertname"]
                           and {k: o.labels.get(k) for k in ("job", "rank", "node", "gpu")}
                           != {k: alert.labels.get(k) for k in ("job", "rank", "node", "gpu")})
    finally:
        get_settings.cache_clear()


def test_the_generic_webhook_links_the_real_dashboard_and_keeps_raw_evidence(notes: list[Notification]) -> None:
    for n in notes:
        body = PAYLOAD_BUILDERS["webhook"](n)
        for alert, sent in zip(n.alerts, body["alerts"]):
            check_dashboard_link(sent["generatorURL"], alert)
            assert sent["evidence"] == alert.evidence  # data for machines: numbers as they are


def test_default_dashboard_link_names_the_provisioned_dashboard_and_its_variables() -> None:
    config = load_rules(DEFAULT_RULES)
    assert config.external_url.rstrip("/").rsplit("/d/", 1)[1] == BOARD["uid"]
    assert set(DASHBOARD_VARIABLES) <= {v["name"] for v in BOARD["templating"]["list"]}
    assert RulesConfig.model_fields["external_url"].default.endswith("/d/" + BOARD["uid"])
    alert = AlertSnapshot(fingerprint="f", status="firing", starts_at=1_790_000_000.0,
                          labels={"alertname": "A", "cluster": "c1", "job": "j 7", "node": "n3", "gpu": "0"},
                          annotations={}, generator_url=config.external_url + "?var-node=n3&var-gpu=0&orgId=1")
    link = dashboard_link(alert, now=1_790_000_600.0)
    assert link == (f"{config.external_url}?orgId=1&var-cluster=c1&var-job=j+7"
                    f"&from={(1_790_000_000 - 1800) * 1000}&to={(1_790_000_600 + 600) * 1000}")


def test_default_rules_route_every_severity_to_a_receiver_the_demo_defines() -> None:
    """`laggard demo` (commands/demo.py) gives only the Slack receiver a URL; nothing may route
    to a receiver without one (it would be dead-lettered)."""
    config = load_rules(DEFAULT_RULES)
    demo_env = {"LAGGARD_SLACK_WEBHOOK_URL": "http://127.0.0.1:9/hook"}
    configured = set()
    for receiver in config.receivers:
        try:
            receiver.resolve_url(demo_env)
            configured.add(receiver.name)
        except LookupError:
            pass
    assert configured == {"slack"}
    for rule in config.rules:
        for severity in ("info", "warning", "critical"):
            labels = {"alertname": rule.name, "severity": severity, "cluster": "c", "job": "j", "scope": "job"}
            targets = route_targets(config.route, labels, rule.model_copy(update={"severity": severity}))
            assert targets and {t.receiver for t in targets} <= configured, (rule.name, severity, targets)


@pytest.mark.parametrize(("key", "value", "text"), [
    ("sm_clock_mhz", 1410.0, "SM clock 1410 MHz"),
    ("temp_c", 82.04, "temperature 82 °C"),
    ("power_w", 125.0, "power 125 W"),
    ("rank_util_pct", 99.5, "rank util 99.5%"),
    ("peer_wait_share", 0.2864, "peer wait share 28.6%"),
    ("peer_gpu_s_wasted", 200.0, "peer GPU time wasted 3m 20s"),
    ("energy_wh_wasted", 2.844, "energy wasted 2.84 Wh"),
    ("energy_wh_idle", 12_500.0, "energy idle 12.5 kWh"),
    ("fb_used_mib", 81_559.0, "fb used 79.6 GiB"),
    ("last_window_start", 1_790_000_000.0, "last sample 2026-09-21 14:13:20 UTC"),
    ("last_busy_window_end", None, None),
    ("throttle_reasons", None, None),
    ("peers", 31, "peers 31"),
    ("xid", 79, "XID 79"),
    ("score", 1234567.0, "score 1,234,567"),
    ("score", 0.00001, "score <0.001"),
    ("effective_util", 0.35, "effective utilization 35%"),
])
def test_each_evidence_key_reads_in_its_unit(key: str, value: Any, text: str | None) -> None:
    assert evidence_item(key, value) == text


def test_humanized_numbers_times_and_durations() -> None:
    assert [number(v) for v in (1410.0, 1.8e9, 0.2864, 85.25, 2.0, -3.14159, float("nan"))] == [
        "1410", "1,800,000,000", "0.286", "85.2", "2", "-3.14", "nan"]
    assert [duration(s) for s in (0, 45, 200, 3900, 2 * 86400 + 3 * 3600 + 5, 0.4)] == [
        "0s", "45s", "3m 20s", "1h 5m", "2d 3h", "0.4s"]
    assert utc_time(1_790_000_000.0, now=1_790_000_100.0) == "14:13:20 UTC"
    assert utc_time(1_790_000_000.0, now=1_790_200_000.0) == "2026-09-21 14:13:20 UTC"
    assert evidence_text({"a_pct": 1.0, "b": None, "c_mhz": 1.41e3}) == "a 1% , c 1410 MHz".replace(" ,", ",")


def test_detector_summaries_carry_utc_times_not_epochs() -> None:
    findings = _real_findings()
    for kind in ("job_stalled", "silent_gpu"):
        summaries = [f.summary for f in findings if f.kind == kind and f.state == "firing"]
        assert summaries, kind
        for summary in summaries:
            assert TIME.search(summary) and not EPOCH.search(summary), summary
    assert utc_clock(1_790_000_000.0, 1_790_000_010.0) == "14:13:20 UTC"
    assert utc_clock(1_790_000_000.0, 1_790_100_000.0) == "2026-09-21 14:13:20 UTC"
