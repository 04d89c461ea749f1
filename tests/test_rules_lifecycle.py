"""The alert state machine: pending/firing/resolved, dedup, grouping, silences, inhibition, restart."""

from __future__ import annotations

import json

from laggard.rules.alert_lifecycle import AlertEngine, EngineState, Notification, fingerprint, idempotency_key
from laggard.rules.loader import check_text
from laggard.rules.model import Matcher, RulesConfig
from laggard.rules.silences import Silence

CONFIG = """
external_url: http://dash.example/d/laggard
stale_after: 60s
receivers:
  - {name: chat, kind: slack, url_env: CHAT_URL}
  - {name: quiet, kind: webhook, url_env: QUIET_URL, send_resolved: false}
route:
  receiver: chat
  group_by: [alertname, cluster, job]
  group_wait: 30s
  group_interval: 5m
  repeat_interval: 1h
  routes:
    - match: ["severity=info"]
      receiver: quiet
inhibit_rules:
  - source_match: ["scope=node"]
    target_match: ["scope=gpu"]
    equal: [cluster, node]
rules:
  - name: Straggler
    finding: {kind: straggler}
    for: 2m
    keep_firing_for: 1m
    annotations:
      summary: "rank {{ labels.rank }} of {{ labels.job }} is slow ({{ evidence.score }})"
  - name: Xid
    finding: {kind: xid}
    severity: critical
    annotations: {summary: "xid on {{ labels.node }}"}
  - name: NodeSilent
    finding: {kind: silent_gpu}
    severity: critical
    annotations: {summary: "node {{ labels.node }} is silent"}
  - name: Idle
    finding: {kind: idle_allocated}
    severity: info
    annotations: {summary: idle}
  - name: ClusterEffLow
    threshold: {metric: effective_util, scope: cluster, op: "<", threshold: 0.4}
    for: 0s
    annotations: {summary: "eff util {{ value | pct }} < {{ threshold | pct }}"}
"""


def config() -> RulesConfig:
    parsed, errors = check_text(CONFIG, "test.yaml")
    assert not errors, errors
    assert parsed is not None
    return parsed


def straggler(rank: int = 3, state: str = "firing", job: str = "train-1") -> dict:
    return {
        "kind": "straggler", "state": state, "cluster": "c1", "job": job, "rank": rank, "node": f"n{rank}",
        "gpu": 0, "model": "H100", "evidence": {"score": 0.62}, "cost": {"gpu_hours_lost": 2.5},
        "summary": f"rank {rank} slow", "fingerprint": f"f{rank}",
    }


def run(engine: AlertEngine, finding: dict | list[dict], start: float, end: float, step: float = 10.0,
        silences: list[Silence] | None = None) -> list[tuple[float, Notification]]:
    """Feed the same finding(s) every `step` seconds from start to end; collect notifications."""
    sent = []
    t = start
    findings = finding if isinstance(finding, list) else [finding]
    while t <= end:
        for f in findings:
            engine.observe_finding(f, t)
        sent += [(t, n) for n in engine.advance(t, silences or [])]
        t += step
    return sent


def test_pending_then_firing_after_for_then_one_notification_after_group_wait() -> None:
    engine = AlertEngine(config())
    engine.observe_finding(straggler(), 0)
    assert engine.advance(0) == []
    assert [a.status for a in engine.active_alerts()] == ["pending"]
    sent = run(engine, straggler(), 10, 300)
    # for=2m -> firing at t=120; group_wait 30s -> first notification at t=150
    assert [(t, n.status, len(n.alerts)) for t, n in sent] == [(150, "firing", 1)]
    alert = sent[0][1].alerts[0]
    assert alert.starts_at == 120
    assert alert.annotations["summary"] == "rank 3 of train-1 is slow (0.62)"
    assert alert.evidence == {"score": 0.62} and alert.cost == {"gpu_hours_lost": 2.5}
    assert alert.generator_url == "http://dash.example/d/laggard?var-cluster=c1&var-job=train-1&var-node=n3&var-gpu=0"


def test_pending_alert_that_breaks_before_for_never_fires() -> None:
    engine = AlertEngine(config())
    run(engine, straggler(), 0, 60)
    engine.observe_finding(straggler(state="resolved"), 70)
    assert engine.advance(70) == [] and engine.active_alerts() == []
    assert run(engine, straggler(), 80, 190) == []  # `for` restarted at 80: fires at 200


def test_repeated_finding_gives_one_notification_until_repeat_interval() -> None:
    engine = AlertEngine(config())
    sent = run(engine, straggler(), 0, 7400)
    times = [t for t, _ in sent]
    # first at 150, then only every repeat_interval (1h), checked on group_interval ticks
    assert times == [150, 3750, 7350]
    assert all(b - a >= 3600 for a, b in zip(times, times[1:]))
    assert len({n.idempotency_key for _, n in sent}) == 3
    assert [n.sequence for _, n in sent] == [1, 2, 3]


