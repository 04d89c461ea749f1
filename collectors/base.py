"""What every collector source shares: the source contract, reject counting and a fixed-rate clock.

A source is one file (Telegraf-style): a subclass of `Source` whose `ticks()` yields one
`list[NodeSample]` per tick (one NodeSample per node, every GPU of that node inside). A source
never talks to Kafka; `laggard.collectors.cli` drives any source into stdout or the publisher.

Bad raw values are not fatal: `Rejects.validate` turns a pydantic ValidationError into one log
line naming the source, node, field and value, counts it by category and returns None, so the
caller skips that GPU (or node) and goes on.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from laggard.events import GpuSample, NodeSample, describe_validation_error

log = logging.getLogger("laggard.collectors")

Tick = list[NodeSample]
M = TypeVar("M", bound=BaseModel)

# Log every reject of a category until this many, then one line per LOG_EVERY (a broken GPU
# would otherwise write a line per tick forever); the counter keeps counting all of them.
LOG_FIRST = 10
LOG_EVERY = 100

_FAMILY = re.compile(r"[A-Z]{1,2}\d{2,3}[A-Z]?")

def stdout_to_devnull() -> None:
    """The reader of stdout is gone (`--stdout | head`): later writes and the flush at exit go
    nowhere instead of raising BrokenPipeError."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Rejects:
    """Counts rejected input by category ('power_w:greater_than_equal', 'scrape_failed', ...)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.by_category: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_category.values())

    def count(self, category: str, where: str, detail: str) -> None:
        """Count one reject and log it: '<source> rejected <where>: <detail>'."""
        self.by_category[category] += 1
        seen = self.by_category[category]
        if seen <= LOG_FIRST or seen % LOG_EVERY == 0:
            log.warning("%s rejected %s: %s (%s #%d)", self.source, where, detail, category, seen)

    def validate(self, model: type[M], raw: dict[str, Any], where: str) -> M | None:
        """`model` built from `raw`, or None after counting and logging why not."""
        try:
            return model.model_validate(raw)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            field = str(first["loc"][-1]) if first["loc"] else "<message>"
            self.count(f"{field}:{first['type']}", where, describe_validation_error(err))
            return None


def build_node_sample(
    rejects: Rejects, *, ts: float, cluster: str, node: str, gpus: Iterable[dict[str, Any]]
) -> NodeSample | None:
    """One NodeSample from raw per-GPU field dicts; bad GPUs are skipped, a node with none left is skipped."""
    valid: list[GpuSample] = []
    for raw in gpus:
        what = f"node {node} gpu {raw.get('index', '?')}"
        if raw.get("mig_instance") is not None:
            what += f" mig {raw['mig_instance']}"
        if (gpu := rejects.validate(GpuSample, raw, what)) is not None:
            valid.append(gpu)
    if not valid:
        return None
    node_raw = {"ts": ts, "cluster": cluster, "node": node, "source": rejects.source, "gpus": valid}
    return rejects.validate(NodeSample, node_raw, f"node {node}")


def short_model(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100', 'NVIDIA GB200' -> 'GB200'; unknown names stay readable.

    A family name is one or two capitals and two or three digits, maybe a letter (H100, A10G, L40S);
    anything else ('NVIDIA RTX A6000') keeps its full name without the vendor prefix.
    """
    bare = name.strip()
    for prefix in ("NVIDIA ", "Tesla "):
        bare = bare.removeprefix(prefix)
    first = bare.replace("-", " ").split(" ")[0]
    if _FAMILY.fullmatch(first):
        return first
    return (bare or "unknown")[:64]


class Clock(Protocol):
    """Monotonic time plus an interruptible wait; tests inject a fake one."""

    def monotonic(self) -> float: ...

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when asked to stop (the caller then ends)."""
        ...


class SystemClock:
    """The real clock. `stop` ends every wait at once (signal handlers and --duration set it)."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, seconds: float) -> bool:
        # Event.wait raises OverflowError beyond TIMEOUT_MAX (~292 years); sleep_until loops on.
        return self.stop.wait(min(max(0.0, seconds), threading.TIMEOUT_MAX))


def sleep_until(clock: Clock, deadline: float) -> bool:
    """Wait until monotonic `deadline`; True if asked to stop first (or already)."""
    while (left := deadline - clock.monotonic()) > 0:
        if clock.wait(left):
            return True
    return clock.wait(0)  # a stop asked for while the previous tick was working


class FixedRateScheduler:
    """Tick k is due at start + k * interval: the schedule never drifts with the work done per tick.

    When a tick's work overruns, the deadlines already passed are skipped (and counted in
    `missed`) and the latest one runs at once, so a slow tick never causes a burst of catch-up ticks.
    """

    def __init__(self, interval_s: float, clock: Clock) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval_s!r}")
        self.interval_s = interval_s
        self.clock = clock
        self.missed = 0

    def __iter__(self) -> Iterator[int]:
        """Yields the tick number k at each deadline until the clock says stop."""
        start = self.clock.monotonic()
        k = 0
        while not sleep_until(self.clock, start + k * self.interval_s):
            yield k
            latest_due = math.floor((self.clock.monotonic() - start) / self.interval_s)
            if latest_due > k + 1:
                self.missed += latest_due - k - 1
                k = latest_due
            else:
                k += 1


class Source(ABC):
    """One place telemetry comes from. Subclasses set `name` and implement `ticks()`."""

    name: str = "source"

    def __init__(self) -> None:
        self.rejects = Rejects(self.name)

    @property
    def missed_ticks(self) -> int:
        """Ticks skipped because the previous one overran (fixed-rate sources)."""
        return 0

    @abstractmethod
    def ticks(self) -> Iterator[Tick]:
        """One list of NodeSamples per tick, until the source ends or its clock says stop."""
