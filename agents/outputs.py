"""What stage 1 sends for one closed window, as plain data: agents/worker.py sends it, tests and
bench/agents.py call it without Kafka."""

from __future__ import annotations

from dataclasses import dataclass

from laggard.agents.points import window_line
from laggard.agents.stages import FleetPartial, WindowMarker, results_json
from laggard.agents.windows import ClosedWindow
from laggard.results import WindowResult, detect_key


@dataclass
class WindowOutputs:
    lines: list[str]  # GPU and node window points for InfluxDB
    to_detect: list[tuple[bytes, bytes]]  # (job or node key, JSON list of its GPU results) for stage 2
    marker: bytes  # "this partition closed the window", for every stage-2 partition
    fleet: list[tuple[bytes, bytes]]  # (cluster key, this partition's share of the cluster result) for stage 3


def window_outputs(closed: ClosedWindow, partition: int) -> WindowOutputs:
    gpu_results = closed.gpu_results()
    rollups = closed.rollup_results()
    # One stage-2 message per job (or unallocated node) and window: all its ranks from this partition.
    by_key: dict[str, list[WindowResult]] = {}
    for result in gpu_results:
        by_key.setdefault(detect_key(result), []).append(result)
    return WindowOutputs(
        lines=[window_line(r) for r in gpu_results] + [window_line(r) for r in rollups if r.scope == "node"],
        to_detect=[(key.encode(), results_json(results)) for key, results in by_key.items()],
        marker=WindowMarker(part=partition, closed_before=closed.window_end).model_dump_json().encode(),
        fleet=[(r.labels.cluster.encode(), FleetPartial(part=partition, result=r).model_dump_json().encode())
               for r in rollups if r.scope == "cluster"],
    )
