"""Scale-out: N laggard workers in one consumer group, through the real broker.

1. Throughput, for each N in --workers: a fault-free fleet's messages (event time an hour ago)
   are on the samples topic before the N workers start. The timed span runs from the first poll
   at which every worker has input partitions and the group has all of them (Faust's start-up and
   rebalances not counted) to the poll that sees every message taken; GPU-samples/s = GPU samples
   taken in the span / its length. Memory: each worker's VmRSS (/proc/<pid>/status) before it has
   taken anything and at the end, against its `laggard_gpus_tracked` (/metrics); its share of the
   messages taken.
2. Latency under load, on the largest N's workers: the same fleet with a straggler in each job,
   published paced in event time at --load of the throughput just measured (speed-up K = that
   rate / fleet GPUs; event time runs K times faster than wall time). Each tick is flushed
   (acknowledged) and its wall time kept. A finding's latency = its record's Kafka timestamp
   (when the worker published it) - the wall time at which the last tick inside its triggering
   window (window_end) was acknowledged. It includes the watermark grace (LATE_GRACE_S / K wall
   seconds), the wait for every partition's window marker and the detector's work.

The last line is one JSON object.

    python bench/scale.py [--workers 1 2] [--messages 12000] [--load 0.6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from laggard.agents.scoring import percentile
from laggard.batches import gpu_sample_count
from laggard.collectors.publisher import Publisher
from laggard.collectors.simulate import FleetSimulator
from laggard.collectors.simulate.scenario import Scenario
from laggard.commands.pipeline_run import PipelineError, PipelineRun, messages_taken
from laggard.results import Finding
from laggard.settings import Settings, get_settings
from laggard.topics import read_records

POLL_S = 0.2
JOBS = 24  # of 4 nodes x 8 H100s: 768 GPUs, one straggler per job in the latency phase
NODES_PER_JOB = 4
LIVE_DURATION_S = 120.0  # event time of the latency phase


def bench_fleet(with_stragglers: bool, duration_s: float = LIVE_DURATION_S) -> Scenario:
    """JOBS training jobs; stragglers start at staggered times and end, so each fires and resolves."""
    jobs = [{"name": f"job-{j:02d}", "nodes": [{"group": "h100-", "first": j * NODES_PER_JOB, "count": NODES_PER_JOB}],
             "step_s": 1.0} for j in range(JOBS)]
    faults = [{"kind": "straggler", "job": f"job-{j:02d}", "rank": 5 + j % 20, "cause": "thermal", "clock_mhz": 1100,
               "start_s": 10 + (j % 4) * 10, "end_s": 60 + (j % 4) * 10} for j in range(JOBS)] if with_stragglers else []
    return Scenario.model_validate({
        "name": "scale", "seed": 3, "duration_s": duration_s, "tick_s": 1.0, "cluster": "sim-scale",
        "nodes": [{"prefix": "h100-", "count": JOBS * NODES_PER_JOB, "model": "H100"}], "jobs": jobs, "faults": faults,
    })


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scrape(run: PipelineRun) -> dict[str, float]:
    """A worker's /metrics as {name{label=value,...}: value} ({} while it is not answering)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{run.settings.worker_web_port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return {}
    return {sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric(metrics: dict[str, float], name: str, **labels: str) -> float:
    return metrics.get(name + json.dumps(labels, sort_keys=True), 0.0)


def start_group(base: Settings, count: int, tmp: Path, group: contextlib.ExitStack) -> list[PipelineRun]:
    """`count` workers in one consumer group: the first run owns the topics, the others join it.
    Leaving `group` stops them all."""
    first = group.enter_context(PipelineRun(base, prefix="scale", state_root=tmp))
    runs = [first] + [group.enter_context(first.member()) for _ in range(count - 1)]
    for run in runs:
        run.start_worker()
    return runs


def group_ready(runs: list[PipelineRun], partitions: int) -> bool:
    """Every worker holds samples partitions and together they hold all of them."""
    topic = runs[0].settings.topic_samples
    held = [metric(scrape(run), "laggard_partitions_assigned", topic=topic) for run in runs]
    return min(held) > 0 and sum(held) == partitions


def throughput(base: Settings, count: int, messages: int, tmp: Path,
               group: contextlib.ExitStack) -> tuple[dict, list[PipelineRun]]:
    runs = start_group(base, count, tmp, group)
    first = runs[0]
    duration_s = math.ceil(messages / (JOBS * NODES_PER_JOB))
    sim = FleetSimulator(bench_fleet(with_stragglers=False, duration_s=duration_s), start_ts=time.time() - 3600 - duration_s)
    published = gpu_samples = 0
    with Publisher(first.settings) as publisher:
        for _ts, batch in sim.encoded_ticks():
            for key, value in batch:
                publisher.publish_raw(key, value)
                published += 1
                gpu_samples += gpu_sample_count(value)
            if published >= messages:
                break
    idle_rss = {}
    deadline = time.monotonic() + 180
    start: tuple[float, int] | None = None
    while True:
        stats = [run.stats() for run in runs]
        for run, s in zip(runs, stats):
            if s and messages_taken(s) == 0 and run.worker.pid not in idle_rss:
                idle_rss[run.worker.pid] = rss_mib(run.worker.pid)
        done, now = sum(messages_taken(s) for s in stats), time.perf_counter()
        if start is None and group_ready(runs, base.topic_partitions):
            start = (now, done)
        if done >= published:
            break
        if time.monotonic() > deadline:
            workers = "\n".join(run.describe() for run in runs)
            raise PipelineError(f"{count} worker(s) took {done:,} of {published:,} messages in 180 s\n{workers}")
        time.sleep(POLL_S)
    if start is None or done - start[1] < published / 4:
        raise PipelineError(f"the group of {count} became ready too late to time ({start}); raise --messages")
    seconds = now - start[0]
    gpus_per_message = gpu_samples / published
    memory = []
    for run, s in zip(runs, stats):
        pid = run.worker.pid
        memory.append({"share": round(messages_taken(s) / done, 3),
                       "rss_mib_idle": round(idle_rss.get(pid, float("nan")), 1),
                       "rss_mib": round(rss_mib(pid), 1),
                       "gpus_tracked": int(metric(scrape(run), "laggard_gpus_tracked"))})
    result = {"workers": count, "gpu_samples_per_s": round((done - start[1]) * gpus_per_message / seconds),
              "messages_timed": done - start[1], "seconds": round(seconds, 2), "memory": memory}
    return result, runs


def latency(runs: list[PipelineRun], gpu_rate: float) -> dict:
    """Publish the straggler fleet paced at `gpu_rate` GPU-samples/s; latency of each finding."""
    first = runs[0]
    spec = bench_fleet(with_stragglers=True)
    gpus = FleetSimulator(spec).gpu_count
    speed = max(1.0, gpu_rate / gpus)
    wall_s = spec.duration_s / speed
    start_ts = time.time() - spec.duration_s + wall_s  # the last tick's event time is about now
    sim = FleetSimulator(spec, start_ts=start_ts)
    acked: dict[float, float] = {}  # tick event time -> wall time it was acknowledged
    began = time.time()
    with Publisher(first.settings) as publisher:
        for ts, batch in sim.encoded_ticks():
            time.sleep(max(0.0, began + (ts - start_ts) / speed - time.time()))
            for key, value in batch:
                publisher.publish_raw(key, value)
            publisher.flush()
            acked[ts] = time.time()
    behind = max(acked[ts] - (began + (ts - start_ts) / speed) for ts in acked)
    deadline = time.monotonic() + 60 + first.settings.window_hold_s
    expected = 2 * len(spec.faults)  # firing and resolved for each straggler
    findings: list[tuple[Finding, float]] = []
    while time.monotonic() < deadline:
        records = read_records(first.settings, first.settings.topic_findings)
        findings = [(f, r.timestamp / 1000) for r in records
                    if (f := Finding.model_validate_json(r.value)).kind == "straggler" and f.window_start >= start_ts]
        if len({f.idempotency_key for f, _ in findings}) >= expected:
            break
        time.sleep(1.0)
    latencies = {}
    for finding, published_at in findings:
        last_tick = max(ts for ts in acked if ts < finding.window_end)
        latencies.setdefault(finding.idempotency_key, published_at - acked[last_tick])
    values = list(latencies.values())
    if not values:
        raise PipelineError(f"no straggler findings within the deadline; worker log {first.log_path}")
    return {"workers": len(runs), "load_gpu_samples_per_s": round(gpus * speed), "speed_up": round(speed, 2),
            "findings": len(values), "findings_expected": expected,
            "latency_s_p50": round(statistics.median(values), 2), "latency_s_p99": round(percentile(values, 0.99), 2),
            "latency_s_max": round(max(values), 2), "publisher_max_behind_s": round(behind, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--load", type=float, default=0.6, help="latency phase load, share of measured throughput")
    args = parser.parse_args()
    base = get_settings()
    scaling: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="laggard-scale-") as tmp:
        for count in args.workers:
            with contextlib.ExitStack() as group:  # stops this group's workers, also on failure
                result, runs = throughput(base, count, args.messages, Path(tmp), group)
                print(f"{count} worker(s): {result}", file=sys.stderr)
                scaling.append(result)
                if count == args.workers[-1]:
                    under_load = latency(runs, args.load * scaling[-1]["gpu_samples_per_s"])
                    print(f"latency: {under_load}", file=sys.stderr)
    one = scaling[0]["gpu_samples_per_s"]
    best = scaling[-1]
    print(json.dumps({
        "scaling": [{k: r[k] for k in ("workers", "gpu_samples_per_s", "messages_timed", "seconds")} for r in scaling],
        "efficiency": round(best["gpu_samples_per_s"] / (best["workers"] * one), 2),
        "memory": [{"workers": r["workers"], "per_worker": r["memory"]} for r in scaling],
        "latency": under_load,
    }))


if __name__ == "__main__":
    main()
