"""Slack incoming webhook: `text` (fallback, shown in notifications), a Block Kit header, and one
attachment per alert whose `color` bar is the alert's severity (resolved: green) and whose
section block says what, where, since when, evidence, cost, runbook, dashboard and how to silence.

`text` and the section and context blocks are mrkdwn, where `<...>` is a mention (`<!channel>`,
`<@U123>`) or a link (`<https://...|label>`): label text goes in through `mrkdwn_text`. The header
block is plain_text, which Slack shows as it is, so it is not escaped.
"""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.text import (
    COLOURS,
    alert_fields,
    as_is,
    backticks,
    colour,
    summary,
    title,
    truncate,
)

MAX_ATTACHMENTS = 20  # Slack's advice; more are cut with a pointer to the dashboard
MAX_SECTION_CHARS = 3000

_MRKDWN_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def mrkdwn_text(text: str) -> str:
    """Text as Slack mrkdwn shows it literally: Slack's documented escaping of `&`, `<`, `>`.
    Nothing else makes a mention or a link (a plain `@channel` is not one without `link_names`)."""
    return text.translate(_MRKDWN_ESCAPES)


def alert_text(n: Notification, alert: Any) -> str:
    """One alert's section: its summary in bold, then a `*Name:* value` row per field."""
    rows = "\n".join(f"*{name}:* {value}"
                     for name, value in alert_fields(alert, n.created_at, mrkdwn_text, backticks, n.external_url))
    return truncate(f"*{summary(alert, mrkdwn_text)}*\n{rows}", MAX_SECTION_CHARS)


def payload(n: Notification) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": truncate(title(n, as_is), 150)}}]
    attachments = [
        {"color": COLOURS[colour(alert)], "fallback": truncate(summary(alert, mrkdwn_text), 300),
         "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": alert_text(n, alert)}}]}
        for alert in n.alerts[:MAX_ATTACHMENTS]
    ]
    if len(n.alerts) > MAX_ATTACHMENTS:
        more = f"…and {len(n.alerts) - MAX_ATTACHMENTS} more alerts on the dashboard: {mrkdwn_text(n.external_url)}"
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": more}]})
    fallback = f"{title(n, mrkdwn_text)}: " + "; ".join(summary(a, mrkdwn_text) for a in n.alerts)
    return {"text": truncate(fallback, MAX_SECTION_CHARS), "blocks": blocks, "attachments": attachments}
