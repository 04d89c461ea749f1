"""Match detector findings and window metrics against rules: pure functions, no state, no clock.

The inputs are duck-typed: a finding or window result may be a pydantic model, a dataclass or a
dict, as long as it carries the fields below (the agents' `Finding` and `WindowResult`). Each
match becomes an `Observation` ("this rule's condition is true/false for these labels"), which
the lifecycle engine turns into pending/firing/resolved alerts.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.findings import Labels
from rules.model import Comparator, Rule, RulesConfig, Scope, matches_all
from rules.templating import render

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
    """What the rules read from a detector finding (agents.findings.Finding or a dict like it):
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


def _render_annotations(rule: Rule, context: dict[str, Any]) -> dict[str, str]:
    raw = rule.annotations.model_dump()
    return {name: render(text, context) for name, text in raw.items() if text}


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


def evaluate_finding(config: RulesConfig, finding: object) -> list[Observation]:
    """Observations for every finding rule that matches this finding (firing -> active)."""
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
                annotations=_render_annotations(rule, context),
                evidence=parsed.evidence,
                cost=parsed.cost,
                finding_fingerprint=parsed.fingerprint or None,
            )
        )
    return out


def evaluate_window(config: RulesConfig, window: object) -> list[Observation]:
    """Observations for every threshold rule on this window's scope and metric."""
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
                annotations=_render_annotations(rule, context),
                value=value,
                evidence=context["evidence"],
            )
        )
    return out


def sample_context(rule: Rule, external_url: str) -> dict[str, Any]:
    """A realistic context for rendering a rule's templates once at check time."""
    if rule.threshold is not None:
        scope_labels = {"gpu": {"node": "node-0", "gpu": "0"}, "node": {"node": "node-0"}, "job": {"job": "job-0"}}
        window = WindowIn(
            scope=rule.threshold.scope,
            labels={"cluster": "cluster-0", **scope_labels.get(rule.threshold.scope, {}), "model": "H100"},
            metrics={rule.threshold.metric: rule.threshold.threshold},
            window_start=1_700_000_000.0,
            window_end=1_700_000_010.0,
        )
        return window_context(rule, window, rule.threshold.threshold, external_url)
    assert rule.finding is not None
    finding = FindingIn(
        kind=rule.finding.kind,
        cluster="cluster-0",
        job="job-0",
        rank=3,
        node="node-0",
        gpu=1,
        model="H100",
        window_start=1_700_000_000.0,
        window_end=1_700_000_010.0,
        evidence={"util_mean": 0.9, "peer_median": 0.6, "score": 0.65},
        cost={"gpu_hours_lost": 1.5, "energy_wh": 120.0},
        summary="sample finding",
        fingerprint="0123456789abcdef",
    )
    return finding_context(rule, finding, external_url)
