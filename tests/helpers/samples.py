"""Valid NodeSample builders for tests."""

from __future__ import annotations

import time
from typing import Any

from laggard.batches import NodeBatch, decode_event
from laggard.events import GpuSample, NodeSample


def gpu(index: int = 0, **overrides: Any) -> GpuSample:
    values: dict[str, Any] = dict(
        index=index, uuid=f"GPU-test-{index}", model="H200", util_gpu=90.0, util_mem=30.0, power_w=600.0,
        power_limit_w=700.0, sm_clock_mhz=1830.0, mem_clock_mhz=3201.0, temp_c=55.0,
        mem_used_mib=60_000.0, mem_total_mib=143_771.0, clocks_event_reasons=0,
    )
    values.update(overrides)
    return GpuSample(**values)


def node_sample(node: str = "a01", gpus: int = 8, ts: float | None = None, **gpu_overrides: Any) -> NodeSample:
    return NodeSample(ts=ts if ts is not None else time.time(), cluster="test", node=node, source="test",
                      gpus=[gpu(i, **gpu_overrides) for i in range(gpus)])


def printed_samples(text: str) -> list[NodeSample]:
    """The samples in `--stdout` output: version-1 lines as they are, schema-2 batches taken apart."""
    out: list[NodeSample] = []
    for line in text.splitlines():
        if line.startswith("{"):
            event = decode_event(line)
            out += event.samples() if isinstance(event, NodeBatch) else [event]
    return out


def printed_batches(text: str) -> list[NodeBatch]:
    """The schema-2 batches in `--stdout` output (a version-1 line fails the test)."""
    events = [decode_event(line) for line in text.splitlines() if line.startswith("{")]
    assert all(isinstance(e, NodeBatch) for e in events), "a version-1 line where batches were expected"
    return events
