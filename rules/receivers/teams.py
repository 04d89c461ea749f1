"""Microsoft Teams via a Workflows webhook: a message carrying one Adaptive Card attachment.

TextBlock text and FactSet titles and values are markdown, links (`[label](url)`) included, so
label text goes in through `markdown_text`. A mention needs an `msteams.entities` entry, which
only we could add, so `<at>` in a label stays text.
"""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.text import alert_fields, break_after, summary, title

MAX_ALERTS = 20  # Teams rejects cards over about 28 KB


def markdown_text(text: str) -> str:
    """Text as a card shows it literally: a zero-width space after `]`, so no markdown link."""
    return break_after(text, "]")


def payload(n: Notification) -> dict[str, Any]:
    body: list[dict[str, Any]] = [
        {"type": "TextBlock", "size": "Large", "weight": "Bolder", "wrap": True, "text": title(n, markdown_text),
         "color": "Attention" if n.status == "firing" else "Good"},
    ]
    for alert in n.alerts[:MAX_ALERTS]:
        facts = [{"title": name, "value": value} for name, value in alert_fields(alert, n.created_at, markdown_text)
                 if name != "Dashboard"]
        body.append({"type": "TextBlock", "weight": "Bolder", "wrap": True, "separator": True, "text": summary(alert, markdown_text)})
        body.append({"type": "FactSet", "facts": facts})
    if len(n.alerts) > MAX_ALERTS:
        body.append({"type": "TextBlock", "wrap": True, "text": f"…and {len(n.alerts) - MAX_ALERTS} more alerts"})
    dashboard = n.alerts[0].generator_url if len(n.alerts) == 1 else n.external_url
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "msteams": {"width": "Full"},
        "body": body,
        "actions": [{"type": "Action.OpenUrl", "title": "Open dashboard", "url": dashboard}],
    }
    return {
        "type": "message",
        "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}],
    }
