"""Firing/resolved lifecycle of findings: persistence before firing, clean windows before resolving.

Detectors report, per window, the conditions that hold now (`Observation`s keyed by fingerprint).
`Lifecycle` turns that into transitions: a condition fires after `fire_after` consecutive windows
(and, with `fire_after_s`, once those windows hold that many seconds of it: a finding's
`evidence["fault_share"]` says how much of its window the condition covered, so a fault of a few
seconds that straddles a window boundary does not pass for two windows of it) and resolves after
`clear_after` consecutive windows without it, each transition emitted once.
Its state is a pydantic model so it can be dumped to a dict (e.g. a Faust table) and restored.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from laggard.results import Finding


class Episode(BaseModel):
    """One fingerprint's progress: consecutive windows with and without the condition."""

    hits: int = 0
    seconds: float = 0.0  # of the condition over the consecutive hits
    clean: int = 0
    firing: bool = False
    last: Finding  # the latest observation (or the firing finding), to describe a resolution


class LifecycleState(BaseModel):
    episodes: dict[str, Episode] = Field(default_factory=dict)


def resolved_from(last: Finding, window_start: float, window_s: float, clean_windows: int) -> Finding:
    return last.model_copy(
        update={
            "state": "resolved",
            "window_start": window_start,
            "window_end": window_start + window_s,
            "summary": f"resolved after {clean_windows} clean window(s): {last.summary}",
        }
    )


class Lifecycle:
    """Applies persistence and clearing to one detector's observations."""

    def __init__(self, fire_after: int, clear_after: int, state: LifecycleState | None = None,
                 fire_after_s: float = 0.0) -> None:
        if fire_after < 1 or clear_after < 1:
            raise ValueError(f"fire_after and clear_after must be >= 1, got {fire_after}, {clear_after}")
        self.fire_after = fire_after
        self.fire_after_s = fire_after_s
        self.clear_after = clear_after
        self.state = state or LifecycleState()

    def step(self, window_start: float, window_s: float, observed: dict[str, Finding]) -> list[Finding]:
        """Advance one window. `observed` maps fingerprint -> a firing Finding for conditions seen now."""
        out: list[Finding] = []
        episodes = self.state.episodes
        for fp, finding in observed.items():
            ep = episodes.get(fp)
            if ep is None:
                ep = episodes[fp] = Episode(last=finding)
            ep.hits += 1
            share = finding.evidence.get("fault_share", 1.0)
            ep.seconds += window_s * (share if isinstance(share, (int, float)) else 1.0)
            ep.clean = 0
            ep.last = finding
            if not ep.firing and ep.hits >= self.fire_after and ep.seconds >= self.fire_after_s - 1e-9:
                ep.firing = True
                out.append(finding)
        for fp in [fp for fp in episodes if fp not in observed]:
            ep = episodes[fp]
            ep.hits = 0
            ep.clean += 1
            if not ep.firing:
                del episodes[fp]
            elif ep.clean >= self.clear_after:
                out.append(resolved_from(ep.last, window_start, window_s, ep.clean))
                del episodes[fp]
        return out

    def is_firing(self, fingerprint: str) -> bool:
        ep = self.state.episodes.get(fingerprint)
        return ep is not None and ep.firing

    def firing(self) -> list[Finding]:
        return [ep.last for ep in self.state.episodes.values() if ep.firing]

    def active(self) -> list[Finding]:
        """Firing findings whose condition held in the last window stepped (not clearing), as
        observed then: what is going on now, with this window's evidence and cost."""
        return [ep.last for ep in self.state.episodes.values() if ep.firing and ep.clean == 0]
