"""Silences (store and CLI), `alerts list`, and reading the agents' own Finding/WindowResult."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from laggard.results import Finding
from laggard.rules.alert_lifecycle import AlertEngine
from laggard.rules.cli import alerts_app, silence_app
from laggard.rules.evaluate import FindingIn, WindowIn
from laggard.rules.loader import DEFAULT_RULES, load_rules
from laggard.rules.model import Matcher
from laggard.rules.silences import SilenceStore
from laggard.settings import ALERTS_STATE_FILE, get_settings


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("LAGGARD_STATE_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_store_add_list_expire(tmp_path: Path) -> None:
    store = SilenceStore(tmp_path / "silences.json")
    later = store.add([Matcher.model_validate("job=~train-.*")], starts_at=500, ends_at=900, comment="later", created_by="ops", now=100)
    now_ = store.add([Matcher.model_validate("node=n1")], starts_at=100, ends_at=300, comment="reboot", created_by="ops", now=100)
    assert [s.id for s in store.list(now=200)] == [later.id, now_.id]
    assert later.state(200) == "pending" and now_.state(200) == "active"
    assert now_.mutes({"node": "n1", "job": "x"}, 200) and not now_.mutes({"node": "n2"}, 200)
    assert later.mutes({"job": "train-7"}, 600) and not later.mutes({"job": "eval-7"}, 600)
    expired = store.expire(now_.id, now=250)
    assert expired.ends_at == 250 and expired.state(250) == "expired"
    assert [s.id for s in SilenceStore(tmp_path / "silences.json").list(now=260)] == [later.id]
    assert len(store.list(now=260, include_expired=True)) == 2
    with pytest.raises(KeyError):
        store.expire("nope", now=260)


def test_matchers_parse_and_reject_bad_input() -> None:
    assert str(Matcher.model_validate("job!~'eval-.*'")) == "job!~eval-.*"
    assert Matcher.model_validate("gpu!=3").matches({"gpu": "4"})
    assert Matcher.model_validate("missing=").matches({})
    with pytest.raises(ValidationError, match="bad matcher"):
        Matcher.model_validate("no operator")
    with pytest.raises(ValidationError, match="bad regex"):
        Matcher.model_validate("job=~(")


def test_silence_cli_add_list_expire(state_dir: Path) -> None:
    runner = CliRunner()
    added = runner.invoke(silence_app, ["add", "--match", "node=n1", "-m", "job=~train-.*", "--for", "30m",
                                        "--comment", "firmware update", "--author", "ana"])
    assert added.exit_code == 0, added.output
    stored = json.loads((state_dir / "silences.json").read_text())
    assert len(stored) == 1 and stored[0]["created_by"] == "ana"
    assert stored[0]["ends_at"] - stored[0]["starts_at"] == pytest.approx(1800)
    silence_id = stored[0]["id"]
    listed = runner.invoke(silence_app, ["list"])
    assert silence_id in listed.output and "firmware" in listed.output
    expired = runner.invoke(silence_app, ["expire", silence_id])
    assert expired.exit_code == 0 and "expired" in expired.output
    assert silence_id not in runner.invoke(silence_app, ["list"]).output
    assert silence_id in runner.invoke(silence_app, ["list", "--all"]).output
    assert runner.invoke(silence_app, ["expire", "nope"]).exit_code == 1
    bad = runner.invoke(silence_app, ["add", "-m", "node", "--comment", "x"])
    assert bad.exit_code != 0 and "bad matcher" in bad.output


def test_alerts_list_reads_the_worker_state_file(state_dir: Path) -> None:
    engine = AlertEngine(load_rules(DEFAULT_RULES))
    xid = {"kind": "xid", "cluster": "c1", "job": "j", "node": "n7", "gpu": 2, "evidence": {"xid": 79}}
    engine.observe_finding(xid, 100.0)
    engine.advance(100.0)
    (state_dir / ALERTS_STATE_FILE).write_text(json.dumps(engine.snapshot()))
    result = CliRunner().invoke(alerts_app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    (alert,) = json.loads(result.output)
    assert alert["status"] == "firing" and alert["labels"]["node"] == "n7"
    assert alert["annotations"]["summary"] == "XID 79 on n7 GPU 2"
    table = CliRunner().invoke(alerts_app, ["list"])
    assert "GpuXidError" in table.output
    (state_dir / ALERTS_STATE_FILE).unlink()
    assert CliRunner().invoke(alerts_app, ["list"]).exit_code == 1


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
