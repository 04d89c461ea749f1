"""Annotation templates: Jinja2 in an immutable sandbox, bounded in size and time.

Rule files are data from whoever edits them, so templates run sandboxed: attribute access on
internals (`''.__class__`, `x._private`) raises SecurityError, and nothing can mutate the
context. Missing values render empty (evidence keys vary by detector, some values are None), but
the rule checker rejects unknown top-level names and renders every template against a sample of
each shape of finding the rule can see, with the evidence and cost keys the detectors emit.

The sandbox alone lets a template allocate without bound (`{{ ('a' * 10**9)|length }}` took 1 GB
in `rules check`), so a template is also bounded (TemplateLimit, a SecurityError):

- No value it builds holds more than MAX_SIZE characters or items (nested ones counted). Where the
  size follows from the operands it is refused before it is built: repetition and `+` of strings
  and lists, `~`, `%` and `str.format` (fields and widths), the join, replace and format filters;
  integers stay under MAX_INT_BITS (`*`, `**`). Every filter's arguments and result, every call's
  result and every output are checked too.
- Builtin methods and filters whose result size is an argument (`center`, `ljust`, `zfill`,
  `translate`, `to_bytes`, the `indent`, `wordwrap`, `batch`, `tojson` filters, ...) are not
  available: the filters below are, and `join`/`replace` as filters (checked), not as methods.
- Blocks whose output is built out of sight of the output limit (macro, call, filter blocks,
  `{% set %}...{% endset %}`, blocks, include, import, extends, recursive loops) do not parse.
- The output is at most MAX_OUTPUT_CHARS, and a render takes at most MAX_RENDER_S (checked at
  every loop iteration, call, filter and intercepted operator).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from functools import lru_cache, wraps
from string import Formatter
from typing import Any

from jinja2 import Template, TemplateSyntaxError, Undefined, meta, nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

log = logging.getLogger(__name__)

# Names a template may use; evaluate.py builds exactly this context.
CONTEXT_NAMES = frozenset(
    {"labels", "rule", "finding", "evidence", "cost", "value", "threshold", "metric", "external_url"}
)

MAX_SIZE = 100_000  # characters and items in one value a template builds
MAX_INT_BITS = 4096  # an integer a template computes (2**4096 has 1,234 digits)
MAX_OUTPUT_CHARS = 100_000  # far beyond any chat message (Slack sections take 3,000)
MAX_RENDER_S = 1.0  # a normal annotation renders in microseconds

# Filters a template may use; the others build values sized by an argument (see the docstring).
FILTERS = frozenset({
    "abs", "attr", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "filesizeformat",
    "first", "float", "forceescape", "format", "groupby", "int", "items", "join", "last", "length",
    "list", "lower", "map", "max", "min", "pct", "pprint", "random", "reject", "rejectattr", "replace",
    "reverse", "round", "safe", "select", "selectattr", "sort", "string", "striptags", "sum", "title",
    "trim", "truncate", "unique", "upper", "urlencode", "wordcount", "xmlattr",
})
# Methods of builtin values that build a result sized by an argument.
_GROWING_METHODS = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "join", "replace", "translate", "maketrans", "to_bytes"}
)
# Template parts whose output is built in memory before it reaches the output limit.
_BUFFERING_NODES = {
    nodes.Macro: "macro", nodes.CallBlock: "call", nodes.FilterBlock: "filter", nodes.AssignBlock: "set ... endset",
    nodes.Block: "block", nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import",
    nodes.Extends: "extends",
}
_SEQUENCES = (str, bytes, list, tuple)


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


class TemplateLimit(SecurityError):
    """A template would build a value or an output over the limits, or run too long."""


_DEADLINE: ContextVar[float] = ContextVar("template_deadline", default=math.inf)


def _tick() -> None:
    if time.monotonic() > _DEADLINE.get():
        raise TemplateLimit(f"the template ran longer than {MAX_RENDER_S:g} s")


def _size(value: object) -> int:
    """Characters and items in `value`, nested containers included; counting stops past MAX_SIZE."""
    total, pending = 0, [value]
    while pending and total <= MAX_SIZE:
        item = pending.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, (list, tuple, set, frozenset, dict)):
            total += len(item)
            if total <= MAX_SIZE:
                pending.extend(item.items() if isinstance(item, dict) else item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1  # about its decimal digits
        else:
            total += 1
    return total


def _limit(size: int, what: str) -> None:
    if size > MAX_SIZE:
        raise TemplateLimit(f"{what} would build more than {MAX_SIZE:,} characters or items")


def _bounded(value: Any, what: str) -> Any:
    _limit(_size(value), what)
    return value


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?(.)", re.DOTALL)
_FIELD_SLACK = 64  # characters a field may add beyond its width and arguments (a float's digits)
_UNBOUNDED = MAX_SIZE + 1


def _percent_format_size(template: str, args: object) -> int:
    """An upper bound on the length of `template % args`."""
    size, args_size = len(template), _size(args)
    for width, precision, conversion in _PERCENT_FIELD.findall(template):
        if "*" in (width, precision):
            return _UNBOUNDED  # a width taken from the arguments
        if conversion != "%":
            size += max(int(width or 0), int(precision or 0)) + args_size + _FIELD_SLACK
    return size


def _brace_format_size(template: str, args: object) -> int:
    """An upper bound on the length of `template.format(*args)`; a nested `{}` in a field's spec
    (a width taken from the arguments) counts as unbounded."""
    size, args_size = len(template), _size(args)
    for _literal, field, spec, _conversion in Formatter().parse(template):
        if field is not None:
            if "{" in (spec or ""):
                return _UNBOUNDED
            size += max((int(n) for n in re.findall(r"\d+", spec or "")), default=0) + args_size + _FIELD_SLACK
    return size


def _binop_size(operator: str, left: Any, right: Any) -> int:
    """The size of `left <operator> right` where it can grow a value, else 0."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, _SEQUENCES) and isinstance(times, int):
                return _size(seq) * max(times, 0)
    elif operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        return _size(left) + _size(right)
    elif operator == "%" and isinstance(left, str):
        return _percent_format_size(left, right)
    return 0


