"""Chat, webhook and Alertmanager receivers: one module per kind builds the JSON body; delivery.py sends it."""

from __future__ import annotations

from typing import Any, Callable

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers import alertmanager, discord, mattermost, slack, teams, webhook

# A JSON object for the chats and the generic webhook; a JSON array for Alertmanager's /api/v2/alerts.
PAYLOAD_BUILDERS: dict[str, Callable[[Notification], dict[str, Any] | list[dict[str, Any]]]] = {
    "slack": slack.payload,
    "discord": discord.payload,
    "teams": teams.payload,
    "mattermost": mattermost.payload,
    "webhook": webhook.payload,
    "alertmanager": alertmanager.payload,
}
