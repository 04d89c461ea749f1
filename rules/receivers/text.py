"""What every chat notification says, shared by the chat receivers: what, where, since when,
the evidence, the cost, and a dashboard link.

Labels, annotations, evidence and summaries come from job names and rule files, which an attacker
can choose: in a chat they must read as text, never as markup (a `<!channel>` mention, a masked
phishing link). So every piece built from them goes through the receiver's `escape` (its format's
one escaping function) here, where it enters the message; the receivers' own markup (`*Where:*`,
bullets, `[FIRING:2]`) is added around the escaped pieces and is not escaped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from laggard.rules.alert_lifecycle import AlertSnapshot, Notification

_WHERE = ("cluster", "job", "rank", "node", "gpu", "model")

Escape = Callable[[str], str]
ZERO_WIDTH_SPACE = "\u200b"


def as_is(text: str) -> str:
    """The escape of text that is shown as it is (Slack's plain_text header)."""
    return text


def break_after(text: str, chars: str) -> str:
    """`text` with a zero-width space after each of `chars`. Markdown link syntax (`](`, `][`,
    `]:`) and mentions (`@channel`, `<@id>`) need the two characters side by side, and not every
    chat renderer honours backslash escapes; the space splits them and shows nothing."""
    return "".join(c + ZERO_WIDTH_SPACE if c in chars else c for c in text)


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


def title(n: Notification, escape: Escape) -> str:
    """'[FIRING:2] StragglerRank (cluster=c1, job=train-7)'; the alert name and labels escaped."""
    state = f"FIRING:{len(n.firing)}" if n.status == "firing" else "RESOLVED"
    name = n.common_labels.get("alertname") or n.group_labels.get("alertname") or "alerts"
    scope = pairs({k: v for k, v in n.group_labels.items() if k != "alertname" and v})
    return f"[{state}] {escape(name)}" + (f" ({escape(scope)})" if scope else "")


def summary(alert: AlertSnapshot, escape: Escape) -> str:
    return escape(alert.annotations.get("summary") or alert.labels.get("alertname", "alert"))


def alert_fields(alert: AlertSnapshot, now: float, escape: Escape) -> list[tuple[str, str]]:
    """(name, value) rows describing one alert, values escaped; empty rows are left out."""
    if alert.status == "resolved" and alert.ends_at is not None:
        since = f"{iso_utc(alert.starts_at)} to {iso_utc(alert.ends_at)} ({human_duration(alert.ends_at - alert.starts_at)})"
    else:
        since = f"{iso_utc(alert.starts_at)} ({human_duration(now - alert.starts_at)} ago)"
    rows = [
        ("Status", f"{alert.status} · {escape(alert.labels.get('severity', ''))}".strip(" ·")),
        ("Where", escape(", ".join(f"{k}={alert.labels[k]}" for k in _WHERE if k in alert.labels))),
        ("Since", since),
        ("Details", escape(alert.annotations.get("description", ""))),
        ("Evidence", escape(pairs(alert.evidence))),
        ("Cost", escape(pairs(alert.cost))),
        ("Dashboard", escape(alert.generator_url)),
    ]
    return [(name, value) for name, value in rows if value]


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