def _int_bits(operator: str, left: Any, right: Any) -> int:
    """The bits of an integer `left <operator> right`, where it can grow one, else 0."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return 0
    if operator == "*":
        return left.bit_length() + right.bit_length()
    if operator == "**" and right > 0 and abs(left) > 1:
        return math.ceil(right * math.log2(abs(left)))
    return 0


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # `~` joins in compiled code, out of the sandbox's operator hooks: join it in ours.
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        ast = super()._parse(source, name, filename)
        for node in ast.find_all(tuple(_BUFFERING_NODES)):
            raise TemplateSyntaxError(f"'{_BUFFERING_NODES[type(node)]}' is not allowed in an annotation template",
                                      node.lineno, name, filename)
        for loop in list(ast.find_all(nodes.For)):
            if loop.recursive:
                raise TemplateSyntaxError("recursive loops are not allowed in an annotation template",
                                          loop.lineno, name, filename)
            # Every iteration checks the render's deadline.
            counted = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None)
            loop.iter = counted.set_lineno(loop.iter.lineno).set_environment(self)
        return ast

    def bounded_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            _tick()
            yield item

    def bounded_concat(self, values: tuple[Any, ...]) -> str:
        _limit(sum(_size(v) for v in values), "'~'")  # before str(): that would build it
        return "".join(map(str, values))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _limit(_binop_size(operator, left, right), f"'{operator}'")
        if _int_bits(operator, left, right) > MAX_INT_BITS:
            raise TemplateLimit(f"'{operator}' would build an integer of more than {MAX_INT_BITS:,} bits")
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _tick()
        return _bounded(super().call(context, obj, *args, **kwargs), "a call")

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return attr not in _GROWING_METHODS and super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        format_call = super().wrap_str_format(value)
        if format_call is None:
            return None
        template = value.__self__

        @wraps(format_call)
        def bounded_format(*args: Any, **kwargs: Any) -> str:
            _limit(_brace_format_size(template, (args, kwargs)), "str.format")
            return format_call(*args, **kwargs)

        return bounded_format


def _finalize(value: Any) -> Any:
    return _bounded(value, "an output")


_ENV = _BoundedSandbox(undefined=_LenientUndefined, autoescape=False, keep_trailing_newline=False, finalize=_finalize)
_ENV.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs
_ENV.filters["pct"] = _pct
for _name in ("pct", "round", "int", "float", "abs", "filesizeformat"):
    _ENV.filters[_name] = _blank_if_missing(_ENV.filters[_name])

_JOIN, _REPLACE, _FORMAT, _SUM = (_ENV.filters[n] for n in ("join", "replace", "format", "sum"))


@pass_eval_context
def _join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    items = list(value)  # often a generator (`|map(...)|join`)
    _limit(_size(items) + len(str(d)) * len(items), "join")
    return _JOIN(eval_ctx, items, d, attribute)


@pass_eval_context
def _replace(eval_ctx: Any, s: str, old: str, new: str, count: int | None = None) -> str:
    text, old_text, new_text = str(s), str(old), str(new)
    hits = text.count(old_text) if old_text else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    _limit(len(text) + hits * max(0, len(new_text) - len(old_text)), "replace")
    return _REPLACE(eval_ctx, s, old, new, count)


def _format(value: str, *args: Any, **kwargs: Any) -> str:
    _limit(_percent_format_size(str(value), (args, kwargs)), "format")
    return _FORMAT(value, *args, **kwargs)


@pass_environment
def _sum(environment: Any, iterable: Iterable[Any], attribute: str | int | None = None, start: Any = 0) -> Any:
    if not isinstance(start, (int, float)):
        raise TemplateLimit("sum adds numbers only (adding lists or strings one by one takes quadratic memory)")
    return _SUM(environment, iterable, attribute, start)


def _checked_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` refusing oversized arguments (before it builds from them) and results."""

    @wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _tick()
        for arg in (*args, *kwargs.values()):
            _limit(_size(arg), f"the {name} filter's argument")
        return _bounded(func(*args, **kwargs), f"the {name} filter")

    return checked


