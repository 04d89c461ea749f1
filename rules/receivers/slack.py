"""Slack incoming webhook: `text` (fallback, shown in notifications) plus Block Kit `blocks`.

`text` and the section and context blocks are mrkdwn, where `<...>` is a mention (`<!channel>`,
`<@U123>`) or a link (`<https://...|label>`): label text goes in through `mrkdwn_text`. The header
block is plain_text, which Slack shows as it is, so it is not escaped.
"""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.text import Escape, alert_fields, as_is, summary, title, truncate

MAX_BLOCKS = 50
MAX_SECTION_CHARS = 3000

_MRKDWN_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def mrkdwn_text(text: str) -> str:
    """Text as Slack mrkdwn shows it literally: Slack's documented escaping of `&`, `<`, `>`.
    Nothing else makes a mention or a link (a plain `@channel` is not one without `link_names`)."""
    return text.translate(_MRKDWN_ESCAPES)


def markdown_lines(n: Notification, escape: Escape) -> list[str]:
    """The notification as Slack/Mattermost markdown, one alert per paragraph; `escape` is the
    format's escaping of label text."""
    lines = [f"*{title(n, escape)}*"]
    for alert in n.alerts:
        lines.append(f"*{summary(alert, escape)}*")
        lines += [f"• {name}: {value}" for name, value in alert_fields(alert, n.created_at, escape)]
    return lines


def payload(n: Notification) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": truncate(title(n, as_is), 150)}}]
    per_alert = (MAX_BLOCKS - 2) // 2
    for alert in n.alerts[:per_alert]:
        rows = "\n".join(f"*{name}:* {value}" for name, value in alert_fields(alert, n.created_at, mrkdwn_text))
        text = f"*{summary(alert, mrkdwn_text)}*\n{rows}"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": truncate(text, MAX_SECTION_CHARS)}})
        blocks.append({"type": "divider"})
    if len(n.alerts) > per_alert:
        more = f"…and {len(n.alerts) - per_alert} more alerts on the dashboard: {mrkdwn_text(n.external_url)}"
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": more}]})
    fallback = f"{title(n, mrkdwn_text)}: " + "; ".join(summary(a, mrkdwn_text) for a in n.alerts)
    return {"text": truncate(fallback, MAX_SECTION_CHARS), "blocks": blocks}
