"""Discord webhook: `content` (at most 2000 characters) plus up to 10 embeds.

`allowed_mentions` keeps any mention from pinging; label text still goes in through
`markdown_text`, so it cannot make a masked link (`[label](url)`, rendered in content and embeds)
or something that looks like a mention, channel or timestamp (`<@id>`, `<#id>`, `<t:...>`).
"""

from __future__ import annotations

from typing import Any

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.receivers.text import (
    COLOURS,
    alert_fields,
    backticks,
    break_after,
    colour,
    dashboard_link,
    summary,
    title,
    truncate,
)

MAX_CONTENT = 2000
MAX_EMBEDS = 10
MAX_FIELDS = 25
MAX_EMBEDS_CHARS = 6000  # Discord's limit over all embeds of one message
_COLOR = {name: int(hex_colour.lstrip("#"), 16) for name, hex_colour in COLOURS.items()}  # embeds take an int


def markdown_text(text: str) -> str:
    """Text as Discord shows it literally: a zero-width space after `]` (no masked link) and `<`
    (no `<@id>`-style mention, channel, role, emoji or timestamp)."""
    return break_after(text, "]<")


def _embed(alert: Any, now: float, budget: int, external_url: str) -> dict[str, Any]:
    fields = [
        {"name": truncate(name, 256), "value": truncate(value, 1024), "inline": name in ("Status", "Since")}
        for name, value in alert_fields(alert, now, markdown_text, backticks, external_url)
    ][:MAX_FIELDS]
    embed: dict[str, Any] = {"title": truncate(summary(alert, markdown_text), 256), "color": _COLOR[colour(alert)],
                             "fields": fields}
    link = dashboard_link(alert, now, external_url)
    if link:
        embed["url"] = link  # the title links to the dashboard
    # Keep the whole message under Discord's total: shorten field values until it fits.
    # The silence command is cut last: a cut one cannot be pasted.
    for cuttable in (lambda f: f["name"] != "Silence", lambda f: True):
        while _chars(embed) > budget and any(len(f["value"]) > 40 and cuttable(f) for f in fields):
            longest = max((f for f in fields if cuttable(f)), key=lambda f: len(f["value"]))
            longest["value"] = truncate(longest["value"], max(40, len(longest["value"]) // 2))
    return embed


def _chars(embed: dict[str, Any]) -> int:
    return len(embed["title"]) + sum(len(f["name"]) + len(f["value"]) for f in embed["fields"])


def payload(n: Notification) -> dict[str, Any]:
    shown = n.alerts[:MAX_EMBEDS]
    budget = MAX_EMBEDS_CHARS // max(1, len(shown))
    content = title(n, markdown_text)
    if len(n.alerts) > MAX_EMBEDS:
        content += f"\n…and {len(n.alerts) - MAX_EMBEDS} more: {n.external_url}"
    return {
        "content": truncate(content, MAX_CONTENT),
        "embeds": [_embed(alert, n.created_at, budget, n.external_url) for alert in shown],
        "allowed_mentions": {"parse": []},  # alert text must never ping @everyone
    }
