"""A node's samples gathered over a flush interval into schema-2 batches (laggard/batches.py).

Telegraf's convention: a source is read every `interval` (its tick) and what it read goes out
every `flush_interval`. Here the flush is aligned to multiples of the flush interval in event
time (by default the workers' window), so a node's batch holds the ticks of one window and says
so in `until`, and a worker can close the window as soon as every node's batch is in.

A batch goes out early when a GPU's labels change (a job starts or ends: a series has one set of
labels per batch) or when it holds `max_samples` GPU samples (message size). What is still held
goes out when the source stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from laggard.batches import MAX_BATCH_TICKS, NodeBatch, batch_of, flush_period_end, series_labels
from laggard.events import NodeSample

# ~100 bytes of JSON a GPU sample: a batch stays well under the topic's message size limit.
MAX_BATCH_SAMPLES = 4096


@dataclass
class _Held:
    samples: list[NodeSample] = field(default_factory=list)
    labels: dict[tuple[int, int | None], tuple] = field(default_factory=dict)  # per GPU, for the batch
    gpu_samples: int = 0

    def fits(self, sample: NodeSample, max_samples: int) -> bool:
        """Whether `sample` can join: later than the last, same labels per GPU, room left."""
        return (sample.ts > self.samples[-1].ts and len(self.samples) < MAX_BATCH_TICKS
                and self.gpu_samples + len(sample.gpus) <= max_samples
                and all(self.labels.get((g.index, g.mig_instance), labels) == labels
                        for g in sample.gpus for labels in (series_labels(g),)))

    def take(self, sample: NodeSample) -> None:
        self.samples.append(sample)
        self.gpu_samples += len(sample.gpus)
        for g in sample.gpus:
            self.labels.setdefault((g.index, g.mig_instance), series_labels(g))


class Batcher:
    """Per node, the samples since its last flush; `add` returns the batches a tick completes."""

    def __init__(self, flush_s: float, max_samples: int = MAX_BATCH_SAMPLES) -> None:
        if not flush_s > 0:
            raise ValueError(f"flush interval must be > 0 seconds, got {flush_s!r}")
        self.flush_s = flush_s
        self.max_samples = max_samples
        self._held: dict[tuple[str, str], _Held] = {}

    def add(self, tick: list[NodeSample]) -> list[NodeBatch]:
        out = []
        for sample in tick:
            node = (sample.cluster, sample.node)
            held = self._held.get(node)
            if held is not None:
                end = flush_period_end(held.samples[-1].ts, self.flush_s)
                if sample.ts >= end:  # the flush interval is over: the node reported up to its end
                    out.append(batch_of(held.samples, until=end))
                    held = None
                elif not held.fits(sample, self.max_samples):
                    out.append(batch_of(held.samples))
                    held = None
            if held is None:
                held = self._held[node] = _Held()
            held.take(sample)
        return out

    def flush(self) -> list[NodeBatch]:
        """Everything still held (the source stopped): until their last tick, no promise beyond it."""
        out = [batch_of(held.samples) for held in self._held.values()]
        self._held.clear()
        return out
