"""Silences (their topic's records and the CLI), `alerts list` on the published alerts, and reading
the agents' own Finding/WindowResult. The CLI runs as a process on the real broker."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from laggard.results import Finding
from laggard.rules.alert_lifecycle import AlertEngine
from laggard.rules.evaluate import FindingIn, WindowIn
from laggard.rules.loader import DEFAULT_RULES, load_rules
from laggard.rules.model import Matcher
from laggard.rules.shared_state import ALERTS_KEY, SILENCE_RETENTION_S, SilenceBook, board_record
from laggard.rules.silences import Silence
from laggard.settings import Settings
from laggard.topics import read_records
from tests.helpers.faults import produce
from tests.test_cli_errors import laggard, one_line_failure


def silence(matcher: str, *, starts_at: float, ends_at: float, now: float) -> Silence:
    return Silence.new([Matcher.model_validate(matcher)], starts_at=starts_at, ends_at=ends_at, comment="c",
                       created_by="ops", now=now)


def record(silence: Silence) -> tuple[bytes, bytes]:
    return silence.id.encode(), silence.model_dump_json().encode()


def test_silence_book_keeps_the_newest_record_per_id() -> None:
    book = SilenceBook()
    later = silence("job=~train-.*", starts_at=500, ends_at=900, now=90)
    now_ = silence("node=n1", starts_at=100, ends_at=300, now=100)
    assert book.apply(*record(later), "t@0") is None and book.apply(*record(now_), "t@1") is None
    assert [s.id for s in book.listed(now=200)] == [later.id, now_.id]
    assert later.state(200) == "pending" and now_.state(200) == "active"
    assert now_.mutes({"node": "n1", "job": "x"}, 200) and not now_.mutes({"node": "n2"}, 200)
    assert later.mutes({"job": "train-7"}, 600) and not later.mutes({"job": "eval-7"}, 600)
    ended = now_.ended(250)
    assert ended.ends_at == 250 and ended.state(250) == "expired" and ended.ended(260) is ended
    assert book.apply(*record(ended), "t@2") is None
    assert [s.id for s in book.listed(now=260)] == [later.id]
    assert len(book.listed(now=260, include_expired=True)) == 2
    # Forgotten SILENCE_RETENTION_S after their end (now_ ended at 250, later ends at 900).
    assert book.forgettable(now=200 + SILENCE_RETENTION_S) == []
    assert book.forgettable(now=500 + SILENCE_RETENTION_S) == [now_.id]
    assert book.apply(later.id.encode(), None, "t@3") is None  # a tombstone
    assert [s.id for s in book.listed(now=260, include_expired=True)] == [now_.id]


def test_silence_book_skips_records_that_are_not_silences_and_names_them() -> None:
    book = SilenceBook()
    good = silence("job=a", starts_at=0, ends_at=10, now=0)
    book.apply(*record(good), "t@0")
    assert book.apply(good.id.encode(), b'{"id": ', "t@1") == "t@1: not a silence, skipped: not valid JSON (EOF while parsing a value at line 1 column 7)"
    assert book.apply(None, record(good)[1], "t@2") == "t@2: a record without a key (a silence's id) skipped"
    assert book.apply(b"other", record(good)[1], "t@3") == "t@3: a silence filed under another id ('other'), skipped"
    problem = book.apply(good.id.encode(), b'{"id": "x", "matchers": []}', "t@4")
    assert problem is not None and problem.startswith("t@4: not a silence, skipped: matchers: ")
    assert book.silences == {good.id: good}  # the last good record stays


KEYS = st.sampled_from(["a", "b", "c"])


@st.composite
def topic_records(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    key = draw(KEYS)
    kind = draw(st.sampled_from(["silence", "tombstone", "junk"]))
    if kind == "tombstone":
        return key.encode(), None
    if kind == "junk":
        return key.encode(), draw(st.binary(max_size=40))
    start = draw(st.floats(0, 1e9))
    matcher = Matcher(name=draw(st.sampled_from(["job", "node"])), op="=", value=draw(st.text(max_size=8)))
    found = Silence(id=key, matchers=[matcher], starts_at=start, ends_at=start + draw(st.floats(0, 1e6)),
                    comment="c", created_by="ops", created_at=start)
    return key.encode(), found.model_dump_json().encode()


@given(st.lists(topic_records(), max_size=30))
def test_silence_book_is_compaction_of_the_valid_records(records: list[tuple[bytes, bytes | None]]) -> None:
    """Whatever the records, the book holds per id the newest valid silence unless a tombstone came after it."""
    book, expected = SilenceBook(), {}
    for offset, (key, value) in enumerate(records):
        problem = book.apply(key, value, f"t@{offset}")
        if value is None:
            expected.pop(key.decode(), None)
        elif problem is None:
            expected[key.decode()] = value
        else:
            assert problem.startswith(f"t@{offset}: ")
    assert {k: s.model_dump_json().encode() for k, s in book.silences.items()} == expected


def test_matchers_parse_and_reject_bad_input() -> None:
    assert str(Matcher.model_validate("job!~'eval-.*'")) == "job!~eval-.*"
    assert Matcher.model_validate("gpu!=3").matches({"gpu": "4"})
    assert Matcher.model_validate("missing=").matches({})
    with pytest.raises(ValidationError, match="bad matcher"):
        Matcher.model_validate("no operator")
    with pytest.raises(ValidationError, match="bad regex"):
        Matcher.model_validate("job=~(")


def cli(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return laggard(*args, cwd=tmp_path, **env)


def test_silence_cli_add_list_expire_on_the_topic(shared_state_env: dict[str, str], stack: Settings,
                                                  tmp_path: Path) -> None:
    topic = shared_state_env["LAGGARD_TOPIC_SILENCES"]
    day = 86400.0
    old, recent = (silence("job=a", starts_at=time.time() - ago - day, ends_at=time.time() - ago, now=0)
                   for ago in (SILENCE_RETENTION_S + day, day))
    produce(stack, topic, [record(old), record(recent)])  # ended 6 days and 1 day ago
    added = cli("silence", "add", "--match", "node=n1", "-m", "job=~train-.*", "--for", "30m",
                "--comment", "firmware update", "--author", "ana", env=shared_state_env, tmp_path=tmp_path)
    assert added.returncode == 0, added.stderr
    records = read_records(stack, topic)
    assert [(r.key, r.value) for r in records[2:3]] == [(old.id.encode(), None)]  # forgotten: a tombstone
    [stored] = [json.loads(r.value) for r in records[3:]]
    assert stored["created_by"] == "ana" and stored["ends_at"] - stored["starts_at"] == pytest.approx(1800)
    silence_id = stored["id"]
    # Another folder (another machine, as far as laggard knows) sees it: nothing is kept locally.
    (elsewhere := tmp_path / "elsewhere").mkdir()
    listed = cli("silence", "list", env=shared_state_env, tmp_path=elsewhere)
    assert silence_id in listed.stdout and "firmware" in listed.stdout
    expired = cli("silence", "expire", silence_id, env=shared_state_env, tmp_path=tmp_path)
    assert expired.returncode == 0 and "expired" in expired.stdout
    assert silence_id not in cli("silence", "list", env=shared_state_env, tmp_path=tmp_path).stdout
    everything = cli("silence", "list", "--all", env=shared_state_env, tmp_path=tmp_path).stdout
    assert silence_id in everything and recent.id in everything and old.id not in everything
    missing = cli("silence", "expire", "nope", env=shared_state_env, tmp_path=tmp_path)
    assert missing.returncode == 1 and missing.stderr.strip() == "laggard: no silence with id 'nope'"
    bad = cli("silence", "add", "-m", "node", "--comment", "x", env=shared_state_env, tmp_path=tmp_path)
    assert bad.returncode != 0 and "bad matcher" in bad.stderr
    assert [json.loads(r.value)["id"] for r in read_records(stack, topic)[3:]] == [silence_id, silence_id]


def test_records_on_the_silences_topic_that_are_not_silences_are_named_and_skipped(
        shared_state_env: dict[str, str], stack: Settings, tmp_path: Path) -> None:
    topic = shared_state_env["LAGGARD_TOPIC_SILENCES"]
    added = cli("silence", "add", "-m", "job=x", "--comment", "parked", env=shared_state_env, tmp_path=tmp_path)
    assert added.returncode == 0, added.stderr
    produce(stack, topic, [(b"abc", b'[{"id": '), (b"def", b"{}")])  # (the broker refuses records without a key)
    for command in (["silence", "list"], ["silence", "expire", "abc"]):
        done = cli(*command, env=shared_state_env, tmp_path=tmp_path)
        lines = done.stderr.strip().splitlines()
        assert lines[:2] == [f"laggard: {topic}@1: not a silence, skipped: not valid JSON (EOF while parsing a value "
                             "at line 1 column 8)", f"laggard: {topic}@2: not a silence, skipped: id: Field required "
                             "(and 6 more)"], done.stderr
        assert "Traceback" not in done.stderr
    assert added.stdout.split()[1] in cli("silence", "list", env=shared_state_env, tmp_path=tmp_path).stdout


def test_alerts_list_reads_the_published_alerts_and_says_when_they_are_stale(
        shared_state_env: dict[str, str], stack: Settings, tmp_path: Path) -> None:
    topic = shared_state_env["LAGGARD_TOPIC_ALERTS"]
    nothing = cli("alerts", "list", env=shared_state_env, tmp_path=tmp_path)
    assert nothing.returncode == 1 and f"no alerts published on {topic} yet" in nothing.stderr
    engine = AlertEngine(load_rules(DEFAULT_RULES))
    xid = {"kind": "xid", "cluster": "c1", "job": "j", "node": "n7", "gpu": 2, "evidence": {"xid": 79}}
    now = time.time()
    engine.observe_finding(xid, now)
    engine.advance(now)
    produce(stack, topic, [(ALERTS_KEY, board_record(engine.active_alerts(), now, "host-a:42"))])
    result = cli("alerts", "list", "--json", env=shared_state_env, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    (alert,) = json.loads(result.stdout)
    assert alert["status"] == "firing" and alert["labels"]["node"] == "n7" and alert["stale"] is False
    assert alert["annotations"]["summary"] == "XID 79 on n7 GPU 2"
    assert "GpuXidError" in cli("alerts", "list", env=shared_state_env, tmp_path=tmp_path).stdout

    # The worker stopped publishing a minute ago: shown as stale, exit 1, and who wrote them when.
    produce(stack, topic, [(ALERTS_KEY, board_record(engine.active_alerts(), now - 60, "host-a:42"))])
    stale = cli("alerts", "list", env=shared_state_env, tmp_path=tmp_path)
    assert stale.returncode == 1 and "firing (stale)" in stale.stdout
    assert re.search(r"published 1m( \d+s)? ago", stale.stderr), stale.stderr
    assert "by host-a:42" in stale.stderr and "is a worker running?" in stale.stderr
    assert json.loads(cli("alerts", "list", "--json", env=shared_state_env, tmp_path=tmp_path).stdout)[0]["stale"]

    produce(stack, topic, [(ALERTS_KEY, b'{"alerts": [')])
    corrupt = cli("alerts", "list", env=shared_state_env, tmp_path=tmp_path)
    one_line_failure(corrupt, f"{topic}@2: not an alert board: not valid JSON", max_lines=1)


def test_reads_the_agents_finding_and_window_result_shapes() -> None:
    finding = Finding(kind="straggler", state="firing", cluster="c1", job="j", rank=3, node="n3", gpu=1, model="H200",
                      window_start=0.0, window_end=10.0, evidence={"score": 0.6}, cost={"gpu_s": 10.0}, summary="slow")
    parsed = FindingIn.model_validate(finding)
    assert parsed.fingerprint == finding.fingerprint and parsed.scope == "gpu"
    assert parsed.labels() == {"kind": "straggler", "scope": "gpu", "cluster": "c1", "job": "j", "rank": "3",
                               "node": "n3", "gpu": "1", "model": "H200"}
    # WindowResult: nested labels with None values, metrics as top-level numbers.
    window = WindowIn.model_validate({"scope": "cluster", "key": "c1", "labels": {"cluster": "c1", "node": None},
                                      "window_start": 0.0, "effective_util": 0.12, "util_mean": 55.0,
                                      "throttle_share": {"power_cap": 0.1}})
    assert window.labels == {"cluster": "c1"}
    assert window.metrics == {"effective_util": 0.12, "util_mean": 55.0}
    engine = AlertEngine(load_rules(DEFAULT_RULES))
    (obs,) = engine.observe_window(window, 0.0)
    assert obs.rule == "ClusterEffectiveUtilizationLow" and obs.active
