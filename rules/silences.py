"""Silences: mute alerts whose labels match, for a time window, with a reason and an author.

They live on a compacted Kafka topic that the CLI and every worker share (rules/shared_state.py);
`now` comes from the caller so tests and replays are deterministic.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from laggard.rules.model import Matcher, matches_all

SilenceState = Literal["pending", "active", "expired"]


class Silence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    matchers: list[Matcher] = Field(min_length=1)
    starts_at: float
    ends_at: float
    comment: str = Field(min_length=1)
    created_by: str = Field(min_length=1)
    created_at: float

    @model_validator(mode="after")
    def _ordered(self) -> Silence:
        if self.ends_at < self.starts_at:
            raise ValueError("ends_at is before starts_at")
        return self

    def state(self, now: float) -> SilenceState:
        if now < self.starts_at:
            return "pending"
        return "active" if now < self.ends_at else "expired"

    def mutes(self, labels: dict[str, str], now: float) -> bool:
        return self.state(now) == "active" and matches_all(self.matchers, labels)

    @classmethod
    def new(cls, matchers: list[Matcher], *, starts_at: float, ends_at: float, comment: str, created_by: str,
            now: float) -> Silence:
        return cls(id=uuid.uuid4().hex[:12], matchers=matchers, starts_at=starts_at, ends_at=ends_at,
                   comment=comment, created_by=created_by, created_at=now)

    def ended(self, now: float) -> Silence:
        """This silence ending now (itself, if it has already ended)."""
        if self.state(now) == "expired":
            return self
        return self.model_copy(update={"ends_at": now, "starts_at": min(self.starts_at, now)})
