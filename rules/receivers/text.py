"""What every chat notification says, shared by the chat receivers: what, where, how bad (status,
severity and its colour), since when (UTC time), the evidence and the cost in human units
(humanize.py), the runbook, a dashboard link that opens the real dashboard on the alert's time
range, and a `laggard silence add` command that mutes this alert.

Labels, annotations, evidence and summaries come from job names and rule files, which an attacker
can choose: in a chat they must read as text, never as markup (a `<!channel>` mention, a masked
phishing link). So every piece built from them goes through the receiver's `escape` (its format's
one escaping function) here, where it enters the message; the receivers' own markup (`*Where:*`,
bullets, `[FIRING:2]`) is added around the escaped pieces and is not escaped.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from laggard.rules.alert_lifecycle import AlertSnapshot, Notification
from laggard.rules.receivers.humanize import duration, evidence_text, number, utc_time

_WHERE = ("cluster", "job", "rank", "node", "gpu", "model")
# The labels a silence command matches, after alertname: what tells one alert of a rule from another.
_SILENCE_LABELS = ("cluster", "job", "rank", "node", "gpu")
SILENCE_FOR = "2h"
SILENCE_COMMENT = "your reason"
# Template variables of the Grafana dashboard (deploy/grafana/dashboards/laggard.json, uid
# laggard-fleet) that a link may set; tests/test_oncall_messages.py holds this to the JSON.
DASHBOARD_VARIABLES = ("cluster", "job")
# The dashboard opens on this much time before the alert started and after it ended (or was sent).
DASHBOARD_BEFORE_S = 30 * 60.0
DASHBOARD_AFTER_S = 10 * 60.0

Colour = Literal["critical", "warning", "info", "resolved"]
# One palette for every chat: red, amber, blue, green.
COLOURS: dict[str, str] = {"critical": "#D32F2F", "warning": "#F9A825", "info": "#1976D2", "resolved": "#2E7D32"}

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
    """'3m 20s', '2h 5m': the two largest units, never negative."""
    return duration(max(0.0, float(int(seconds))))


def _value(value: Any) -> str:
    if isinstance(value, float):
        return number(value)
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


def colour(alert: AlertSnapshot) -> Colour:
    """Which colour the alert is shown in: green once resolved, else its severity's."""
    if alert.status == "resolved":
        return "resolved"
    severity = alert.labels.get("severity", "")
    return severity if severity in ("critical", "warning") else "info"  # type: ignore[return-value]


def notification_colour(n: Notification) -> Colour:
    """The most urgent colour of a notification's alerts."""
    order: list[Colour] = ["critical", "warning", "info", "resolved"]
    return min((colour(a) for a in n.alerts), key=order.index, default="info")


def since_text(alert: AlertSnapshot, now: float) -> str:
    """'12:03:10 UTC (3m 20s ago)', or from-to and how long for a resolved alert; the date is added
    when it is not the day of `now`."""
    if alert.status == "resolved" and alert.ends_at is not None:
        return (f"{utc_time(alert.starts_at, now)} to {utc_time(alert.ends_at, now)} "
                f"({human_duration(alert.ends_at - alert.starts_at)})")
    return f"{utc_time(alert.starts_at, now)} ({human_duration(now - alert.starts_at)} ago)"


def dashboard_link(alert: AlertSnapshot, now: float, fallback: str = "") -> str:
    """The alert's dashboard link (its generator URL, else `fallback`) with only the template
    variables the dashboard defines and a time range around the alert (`from`/`to`, epoch ms)."""
    url = alert.generator_url or fallback
    if not url:
        return ""
    parts = urlsplit(url)
    keep = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if not (k.startswith("var-") or k in ("from", "to"))]
    variables = [(f"var-{k}", alert.labels[k]) for k in DASHBOARD_VARIABLES if alert.labels.get(k)]
    end = alert.ends_at if alert.status == "resolved" and alert.ends_at is not None else now
    window = [("from", str(int((alert.starts_at - DASHBOARD_BEFORE_S) * 1000))),
              ("to", str(int((max(end, alert.starts_at) + DASHBOARD_AFTER_S) * 1000)))]
    return urlunsplit(parts._replace(query=urlencode(keep + variables + window)))


def silence_matchers(alert: AlertSnapshot) -> list[str]:
    """`name=value` matchers that select this alert: its alertname and where it is."""
    keys = ["alertname", *_SILENCE_LABELS]
    return [f"{k}={alert.labels[k]}" for k in keys if alert.labels.get(k)]


def silence_command(alert: AlertSnapshot) -> str:
    """A `laggard silence add` command line (shell-quoted) that mutes this alert for SILENCE_FOR."""
    matchers = " ".join(f"-m {shlex.quote(m)}" for m in silence_matchers(alert))
    return f"laggard silence add {matchers} --for {SILENCE_FOR} --comment {shlex.quote(SILENCE_COMMENT)}"


def runbook(alert: AlertSnapshot) -> str:
    return alert.annotations.get("runbook_url", "").strip()


def alert_fields(alert: AlertSnapshot, now: float, escape: Escape, code: Escape = as_is,
                 fallback_url: str = "") -> list[tuple[str, str]]:
    """(name, value) rows describing one alert, values escaped; empty rows are left out. `code`
    wraps the (escaped) silence command in the format's code markup."""
    rows = [
        ("Status", f"{alert.status} · {escape(alert.labels.get('severity', ''))}".strip(" ·")),
        ("Where", escape(", ".join(f"{k}={alert.labels[k]}" for k in _WHERE if k in alert.labels))),
        ("Since", since_text(alert, now)),
        ("Details", escape(alert.annotations.get("description", ""))),
        ("Evidence", escape(evidence_text(alert.evidence, now))),
        ("Cost", escape(evidence_text(alert.cost, now))),
        ("Runbook", escape(runbook(alert))),
        ("Dashboard", escape(dashboard_link(alert, now, fallback_url))),
        ("Silence", code(escape(silence_command(alert))) if alert.status == "firing" else ""),
    ]
    return [(name, value) for name, value in rows if value]


def backticks(text: str) -> str:
    """`text` as inline code in Slack, Mattermost and Discord markdown."""
    return f"`{text}`" if text else text


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
