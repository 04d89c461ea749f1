"""`laggard rules check`: every error names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from laggard.agents.detectors import finding_kinds
from laggard.rules.cli import rules_app
from laggard.rules.loader import DEFAULT_RULES, RulesFileInvalid, check_file, load_rules
from laggard.rules.model import parse_duration

GOOD = """\
receivers:
  - name: chat
    kind: slack
    url_env: CHAT_URL
route:
  receiver: chat
rules:
  - name: Straggler
    finding:
      kind: straggler
    for: 2m
    annotations:
      summary: "rank {{ labels.rank }} is slow"
"""


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def only_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    config, errors = check_file(path)
    assert config is None
    assert len(errors) == 1, [str(e) for e in errors]
    return str(errors[0])


def test_good_file_passes(tmp_path: Path) -> None:
    config, errors = check_file(write(tmp_path, GOOD))
    assert errors == [] and config is not None
    assert config.rules[0].for_ == 120.0


def test_default_rules_pass_and_cover_every_finding_kind() -> None:
    config = load_rules(DEFAULT_RULES)
    kinds = {rule.finding.kind for rule in config.rules if rule.finding}
    assert kinds == set(finding_kinds())
    assert any(r.threshold and r.threshold.scope == "cluster" and r.threshold.metric == "effective_util" for r in config.rules)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = GOOD.replace("    for: 2m\n", "    for: [2m\n")
    message = only_error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'rules.yaml'}:")
    assert "YAML syntax error" in message
    line = int(message.split(":")[1])
    assert 11 <= line <= 13


SUMMARY = '      summary: "rank {{ labels.rank }} is slow"\n'
AFTER_FOR = "    for: 2m\n"


@pytest.mark.parametrize(
    "old,new,expected",
    [
        pytest.param(AFTER_FOR, AFTER_FOR + "    severty: critical\n",
                     ":12: rules[0].severty: unknown field (not part of the schema)", id="unknown-field"),
        pytest.param("    url_env: CHAT_URL\n", "    url_env: CHAT_URL\n    url: https://hooks.slack.com/services/T/B/X\n",
                     ":5: receivers[0].url: unknown field (inline webhook URLs are not allowed", id="inline-url"),
        pytest.param(AFTER_FOR, AFTER_FOR + "    labels: [a, b]\n",
                     ":12: rules[0].labels: Input should be a valid dictionary", id="wrong-type"),
        pytest.param("for: 2m", "for: 2 minutes", ":11: rules[0].for: bad duration '2 minutes'", id="bad-duration"),
        pytest.param("  receiver: chat\n", "  receiver: pager\n",
                     ":6: route.receiver: unknown receiver 'pager'; defined: chat", id="unknown-receiver"),
        pytest.param(AFTER_FOR, AFTER_FOR + "    receivers: [chat, pager]\n",
                     ":12: rules[0].receivers[1]: unknown receiver 'pager'", id="unknown-receiver-in-rule"),
        pytest.param("rank {{ labels.rank }} is slow", "{{ ''.__class__ }}",
                     ":13: rules[0].annotations.summary: sandbox violation", id="sandbox-attr"),
        pytest.param("rank {{ labels.rank }} is slow", "{{ labels.__class__.__mro__ }}",
                     ":13: rules[0].annotations.summary: sandbox violation", id="sandbox-mro"),
        pytest.param("rank {{ labels.rank }} is slow", "{{ labels['__class__'] }}",
                     ":13: rules[0].annotations.summary: sandbox violation", id="sandbox-item"),
        pytest.param("rank {{ labels.rank }} is slow", "{{ ''|attr('__class__') }}",
                     ":13: rules[0].annotations.summary: sandbox violation", id="sandbox-attr-filter"),
        pytest.param(SUMMARY, "      summary: x\n      description: |\n        fine\n        {{ labels.rank }\n",
                     ":15: rules[0].annotations.description: template syntax error", id="template-syntax"),
        pytest.param("labels.rank", "lables.rank",
                     ":13: rules[0].annotations.summary: unknown template variable(s) lables", id="template-unknown-name"),
        pytest.param(AFTER_FOR, "    threshold: {metric: m, scope: job, op: '<', threshold: 1}\n",
                     ":8: rules[0]: a rule needs exactly one of 'finding' or 'threshold'", id="two-conditions"),
        pytest.param("  receiver: chat\n", "  group_wait: 1s\n", ":5: route.receiver: required field is missing", id="missing"),
    ],
)
def test_error_names_file_line_and_field(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in GOOD
    message = only_error(tmp_path, GOOD.replace(old, new))
    assert message.startswith(str(tmp_path / "rules.yaml") + expected)


def test_load_rules_raises_with_all_errors(tmp_path: Path) -> None:
    text = GOOD.replace("for: 2m", "for: soon").replace("  receiver: chat\n", "  receiver: pager\n")
    with pytest.raises(RulesFileInvalid) as err:
        load_rules(write(tmp_path, text))
    assert [e.field for e in err.value.errors] == ["rules[0].for"]  # schema errors stop before cross-checks


def test_cli_check_exit_codes_and_output(tmp_path: Path) -> None:
    runner = CliRunner()
    good = write(tmp_path, GOOD, "good.yaml")
    bad = write(tmp_path, GOOD.replace("kind: straggler", "kind: slowpoke"), "bad.yaml")
    ok = runner.invoke(rules_app, ["check", "--no-secrets", str(good), str(DEFAULT_RULES)])  # no webhook URLs here
    assert ok.exit_code == 0, ok.output
    assert "good.yaml: OK (1 rules, 1 receivers)" in ok.output
    failed = runner.invoke(rules_app, ["check", str(good), str(bad)])
    assert failed.exit_code == 1
    assert f"{bad}:10: rules[0].finding.kind:" in failed.output


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("2m", 120), ("1h30m", 5400), ("1d", 86400), ("250ms", 0.25), (45, 45)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "m", "-5s", "1h 30m", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize(("labels", "expected"), [
    ({"job": "notebook"}, "Job notebook holds GPUs it has not used"),
    ({"job": "train", "node": "a12", "gpu": 3, "rank": 5}, "GPU 3 on a12 is allocated to train but idle"),
])
def test_default_idle_summary_reads_well_for_a_whole_job_and_for_one_gpu(labels, expected) -> None:
    """An idle_allocated finding is job-level when the job never used its GPUs (no node or GPU)."""
    from laggard.rules.evaluate import FindingIn, _render_annotations, finding_context

    rule = next(r for r in load_rules(DEFAULT_RULES).rules if r.finding and r.finding.kind == "idle_allocated")
    finding = FindingIn(kind="idle_allocated", cluster="c", summary="held, unused", **labels)
    annotations = _render_annotations(rule, finding_context(rule, finding, "http://dashboard"))
    assert annotations["summary"] == expected


def test_demo_rules_are_the_default_rules_with_short_timings(tmp_path: Path) -> None:
    from laggard.commands.demo import demo_rules

    config, errors = check_file(demo_rules(tmp_path / "demo-rules.yaml"))
    default = load_rules(DEFAULT_RULES)
    assert errors == [] and config is not None
    assert [r.name for r in config.rules] == [r.name for r in default.rules]
    assert all(r.for_ == 0 for r in config.rules) and config.route.group_wait == 2.0
    assert config.route.routes == default.route.routes and config.inhibit_rules == default.inhibit_rules


def _alias_bomb(depth: int, fan_out: int = 6) -> str:
    """`depth` levels, each a list of `fan_out` aliases of the level below: fan_out**depth leaves."""
    lines = ["a0: &a0 [x]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan_out) + "]" for i in range(1, depth + 1)]
    return "\n".join(lines) + "\n" + GOOD


@pytest.mark.parametrize(
    "content,expected",
    [
        pytest.param(("external-url: http://x\n" + GOOD).encode(),
                     [":1: external-url: unknown field (not part of the schema; field names use underscores: "
                      "'external_url'?)"], id="dashed-top-level-key"),
        pytest.param(GOOD.replace(AFTER_FOR, AFTER_FOR + "    keep-firing-for: 5m\n").encode(),
                     [":12: rules[0].keep-firing-for: unknown field"], id="dashed-key-in-rule"),
        pytest.param(GOOD.replace("is slow", "is slow, caf\u00e9").encode("latin-1"),
                     [":13: <file>: not UTF-8 text (byte 0xe9); save the file as UTF-8"], id="latin-1"),
        pytest.param(("x: " + "[" * 3000 + "]" * 3000 + "\n").encode(),
                     [":1: <file>: YAML syntax error: nested deeper than"], id="deep-nesting"),
        pytest.param(GOOD.replace("  receiver: chat\n", "  receiver: chat\n  group_wait: .nan\n").encode(),
                     [":7: route.group_wait: bad duration nan: must be a finite number of seconds"], id="nan-duration"),
        pytest.param(GOOD.replace("for: 2m", "for: .inf").encode(),
                     [":11: rules[0].for: bad duration inf: must be a finite number of seconds"], id="inf-duration"),
        pytest.param(GOOD.replace("is slow", "is \a slow").encode(),
                     [":13: <file>: unacceptable character #x0007"], id="control-character"),
        pytest.param(_alias_bomb(7).encode(),
                     [f":{i + 1}: a{i}: unknown field" for i in range(8)], id="alias-bomb"),
    ],
)
def test_cli_reports_broken_files_as_one_line_per_error(tmp_path: Path, content: bytes, expected: list[str]) -> None:
    """Every broken file ends as FILE:LINE: FIELD: MESSAGE lines and exit 1, never a traceback."""
    path = tmp_path / "rules.yaml"
    path.write_bytes(content)
    result = CliRunner().invoke(rules_app, ["check", str(path)])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exception
    lines = result.stderr.splitlines()
    assert lines[-1] == f"{len(lines) - 1} error(s)"
    assert all(line.startswith(f"{path}:") for line in lines[:-1]), lines
    for want in expected:
        assert any(line.startswith(f"{path}{want}") for line in lines), (want, lines)
    with pytest.raises(RulesFileInvalid):  # the worker's reload counts this as a refused file
        load_rules(path)


def test_aliases_are_indexed_once_not_once_per_use() -> None:
    """An alias bomb of 6**7 leaves is indexed in as many entries as the file has nodes."""
    from laggard.rules.loader import _LocatedDoc

    doc = _LocatedDoc("bomb.yaml", _alias_bomb(7))
    assert len(doc.lines) < 200
    assert doc.lines[("a7",)] == 8 and doc.lines[("rules", 0, "for")] == 11 + 8


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_durations_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="must be a finite number of seconds"):
        parse_duration(value)


@pytest.mark.parametrize("condition,expected", [
    ("{metric: effective_util, scope: job, op: '<', threshold: 0.5}",
     ":9: rules[0].threshold.scope: 'job': the worker evaluates threshold rules on scope 'cluster'"),
    ("{metric: eff_util_mean, scope: cluster, op: '<', threshold: 0.5}",
     ":9: rules[0].threshold.metric: 'eff_util_mean' is not a fleet KPI metric; one of: gpus,"),
])
def test_a_threshold_rule_the_worker_would_never_evaluate_is_refused(tmp_path: Path, condition: str,
                                                                     expected: str) -> None:
    rule = f"    threshold: {condition}\n"
    assert expected in only_error(tmp_path, GOOD.replace("    finding:\n      kind: straggler\n", rule))


def test_threshold_must_be_a_finite_number(tmp_path: Path) -> None:
    rule = "    threshold: {metric: m, scope: job, op: '<', threshold: .nan}\n"
    message = only_error(tmp_path, GOOD.replace("    finding:\n      kind: straggler\n", rule))
    assert ":9: rules[0].threshold.threshold: Input should be a finite number" in message


def test_url_file_that_is_not_utf8_is_a_receiver_problem_without_its_content(tmp_path: Path) -> None:
    from laggard.rules.model import ReceiverConfig

    secret = tmp_path / "hook_url"
    secret.write_bytes("https://hooks.example/h\u00f6oks/T0KEN".encode("latin-1"))
    receiver = ReceiverConfig(name="chat", kind="slack", url_file=secret)
    with pytest.raises(LookupError) as err:
        receiver.resolve_url()
    assert str(err.value) == f"receiver 'chat': cannot read url_file {secret}: not UTF-8 text"
