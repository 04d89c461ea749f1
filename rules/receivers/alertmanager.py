"""Prometheus Alertmanager as a receiver: laggard posts its alerts to Alertmanager's
`/api/v2/alerts` (a list of `PostableAlert`s), as Prometheus does, and Alertmanager routes, groups,
inhibits, silences and delivers them (PagerDuty, Opsgenie, email, chat...).

- `labels`: the alert's labels (alertname = the rule name, severity, cluster, job, ...), strings.
- `annotations`: summary, description, runbook_url as laggard rendered them, plus the evidence
  and cost in human units (`evidence`, `cost`: Alertmanager's annotations are strings only).
- `startsAt`: when the alert started firing. `generatorURL`: the dashboard on the alert's time range.
- `endsAt`: only on a resolved alert (when it ended). A firing one has none, so Alertmanager
  resolves it by itself `resolve_timeout` (5m by default) after the last post: laggard must post
  it again while it fires, which its route's `repeat_interval` does (every flush after that
  interval re-sends all the group's firing alerts). Give the Alertmanager receiver a route with a
  `repeat_interval` well below `resolve_timeout` (e.g. 1m), and the receiver a `rate_per_s`/`burst`
  above the chat defaults: Alertmanager takes many posts a second.

The receiver's URL (url_env/url_file) is the whole endpoint: http://alertmanager:9093/api/v2/alerts.
"""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.humanize import evidence_text
from laggard.rules.receivers.text import dashboard_link, iso_utc


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def payload(n: Notification) -> list[dict[str, Any]]:
    alerts = []
    for a in n.alerts:
        annotations = {k: _text(v) for k, v in a.annotations.items() if _text(v)}
        if a.evidence:
            annotations["evidence"] = evidence_text(a.evidence, n.created_at)
        if a.cost:
            annotations["cost"] = evidence_text(a.cost, n.created_at)
        alert: dict[str, Any] = {
            "labels": {k: _text(v) for k, v in a.labels.items()},
            "annotations": annotations,
            "startsAt": iso_utc(a.starts_at),
            "generatorURL": dashboard_link(a, n.created_at, n.external_url),
        }
        if a.status == "resolved":
            # When it ended; an alert resolved without an end time ends at this notification.
            alert["endsAt"] = iso_utc(a.ends_at if a.ends_at is not None else n.created_at)
        alerts.append(alert)
    return alerts
