"""Load and check rule files, reporting every problem as FILE:LINE: FIELD: MESSAGE.

PyYAML's composer keeps the position of every node, so we walk the node tree once to map each
field path (('rules', 2, 'for')) to its line, then map pydantic's error locations onto it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rules.evaluate import sample_context
from rules.model import Route, RulesConfig
from rules.templating import TemplateProblem, check_template

PathKey = tuple[str | int, ...]

# Hints for the errors people make most.
_HINTS = {"url": "inline webhook URLs are not allowed; use url_env or url_file"}


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


def _index_lines(node: yaml.Node, path: PathKey, lines: dict[PathKey, int], dupes: list[tuple[PathKey, int]]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = (*path, key)
            if child in lines:
                dupes.append((child, key_node.start_mark.line + 1))
            lines[child] = key_node.start_mark.line + 1
            _index_lines(value_node, child, lines, dupes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*path, i), lines, dupes)


class _LocatedDoc:
    """A parsed YAML document with the line of every field path."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines: dict[PathKey, int] = {}
        self.duplicates: list[tuple[PathKey, int]] = []
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        self.data: Any = None
        if node is not None:
            _index_lines(node, (), self.lines, self.duplicates)
            self.data = yaml.safe_load(text)

    def line_of(self, path: PathKey) -> int:
        """The line of the deepest known prefix of `path` (a missing field points at its parent)."""
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.lines:
                return self.lines[path[:cut]]
        return 1

    def error(self, path: PathKey, message: str) -> RuleError:
        return RuleError(self.file, self.line_of(path), _field_name(path), message)


def _validation_errors(doc: _LocatedDoc, err: ValidationError) -> list[RuleError]:
    out = []
    for item in err.errors(include_url=False):
        # Drop pydantic's internal location parts (e.g. 'function-after[...]') that are not fields.
        path = tuple(p for p in item["loc"] if isinstance(p, int) or not ("[" in p or "-" in p))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown field ({_HINTS.get(str(path[-1]), 'not part of the schema')})"
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
        if rule.name in names:
            errors.append(doc.error(("rules", i, "name"), f"duplicate rule name {rule.name!r}"))
        names.add(rule.name)
        sample = sample_context(rule, config.external_url)
        for field, source in rule.annotations.model_dump().items():
            try:
                check_template(source, sample)
            except TemplateProblem as problem:
                path = ("rules", i, "annotations", field)
                line = doc.line_of(path) + ((problem.line or 1) - 1)
                errors.append(RuleError(doc.file, line, _field_name(path), str(problem)))
    return errors


def check_text(text: str, file: str = "<string>") -> tuple[RulesConfig | None, list[RuleError]]:
    """Parse and check one rules file's text; returns the config (if valid) and all errors."""
    try:
        doc = _LocatedDoc(file, text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(err, "problem", None) or str(err)
        return None, [RuleError(file, line, "", f"YAML syntax error: {problem}")]
    errors = [doc.error(path, "duplicate key (the later value would win silently)") for path, _ in doc.duplicates]
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
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        return None, [RuleError(str(path), 0, "", f"cannot read file: {err.strerror}")]
    return check_text(text, str(path))


def load_rules(path: Path) -> RulesConfig:
    """Load a rules file or raise RulesFileInvalid listing every error."""
    config, errors = check_file(path)
    if errors or config is None:
        raise RulesFileInvalid(errors)
    return config


DEFAULT_RULES = Path(__file__).with_name("default.yaml")
