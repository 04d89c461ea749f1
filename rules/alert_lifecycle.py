"""The alert lifecycle as a deterministic state machine, after Alertmanager.

    observe(observations, now)   a rule's condition is true/false for a label set
    advance(now, silences)       pending -> firing -> resolved, muting, grouping; returns the
                                 notifications due at `now`

No clock is read here: callers pass `now` (event time or processing time), so a replay of the
same input with the same times gives the same notifications with the same idempotency keys.
All state is one pydantic model (`EngineState`) that round-trips through plain dicts, so the
worker can keep it in a Faust table and rebuild the engine after a restart.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any, Iterable, Literal, Sequence
from urllib.parse import urlencode

from pydantic import BaseModel, Field

from laggard.rules.evaluate import Observation, evaluate_finding, evaluate_window
from laggard.rules.model import RulesConfig, matches_all
from laggard.rules.routing import RouteTarget, route_targets
from laggard.rules.silences import Silence

AlertStatus = Literal["pending", "firing", "resolved"]


def fingerprint(labels: dict[str, str]) -> str:
    """Identity of an alert: its sorted labels (which include alertname = the rule name)."""
    return hashlib.sha256(json.dumps(sorted(labels.items())).encode()).hexdigest()[:16]


class AlertState(BaseModel):
    fingerprint: str
    rule: str
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    status: AlertStatus = "pending"
    active: bool = True  # the condition as last observed
    active_since: float
    last_true_at: float
    inactive_since: float | None = None
    starts_at: float | None = None  # when it started firing
    ends_at: float | None = None
    value: float | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)
    cost: dict[str, Any] = Field(default_factory=dict)
    finding_fingerprint: str | None = None
    silenced_by: list[str] = Field(default_factory=list)
    inhibited: bool = False

    @property
    def muted(self) -> bool:
        return bool(self.silenced_by) or self.inhibited


class GroupState(BaseModel):
    key: str
    receiver: str
    group_labels: dict[str, str]
    created_at: float  # tells a re-created group (same key, sequence from 1) from its predecessor
    group_interval: float
    repeat_interval: float
    send_resolved: bool = True
    members: list[str] = Field(default_factory=list)
    next_flush_at: float
    last_notified_at: float | None = None
    notified_firing: list[str] = Field(default_factory=list)
    sequence: int = 0


class EngineState(BaseModel):
    alerts: dict[str, AlertState] = Field(default_factory=dict)
    groups: dict[str, GroupState] = Field(default_factory=dict)


class AlertSnapshot(BaseModel):
    """One alert as a notification shows it."""

    fingerprint: str
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    ends_at: float | None = None
    value: float | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)
    cost: dict[str, Any] = Field(default_factory=dict)
    generator_url: str = ""
    finding_fingerprint: str | None = None


class Notification(BaseModel):
    idempotency_key: str
    receiver: str
    group_key: str
    group_labels: dict[str, str]
    status: Literal["firing", "resolved"]
    alerts: list[AlertSnapshot]
    common_labels: dict[str, str]
    common_annotations: dict[str, str]
    external_url: str
    sequence: int
    created_at: float

    @property
    def firing(self) -> list[AlertSnapshot]:
        return [a for a in self.alerts if a.status == "firing"]


def idempotency_key(
    group_key: str, group_created_at: float, alerts: Sequence[tuple[str, str]], status: str, sequence: int
) -> str:
    """Same group (incarnation), same alerts in the same states, same status and sequence -> same key."""
    alerts_hash = hashlib.sha256(json.dumps(sorted(alerts)).encode()).hexdigest()
    raw = json.dumps([group_key, group_created_at, alerts_hash, status, sequence])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def dashboard_url(external_url: str, labels: dict[str, str]) -> str:
    """The dashboard, filtered to this alert's cluster/job/node/gpu (Grafana `var-` convention)."""
    params = {f"var-{k}": labels[k] for k in ("cluster", "job", "node", "gpu") if k in labels}
    return f"{external_url}?{urlencode(params)}" if params else external_url


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    return {k: v for k, v in maps[0].items() if all(m.get(k) == v for m in maps[1:])}


