"""Which receivers an alert goes to, and with which grouping and timings (Alertmanager's tree)."""

from __future__ import annotations

from dataclasses import dataclass

from laggard.rules.model import RootRoute, Route, Rule, matches_all


@dataclass(frozen=True)
class RouteTarget:
    route_id: str
    receiver: str
    group_by: tuple[str, ...]
    group_wait: float
    group_interval: float
    repeat_interval: float


def _walk(route: Route, labels: dict[str, str], inherited: RouteTarget, route_id: str) -> list[RouteTarget]:
    if not matches_all(route.match, labels):
        return []
    here = RouteTarget(
        route_id=route_id,
        receiver=route.receiver or inherited.receiver,
        group_by=tuple(route.group_by) if route.group_by is not None else inherited.group_by,
        group_wait=route.group_wait if route.group_wait is not None else inherited.group_wait,
        group_interval=route.group_interval if route.group_interval is not None else inherited.group_interval,
        repeat_interval=route.repeat_interval if route.repeat_interval is not None else inherited.repeat_interval,
    )
    found: list[RouteTarget] = []
    for i, child in enumerate(route.routes):
        matched = _walk(child, labels, here, f"{route_id}.{i}")
        found += matched
        if matched and not child.continue_:
            break
    return found or [here]


def route_targets(root: RootRoute, labels: dict[str, str], rule: Rule | None = None) -> list[RouteTarget]:
    """The routes an alert takes: the rule's own receivers (root timings) if it names any, else
    the first matching child routes (more while `continue: true`), else the root."""
    base = RouteTarget("root", root.receiver, tuple(root.group_by), root.group_wait, root.group_interval, root.repeat_interval)
    if rule is not None and rule.receivers:
        return [RouteTarget(f"rule:{rule.name}", name, *_timings(base)) for name in rule.receivers]
    return _walk(root, labels, base, "root")


def _timings(target: RouteTarget) -> tuple[tuple[str, ...], float, float, float]:
    return target.group_by, target.group_wait, target.group_interval, target.repeat_interval
