"""The worker's stages 1 and 2 in one process, without Kafka: recorded node samples in, findings
out (`laggard detect`). The same code as the worker's (agents/stages.py, the detectors' registry)
and the same stage-1 -> stage-2 messages, with one partition each: a recorded incident gives the
findings the worker gave, or would have given."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from laggard.agents.outputs import window_outputs
from laggard.agents.stages import DetectStage, SampleStage, parse_results
from laggard.agents.windows import ClosedWindow
from laggard.results import Finding


@dataclass
class OfflineCounts:
    accepted: int = 0
    rejected: int = 0
    late: int = 0
    reasons: list[str] = field(default_factory=list)  # the first few rejects' reasons, with their line


def detect_offline(messages: Iterable[bytes], window_s: float, grace_s: float,
                   counts: OfflineCounts | None = None) -> Iterator[Finding]:
    """Findings (firing and resolved, in window order) for node-sample messages in the order they
    were recorded. Bad and late messages are counted in `counts`, never fatal; the input's end
    closes every window still open."""
    counts = counts if counts is not None else OfflineCounts()
    samples = SampleStage(window_s, grace_s)
    detect = DetectStage(window_s, hold_s=0.0, parts=1)
    emitted = 0  # stage-2 offsets: each results batch and marker is one message, as on the topic

    def judge(windows: list[ClosedWindow]) -> Iterator[Finding]:
        nonlocal emitted
        for closed in windows:
            out = window_outputs(closed, 0)
            for _key, value in out.to_detect:
                detect.add(parse_results(value), emitted)
                emitted += 1
            yield from detect.mark(0, closed.window_end, emitted)
            emitted += 1

    for offset, raw in enumerate(messages):
        outcome = samples.add(raw, offset)
        if outcome.rejected is not None or outcome.late:
            counts.rejected += outcome.rejected is not None
            counts.late += outcome.late
            if len(counts.reasons) < 10:
                reason = outcome.rejected.reason if outcome.rejected else "late: older than its window allows"
                counts.reasons.append(f"message {offset + 1}: {reason}")
            continue
        counts.accepted += 1
        yield from judge(samples.closed())
    yield from judge(samples.close_idle(0.0))
    yield from detect.flush()
