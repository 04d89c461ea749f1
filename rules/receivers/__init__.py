"""Chat and webhook receivers: one module per kind builds the JSON body; delivery.py sends it."""

from __future__ import annotations

from typing import Any, Callable

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers import discord, mattermost, slack, teams, webhook

PAYLOAD_BUILDERS: dict[str, Callable[[Notification], dict[str, Any]]] = {
    "slack": slack.payload,
    "discord": discord.payload,
    "teams": teams.payload,
    "mattermost": mattermost.payload,
    "webhook": webhook.payload,
}
