"""Slack incoming webhook: `text` (fallback, shown in notifications) plus Block Kit `blocks`."""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.text import alert_fields, summary, title, truncate

MAX_BLOCKS = 50
MAX_SECTION_CHARS = 3000


def markdown_lines(n: Notification) -> list[str]:
    """The notification as Slack/Mattermost markdown, one alert per paragraph."""
    lines = [f"*{title(n)}*"]
    for alert in n.alerts:
        lines.append(f"*{summary(alert)}*")
        lines += [f"• {name}: {value}" for name, value in alert_fields(alert, n.created_at)]
    return lines


def payload(n: Notification) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": truncate(title(n), 150)}}]
    per_alert = (MAX_BLOCKS - 2) // 2
    for alert in n.alerts[:per_alert]:
        rows = "\n".join(f"*{name}:* {value}" for name, value in alert_fields(alert, n.created_at))
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": truncate(f"*{summary(alert)}*\n{rows}", MAX_SECTION_CHARS)}})
        blocks.append({"type": "divider"})
    if len(n.alerts) > per_alert:
        more = f"…and {len(n.alerts) - per_alert} more alerts on the dashboard: {n.external_url}"
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": more}]})
    text = truncate(f"{title(n)}: " + "; ".join(summary(a) for a in n.alerts), MAX_SECTION_CHARS)
    return {"text": text, "blocks": blocks}
