"""The worker's counters and its Prometheus `/metrics`: laggard's own health, read when Prometheus scrapes.

A collector reads the worker's plain counters (`Counters`), its InfluxDB sink, its
sample stages and its Faust consumer at scrape time, so the hot paths pay nothing for metrics.
Counters are totals since the worker started (Prometheus' `rate()` makes them per second);
`laggard_events_per_second` is Faust's own one-second sample of stream events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from faust.exceptions import ConsumerNotStarted
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    import faust

    from laggard.agents.sink import InfluxSink


@dataclass
class Counters:
    """The worker's totals since it started (its /stats, and /metrics below)."""

    accepted: int = 0
    rejected: int = 0
    late: int = 0
    late_in_part: int = 0  # batches taken in part: some of their ticks' windows had closed
    late_gpu_samples: int = 0  # the GPU samples of those ticks
    replayed: int = 0
    influx_rejected: int = 0  # points InfluxDB dropped
    influx_dead_letters: int = 0  # refused writes, one dead letter each
    windows_closed: int = 0
    findings: int = 0
    fleet_windows: int = 0
    notifications: int = 0
    notifications_failed: int = 0
    rules_reload_failures: int = 0
    notifications_deferred: int = 0  # not taken by the webhook after retries: tried again later
    silence_records_skipped: int = 0
    alert_tick_failures: int = 0  # alert ticks that raised (logged; the next tick tries again)
    stage_rejected: int = 0  # messages between stages that were not what the stage reads
    input_gaps: int = 0  # offset ranges Faust skipped around a rebalance: re-read, or sought back to
    template_render_failures: Counter[str] = field(default_factory=Counter)  # alert annotations, by rule


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    lag: int


def partition_lag(highwater: int | None, committed: int | None, last_read: int | None) -> int | None:
    """Messages of a partition this worker has not finished: the highwater (offset the next
    message will get) minus the committed offset (where a restart resumes); before the first
    commit, minus the offset after the last one read. None until the consumer has fetched."""
    done = committed if committed is not None else (last_read + 1 if last_read is not None else None)
    if highwater is None or done is None:
        return None
    return max(0, highwater - done)


def input_partitions(app: faust.App) -> list[Any]:
    """The agents' input partitions assigned to this worker (tables' changelogs left out: they
    are read only while recovering); none before the consumer has started."""
    try:
        assigned = app.consumer.assignment()
    except ConsumerNotStarted:
        return []
    changelogs = app.tables.changelog_topics
    return sorted(tp for tp in assigned if tp.topic not in changelogs)


