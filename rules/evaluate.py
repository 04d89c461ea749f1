"""Match detector findings and window metrics against rules: pure functions, no state, no clock.

The inputs are duck-typed: a finding or window result may be a pydantic model, a dataclass or a
dict, as long as it carries the fields below (the agents' `Finding` and `WindowResult`). Each
match becomes an `Observation` ("this rule's condition is true/false for these labels"), which
the lifecycle engine turns into pending/firing/resolved alerts.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from laggard.agents.detectors import finding_kinds
from laggard.results import Labels
from laggard.rules.model import Comparator, Rule, RulesConfig, Scope, matches_all
from laggard.rules.templating import render

_COMPARE: dict[Comparator, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
_IDENTITY = ("cluster", "job", "rank", "node", "gpu", "model")


def _as_dict(obj: object) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return dict(vars(obj))


class FindingIn(Labels):
    """What the rules read from a detector finding (laggard.results.Finding or a dict like it):
    the agents' identity labels plus the finding's own fields; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: str
    state: Literal["firing", "resolved"] = "firing"
    window_start: float | None = None
    window_end: float | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)
    cost: dict[str, Any] = Field(default_factory=dict)
    summary: str = ""
    fingerprint: str = ""

    @model_validator(mode="before")
    @classmethod
    def _duck(cls, data: object) -> dict[str, Any]:
        raw = _as_dict(data)
        if "fingerprint" not in raw and isinstance(getattr(data, "fingerprint", None), str):
            raw = {**raw, "fingerprint": data.fingerprint}  # a property on agents' Finding
        return raw

    @property
    def scope(self) -> Scope:
        """The narrowest thing the finding names: a GPU, else a node, a job, a model, the cluster."""
        if self.gpu is not None and self.node is not None:
            return "gpu"
        if self.node is not None:
            return "node"
        if self.job is not None:
            return "job"
        return "model" if self.model is not None else "cluster"

    def labels(self) -> dict[str, str]:
        found = {name: getattr(self, name) for name in _IDENTITY}
        labels = {name: str(value) for name, value in found.items() if value is not None}
        return {"kind": self.kind, "scope": self.scope, **labels}


class WindowIn(BaseModel):
    """What the rules read from a window result: scope, labels and numeric metrics. Numeric
    top-level fields (util_mean=0.4) are gathered into `metrics` too."""

    model_config = ConfigDict(extra="ignore")

    scope: Scope
    labels: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    window_start: float | None = None
    window_end: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _duck(cls, data: object) -> dict[str, Any]:
        raw = dict(_as_dict(data))
        metrics = dict(raw.get("metrics") or {})
        for name, value in raw.items():
            if name not in cls.model_fields and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.setdefault(name, float(value))
        raw["metrics"] = metrics
        return raw

    @field_validator("labels", mode="before")
    @classmethod
    def _stringify(cls, labels: dict[str, Any]) -> dict[str, str]:
        return {str(k): str(v) for k, v in (labels or {}).items() if v is not None}


class Observation(BaseModel):
    """One rule's condition, true or false, for one label set at the time of the input."""

    rule: str
    labels: dict[str, str]
    active: bool
    annotations: dict[str, str] = Field(default_factory=dict)
    value: float | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)
    cost: dict[str, Any] = Field(default_factory=dict)
    finding_fingerprint: str | None = None


def _alert_labels(rule: Rule, subject: dict[str, str]) -> dict[str, str]:
    return {**subject, "alertname": rule.name, "severity": rule.severity, **rule.labels}


def _render_annotations(rule: Rule, context: dict[str, Any], failures: Counter[str] | None = None) -> dict[str, str]:
    raw = rule.annotations.model_dump()
    return {name: render(text, context, rule.name, name, failures) for name, text in raw.items() if text}


def finding_context(rule: Rule, finding: FindingIn, external_url: str) -> dict[str, Any]:
    labels = _alert_labels(rule, finding.labels())
    return {
        "labels": labels,
        "rule": {"name": rule.name, "severity": rule.severity},
        "finding": finding.model_dump(mode="json"),
        "evidence": finding.evidence,
        "cost": finding.cost,
        "value": None,
        "threshold": None,
        "metric": None,
        "external_url": external_url,
    }


