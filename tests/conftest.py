"""Shared fixtures. Tests that need Kafka and InfluxDB take `stack`: it brings the local stack up
once per session (idempotent; `make test` has usually started it already) and leaves it running.

Every test that takes `stack` is marked `stack` here (a module that starts private instances of
the services marks itself). `make test` runs the unmarked, pure-logic tests first and stops at
the first failure, then the `stack` tests."""

from __future__ import annotations

import uuid

import pytest

from laggard.settings import Settings, get_settings
from laggard.topics import ensure_topics


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def stack() -> Settings:
    from laggard.commands import stack as local_stack

    settings = get_settings()
    local_stack.up(settings)
    return settings


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, group and measurement names, so tests never share state."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def shared_state_env(stack: Settings, unique: str) -> dict[str, str]:
    """LAGGARD_* variables giving a `laggard` command its own silences and alerts topics on the stack,
    created (compacted) beforehand: a record sent to a missing topic may be written twice while the
    broker creates it."""
    names = {"topic_silences": f"test-silences-{unique}", "topic_alerts": f"test-alerts-{unique}"}
    ensure_topics(stack.model_copy(update=names), only=list(names.values()))
    return {f"LAGGARD_{setting.upper()}": name for setting, name in names.items()}
