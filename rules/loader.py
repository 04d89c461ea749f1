"""Load and check rule files, reporting every problem as FILE:LINE: FIELD: MESSAGE.

PyYAML's composer keeps the position of every node, so we walk the node tree once to map each
field path (('rules', 2, 'for')) to its line, then map pydantic's error locations onto it. Any
file, however broken (not UTF-8, nested too deep, an alias bomb), ends as a list of such errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from laggard.results import FLEET_METRICS
from laggard.rules.evaluate import sample_contexts
from laggard.rules.model import Route, RulesConfig, ThresholdCondition
from laggard.rules.templating import TemplateProblem, check_template

PathKey = tuple[str | int, ...]

# Hints for the errors people make most.
_HINTS = {"url": "inline webhook URLs are not allowed; use url_env or url_file"}
# Deeper than any real rules file (a route tree 40 levels deep), far below Python's recursion
# limit, which PyYAML's recursive composer would otherwise hit.
MAX_NESTING = 80


@dataclass(frozen=True)
class RuleError:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field or '<file>'}: {self.message}"


class RulesFileInvalid(ValueError):
    def __init__(self, errors: list[RuleError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


def _field_name(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _index_lines(node: yaml.Node, path: PathKey, located: _LocatedDoc, seen: set[int]) -> None:
    """Record the line of `path` and of everything below it. An aliased node is walked once (at
    its anchor): walking it again per alias would take exponential time on a nested alias bomb."""
    located.lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, str(key_node.value))
            if child in located.lines:
                located.duplicates.append(child)
            located.lines[child] = key_node.start_mark.line + 1
            _index_lines(value_node, child, located, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*path, i), located, seen)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than MAX_NESTING with a YAML error at that line."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self._depth >= MAX_NESTING:
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_NESTING} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _LocatedDoc:
    """A parsed YAML document with the line of every field path."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines: dict[PathKey, int] = {}
        self.duplicates: list[PathKey] = []
        self.data: Any = None
        loader = _BoundedLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _index_lines(node, (), self, set())
                self.data = loader.construct_document(node)
        finally:
            loader.dispose()

    def line_of(self, path: PathKey) -> int:
        """The line of the deepest known prefix of `path` (a missing field points at its parent)."""
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.lines:
                return self.lines[path[:cut]]
        return 1

    def error(self, path: PathKey, message: str) -> RuleError:
        return RuleError(self.file, self.line_of(path), _field_name(path), message)


def _field_path(doc: _LocatedDoc, loc: tuple[str | int, ...]) -> PathKey:
    """pydantic's error location as a field path: its internal parts ('function-after[...]') are
    dropped, but a key that is in the file is kept whatever its spelling ('keep-firing-for')."""
    path: PathKey = ()
    for part in loc:
        if isinstance(part, int) or "[" not in part or (*path, part) in doc.lines:
            path = (*path, part)
    return path


def _unknown_field(name: str) -> str:
    hint = _HINTS.get(name) or "not part of the schema"
    if "-" in name:
        hint += f"; field names use underscores: {name.replace('-', '_')!r}?"
    return f"unknown field ({hint})"


