"""Mattermost incoming webhook: Slack-compatible; it renders markdown `text` (no Block Kit).

Mattermost turns Slack's `<!channel>` and `<url|label>` into a mention and a link, renders markdown
links (`[label](url)`) and makes any `@name` a mention: label text goes in through `markdown_text`.
"""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.slack import markdown_lines, mrkdwn_text
from laggard.rules.receivers.text import break_after, truncate

MAX_TEXT_CHARS = 16383  # Mattermost's post size limit


def markdown_text(text: str) -> str:
    """Text as Mattermost shows it literally: Slack's `&`, `<`, `>` escaping (Mattermost reads
    the entities back as characters), and a zero-width space after `@` (no mention) and `]` (no
    markdown link)."""
    return break_after(mrkdwn_text(text), "@]")


def payload(n: Notification) -> dict[str, Any]:
    return {"text": truncate("\n".join(markdown_lines(n, markdown_text)), MAX_TEXT_CHARS), "username": "laggard"}
