"""What every chat notification says, shared by the chat receivers: what, where, since when,
the evidence, the cost, and a dashboard link."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from laggard.rules.alert_lifecycle import AlertSnapshot, Notification

_WHERE = ("cluster", "job", "rank", "node", "gpu", "model")


def iso_utc(ts: float) -> str:
    """RFC 3339 in UTC with millisecond precision, as Alertmanager writes it."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if v]
    return "".join(parts[:2]) or "0s"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in sorted(values.items()))


def title(n: Notification) -> str:
    """'[FIRING:2] StragglerRank (cluster=c1, job=train-7)'."""
    state = f"FIRING:{len(n.firing)}" if n.status == "firing" else "RESOLVED"
    name = n.common_labels.get("alertname") or n.group_labels.get("alertname") or "alerts"
    scope = pairs({k: v for k, v in n.group_labels.items() if k != "alertname" and v})
    return f"[{state}] {name}" + (f" ({scope})" if scope else "")


def summary(alert: AlertSnapshot) -> str:
    return alert.annotations.get("summary") or alert.labels.get("alertname", "alert")


def alert_fields(alert: AlertSnapshot, now: float) -> list[tuple[str, str]]:
    """(name, value) rows describing one alert; empty rows are left out."""
    if alert.status == "resolved" and alert.ends_at is not None:
        since = f"{iso_utc(alert.starts_at)} to {iso_utc(alert.ends_at)} ({human_duration(alert.ends_at - alert.starts_at)})"
    else:
        since = f"{iso_utc(alert.starts_at)} ({human_duration(now - alert.starts_at)} ago)"
    rows = [
        ("Status", f"{alert.status} · {alert.labels.get('severity', '')}".strip(" ·")),
        ("Where", ", ".join(f"{k}={alert.labels[k]}" for k in _WHERE if k in alert.labels)),
        ("Since", since),
        ("Details", alert.annotations.get("description", "")),
        ("Evidence", pairs(alert.evidence)),
        ("Cost", pairs(alert.cost)),
        ("Dashboard", alert.generator_url),
    ]
    return [(name, value) for name, value in rows if value]


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
