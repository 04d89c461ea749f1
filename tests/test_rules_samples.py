"""Rule templates meet what the detectors really emit: `rules check` renders them against samples
with the detectors' own evidence and cost keys (checked here against findings from the real
detectors), missing values render empty, and a template that fails at send time is logged
(rule and field, never values) and counted."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from laggard.agents.detectors import FleetDetector, LowUtilizationBaseline, finding_kinds
from laggard.results import Finding
from laggard.rules.evaluate import FindingIn, evaluate_finding
from laggard.rules.loader import DEFAULT_RULES, check_text, load_rules
from laggard.rules.model import RulesConfig
from tests.test_detectors import job_samples, run, slowed, straggler_job


def _real_findings() -> list[Finding]:
    """Every kind, in every shape the detectors give it, from small jobs through the real windower."""

    def mixed(r: int, w: int) -> dict[str, object]:
        return {"util_gpu": 90.0 if r < 4 else 90.0 / 1.4}

    def idle_rank_then_stall(r: int, w: int) -> dict[str, object]:
        return {"util_gpu": 0.0, "power_w": 125.0} if r == 5 or 4 <= w < 8 else {"util_gpu": 80.0}

    straggling = job_samples(8, 5, straggler_job(culprit=5, onset=0, until=5, slowdown=1.6, healthy=70.0))
    runs = [
        run(straggling, FleetDetector()),
        run(straggling, LowUtilizationBaseline(50.0)),
        run(job_samples(8, 5, mixed, models=lambda r: "H100" if r < 4 else "H200"), FleetDetector()),
        run(job_samples(8, 12, idle_rank_then_stall), FleetDetector()),
        run(job_samples(4, 4, lambda r, w: {"util_gpu": 0.0}), FleetDetector()),
        run(job_samples(4, 6, lambda r, w: {"util_gpu": 80.0, "xid": 79 if (r, w) == (2, 1) else None}), FleetDetector()),
        run(job_samples(8, 7, lambda r, w: None if (r == 3 and w >= 2) else {"util_gpu": 80.0}), FleetDetector()),
        run(job_samples(16, 4, lambda r, w: {"util_gpu": 95.0}, job="ref", node="r")
            + job_samples(8, 4, slowed(after=0, clock=1400.0), job="solo", node="s"), FleetDetector()),
        run(job_samples(8, 6, slowed(after=3, clock=1400.0, flags=0)), FleetDetector()),
    ]
    return [finding for events in runs for _, finding in events]


@pytest.fixture(scope="module")
def real_findings() -> list[Finding]:
    return _real_findings()


def _shapes(pairs: list[tuple[dict, dict]]) -> set[tuple[frozenset[str], frozenset[str]]]:
    return {(frozenset(evidence), frozenset(cost)) for evidence, cost in pairs}


def test_samples_carry_the_evidence_and_cost_keys_the_detectors_emit(real_findings: list[Finding]) -> None:
    """If a detector gains, renames or drops a key, update its `samples` in agents/detectors.py."""
    assert {f.kind for f in real_findings} == set(finding_kinds())
    for kind, detector in finding_kinds().items():
        samples = detector.samples
        real = _shapes([(f.evidence, f.cost) for f in real_findings if f.kind == kind])
        assert _shapes([(evidence, cost) for _, evidence, cost in samples]) == real, kind
        sample_labels = {frozenset(labels) for labels, _, _ in samples}
        for f in real_findings:
            if f.kind == kind:
                assert frozenset(FindingIn.model_validate(f).labels()) - {"kind", "scope"} in sample_labels, (kind, f)


def test_default_rules_render_every_real_finding_without_template_errors(real_findings: list[Finding]) -> None:
    config, failures = load_rules(DEFAULT_RULES), Counter[str]()
    observations = [o for f in real_findings for o in evaluate_finding(config, f, failures)]
    assert {o.rule for o in observations} == {r.name for r in config.rules if r.finding}
    for o in observations:
        assert o.annotations["summary"].strip() and all("template error" not in t for t in o.annotations.values()), o
    assert not failures


RULE = """\
receivers: [{name: hook, kind: webhook, url_env: HOOK}]
route: {receiver: hook}
rules:
  - name: Strag
    finding: {kind: KIND}
    annotations:
      summary: "SUMMARY"
