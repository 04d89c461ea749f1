"""Annotation templates: Jinja2 in an immutable sandbox.

Rule files are data from whoever edits them, so templates run sandboxed: attribute access on
internals (`''.__class__`, `x._private`) raises SecurityError, and nothing can mutate the
context. Unknown variables render empty at run time (evidence keys vary by detector), but the
rule checker rejects unknown top-level names and renders every template once with a sample.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import Template, TemplateSyntaxError, Undefined, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

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


def _pct(value: object, digits: int = 1) -> str:
    """0.335 -> '33.5%' (ratios in 0-1)."""
    try:
        return f"{float(value) * 100:.{digits}f}%"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


_ENV = ImmutableSandboxedEnvironment(undefined=_LenientUndefined, autoescape=False, keep_trailing_newline=False)
_ENV.filters["pct"] = _pct


def _private_attributes(ast: nodes.Template) -> list[str]:
    names = [n.attr for n in ast.find_all(nodes.Getattr) if n.attr.startswith("_")]
    names += [
        n.arg.value
        for n in ast.find_all(nodes.Getitem)
        if isinstance(n.arg, nodes.Const) and isinstance(n.arg.value, str) and n.arg.value.startswith("_")
    ]
    return names


def check_template(source: str, sample: dict[str, Any]) -> None:
    """Raise TemplateProblem if `source` does not parse, names unknown variables, reaches for
    internals, or fails to render against `sample`."""
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
    try:
        _ENV.from_string(source).render(sample)
    except SecurityError as err:
        raise TemplateProblem(f"sandbox violation: {err}") from None
    except Exception as err:  # any render failure is a rule error at check time
        raise TemplateProblem(f"template failed on a sample: {type(err).__name__}: {err}") from None


@lru_cache(maxsize=1024)
def _compiled(source: str) -> Template:
    return _ENV.from_string(source)


def render(source: str, context: dict[str, Any]) -> str:
    """Render one template; a failure yields the raw template with the reason, never an exception,
    so one bad annotation cannot stop alerting."""
    try:
        return _compiled(source).render(context)
    except Exception as err:
        return f"{source} [template error: {type(err).__name__}]"