def test_alerts_of_one_job_are_grouped_into_one_notification() -> None:
    engine = AlertEngine(config())
    sent = run(engine, [straggler(1), straggler(2), straggler(5, job="other")], 0, 200)
    by_job = {n.group_labels["job"]: n for _, n in sent}
    assert sorted(by_job) == ["other", "train-1"]
    assert sorted(a.labels["rank"] for a in by_job["train-1"].alerts) == ["1", "2"]
    assert by_job["train-1"].common_labels["job"] == "train-1"
    assert "rank" not in by_job["train-1"].common_labels


def test_alert_joining_a_notified_group_waits_for_group_interval() -> None:
    engine = AlertEngine(config())
    run(engine, straggler(1), 0, 150)  # notified at 150, next tick at 450
    sent = run(engine, [straggler(1), straggler(2)], 160, 500)
    assert [(t, sorted(a.labels["rank"] for a in n.alerts)) for t, n in sent] == [(450, ["1", "2"])]


def test_resolved_finding_sends_resolved_notification_and_forgets_the_alert() -> None:
    engine = AlertEngine(config())
    run(engine, straggler(), 0, 150)
    engine.observe_finding(straggler(state="resolved"), 160)
    # keep_firing_for 1m: still firing at 200, resolved at 220
    assert engine.advance(200) == [] and engine.active_alerts()[0].status == "firing"
    assert engine.advance(220) == []  # resolved now; the group flushes on its tick
    sent = engine.advance(450)
    assert len(sent) == 1 and sent[0].status == "resolved"
    assert sent[0].alerts[0].ends_at == 220 and sent[0].alerts[0].starts_at == 120
    assert engine.state.alerts == {} and engine.state.groups == {}


def test_finding_back_within_keep_firing_for_stays_the_same_alert() -> None:
    engine = AlertEngine(config())
    run(engine, straggler(), 0, 150)
    engine.observe_finding(straggler(state="resolved"), 160)
    engine.advance(170)
    sent = run(engine, straggler(), 180, 1000)
    assert sent == []  # never resolved, nothing new to say before repeat_interval
    assert engine.active_alerts()[0].starts_at == 120


def test_finding_that_stops_arriving_goes_stale_and_resolves() -> None:
    engine = AlertEngine(config())
    run(engine, straggler(), 0, 150)
    # last seen at 150; stale_after 60s -> inactive from 210; keep_firing_for 60s -> resolved at 270
    assert engine.advance(260) == [] and engine.active_alerts()[0].status == "firing"
    engine.advance(270)
    assert engine.active_alerts() == []
    assert [n.status for n in engine.advance(450)] == ["resolved"]


def test_receiver_without_send_resolved_gets_no_resolved_notification() -> None:
    engine = AlertEngine(config())
    idle = {"kind": "idle_allocated", "cluster": "c1", "job": "j", "node": "n1", "gpu": 1}
    sent = run(engine, idle, 0, 40)
    assert [(n.receiver, n.status) for _, n in sent] == [("quiet", "firing")]
    engine.observe_finding({**idle, "state": "resolved"}, 50)
    assert engine.advance(50) + engine.advance(400) == []
    assert engine.state.groups == {}


def test_silence_mutes_matching_alerts_until_it_ends() -> None:
    engine = AlertEngine(config())
    silence = Silence(id="s1", matchers=[Matcher.model_validate("job=train-1")], starts_at=0, ends_at=1000,
                      comment="maintenance", created_by="ops", created_at=0)
    sent = run(engine, [straggler(1), straggler(2, job="other")], 0, 900, silences=[silence])
    assert {n.group_labels["job"] for _, n in sent} == {"other"}
    assert any(a.silenced_by == ["s1"] for a in engine.active_alerts())
    after = run(engine, [straggler(1), straggler(2, job="other")], 1000, 1400, silences=[silence])
    assert [n.group_labels["job"] for _, n in after] == ["train-1"]


def test_node_alert_inhibits_gpu_alerts_of_that_node_only() -> None:
    engine = AlertEngine(config())
    xid_n1 = {"kind": "xid", "cluster": "c1", "node": "n1", "gpu": 4, "job": "j"}
    xid_n2 = {"kind": "xid", "cluster": "c1", "node": "n2", "gpu": 4, "job": "j"}
    node_silent = {"kind": "silent_gpu", "cluster": "c1", "node": "n1"}  # no gpu: node scope
    sent = run(engine, [xid_n1, xid_n2, node_silent], 0, 40)
    alerted = sorted((a.labels["alertname"], a.labels["node"]) for _, n in sent for a in n.alerts)
    assert alerted == [("NodeSilent", "n1"), ("Xid", "n2")]
    inhibited = [a for a in engine.active_alerts() if a.inhibited]
    assert [(a.labels["alertname"], a.labels["node"]) for a in inhibited] == [("Xid", "n1")]