"""


def rules_with(summary: str, kind: str = "straggler") -> tuple[RulesConfig | None, list[str]]:
    config, errors = check_text(RULE.replace("KIND", kind).replace("SUMMARY", summary), "rules.yaml")
    return config, [str(e) for e in errors]


@pytest.mark.parametrize(("kind", "summary"), [
    ("straggler", "Rank {{ labels.rank }} at {{ evidence.rank_util_pct | round(1) }}% vs {{ evidence.peer_util_median_pct | round(1) }}%"),
    ("straggler", "{{ (cost.peer_wait_share * 100) | round }}% lost, {{ cost.energy_wh_wasted | round(1) }} Wh"),
    ("mixed_generation", "{{ evidence.fast_model }} waits for {{ evidence.slow_model }}: {{ cost.fast_rank_waste_share | pct }}"),
    ("xid", "XID {{ evidence.xid }} ({{ evidence.xid_samples }} samples)"),
    ("straggler", "{{ evidence.throttle_reasons | upper }}"),  # None on a rank that is not throttled
])
def test_templates_on_the_detectors_keys_pass_the_check(kind: str, summary: str) -> None:
    assert rules_with(summary, kind)[1] == []


@pytest.mark.parametrize(("kind", "summary", "error"), [
    ("straggler", "{{ evidence.util_mean * 100 }}", "UndefinedError"),  # no detector sends util_mean
    ("idle_allocated", "{{ '%.0f' | format(evidence.ranks) }} ranks", "UndefinedError"),  # only a job-level finding has it
    ("straggler", "{{ evidence.throttle_reasons.split(',') | first }}", "UndefinedError"),  # None when not throttled
])
def test_templates_that_would_fail_on_a_real_finding_fail_the_check(kind: str, summary: str, error: str) -> None:
    [message] = rules_with(summary, kind)[1]
    assert message.startswith("rules.yaml:7: rules[0].annotations.summary: template failed on a sample: " + error)


def test_missing_and_none_values_render_empty_through_number_filters() -> None:
    config, errors = rules_with("[{{ evidence.nope | pct }}|{{ evidence.gone | round(1) }}|{{ evidence.none | pct }}|"
                                "{{ evidence.none | round }}|{{ cost.nope | int }}|{{ value | abs }}]")
    assert errors == [] and config is not None
    failures = Counter[str]()
    finding = {"kind": "straggler", "cluster": "c", "evidence": {"none": None}}
    [observation] = evaluate_finding(config, finding, failures)
    assert observation.annotations["summary"] == "[|||||]"
    assert not failures


def test_sandbox_refusal_is_not_rendered_away_by_a_number_filter() -> None:
    [message] = rules_with("{{ ''|attr('__class__')|round }}")[1]
    assert "sandbox violation" in message


def test_a_template_failing_at_send_time_is_logged_by_rule_and_field_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, errors = rules_with("{{ evidence.rank_util_pct + 1 }}")  # fine on the detector's numbers
    assert errors == [] and config is not None
    caplog.set_level(logging.DEBUG, logger="laggard.rules.templating")
    failures = Counter[str]()
    secret = "s3cr3t-token-value"
    finding = {"kind": "straggler", "cluster": "c", "evidence": {"rank_util_pct": secret}}
    [observation] = evaluate_finding(config, finding, failures)
    assert observation.annotations["summary"].endswith("[template error: TypeError]")
    assert failures == {"Strag": 1}
    assert [r.getMessage() for r in caplog.records] == ["rule Strag: annotation summary failed to render: TypeError"]
    assert secret not in caplog.text


def test_test_notification_uses_a_real_findings_evidence(tmp_path: Path) -> None:
    from laggard.rules.cli import test_notification

    notification = test_notification(load_rules(DEFAULT_RULES), "chat", now=1_700_000_000.0)
    [alert] = notification.alerts
    assert "rank_util_pct" in alert.evidence and "peer_wait_share" in alert.cost
