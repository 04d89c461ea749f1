"""The rules file as pydantic models: rules, receivers, the routing tree and inhibit rules.

Everything here is plain data validated at the edge; unknown fields are errors so a typo in a
rule file is reported instead of silently ignored. Webhook URLs are never inline: a receiver
names an environment variable or a file that holds the URL.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator

from laggard.agents.detectors import finding_kinds  # the detectors' registry: rules cannot drift from it
from laggard.results import Scope

Comparator = Literal[">", ">=", "<", "<=", "==", "!="]
Severity = Literal["info", "warning", "critical"]
ReceiverKind = Literal["slack", "discord", "teams", "mattermost", "webhook", "alertmanager"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: object) -> float:
    """'30s', '2m', '1h30m', '1d' or a plain number of seconds -> seconds (float)."""
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r}: use e.g. 30s, 2m, 1h30m")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        parts = _DURATION_PART.findall(text)
        if "".join(n + u for n, u in parts) != text:
            raise ValueError(f"bad duration {value!r}: use e.g. 30s, 2m, 1h30m")
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise ValueError(f"bad duration {value!r}: use e.g. 30s, 2m, 1h30m")
    if not math.isfinite(seconds):  # YAML's .nan/.inf: a nan wait would never end, so nothing is ever sent
        raise ValueError(f"bad duration {value!r}: must be a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"bad duration {value!r}: must not be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*")


class Matcher(_Strict):
    """A label matcher like Alertmanager's: `name=value`, `name!=value`, `name=~regex`, `name!~regex`.
    Regexes are anchored (full match). A missing label matches as the empty string."""

    name: str
    op: Literal["=", "!=", "=~", "!~"] = "="
    value: str

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: object) -> object:
        if isinstance(data, str):
            return parse_matcher_text(data)
        return data

    @model_validator(mode="after")
    def _regex_compiles(self) -> Matcher:
        if self.op in ("=~", "!~"):
            try:
                re.compile(self.value)
            except re.error as err:
                raise ValueError(f"bad regex {self.value!r}: {err}") from None
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        found = re.fullmatch(self.value, actual) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value}"


def parse_matcher_text(text: str) -> dict[str, str]:
    """'job=~train-.*' -> {'name': 'job', 'op': '=~', 'value': 'train-.*'}; surrounding quotes dropped."""
    found = _MATCHER.fullmatch(text)
    if not found:
        raise ValueError(f"bad matcher {text!r}: use name=value, name!=value, name=~regex or name!~regex")
    name, op, value = found.groups()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return {"name": name, "op": op, "value": value}


def matches_all(matchers: list[Matcher], labels: dict[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


class FindingCondition(_Strict):
    """Fire on findings of one kind from the detectors, optionally narrowed by label matchers."""

    kind: str
    match: list[Matcher] = Field(default_factory=list)

    @field_validator("kind")
    @classmethod
    def _a_detectors_kind(cls, kind: str) -> str:
        kinds = finding_kinds()
        if kind not in kinds:
            raise ValueError(f"unknown finding kind {kind!r}; the detectors' kinds are {', '.join(sorted(kinds))}")
        return kind


class ThresholdCondition(_Strict):
    """Fire when a window metric at one scope crosses a threshold, e.g. cluster effective_util < 0.5."""

    metric: str = Field(min_length=1)
    scope: Scope
    op: Comparator
    threshold: float = Field(allow_inf_nan=False)  # nothing compares true against nan
    match: list[Matcher] = Field(default_factory=list)


class Annotations(_Strict):
    summary: str = Field(min_length=1)
    description: str = ""
    runbook_url: str = ""


class Rule(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    finding: FindingCondition | None = None
    threshold: ThresholdCondition | None = None
    for_: Duration = Field(default=0.0, alias="for")
    keep_firing_for: Duration = 0.0
    severity: Severity = "warning"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: Annotations
    # Empty: the routing tree picks receivers. Set: these receivers, with the root route's timings.
    receivers: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_condition(self) -> Rule:
        if (self.finding is None) == (self.threshold is None):
            raise ValueError("a rule needs exactly one of 'finding' or 'threshold'")
        return self

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        for name in labels:
            if not _LABEL_NAME.fullmatch(name):
                raise ValueError(f"bad label name {name!r}")
        return labels


class ReceiverConfig(_Strict):
    name: str = Field(min_length=1)
    kind: ReceiverKind
    url_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    url_file: Path | None = None
    send_resolved: bool = True
    # Delivery policy: chat services throttle (Slack about 1 message/s per webhook).
    rate_per_s: float = Field(default=1.0, gt=0)
    burst: int = Field(default=1, ge=1)
    timeout: Duration = 10.0
    max_attempts: int = Field(default=5, ge=1, le=20)
    backoff_initial: Duration = 1.0
    backoff_max: Duration = 30.0
    max_retry_after: Duration = 120.0

    @model_validator(mode="after")
    def _one_url_source(self) -> ReceiverConfig:
        if (self.url_env is None) == (self.url_file is None):
            raise ValueError("a receiver needs exactly one of 'url_env' or 'url_file' (never an inline url)")
        return self

    def resolve_url(self, environ: dict[str, str] | None = None) -> SecretStr:
        """Read the webhook URL. Errors name the variable or file, never the URL."""
        env = os.environ if environ is None else environ
        if self.url_env is not None:
            url = env.get(self.url_env, "").strip()
            if not url:
                raise LookupError(f"receiver {self.name!r}: environment variable {self.url_env} is not set")
        else:
            assert self.url_file is not None
            try:
                url = self.url_file.read_text(encoding="utf-8").strip()
            except OSError as err:
                raise LookupError(f"receiver {self.name!r}: cannot read url_file {self.url_file}: {err.strerror}") from None
            except UnicodeDecodeError:  # its text is the secret: never quote it, not even a byte
                raise LookupError(f"receiver {self.name!r}: cannot read url_file {self.url_file}: not UTF-8 text") from None
            if not url:
                raise LookupError(f"receiver {self.name!r}: url_file {self.url_file} is empty")
        if not url.startswith(("http://", "https://")):
            raise LookupError(f"receiver {self.name!r}: the configured URL is not http(s)")
        return SecretStr(url)


class Route(_Strict):
    """A node of the routing tree. Children inherit grouping and timings unless they set them."""

    receiver: str | None = None
    match: list[Matcher] = Field(default_factory=list)
    group_by: list[str] | None = None
    group_wait: Duration | None = None
    group_interval: Duration | None = None
    repeat_interval: Duration | None = None
    continue_: bool = Field(default=False, alias="continue")
    routes: list[Route] = Field(default_factory=list)


class RootRoute(Route):
    receiver: str  # type: ignore[assignment]
    group_by: list[str] = Field(default_factory=lambda: ["alertname", "cluster", "job"])  # type: ignore[assignment]
    group_wait: Duration = 30.0  # type: ignore[assignment]
    group_interval: Duration = 300.0  # type: ignore[assignment]
    repeat_interval: Duration = 4 * 3600.0  # type: ignore[assignment]


class InhibitRule(_Strict):
    """While an alert matching `source_match` fires, alerts matching `target_match` with equal
    values for the `equal` labels are muted (e.g. a node alert mutes that node's GPU alerts)."""

    source_match: list[Matcher] = Field(min_length=1)
    target_match: list[Matcher] = Field(min_length=1)
    equal: list[str] = Field(default_factory=list)


class RulesConfig(_Strict):
    # The Grafana dashboard (uid laggard-fleet, deploy/grafana/dashboards/laggard.json).
    external_url: str = "http://127.0.0.1:3000/d/laggard-fleet"
    # A condition not re-observed for this long counts as gone (detectors repeat while it holds).
    stale_after: Duration = 300.0
    receivers: list[ReceiverConfig] = Field(min_length=1)
    route: RootRoute
    inhibit_rules: list[InhibitRule] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)

    def receiver(self, name: str) -> ReceiverConfig:
        for receiver in self.receivers:
            if receiver.name == name:
                return receiver
        raise KeyError(name)
