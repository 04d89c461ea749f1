"""Label text reaches a chat as text, never as markup: issue #18's job named
`<!channel> <https://evil.example/login|Click to re-authenticate>` arrived in Slack as a live
@channel mention and a phishing link. Each receiver's payload is rendered from a notification whose
labels, annotations and evidence carry hostile markup for every chat format, and each format's
escaping function is checked on arbitrary text."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from laggard.rules.alert_lifecycle import AlertSnapshot, Notification, dashboard_url
from laggard.rules.receivers import PAYLOAD_BUILDERS, discord, mattermost, slack, teams
from laggard.rules.receivers.text import ZERO_WIDTH_SPACE

HOSTILE = ("<!channel> <https://evil.example/login|Click to re-authenticate> <@U024BE7LH> <#C024BE7LR> <!here> "
           "[Click here](https://evil.example/login) @channel @all <at>Boss</at> <t:1700000000:R> &amp; &lt;!everyone&gt;")
NOW = 1_700_000_000.0

# Markup that must not survive from a label, per format.
SLACK_MARKUP = ("<!", "<http", "<@", "<#")
MARKDOWN_LINK = re.compile(r"\][(\[:]")  # [label](url), [label][ref], [ref]: url (no space allowed)
MATTERMOST_MENTION = re.compile(r"@\w")
DISCORD_ANGLE = re.compile(r"<[^\u200b]")

# Lone surrogates are left out: labels reach the alert engine from validated JSON, which has none.
chat_text = st.text(st.one_of(st.sampled_from(list("<>&@[]():!#|*_~`\\;\n ")), st.characters(exclude_categories=("Cs",))),
                    max_size=80)


def notification(hostile: str = HOSTILE) -> Notification:
    labels = {"alertname": hostile, "severity": hostile, "cluster": hostile, "job": hostile, "node": "a12"}
    alert = AlertSnapshot(
        fingerprint="f1", status="firing", labels=labels, annotations={"summary": hostile, "description": hostile},
        starts_at=NOW - 120, evidence={"note": hostile, "score": 0.61}, cost={hostile: 1.5},
        generator_url=dashboard_url("http://dash.example/d/laggard", labels),
    )
    return Notification(
        idempotency_key="k", receiver="chat", group_key="g", group_labels={"alertname": hostile, "job": hostile},
        status="firing", alerts=[alert], common_labels=labels, common_annotations={"summary": hostile},
        external_url="http://dash.example/d/laggard?a=1&b=2", sequence=1, created_at=NOW,
    )


def slack_unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def slack_mrkdwn_fields(body: dict[str, Any]) -> list[str]:
    """Every mrkdwn text of a Slack payload: the fallback, and the section and context blocks at
    the top and in the attachments (one per alert), with each attachment's fallback."""
    texts = [body["text"]]
    blocks = list(body["blocks"])
    for attachment in body.get("attachments", []):
        texts.append(attachment["fallback"])
        blocks += attachment["blocks"]
    for block in blocks:
        if block["type"] == "section":
            texts.append(block["text"]["text"])
        elif block["type"] == "context":
            texts += [e["text"] for e in block["elements"] if e["type"] == "mrkdwn"]
    return texts


def mattermost_texts(body: dict[str, Any]) -> list[str]:
    return [body["text"], *(t for a in body.get("attachments", []) for t in (a["text"], a["fallback"]))]


def teams_blocks(card: dict[str, Any]) -> list[dict[str, Any]]:
    """The card's elements, containers' items included."""
    out = []
    for element in card["body"]:
        out.append(element)
        out += teams_blocks({"body": element.get("items", [])})
    return out


def test_slack_mrkdwn_carries_the_label_as_text_and_the_header_as_plain_text() -> None:
    body = slack.payload(notification())
    fields = slack_mrkdwn_fields(body)
    assert len(fields) == 3  # the fallback text, the alert's fallback and its section
    for text in fields:
        assert not any(markup in text for markup in SLACK_MARKUP), text
        assert "<" not in text and ">" not in text
        assert HOSTILE in slack_unescape(text)  # shown as the label reads
    assert "*Where:* cluster=&lt;!channel&gt; &lt;https://evil.example/login|Click" in fields[2]
    header = body["blocks"][0]["text"]
    assert header["type"] == "plain_text" and header["text"].startswith(f"[FIRING:1] {HOSTILE[:40]}")


