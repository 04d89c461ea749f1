"""Microsoft Teams via a Workflows webhook: a message carrying one Adaptive Card attachment.

TextBlock text and FactSet titles and values are markdown, links (`[label](url)`) included, so
label text goes in through `markdown_text`. A mention needs an `msteams.entities` entry, which
only we could add, so `<at>` in a label stays text.

An Adaptive Card has no `themeColor` (that was the retired MessageCard's): severity shows as the
title's colour and as each alert's container style (critical: attention/red, warning: amber,
info: accent/blue, resolved: good/green).
"""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.text import (
    alert_fields,
    break_after,
    colour,
    dashboard_link,
    notification_colour,
    runbook,
    summary,
    title,
)

MAX_ALERTS = 20  # Teams rejects cards over about 28 KB
# Severity colour as an Adaptive Card TextBlock `color` and a Container `style`.
TEXT_COLOR = {"critical": "Attention", "warning": "Warning", "info": "Accent", "resolved": "Good"}
CONTAINER_STYLE = {"critical": "attention", "warning": "warning", "info": "accent", "resolved": "good"}


def markdown_text(text: str) -> str:
    """Text as a card shows it literally: a zero-width space after `]`, so no markdown link."""
    return break_after(text, "]")


def _http(url: str) -> bool:
    return url.startswith(("https://", "http://"))


def payload(n: Notification) -> dict[str, Any]:
    body: list[dict[str, Any]] = [
        {"type": "TextBlock", "size": "Large", "weight": "Bolder", "wrap": True, "text": title(n, markdown_text),
         "color": TEXT_COLOR[notification_colour(n)]},
    ]
    for alert in n.alerts[:MAX_ALERTS]:
        facts = [{"title": name, "value": value}
                 for name, value in alert_fields(alert, n.created_at, markdown_text, fallback_url=n.external_url)
                 if name != "Dashboard"]
        body.append({"type": "Container", "style": CONTAINER_STYLE[colour(alert)], "separator": True, "items": [
            {"type": "TextBlock", "weight": "Bolder", "wrap": True, "text": summary(alert, markdown_text),
             "color": TEXT_COLOR[colour(alert)]},
            {"type": "FactSet", "facts": facts},
        ]})
    if len(n.alerts) > MAX_ALERTS:
        body.append({"type": "TextBlock", "wrap": True, "text": f"…and {len(n.alerts) - MAX_ALERTS} more alerts"})
    # One group's alerts share its cluster and job: the earliest one's link covers them all.
    earliest = min(n.alerts, key=lambda a: a.starts_at, default=None)
    dashboard = dashboard_link(earliest, n.created_at, n.external_url) if earliest else n.external_url
    actions = [{"type": "Action.OpenUrl", "title": "Open dashboard", "url": dashboard}]
    runbooks = list(dict.fromkeys(runbook(a) for a in n.alerts if _http(runbook(a))))
    actions += [{"type": "Action.OpenUrl", "title": "Runbook", "url": url} for url in runbooks[:3]]
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "msteams": {"width": "Full"},
        "body": body,
        "actions": actions,
    }
    return {
        "type": "message",
        "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}],
    }
