"""Generic JSON webhook in Alertmanager's webhook format (version "4"), so existing receivers
(PagerDuty bridges, ticketing, custom handlers) work unchanged. Evidence and cost ride along
as extra per-alert fields (raw numbers: this is data, not a message), which Alertmanager consumers
ignore."""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.text import dashboard_link, iso_utc

# Alertmanager writes this for "no end time yet".
ZERO_TIME = "0001-01-01T00:00:00Z"


def payload(n: Notification) -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": 0,
        "status": n.status,
        "receiver": n.receiver,
        "groupLabels": n.group_labels,
        "commonLabels": n.common_labels,
        "commonAnnotations": n.common_annotations,
        "externalURL": n.external_url,
        # The same on every retry of this notification (also the Idempotency-Key header): a
        # receiver drops the repeat a timed-out first try may leave. Alertmanager consumers ignore it.
        "idempotencyKey": n.idempotency_key,
        "alerts": [
            {
                "status": a.status,
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": iso_utc(a.starts_at),
                "endsAt": iso_utc(a.ends_at) if a.ends_at is not None else ZERO_TIME,
                # The dashboard on the alert's time range, with only the variables it defines.
                "generatorURL": dashboard_link(a, n.created_at, n.external_url),
                "fingerprint": a.fingerprint,
                "evidence": a.evidence,
                "cost": a.cost,
            }
            for a in n.alerts
        ],
    }
