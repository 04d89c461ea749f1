"""Shared fixtures. Tests that need Kafka and InfluxDB take `stack`: it brings the local stack up
once per session (idempotent; `make test` has usually started it already) and leaves it running."""

from __future__ import annotations

import uuid

import pytest

from laggard.settings import Settings, get_settings


@pytest.fixture(scope="session")
def stack() -> Settings:
    from laggard import stack as local_stack

    settings = get_settings()
    local_stack.up(settings)
    return settings


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, group and measurement names, so tests never share state."""
    return uuid.uuid4().hex[:10]