class AlertEngine:
    """Pending/firing/resolved alerts, deduplicated by fingerprint, grouped per route."""

    def __init__(self, config: RulesConfig, state: EngineState | dict[str, Any] | None = None,
                 render_failures: Counter[str] | None = None) -> None:
        self.config = config
        self.render_failures = render_failures  # templates that failed at send time, by rule
        self.state = state if isinstance(state, EngineState) else EngineState.model_validate(state or {})
        self._rules = {rule.name: rule for rule in config.rules}

    def snapshot(self) -> dict[str, Any]:
        """The whole state as JSON-ready dicts (store it; pass it back to rebuild the engine)."""
        return self.state.model_dump(mode="json")

    # -- input ---------------------------------------------------------------------------------

    def observe_finding(self, finding: object, now: float) -> list[Observation]:
        observations = evaluate_finding(self.config, finding, self.render_failures)
        self.observe(observations, now)
        return observations

    def observe_window(self, window: object, now: float) -> list[Observation]:
        observations = evaluate_window(self.config, window, self.render_failures)
        self.observe(observations, now)
        return observations

    def observe(self, observations: Iterable[Observation], now: float) -> None:
        for obs in observations:
            fp = fingerprint(obs.labels)
            alert = self.state.alerts.get(fp)
            if obs.active:
                self._activate(fp, alert, obs, now)
            elif alert is not None:
                self._deactivate(alert, now)

    def _activate(self, fp: str, alert: AlertState | None, obs: Observation, now: float) -> None:
        if alert is None or alert.status == "resolved":
            alert = AlertState(fingerprint=fp, rule=obs.rule, labels=obs.labels, active_since=now, last_true_at=now)
            self.state.alerts[fp] = alert
        elif not alert.active and alert.status == "firing":
            alert.inactive_since = None  # back within keep_firing_for: still the same firing alert
        alert.active = True
        alert.last_true_at = max(alert.last_true_at, now)
        alert.annotations = obs.annotations
        alert.value = obs.value
        alert.evidence = obs.evidence
        alert.cost = obs.cost
        alert.finding_fingerprint = obs.finding_fingerprint

    def _deactivate(self, alert: AlertState, now: float) -> None:
        rule = self._rules.get(alert.rule)
        if alert.status == "pending" and alert.active and rule is not None and now - alert.active_since >= rule.for_:
            # It held for `for` (at once without one) but ended before advance() saw it: it fired,
            # and it is announced firing, then resolved (a finding is persistence-checked already).
            alert.status, alert.starts_at = "firing", alert.active_since + rule.for_
        if alert.status == "pending":
            self._drop_pending(alert, now)
        elif alert.active:
            alert.active = False
            alert.inactive_since = now

    def _drop_pending(self, alert: AlertState, now: float) -> None:
        """`for` must hold without a break: start over next time. An alert that re-entered
        pending while a group still owes its resolved notification resolves instead."""
        alert.active = False
        if any(alert.fingerprint in g.members for g in self.state.groups.values()):
            alert.status, alert.ends_at = "resolved", now
            alert.starts_at = alert.starts_at if alert.starts_at is not None else alert.active_since
        else:
            del self.state.alerts[alert.fingerprint]

    # -- time ----------------------------------------------------------------------------------

    def advance(self, now: float, silences: Sequence[Silence] = ()) -> list[Notification]:
        """Move every alert and group to time `now`; return the notifications due."""
        self._transition(now)
        self._mute(now, silences)
        self._assign_groups(now)
        notifications = []
        for key in sorted(self.state.groups):
            group = self.state.groups[key]
            if now >= group.next_flush_at:
                sent = self._flush(group, now)
                if sent is not None:
                    notifications.append(sent)
                group.next_flush_at = now + group.group_interval
        self._collect_garbage()
        return notifications

    def _transition(self, now: float) -> None:
        stale_after = self.config.stale_after
        for fp in list(self.state.alerts):
            alert = self.state.alerts[fp]
            rule = self._rules.get(alert.rule)
            if rule is None:  # rule removed from the file: resolve what it raised
                alert.active, alert.inactive_since = False, alert.inactive_since or now
            elif alert.active and now - alert.last_true_at > stale_after:
                alert.active, alert.inactive_since = False, alert.last_true_at + stale_after
            keep_for = rule.keep_firing_for if rule else 0.0
            if alert.status == "pending":
                if not alert.active:
                    self._drop_pending(alert, now)
                elif rule is not None and now - alert.active_since >= rule.for_:
                    alert.status, alert.starts_at = "firing", now
            elif alert.status == "firing" and not alert.active:
                assert alert.inactive_since is not None
                if now - alert.inactive_since >= keep_for and not self._unannounced(alert):
                    # When it ended, not when this advance noticed (an unannounced one is held longer).
                    ends_at = max(alert.inactive_since + keep_for, alert.starts_at or alert.active_since)
                    alert.status, alert.ends_at = "resolved", ends_at

    def _unannounced(self, alert: AlertState) -> bool:
        """Fired, not muted, and not yet in a firing notification of each of its groups: it stays
        firing until it is, so an alert that ends before its group flushes is not lost (its
        resolved notification follows). A muted one is never announced, so it is not held."""
        if alert.muted or alert.rule not in self._rules:
            return False
        for target in self._targets(alert):
            group = self.state.groups.get(self._group_key(target, alert.labels))
            if group is None or alert.fingerprint not in group.notified_firing:
                return True
        return False

    @staticmethod
    def _group_key(target: RouteTarget, labels: dict[str, str]) -> str:
        group_labels = {k: labels.get(k, "") for k in target.group_by}
        return f"{target.route_id}/{target.receiver}:" + json.dumps(sorted(group_labels.items()))

    def _mute(self, now: float, silences: Sequence[Silence]) -> None:
        firing = [a for a in self.state.alerts.values() if a.status == "firing"]
        for alert in self.state.alerts.values():
            alert.silenced_by = [s.id for s in silences if s.mutes(alert.labels, now)]
            alert.inhibited = any(
                source.fingerprint != alert.fingerprint
                and matches_all(rule.target_match, alert.labels)
                and matches_all(rule.source_match, source.labels)
                and all(source.labels.get(k, "") == alert.labels.get(k, "") for k in rule.equal)
                for rule in self.config.inhibit_rules
                for source in firing
            )

    def _targets(self, alert: AlertState) -> list[RouteTarget]:
        return route_targets(self.config.route, alert.labels, self._rules.get(alert.rule))

    def _assign_groups(self, now: float) -> None:
        for alert in self.state.alerts.values():
            if alert.status != "firing":
                continue
            for target in self._targets(alert):
                group_labels = {k: alert.labels.get(k, "") for k in target.group_by}
                key = self._group_key(target, alert.labels)
                group = self.state.groups.get(key)
                if group is None:
                    group = GroupState(
                        key=key,
                        receiver=target.receiver,
                        group_labels=group_labels,
                        created_at=now,
                        group_interval=target.group_interval,
                        repeat_interval=target.repeat_interval,
                        send_resolved=self.config.receiver(target.receiver).send_resolved,
                        next_flush_at=now + target.group_wait,
                    )
                    self.state.groups[key] = group
                if alert.fingerprint not in group.members:
                    group.members.append(alert.fingerprint)

    def _flush(self, group: GroupState, now: float) -> Notification | None:
        alerts = self.state.alerts
        firing = sorted(fp for fp in group.members if fp in alerts and alerts[fp].status == "firing" and not alerts[fp].muted)
        resolved = sorted(
            fp
            for fp in group.members
            if fp in group.notified_firing and (fp not in alerts or alerts[fp].status == "resolved")
        )
        resolved = [fp for fp in resolved if fp in alerts] if group.send_resolved else []
        changed = set(firing) != set(group.notified_firing)
        repeat_due = group.last_notified_at is None or now - group.last_notified_at >= group.repeat_interval
        send = bool(firing or resolved) and (changed or bool(resolved) or (bool(firing) and repeat_due))
        notification = self._notification(group, firing, resolved, now) if send else None
        # Resolved (or vanished) alerts leave the group once flushed.
        group.members = [fp for fp in group.members if fp in alerts and alerts[fp].status != "resolved"]
        if notification is not None:
            group.notified_firing, group.last_notified_at = firing, now
        else:
            group.notified_firing = [fp for fp in group.notified_firing if fp in group.members]
        return notification

    def _notification(self, group: GroupState, firing: list[str], resolved: list[str], now: float) -> Notification:
        # Oldest first, then by labels (rank 1 before rank 2): stable and readable.
        snapshots = sorted(
            (self._snapshot(self.state.alerts[fp]) for fp in firing + resolved),
            key=lambda a: (a.status != "firing", a.starts_at, sorted(a.labels.items())),
        )
        status: Literal["firing", "resolved"] = "firing" if firing else "resolved"
        group.sequence += 1
        return Notification(
            idempotency_key=idempotency_key(group.key, group.created_at, [(a.fingerprint, a.status) for a in snapshots], status, group.sequence),
            receiver=group.receiver,
            group_key=group.key,
            group_labels=group.group_labels,
            status=status,
            alerts=snapshots,
            common_labels=_common([a.labels for a in snapshots]),
            common_annotations=_common([a.annotations for a in snapshots]),
            external_url=self.config.external_url,
            sequence=group.sequence,
            created_at=now,
        )

    def _snapshot(self, alert: AlertState) -> AlertSnapshot:
        return AlertSnapshot(
            fingerprint=alert.fingerprint,
            status="resolved" if alert.status == "resolved" else "firing",
            labels=alert.labels,
            annotations=alert.annotations,
            starts_at=alert.starts_at if alert.starts_at is not None else alert.active_since,
            ends_at=alert.ends_at,
            value=alert.value,
            evidence=alert.evidence,
            cost=alert.cost,
            generator_url=dashboard_url(self.config.external_url, alert.labels),
            finding_fingerprint=alert.finding_fingerprint,
        )

    def _collect_garbage(self) -> None:
        self.state.groups = {k: g for k, g in self.state.groups.items() if g.members}
        grouped = {fp for g in self.state.groups.values() for fp in g.members}
        for fp in [fp for fp, a in self.state.alerts.items() if a.status == "resolved" and fp not in grouped]:
            del self.state.alerts[fp]

    def active_alerts(self) -> list[AlertState]:
        """Pending and firing alerts (muted ones included, marked), oldest first."""
        live = [a for a in self.state.alerts.values() if a.status != "resolved"]
        return sorted(live, key=lambda a: (a.active_since, a.fingerprint))