_ENV.filters.update({"join": _join, "replace": _replace, "format": _format, "sum": _sum})
_ENV.filters = {name: _checked_filter(name, func) for name, func in _ENV.filters.items() if name in FILTERS}


def _render(template: Template, context: dict[str, Any]) -> str:
    """Render within the output and time limits."""
    deadline = _DEADLINE.set(time.monotonic() + MAX_RENDER_S)
    try:
        out: list[str] = []
        length = 0
        for chunk in template.generate(context):
            length += len(chunk)
            if length > MAX_OUTPUT_CHARS:
                raise TemplateLimit(f"the output would be longer than {MAX_OUTPUT_CHARS:,} characters")
            out.append(chunk)
        return "".join(out)
    finally:
        _DEADLINE.reset(deadline)


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
        # This compiles the template, which fails on an unknown filter or test (TemplateAssertionError).
        undeclared = meta.find_undeclared_variables(ast)
    except TemplateSyntaxError as err:
        raise TemplateProblem(f"template syntax error: {err.message}", err.lineno) from None
    unknown = sorted(undeclared - CONTEXT_NAMES)
    if unknown:
        raise TemplateProblem(
            f"unknown template variable(s) {', '.join(unknown)}; available: {', '.join(sorted(CONTEXT_NAMES))}"
        )
    private = _private_attributes(ast)
    if private:
        raise TemplateProblem(f"sandbox violation: access to internal attribute {private[0]!r} is not allowed")
    for sample in samples:
        try:
            _render(_compiled(source), sample)
        except TemplateLimit as err:
            raise TemplateProblem(f"template over its limits: {err}") from None
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
        return _render(_compiled(source), context)
    except Exception as err:
        if failures is not None:
            failures[rule] += 1
        log.warning("rule %s: annotation %s failed to render: %s", rule, field, type(err).__name__)
        return f"{source} [template error: {type(err).__name__}]"
