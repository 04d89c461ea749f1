"""Annotation templates: Jinja2 in an immutable sandbox.

Rule files are data from whoever edits them, so templates run sandboxed: attribute access on
internals (`''.__class__`, `x._private`) raises SecurityError, and nothing can mutate the
context. Missing values render empty (evidence keys vary by detector, some values are None), but
the rule checker rejects unknown top-level names and renders every template against a sample of
each shape of finding the rule can see, with the evidence and cost keys the detectors emit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache, wraps
from typing import Any

from jinja2 import Template, TemplateSyntaxError, Undefined, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

log = logging.getLogger(__name__)

# Names a template may use; evaluate.py builds exactly this context.
CONTEXT_NAMES = frozenset(
    {"labels", "rule", "finding", "evidence", "cost", "value", "threshold", "metric", "external_url"}
)


class TemplateProblem(ValueError):
    """A template that does not parse, uses unknown names or breaks the sandbox."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class _LenientUndefined(Undefined):
    """Missing values render empty, but a sandbox refusal is never swallowed."""

    __slots__ = ()

    def __str__(self) -> str:
        if self._undefined_exception is SecurityError:
            self._fail_with_undefined_error()
        return ""


def _blank_if_missing(number_filter: Callable[..., Any]) -> Callable[..., Any]:
    """A numeric filter that renders a missing value (an absent evidence key, a None) empty
    instead of failing: evidence varies by detector and by window."""

    @wraps(number_filter)
    def tolerant(value: object, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, Undefined) and value._undefined_exception is SecurityError:
            value._fail_with_undefined_error()  # a sandbox refusal is never rendered away
        if value is None or isinstance(value, Undefined):
            return ""
        return number_filter(value, *args, **kwargs)

    return tolerant


def _pct(value: object, digits: int = 1) -> str:
    """0.335 -> '33.5%' (ratios in 0-1)."""
    try:
        return f"{float(value) * 100:.{digits}f}%"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


_ENV = ImmutableSandboxedEnvironment(undefined=_LenientUndefined, autoescape=False, keep_trailing_newline=False)
_ENV.filters["pct"] = _pct
for _name in ("pct", "round", "int", "float", "abs", "filesizeformat"):
    _ENV.filters[_name] = _blank_if_missing(_ENV.filters[_name])


def _private_attributes(ast: nodes.Template) -> list[str]:
    names = [n.attr for n in ast.find_all(nodes.Getattr) if n.attr.startswith("_")]
    names += [
        n.arg.value
        for n in ast.find_all(nodes.Getitem)
        if isinstance(n.arg, nodes.Const) and isinstance(n.arg.value, str) and n.arg.value.startswith("_")
    ]
    return names


def check_template(source: str, samples: Sequence[dict[str, Any]]) -> None:
    """Raise TemplateProblem if `source` does not parse, names unknown variables, reaches for
    internals, or fails to render against any of `samples` (one per shape of the rule's input)."""
    try:
        ast = _ENV.parse(source)
    except TemplateSyntaxError as err:
        raise TemplateProblem(f"template syntax error: {err.message}", err.lineno) from None
    unknown = sorted(meta.find_undeclared_variables(ast) - CONTEXT_NAMES)
    if unknown:
        raise TemplateProblem(
            f"unknown template variable(s) {', '.join(unknown)}; available: {', '.join(sorted(CONTEXT_NAMES))}"
        )
    private = _private_attributes(ast)
    if private:
        raise TemplateProblem(f"sandbox violation: access to internal attribute {private[0]!r} is not allowed")
    template = _ENV.from_string(source)
    for sample in samples:
        try:
            template.render(sample)
        except SecurityError as err:
            raise TemplateProblem(f"sandbox violation: {err}") from None
        except Exception as err:  # any render failure is a rule error at check time
            raise TemplateProblem(f"template failed on a sample: {type(err).__name__}: {err}") from None


@lru_cache(maxsize=1024)
def _compiled(source: str) -> Template:
    return _ENV.from_string(source)


def render(source: str, context: dict[str, Any], rule: str, field: str, failures: Counter[str] | None = None) -> str:
    """Render one template; a failure yields the raw template with the reason, never an exception,
    so one bad annotation cannot stop alerting. Failures are logged (rule and field only: the
    context may hold values that must not reach a log) and counted by rule in `failures` (the
    worker exposes them as a metric)."""
    try:
        return _compiled(source).render(context)
    except Exception as err:
        if failures is not None:
            failures[rule] += 1
        log.warning("rule %s: annotation %s failed to render: %s", rule, field, type(err).__name__)
        return f"{source} [template error: {type(err).__name__}]"