def test_cluster_threshold_rule_fires_and_resolves_on_window_metrics() -> None:
    engine = AlertEngine(config())
    low = {"scope": "cluster", "labels": {"cluster": "c1"}, "effective_util": 0.11, "util_mean": 0.6}
    engine.observe_window(low, 0)
    engine.advance(0)
    sent = engine.advance(30)
    assert len(sent) == 1
    alert = sent[0].alerts[0]
    assert alert.annotations["summary"] == "eff util 11.0% < 40.0%" and alert.value == 0.11
    engine.observe_window({**low, "effective_util": 0.55}, 40)
    engine.advance(40)
    assert [n.status for n in engine.advance(330)] == ["resolved"]
    other_scope = engine.observe_window({"scope": "job", "labels": {"job": "j"}, "metrics": {"effective_util": 0.1}}, 400)
    assert other_scope == []


def test_state_round_trips_through_json_and_replay_gives_identical_notifications() -> None:
    cfg = config()
    engine = AlertEngine(cfg)
    run(engine, [straggler(1), straggler(2)], 0, 140)
    saved = json.loads(json.dumps(engine.snapshot()))
    first = run(engine, [straggler(1), straggler(2)], 150, 160)
    restarted = AlertEngine(cfg, EngineState.model_validate(saved))
    replayed = run(restarted, [straggler(1), straggler(2)], 150, 160)
    assert [n.idempotency_key for _, n in first] == [n.idempotency_key for _, n in replayed]
    assert len(first) == 1
    assert restarted.snapshot() == engine.snapshot()


def test_fingerprint_and_idempotency_key_depend_on_what_they_should() -> None:
    assert fingerprint({"a": "1", "b": "2"}) == fingerprint({"b": "2", "a": "1"})
    assert fingerprint({"a": "1"}) != fingerprint({"a": "2"})
    base = idempotency_key("g", 0.0, [("f1", "firing")], "firing", 1)
    assert base == idempotency_key("g", 0.0, [("f1", "firing")], "firing", 1)
    assert base != idempotency_key("g", 0.0, [("f1", "firing")], "firing", 2)
    assert base != idempotency_key("g", 0.0, [("f1", "resolved")], "resolved", 1)
    assert base != idempotency_key("h", 0.0, [("f1", "firing")], "firing", 1)
    assert base != idempotency_key("g", 9.0, [("f1", "firing")], "firing", 1)  # a re-created group


XID = {"kind": "xid", "cluster": "c1", "job": "j", "node": "n1", "gpu": 4}


def test_a_finding_that_fires_and_resolves_between_two_advances_is_announced_firing_then_resolved() -> None:
    # After a catch-up backlog, both transitions arrive before the alert stage's next tick.
    engine = AlertEngine(config())
    engine.observe_finding(XID, 0)
    engine.observe_finding({**XID, "state": "resolved"}, 1)
    assert engine.advance(2) == []  # group_wait 30s from here
    (firing,) = engine.advance(32)
    assert firing.status == "firing" and firing.alerts[0].starts_at == 0
    assert engine.advance(100) == []  # group_interval 5m
    (resolved,) = engine.advance(332)
    assert resolved.status == "resolved" and resolved.alerts[0].ends_at == 1  # when it ended
    assert engine.state.alerts == {} and engine.state.groups == {}


def test_an_alert_that_resolves_before_its_group_first_flushes_is_still_announced() -> None:
    engine = AlertEngine(config())
    engine.observe_finding(XID, 0)
    assert engine.advance(0) == []  # firing, its group flushes at 30
    engine.observe_finding({**XID, "state": "resolved"}, 10)
    assert engine.advance(10) == []
    assert [n.status for n in engine.advance(30)] == ["firing"]
    assert [n.status for n in engine.advance(330)] == ["resolved"]


def test_a_finding_shorter_than_the_rules_for_never_fires_and_one_that_held_it_does() -> None:
    engine = AlertEngine(config())  # Straggler: for 2m, keep_firing_for 1m
    engine.observe_finding(straggler(1), 0)
    engine.observe_finding(straggler(1, state="resolved"), 119)  # 119 s < for: Prometheus never fires it
    engine.observe_finding(straggler(2), 0)
    engine.observe_finding(straggler(2, state="resolved"), 120)  # held `for` before advance() saw it
    sent = [(t, n) for t in (121, 151, 451) for n in engine.advance(t)]
    assert [(t, n.status, [a.labels["rank"] for a in n.alerts]) for t, n in sent] == [
        (151, "firing", ["2"]), (451, "resolved", ["2"])]
    assert sent[0][1].alerts[0].starts_at == 120
