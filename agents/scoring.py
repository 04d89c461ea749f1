"""Score findings against the simulator's ground truth: precision, recall, detection and clear latency.

Kinds are compared by family, because telemetry cannot tell some truths apart: a slow node shows
as straggling ranks on that node, and a job whose every rank was left idle looks like a stalled
job. A finding matches a truth when the family agrees, the cluster and job agree (where the truth
names a job), every rank/node/gpu the truth names agrees, and the finding's time (its window end)
lies in [truth start, truth end + `slack_windows` windows]. A straggler finding that names a peer
(a victim) matches nothing and counts as a false positive.

The baseline ("low utilization") has no kinds: each of its findings is matched against every
family's truths, and its precision for a family is the share of *all* its alerts that point at a
fault of that family, which is what an on-call engineer paged by it would experience.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from laggard.agents.detectors import DETECTORS
from laggard.events import FaultTruth
from laggard.results import Finding

SLACK_WINDOWS = 2


def families() -> dict[str, str]:
    """Finding kinds and truth kinds -> the family they are scored in (the detectors' registry)."""
    family_of = {}
    for detector in DETECTORS.values():
        family_of[detector.kind] = detector.eval_family
        family_of.update(dict.fromkeys(detector.truth_kinds, detector.eval_family))
    return family_of


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def matches(f: Finding, t: FaultTruth, window_s: float, slack_windows: int = SLACK_WINDOWS) -> bool:
    """Same cluster and job, every GPU identity the truth names, finding time inside the truth's span."""
    if f.cluster != t.cluster or (t.job is not None and f.job != t.job):
        return False
    if any(want is not None and got != want for want, got in ((t.rank, f.rank), (t.node, f.node), (t.gpu, f.gpu))):
        return False
    end = math.inf if t.end is None else t.end + slack_windows * window_s
    return t.start <= f.window_end <= end


def _latency_stats(prefix: str, seconds: list[float], window_s: float) -> dict[str, float | None]:
    return {
        f"{prefix}_s_p50": percentile(seconds, 0.5),
        f"{prefix}_s_p95": percentile(seconds, 0.95),
        f"{prefix}_windows_p50": None if not seconds else percentile(seconds, 0.5) / window_s,
        f"{prefix}_windows_p95": None if not seconds else percentile(seconds, 0.95) / window_s,
    }


def score_family(
    findings: Sequence[Finding], truths: Sequence[FaultTruth], window_s: float
) -> dict[str, float | int | None]:
    """Precision over `findings` (firing ones), recall over `truths`, latencies of the detected truths."""
    firing = [f for f in findings if f.state == "firing"]
    resolved = [f for f in findings if f.state == "resolved"]
    true_positives = sum(1 for f in firing if any(matches(f, t, window_s) for t in truths))
    detect_s, clear_s = [], []
    for t in truths:
        hits = [f for f in firing if matches(f, t, window_s)]
        if not hits:
            continue
        first = min(hits, key=lambda f: f.window_end)
        detect_s.append(max(0.0, first.window_end - t.start))
        if t.end is not None:
            prints = {f.fingerprint for f in hits}
            clears = [f.window_end for f in resolved if f.fingerprint in prints and f.window_end >= t.end]
            if clears:
                clear_s.append(min(clears) - t.end)
    return {
        "truths": len(truths),
        "findings": len(firing),
        "true_positives": true_positives,
        "detected": len(detect_s),
        "precision": true_positives / len(firing) if firing else None,
        "recall": len(detect_s) / len(truths) if truths else None,
        **_latency_stats("detect_latency", detect_s, window_s),
        **_latency_stats("clear_latency", clear_s, window_s),
    }


def score(
    laggard: Sequence[Finding], baseline: Sequence[Finding], truths: Sequence[FaultTruth], window_s: float
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """{"laggard": {family: metrics}, "baseline": {family: metrics}} over families with truths or findings."""
    family_of = families()
    if unclaimed := sorted({t.kind for t in truths} - family_of.keys()):
        raise ValueError(f"no detector is registered to find truths of kind {', '.join(unclaimed)}")
    all_families = list(dict.fromkeys(family_of.values()))
    truth_by = {fam: [t for t in truths if family_of[t.kind] == fam] for fam in all_families}
    found_by = {fam: [f for f in laggard if family_of.get(f.kind) == fam] for fam in all_families}
    scored = [fam for fam in all_families if truth_by[fam] or found_by[fam]]
    return {
        "laggard": {fam: score_family(found_by[fam], truth_by[fam], window_s) for fam in scored},
        "baseline": {fam: score_family(baseline, truth_by[fam], window_s) for fam in scored if truth_by[fam]},
    }


def straggler_cells(laggard: Sequence[Finding], baseline: Sequence[Finding], truths: Sequence[FaultTruth],
                    window_s: float) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Straggler recall and detection latency per cause x wait mode ("thermal/kernel": {...}), from
    the simulator's truth details: where laggard finds which kind of straggler, beside the
    baseline. Precision has no cell (a false finding has no cause); `score` gives it per family."""
    family_of = families()
    cells: dict[str, list[FaultTruth]] = {}
    for t in truths:
        if family_of.get(t.kind) == "straggler" and "cause" in t.detail:
            cells.setdefault(f"{t.detail['cause']}/{t.detail.get('wait', '?')}", []).append(t)
    keep = ("truths", "detected", "recall", "detect_latency_windows_p50")
    return {cell: {"laggard": {k: v for k, v in score_family(laggard, ts, window_s).items() if k in keep},
                   "baseline": {k: v for k, v in score_family(baseline, ts, window_s).items() if k in keep}}
            for cell, ts in sorted(cells.items())}
