"""Rule templates are bounded in what they build, output and take: issue #18's
`{{ ('a'*(10**9))|length }}` passed `laggard rules check` using 1 GB. Now it, and the other ways
to grow a value (`**`, `~`, `+`, `%`, str.format, join, replace, padding methods), are refused
before the value is built, `rules check` names the file, line and field, and at run time the
annotation falls back to the raw template with the reason."""

from __future__ import annotations

import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from laggard.rules.cli import rules_app
from laggard.rules.loader import check_file
from laggard.rules.templating import MAX_OUTPUT_CHARS, TemplateProblem, check_template, render

ISSUE = "{{ ('a'*(10**9))|length }}"

CONTEXT: dict[str, Any] = {
    "labels": {"job": "train-7", "rank": "17", "node": "a12"}, "rule": {"name": "Straggler", "severity": "critical"},
    "finding": {"summary": "rank 17 paces its peers"}, "evidence": {"rank_util_pct": 63.25, "ranks": [1, 2, 3]},
    "cost": {"peer_wait_share": 0.335}, "value": 0.31, "threshold": 0.4, "metric": "effective_util",
    "external_url": "http://dash.example/d/laggard",
}

RULES = """\
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
    annotations:
      summary: "rank {{ labels.rank }} is slow"
      description: "%s"
"""


def problem(source: str) -> str:
    with pytest.raises(TemplateProblem) as refused:
        check_template(source, [CONTEXT])
    return str(refused.value)


def test_the_issue_template_is_refused_without_allocating_the_gigabyte() -> None:
    tracemalloc.start()
    try:
        message = problem(ISSUE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message == "template over its limits: '*' would build more than 100,000 characters or items"
    assert peak < 20 * 2**20, f"checking the template allocated {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(("source", "expected"), [
    pytest.param("{{ 2**10000 }}", "'**' would build an integer of more than 4,096 bits", id="power"),
    pytest.param("{{ (2**4000) * (2**4000) }}", "'*' would build an integer", id="int-product"),
    pytest.param("{{ [labels] * 10**6 }}", "'*' would build more than", id="list-repetition"),
    pytest.param("{% set a = 'a' * 60000 %}{{ (a + a)|length }}", "'+' would build more than", id="plus"),
    pytest.param("{% set a = 'a' * 60000 %}{% set b = a ~ a %}{{ b|length }}", "'~' would build more than",
                 id="concat-doubling"),
    pytest.param("{{ '%1000000000s' % 'a' }}", "'%' would build more than", id="percent-width"),
    pytest.param("{{ '%*s' % (10**9, 'a') }}", "'%' would build more than", id="percent-star-width"),
    pytest.param("{{ '%1000000000s'|format('a') }}", "format would build more than", id="format-filter"),
    pytest.param("{{ '{:>1000000000}'.format('a') }}", "str.format would build more than", id="str-format-width"),
    pytest.param("{{ ('{0}' * 20000).format('abcdefghij') }}", "str.format would build more than", id="str-format-fields"),
    pytest.param("{{ ('a' * 1000)|replace('', 'b' * 1000) }}", "replace would build more than", id="replace"),
    pytest.param("{{ ['a' * 1000, 'b']|join('x' * 100000) }}", "join would build more than", id="join-sep"),
    pytest.param("{{ ('ab' * 20000)|list|join('-' * 10) }}", "join would build more than", id="join-items"),
    pytest.param("{{ [('a' * 60000), ('b' * 60000)]|string }}", "the string filter's argument would build", id="string"),
    pytest.param("{{ [[1] * 9, [2] * 9]|sum(start=[]) }}", "sum adds numbers only", id="sum-lists"),
    pytest.param("{{ 'x'.center(10**9) }}", "sandbox violation: access to attribute 'center'", id="center-method"),
    pytest.param("{{ (1).to_bytes(10**9, 'big') }}", "sandbox violation: access to attribute 'to_bytes'", id="to-bytes"),
    pytest.param("{{ 'x'|center(10**9) }}", "template syntax error: No filter named 'center'", id="center-filter"),
    pytest.param("{{ 'x y'|wordwrap(1, wrapstring='-' * 99999) }}", "No filter named 'wordwrap'", id="wordwrap"),
    pytest.param("{% for c in 'x' * 50000 %}{{ 'yy' * 50000 }}{% endfor %}",
                 f"the output would be longer than {MAX_OUTPUT_CHARS:,} characters", id="output"),
    pytest.param("{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}{% endfor %}{% endfor %}",
                 "the template ran longer than 1 s", id="time"),
    pytest.param("{% macro m() %}{{ 'x' * 99999 }}{% endmacro %}{{ m() }}",
                 "template syntax error: 'macro' is not allowed", id="macro"),
    pytest.param("{% filter upper %}x{% endfilter %}", "'filter' is not allowed", id="filter-block"),
    pytest.param("{% set s %}x{% endset %}{{ s }}", "'set ... endset' is not allowed", id="block-set"),
])
def test_templates_that_grow_without_bound_are_refused(source: str, expected: str) -> None:
    assert expected in problem(source)


@pytest.mark.parametrize(("source", "expected"), [
    ("rank {{ labels.rank }} of {{ labels.job }}: {{ evidence.rank_util_pct|round(1) }}%", "rank 17 of train-7: 63.2%"),
    ("{{ value|pct }} < {{ threshold|pct }} ({{ '%.2f'|format(value) }})", "31.0% < 40.0% (0.31)"),
    ("{{ evidence.ranks|join(', ') }} / {{ evidence.ranks|map('string')|join }}", "1, 2, 3 / 123"),
    ("{{ '{} on {}'.format(labels.job, labels.node) }} {{ labels.job|replace('-', ' ')|upper }}", "train-7 on a12 TRAIN 7"),
    ("{% for k, v in labels|dictsort %}{{ k }}={{ v }}{{ ',' if not loop.last }}{% endfor %}",
     "job=train-7,node=a12,rank=17"),
    ("{{ '-' * 10 }}{{ 2**64 }}{{ [1, 2] + [3] }}{{ 'x' ~ labels.rank }}", "----------18446744073709551616[1, 2, 3]x17"),
    ("{{ evidence.ranks|sum }} {{ cost.peer_wait_share * 100 }}", "6 33.5"),
])
def test_ordinary_templates_still_render(source: str, expected: str) -> None:
    check_template(source, [CONTEXT])
    assert render(source, CONTEXT, "Straggler", "summary") == expected


def test_rules_check_names_the_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES % ISSUE)
    config, errors = check_file(path)
    assert config is None
    assert [str(e) for e in errors] == [
        f"{path}:13: rules[0].annotations.description: template over its limits: "
        "'*' would build more than 100,000 characters or items"
    ]
    result = CliRunner().invoke(rules_app, ["check", str(path)])
    assert result.exit_code == 1
    assert f"{path}:13: rules[0].annotations.description: template over its limits" in result.stderr


def test_a_render_over_the_limits_at_run_time_gives_the_raw_template_and_is_counted() -> None:
    failures = Counter[str]()
    assert render(ISSUE, CONTEXT, "Straggler", "description", failures) == f"{ISSUE} [template error: TemplateLimit]"
    assert failures == {"Straggler": 1}
