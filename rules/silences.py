"""Silences: mute alerts whose labels match, for a time window, with a reason and an author.

Stored as a JSON file for now (the CLI and the worker share it); the store takes `now` from the
caller so tests and replays are deterministic.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

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


_SILENCES = TypeAdapter(list[Silence])


class StateFileInvalid(ValueError):
    """A state file (silences, alert state) that cannot be read: one line naming the file and
    what is wrong (the first problem, with its place), never its content."""

    def __init__(self, path: Path, problem: str, hint: str = "") -> None:
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))
        self.path = path


def state_file_problem(err: ValidationError) -> str:
    """The first thing wrong with a state file's content, in one line, without quoting it."""
    first = err.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).replace("\n", " ")
    if first["type"] == "json_invalid":
        return f"not valid JSON ({message.removeprefix('Invalid JSON: ')})"
    more = len(err.errors()) - 1
    return f"{where + ': ' if where else ''}{message}" + (f" (and {more} more)" if more else "")


class SilenceStore:
    """Silences in one JSON file, rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[Silence]:
        """The silences; StateFileInvalid (a ValueError) when the file is not a list of silences."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        try:
            return _SILENCES.validate_json(data)
        except ValidationError as err:
            raise StateFileInvalid(self.path, f"not a valid silences file: {state_file_problem(err)}",
                                   "fix it or move it away") from None

    def _save(self, silences: list[Silence]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(_SILENCES.dump_json(silences, indent=2))
        os.replace(tmp, self.path)

    def add(
        self, matchers: list[Matcher], *, starts_at: float, ends_at: float, comment: str, created_by: str, now: float
    ) -> Silence:
        silence = Silence(
            id=uuid.uuid4().hex[:12],
            matchers=matchers,
            starts_at=starts_at,
            ends_at=ends_at,
            comment=comment,
            created_by=created_by,
            created_at=now,
        )
        self._save([*self.load(), silence])
        return silence

    def list(self, now: float, include_expired: bool = False) -> list[Silence]:
        return [s for s in self.load() if include_expired or s.state(now) != "expired"]

    def expire(self, silence_id: str, now: float) -> Silence:
        """End a silence now. KeyError if no silence has this id."""
        silences = self.load()
        for i, silence in enumerate(silences):
            if silence.id == silence_id:
                if silence.state(now) != "expired":
                    silences[i] = silence.model_copy(
                        update={"ends_at": now, "starts_at": min(silence.starts_at, now)}
                    )
                    self._save(silences)
                return silences[i]
        raise KeyError(silence_id)