def consumer_lags(app: faust.App, partitions: Iterable[Any],
                  taken: Mapping[tuple[str, int], int] | None = None) -> list[PartitionLag]:
    """Each partition's lag behind its highwater: from the committed offset, or where `taken`
    has the partition (topic, number), from that offset (the next one a stage expects)."""
    committed, read = app.monitor.tp_committed_offsets, app.monitor.tp_read_offsets
    lags = []
    for tp in partitions:
        try:
            highwater = app.consumer.highwater(tp)
        except AssertionError:  # revoked since assignment() (aiokafka runs in its own thread)
            continue
        next_offset = (taken or {}).get((tp.topic, tp.partition))
        lag = (partition_lag(highwater, next_offset, None) if next_offset is not None
               else partition_lag(highwater, committed.get(tp), read.get(tp)))
        if lag is not None:
            lags.append(PartitionLag(tp.topic, tp.partition, lag))
    return lags


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, label: str, values: dict[str, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def counter_families(counters: Counters, influx_points_written: int, influx_write_failures: int) -> list[Metric]:
    """The worker's totals as Prometheus counters (`_total` is added to each name)."""
    c = counters
    return [
        _labelled("laggard_node_samples", "Node sample messages taken from the samples topic, by outcome "
                  "(rejected and late ones are dead-lettered)", "outcome",
                  {"accepted": c.accepted, "rejected": c.rejected, "late": c.late}),
        _counter("laggard_late_gpu_samples", "GPU samples of a batch (schema 2) whose window had closed while "
                 "the rest was taken (the batch is dead-lettered too, with how many)", c.late_gpu_samples),
        _counter("laggard_samples_replayed", "Input messages re-read to rebuild open windows after a "
                 "restart or rebalance", c.replayed),
        _counter("laggard_input_gaps", "Times a stage found input offsets Faust never handed it (a race "
                 "around a rebalance) and re-read them from Kafka, or had Faust seek back to them", c.input_gaps),
        _counter("laggard_windows_closed", "Event-time windows closed (all GPUs of a partition)", c.windows_closed),
        _counter("laggard_fleet_windows", "Fleet KPI windows written", c.fleet_windows),
        _counter("laggard_findings", "Findings (state changes) published", c.findings),
        _labelled("laggard_notifications", "Chat/webhook notifications, by outcome (deferred = the webhook did "
                  "not take it after retries, tried again later; failed = refused for good, dead-lettered)", "outcome",
                  {"sent": c.notifications, "deferred": c.notifications_deferred, "failed": c.notifications_failed}),
        _labelled("laggard_dead_letters", "Records written to the dead-letter topic, by reason category",
                  "category", {"sample_rejected": c.rejected, "sample_late": c.late,
                               "sample_late_in_part": c.late_in_part,
                               "notification_failed": c.notifications_failed,
                               "influx_rejected": c.influx_dead_letters,
                               "stage_message_rejected": c.stage_rejected}),
        _counter("laggard_influx_points_written", "Points InfluxDB accepted", influx_points_written),
        _counter("laggard_influx_write_failures", "InfluxDB writes that failed and were retried",
                 influx_write_failures),
        _counter("laggard_influx_points_rejected", "Points InfluxDB refused and dropped (their "
                 "write is dead-lettered)", c.influx_rejected),
        _counter("laggard_rules_reload_failures", "Changed rules files refused (last good rules kept)",
                 c.rules_reload_failures),
        _counter("laggard_silence_records_skipped", "Records on the silences topic that are not silences (skipped)",
                 c.silence_records_skipped),
        _counter("laggard_alert_tick_failures", "Alert ticks that failed (logged; the next one tries again)",
                 c.alert_tick_failures),
        _labelled("laggard_template_render_failures", "Annotation templates that failed at send time (sent as "
                  "the raw template), by rule", "rule", dict(c.template_render_failures)),
    ]


def lag_family(lags: Iterable[PartitionLag]) -> GaugeMetricFamily:
    family = GaugeMetricFamily("laggard_consumer_lag", "Messages behind the partition's highwater "
                               "(highwater - committed offset)", labels=["topic", "partition"])
    for lag in lags:
        family.add_metric([lag.topic, str(lag.partition)], lag.lag)
    return family


class WorkerCollector(Collector):
    """Reads one worker's state at scrape time."""

    def __init__(self, app: faust.App, counters: Counters, sink: InfluxSink, gpus_tracked: Callable[[], int]) -> None:
        self.app, self.counters, self.sink, self.gpus_tracked = app, counters, sink, gpus_tracked

    def collect(self) -> Iterable[Metric]:
        yield from counter_families(self.counters, self.sink.points_written, self.sink.write_failures)
        partitions = input_partitions(self.app)
        assigned = GaugeMetricFamily("laggard_partitions_assigned", "Input partitions assigned to this worker",
                                     labels=["topic"])
        for topic, count in Counter(tp.topic for tp in partitions).items():
            assigned.add_metric([topic], count)
        yield assigned
        yield lag_family(consumer_lags(self.app, partitions))
        yield GaugeMetricFamily("laggard_gpus_tracked", "GPUs whose samples this worker holds state for",
                                value=self.gpus_tracked())
        yield GaugeMetricFamily("laggard_events_per_second", "Stream events per second, all agents "
                                "(Faust's monitor, sampled every second)", value=self.app.monitor.events_s)


def worker_registry(app: faust.App, counters: Counters, sink: InfluxSink,
                    gpus_tracked: Callable[[], int]) -> CollectorRegistry:
    """The worker's metrics plus the process' own (CPU seconds, resident memory, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(app, counters, sink, gpus_tracked))
    ProcessCollector(registry=registry)
    return registry


def metrics_page(web: Any, registry: CollectorRegistry) -> Any:
    """The Faust web response for `/metrics`: Prometheus' text format."""
    # In a header: aiohttp refuses a charset inside its content_type argument.
    return web.bytes(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
