"""Mattermost incoming webhook: Slack-compatible; it renders markdown `text` (no Block Kit)."""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.slack import markdown_lines
from laggard.rules.receivers.text import truncate

MAX_TEXT_CHARS = 16383  # Mattermost's post size limit


def payload(n: Notification) -> dict[str, Any]:
    return {"text": truncate("\n".join(markdown_lines(n)), MAX_TEXT_CHARS), "username": "laggard"}