def _validation_errors(doc: _LocatedDoc, err: ValidationError) -> list[RuleError]:
    out = []
    for item in err.errors(include_url=False):
        path = _field_path(doc, item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = _unknown_field(str(path[-1]) if path else "")
        elif item["type"] == "missing":
            message = "required field is missing"
        elif "input" in item and not isinstance(item["input"], (dict, list)):
            message = f"{message} (got {item['input']!r})"
        out.append(doc.error(path, message))
    return out


def _route_receivers(route: Route, path: PathKey) -> list[tuple[PathKey, str]]:
    found = [((*path, "receiver"), route.receiver)] if route.receiver else []
    for i, child in enumerate(route.routes):
        found += _route_receivers(child, (*path, "routes", i))
    return found


def _threshold_errors(doc: _LocatedDoc, path: tuple, cond: ThresholdCondition) -> list[RuleError]:
    """A threshold rule the worker would never evaluate: it sends the alert rules the fleet KPI
    of each cluster (per-GPU conditions are the detectors' findings)."""
    if cond.scope != "cluster":
        return [doc.error((*path, "scope"), f"{cond.scope!r}: the worker evaluates threshold rules on scope "
                          "'cluster' (the fleet KPI) only; for GPUs, nodes and jobs use a finding rule")]
    if cond.metric not in FLEET_METRICS:
        return [doc.error((*path, "metric"), f"{cond.metric!r} is not a fleet KPI metric; one of: "
                          f"{', '.join(FLEET_METRICS)}")]
    return []


def _semantic_errors(doc: _LocatedDoc, config: RulesConfig) -> list[RuleError]:
    errors = []
    known = {r.name for r in config.receivers}
    seen: set[str] = set()
    for i, receiver in enumerate(config.receivers):
        if receiver.name in seen:
            errors.append(doc.error(("receivers", i, "name"), f"duplicate receiver name {receiver.name!r}"))
        seen.add(receiver.name)
    references = _route_receivers(config.route, ("route",))
    for i, rule in enumerate(config.rules):
        references += [(("rules", i, "receivers", j), name) for j, name in enumerate(rule.receivers)]
    for path, name in references:
        if name not in known:
            errors.append(doc.error(path, f"unknown receiver {name!r}; defined: {', '.join(sorted(known))}"))
    names: set[str] = set()
    for i, rule in enumerate(config.rules):
        if rule.threshold is not None:
            errors += _threshold_errors(doc, ("rules", i, "threshold"), rule.threshold)
        if rule.name in names:
            errors.append(doc.error(("rules", i, "name"), f"duplicate rule name {rule.name!r}"))
        names.add(rule.name)
        samples = sample_contexts(rule, config.external_url)
        for field, source in rule.annotations.model_dump().items():
            try:
                check_template(source, samples)
            except TemplateProblem as problem:
                path = ("rules", i, "annotations", field)
                line = doc.line_of(path) + ((problem.line or 1) - 1)
                errors.append(RuleError(doc.file, line, _field_name(path), str(problem)))
    return errors


def check_text(text: str, file: str = "<string>") -> tuple[RulesConfig | None, list[RuleError]]:
    """Parse and check one rules file's text; returns the config (if valid) and all errors."""
    try:
        doc = _LocatedDoc(file, text)
    except yaml.reader.ReaderError as err:  # a control character; its str() spans lines
        line = text.count("\n", 0, err.position) + 1
        return None, [RuleError(file, line, "", f"unacceptable character #x{err.character:04x} ({err.reason})")]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(err, "problem", None) or str(err)
        return None, [RuleError(file, line, "", f"YAML syntax error: {problem}")]
    errors = [doc.error(path, "duplicate key (the later value would win silently)") for path in doc.duplicates]
    if not isinstance(doc.data, dict):
        return None, [*errors, RuleError(file, 1, "", "expected a mapping with 'receivers', 'route' and 'rules'")]
    try:
        config = RulesConfig.model_validate(doc.data)
    except ValidationError as err:
        return None, errors + _validation_errors(doc, err)
    errors += _semantic_errors(doc, config)
    return (None if errors else config), errors


def check_file(path: Path) -> tuple[RulesConfig | None, list[RuleError]]:
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, [RuleError(str(path), 0, "", f"cannot read file: {err.strerror}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        byte = data[err.start : err.start + 1].hex()
        return None, [RuleError(str(path), line, "", f"not UTF-8 text (byte 0x{byte}); save the file as UTF-8")]
    return check_text(text, str(path))


def load_rules(path: Path) -> RulesConfig:
    """Load a rules file or raise RulesFileInvalid listing every error."""
    config, errors = check_file(path)
    if errors or config is None:
        raise RulesFileInvalid(errors)
    return config


DEFAULT_RULES = Path(__file__).with_name("default.yaml")
