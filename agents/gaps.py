"""Messages Faust never delivers, and how a stage notices them.

faust-streaming (0.15, on aiokafka 0.14) drops messages in races around a rebalance or a table
recovery: fetched, then cleared from its buffers with no seek back. A stage that knows the next
offset it expects sees the hole when a later message arrives; when none does (the partition's last
messages were dropped, or the ones below what the stage had from its checkpoint), nothing moves
on the partition while it has input left, for the stage or for the group's commit (`StallWatch`;
Faust also records a refused commit as done, with the same effect). The first case re-reads the
hole from Kafka (agents/worker.py, `deliver`); the second seeks Faust back to the group's commits
(`unstick`).
"""

from __future__ import annotations

import time
from typing import Any, Hashable

from faust.types import TP, Message


def acknowledge(consumer: Any, topic: str, partition: int, start: int, end: int) -> None:
    """Acknowledge offsets [start, end) to Faust's consumer as if it had delivered them. Faust
    commits only up to its first unacknowledged offset, so a hole it never delivered would hold
    its commit back for good (a restart would re-read from there; the group's lag would never
    drain). Acknowledging an offset twice (Faust delivers it after all) counts it once."""
    tp = TP(topic, partition)
    for offset in range(start, end):
        consumer.ack(Message(topic, partition, offset, 0.0, 0, None, None, None, None, tp=tp))


class StallWatch:
    """Since when each partition's progress (offsets: what its stage expects, what the consumer
    read and committed) has stayed the same; `stalled` says whether it has for `after_s`."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._since: dict[Hashable, tuple[Hashable, float]] = {}

    def stalled(self, key: Hashable, progress: Hashable, now: float | None = None) -> bool:
        """Call it every tick for every partition. True once `progress` has not changed for
        `after_s`; then counting starts again, so a remedy gets `after_s` to work."""
        now = time.monotonic() if now is None else now
        seen = self._since.get(key)
        if seen is None or seen[0] != progress or now - seen[1] >= self.after_s:
            self._since[key] = (progress, now)
            return seen is not None and seen[0] == progress
        return False

    def forget(self) -> None:
        """Nothing moves while the worker is held up (a rebalance, a write waiting on InfluxDB):
        start counting again once it is not."""
        self._since.clear()
