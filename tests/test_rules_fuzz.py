"""The rules loader on hostile input (issue 18): arbitrary bytes, YAML documents and mutations of a
good file never raise; every refusal names the file and a line inside it, and says what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laggard.rules.loader import check_file, check_text
from tests.test_rules_check import GOOD

FILE = "hostile.yaml"
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=25,
)


def assert_checked(text: str) -> None:
    config, errors = check_text(text, FILE)
    lines = text.count("\n") + 1
    assert (config is None) == bool(errors)
    for error in errors:
        assert error.file == FILE and error.message.strip(), error
        assert 0 <= error.line <= lines + 1, (error, lines)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_any_text_is_checked_without_an_exception(text: str) -> None:
    assert_checked(text)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_values)
def test_any_yaml_document_is_checked_without_an_exception(value: Any) -> None:
    assert_checked(yaml.safe_dump(value))


PATHS = [("receivers", 0, "kind"), ("receivers", 0, "url_env"), ("route", "receiver"), ("rules", 0, "name"),
         ("rules", 0, "finding"), ("rules", 0, "for"), ("rules", 0, "annotations", "summary"), ("rules",)]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), yaml_values)
def test_a_good_file_with_one_field_replaced_by_anything_is_checked(path: tuple[str | int, ...], value: Any) -> None:
    doc = yaml.safe_load(GOOD)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    assert_checked(yaml.safe_dump(doc, sort_keys=False))


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_any_bytes_in_a_file_are_checked_without_an_exception(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / FILE
    path.write_bytes(raw)
    config, errors = check_file(path)
    assert (config is None) == bool(errors)
    assert all(e.file == str(path) and e.message.strip() for e in errors)