def window_context(rule: Rule, window: WindowIn, value: float, external_url: str) -> dict[str, Any]:
    assert rule.threshold is not None
    labels = _alert_labels(rule, {**window.labels, "scope": window.scope})
    return {
        "labels": labels,
        "rule": {"name": rule.name, "severity": rule.severity},
        "finding": None,
        "evidence": {rule.threshold.metric: value},
        "cost": {},
        "value": value,
        "threshold": rule.threshold.threshold,
        "metric": rule.threshold.metric,
        "external_url": external_url,
    }


def evaluate_finding(config: RulesConfig, finding: object, failures: Counter[str] | None = None) -> list[Observation]:
    """Observations for every finding rule that matches this finding (firing -> active); templates
    that fail to render are counted by rule in `failures`."""
    parsed = finding if isinstance(finding, FindingIn) else FindingIn.model_validate(finding)
    out = []
    for rule in config.rules:
        cond = rule.finding
        if cond is None or cond.kind != parsed.kind or not matches_all(cond.match, parsed.labels()):
            continue
        context = finding_context(rule, parsed, config.external_url)
        out.append(
            Observation(
                rule=rule.name,
                labels=context["labels"],
                active=parsed.state == "firing",
                annotations=_render_annotations(rule, context, failures),
                evidence=parsed.evidence,
                cost=parsed.cost,
                finding_fingerprint=parsed.fingerprint or None,
            )
        )
    return out


def evaluate_window(config: RulesConfig, window: object, failures: Counter[str] | None = None) -> list[Observation]:
    """Observations for every threshold rule on this window's scope and metric (see evaluate_finding)."""
    parsed = window if isinstance(window, WindowIn) else WindowIn.model_validate(window)
    out = []
    for rule in config.rules:
        cond = rule.threshold
        if cond is None or cond.scope != parsed.scope or cond.metric not in parsed.metrics:
            continue
        if not matches_all(cond.match, {**parsed.labels, "scope": parsed.scope}):
            continue
        value = parsed.metrics[cond.metric]
        context = window_context(rule, parsed, value, config.external_url)
        out.append(
            Observation(
                rule=rule.name,
                labels=context["labels"],
                active=_COMPARE[cond.op](value, cond.threshold),
                annotations=_render_annotations(rule, context, failures),
                value=value,
                evidence=context["evidence"],
            )
        )
    return out


# Sample inputs' time: `rules check` renders templates on each kind's sample shapes (the
# detectors' registry, agents/detectors.py), tests/test_rules_samples.py holds them to what the
# detectors really emit.
_T0 = 1_700_000_000.0


def sample_contexts(rule: Rule, external_url: str) -> list[dict[str, Any]]:
    """Realistic contexts for rendering a rule's templates at check time: one per shape of input
    the rule can see (a threshold rule sees one; a finding rule each shape its kind comes in)."""
    if rule.threshold is not None:
        scope_labels = {"gpu": {"node": "node-0", "gpu": "0"}, "node": {"node": "node-0"}, "job": {"job": "job-0"}}
        window = WindowIn(
            scope=rule.threshold.scope,
            labels={"cluster": "cluster-0", **scope_labels.get(rule.threshold.scope, {}), "model": "H100"},
            metrics={rule.threshold.metric: rule.threshold.threshold},
            window_start=_T0,
            window_end=_T0 + 10.0,
        )
        return [window_context(rule, window, rule.threshold.threshold, external_url)]
    assert rule.finding is not None
    kind = rule.finding.kind
    findings = (
        FindingIn(kind=kind, **labels, window_start=_T0, window_end=_T0 + 10.0, evidence=evidence, cost=cost,
                  summary=f"sample {kind} finding", fingerprint="0123456789abcdef")
        for labels, evidence, cost in finding_kinds()[kind].samples
    )
    return [finding_context(rule, finding, external_url) for finding in findings]
