"""Bookkeeping for the fault-injection suite (tests/test_faults.py): what went in, what came out,
and how long the pipeline took to recover, as plain functions; plus the Kafka and InfluxDB reads
the tests count with."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CoordinatorNotAvailableError

from laggard.agents.sink import InfluxSink
from laggard.agents.stages import MARKER_PREFIX, parse_results
from laggard.agents.windows import Windower
from laggard.collectors.publisher import default_partition
from laggard.collectors.simulate import FleetSimulator, load_scenario
from laggard.kafka_config import client_config
from laggard.settings import Settings
from laggard.topics import committed_offsets, read_topic


@dataclass(frozen=True)
class Delivery:
    """Identities that went in against identities that came out."""

    events_in: int
    results_out: int  # distinct identities that came out
    lost: int  # went in (and were accepted) but never came out
    duplicated: int  # came out more than once
    unexpected: int  # came out but never went in


def delivery(accepted: Iterable[Any], delivered: Iterable[Any]) -> Delivery:
    """Compare accepted identities with delivered ones (a delivered identity may repeat)."""
    accepted_set = set(accepted)
    counts = Counter(delivered)
    return Delivery(
        events_in=len(accepted_set), results_out=len(counts),
        lost=len(accepted_set - counts.keys()), duplicated=sum(n - 1 for n in counts.values()),
        unexpected=len(counts.keys() - accepted_set),
    )


def summary_line(fault: str, events_in: int, results_out: int, lost: int, duplicated: int,
                 recover_s: float | None) -> str:
    """One row of the fault table, printed by each test (run pytest with -s to see them)."""
    recovered = "n/a" if recover_s is None else f"{recover_s:.1f} s"
    return (f"FAULT | {fault} | events in {events_in} | results out {results_out} | lost {lost} | "
            f"duplicated {duplicated} | time to recover {recovered}")


def scenario_for_run(scenario: Path | str, run_id: str, folder: Path) -> Path:
    """A copy of `scenario` whose fleet is named after the run, so that counting a cluster's points
    in the shared InfluxDB never counts another run's (runs close together overlap in event time)."""
    spec = yaml.safe_load(Path(scenario).read_text())
    spec["cluster"] = run_id
    path = folder / f"{run_id}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def expected_gpu_windows(settings: Settings, scenario: Path | str, start_ts: float) -> int:
    """GPU windows a scenario stamped from `start_ts` yields, computed in-process with the worker's Windower."""
    sim = FleetSimulator(load_scenario(Path(scenario)), start_ts=start_ts)
    windower = Windower(settings.window_s, settings.late_grace_s)
    expected = 0
    for tick in sim.ticks():
        for sample in tick:
            windower.add(sample)
        expected += sum(len(w.series) for w in windower.pop_closed())
    return expected + sum(len(w.series) for w in windower.flush())


def missing_gpu_windows(settings: Settings, scenario: Path | str, start_ts: float) -> Counter[tuple[int, float]]:
    """GPU windows the scenario yields that are not in InfluxDB, counted by (samples partition,
    window start relative to `start_ts`): where a loss happened, for a failing test to say."""
    spec = load_scenario(Path(scenario))
    windower = Windower(settings.window_s, settings.late_grace_s)
    expected: set[tuple[str, int, float]] = set()
    for tick in FleetSimulator(spec, start_ts=start_ts).ticks():
        for sample in tick:
            windower.add(sample)
        expected |= {(node, gpu, w.window_start) for w in windower.pop_closed() for (_c, node, gpu, *_rest) in w.series}
    expected |= {(node, gpu, w.window_start) for w in windower.flush() for (_c, node, gpu, *_rest) in w.series}
    sink = InfluxSink(settings)
    try:
        rows = sink.query(f'SELECT "samples", "node", "gpu" FROM "gpu_window" WHERE "cluster" = \'{spec.cluster}\' '
                          f'AND time >= {int(start_ts) - 20}s AND time <= {int(start_ts + spec.duration_s) + 20}s')
    finally:
        sink.close()
    found = {(row["node"], int(row["gpu"]), float(row["time"])) for row in rows}
    return Counter((default_partition(node.encode(), settings.topic_partitions), round(start - start_ts, 1))
                   for node, gpu, start in expected - found)


def _aggregate(settings: Settings, function: str, measurement: str, field_name: str, where: str) -> int:
    sink = InfluxSink(settings)
    try:
        rows = sink.query(f'SELECT {function}("{field_name}") FROM "{measurement}" WHERE {where}')
    finally:
        sink.close()
    return int(rows[0][function]) if rows else 0


def influx_count(settings: Settings, measurement: str, where: str) -> int:
    """Points of `measurement` matching the InfluxQL condition `where` (0 when there are none)."""
    return _aggregate(settings, "count", measurement, "samples", where)


def influx_sum(settings: Settings, measurement: str, field_name: str, where: str) -> int:
    """Sum of a numeric field over the points matching `where` (0 when there are none)."""
    return _aggregate(settings, "sum", measurement, field_name, where)


def gpu_windows_in_influx(settings: Settings, cluster: str, start_ts: float, duration_s: float) -> int:
    """gpu_window points of one cluster around a run's event time (a series and time is one point:
    a repeated write overwrites, so this counts distinct windows)."""
    return influx_count(settings, "gpu_window", f"\"cluster\" = '{cluster}' AND time >= {int(start_ts) - 20}s "
                                                f"AND time <= {int(start_ts + duration_s) + 20}s")


def window_result_ids(settings: Settings) -> list[str]:
    """Ids of every GPU window result on the run's stage-1 -> stage-2 topic, repeats included."""
    return [result.id for value in read_topic(settings, settings.topic_windows)
            if not value.startswith(MARKER_PREFIX) for result in parse_results(value)]


def produce(settings: Settings, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    """Write raw records (key, value) to `topic`, as anything else on the cluster could, each acknowledged."""
    producer = KafkaProducer(**client_config(settings), acks="all")
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close()


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(**client_config(settings))
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        return {tp.partition: offset for tp, offset in consumer.end_offsets(partitions).items()}
    finally:
        consumer.close()


def group_members(settings: Settings, group: str) -> int:
    """Members of a consumer group that is stable (0 while it rebalances, does not exist, or its
    coordinator is not available yet: a fresh broker is still loading its offsets topic)."""
    admin = KafkaAdminClient(**client_config(settings))
    try:
        group_info = admin.describe_groups([group]).get(group, {})
    except CoordinatorNotAvailableError:
        return 0
    finally:
        admin.close()
    return len(group_info.get("members", [])) if group_info.get("group_state") == "Stable" else 0


def worker_stats(port: int) -> dict[str, Any]:
    """A worker's /stats, or {} while it does not answer."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/stats", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}


def commit_progress(settings: Settings, group: str, topic: str) -> dict[int, tuple[int, int]]:
    """Each partition of `topic`: (`group`'s committed offset, end offset)."""
    end, committed = end_offsets(settings, topic), committed_offsets(settings, group, topic)
    return {p: (committed[p], end[p]) for p in sorted(end)}


def uncommitted(settings: Settings, group: str) -> int:
    """Messages of the samples topic that `group` has not committed yet."""
    return sum(end - committed for committed, end in commit_progress(settings, group, settings.topic_samples).values())


def commit_report(settings: Settings, group: str) -> str:
    """For a failure message: per input topic, each partition's committed/end offsets."""
    return "\n".join(f"{topic}: " + " ".join(f"{p}:{c}/{e}" for p, (c, e) in commit_progress(settings, group, topic).items())
                     for topic in (settings.topic_samples, settings.topic_windows, settings.topic_fleet))
