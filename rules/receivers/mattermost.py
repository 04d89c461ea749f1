"""Mattermost incoming webhook: Slack-compatible; it renders markdown `text` (no Block Kit) and
Slack-style `attachments`, whose `color` bar shows each alert's severity (resolved: green).

Mattermost turns Slack's `<!channel>` and `<url|label>` into a mention and a link, renders markdown
links (`[label](url)`) and makes any `@name` a mention: label text goes in through `markdown_text`.
"""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.slack import mrkdwn_text
from laggard.rules.receivers.text import COLOURS, alert_fields, backticks, break_after, colour, summary, title, truncate

MAX_TEXT_CHARS = 16383  # Mattermost's post size limit
MAX_ATTACHMENTS = 20


def markdown_text(text: str) -> str:
    """Text as Mattermost shows it literally: Slack's `&`, `<`, `>` escaping (Mattermost reads
    the entities back as characters), and a zero-width space after `@` (no mention) and `]` (no
    markdown link)."""
    return break_after(mrkdwn_text(text), "@]")


def alert_markdown(n: Notification, alert: Any) -> str:
    """One alert as markdown: its summary in bold, then a bullet per row."""
    rows = [f"• {name}: {value}"
            for name, value in alert_fields(alert, n.created_at, markdown_text, backticks, n.external_url)]
    return "\n".join([f"*{summary(alert, markdown_text)}*", *rows])


def payload(n: Notification) -> dict[str, Any]:
    shown = n.alerts[:MAX_ATTACHMENTS]
    # The post's text (what a push notification shows): the title and each alert's summary; the
    # attachments under it carry the details, each with its severity colour.
    text = "\n".join([f"*{title(n, markdown_text)}*", *(f"• {summary(a, markdown_text)}" for a in shown)])
    if len(n.alerts) > MAX_ATTACHMENTS:
        more = len(n.alerts) - MAX_ATTACHMENTS
        text += f"\n…and {more} more alerts on the dashboard: {markdown_text(n.external_url)}"
    budget = (MAX_TEXT_CHARS - len(text)) // max(1, len(shown)) - 100  # room for the attachments' other fields
    attachments = [
        {"fallback": truncate(summary(alert, markdown_text), 300), "color": COLOURS[colour(alert)],
         "text": truncate(alert_markdown(n, alert), max(200, budget))}
        for alert in shown
    ]
    return {"text": truncate(text, MAX_TEXT_CHARS), "username": "laggard", "attachments": attachments}