def test_mattermost_text_has_no_slack_markup_mention_or_markdown_link() -> None:
    body = mattermost.payload(notification())
    for text in mattermost_texts(body):
        assert "<" not in text and ">" not in text
        assert not MATTERMOST_MENTION.search(text) and not MARKDOWN_LINK.search(text)
        assert HOSTILE in slack_unescape(text.replace(ZERO_WIDTH_SPACE, ""))
    assert body["text"].startswith("*[FIRING:1] ")  # our own markup is kept


def test_discord_content_and_embeds_have_no_masked_link_or_mention_syntax() -> None:
    body = discord.payload(notification())
    [embed] = body["embeds"]
    texts = [body["content"], embed["title"], *(f["value"] for f in embed["fields"])]
    for text in texts:
        assert not MARKDOWN_LINK.search(text) and not DISCORD_ANGLE.search(text), text
    assert HOSTILE in embed["title"].replace(ZERO_WIDTH_SPACE, "")  # the summary, shown as it reads
    assert body["allowed_mentions"] == {"parse": []}


def test_teams_card_text_and_facts_have_no_markdown_link() -> None:
    card = teams.payload(notification())["attachments"][0]["content"]
    blocks = teams_blocks(card)
    texts = [b["text"] for b in blocks if b["type"] == "TextBlock"]
    texts += [v for b in blocks if b["type"] == "FactSet" for f in b["facts"] for v in (f["title"], f["value"])]
    for text in texts:
        assert not MARKDOWN_LINK.search(text), text
    assert any(HOSTILE in t.replace(ZERO_WIDTH_SPACE, "") for t in texts)
    assert card["actions"][0]["url"].startswith("http://dash.example/d/laggard?")
    assert "<" not in card["actions"][0]["url"]  # label values are URL-encoded in the dashboard link


def test_generic_webhook_carries_labels_as_data_unchanged() -> None:
    body = PAYLOAD_BUILDERS["webhook"](notification())
    assert body["alerts"][0]["labels"]["job"] == HOSTILE and body["commonAnnotations"]["summary"] == HOSTILE


@given(chat_text)
def test_slack_escaping_leaves_no_angle_bracket_and_reverses_exactly(text: str) -> None:
    escaped = slack.mrkdwn_text(text)
    assert "<" not in escaped and ">" not in escaped
    assert not re.search(r"&(?!amp;|lt;|gt;)", escaped)  # every & starts one of Slack's three entities
    assert slack_unescape(escaped) == text


@given(chat_text)
def test_mattermost_escaping_leaves_no_markup_and_reads_as_the_text(text: str) -> None:
    escaped = mattermost.markdown_text(text)
    assert "<" not in escaped and ">" not in escaped
    assert not MATTERMOST_MENTION.search(escaped) and not MARKDOWN_LINK.search(escaped)
    assert slack_unescape(escaped.replace(ZERO_WIDTH_SPACE, "")) == text.replace(ZERO_WIDTH_SPACE, "")


@given(chat_text)
def test_discord_and_teams_escaping_leave_no_link_and_read_as_the_text(text: str) -> None:
    for escaped in (discord.markdown_text(text), teams.markdown_text(text)):
        assert not MARKDOWN_LINK.search(escaped)
        assert escaped.replace(ZERO_WIDTH_SPACE, "") == text.replace(ZERO_WIDTH_SPACE, "")
    assert not DISCORD_ANGLE.search(discord.markdown_text(text))


@given(chat_text)
def test_every_chat_payload_keeps_arbitrary_label_text_out_of_markup(text: str) -> None:
    note = notification(text)
    for field in slack_mrkdwn_fields(slack.payload(note)):
        assert "<" not in field.replace("&lt;", "") and ">" not in field.replace("&gt;", "")
    for mm in mattermost_texts(mattermost.payload(note)):
        assert "<" not in mm and not MATTERMOST_MENTION.search(mm) and not MARKDOWN_LINK.search(mm)
    card = teams.payload(note)["attachments"][0]["content"]
    for block in teams_blocks(card):
        for value in [block.get("text", ""), *(v for f in block.get("facts", []) for v in (f["title"], f["value"]))]:
            assert not MARKDOWN_LINK.search(value)
    body = discord.payload(note)
    for value in [body["content"], *(f["value"] for e in body["embeds"] for f in e["fields"])]:
        assert not MARKDOWN_LINK.search(value) and not DISCORD_ANGLE.search(value)
