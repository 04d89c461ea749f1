"""Simulator + publisher throughput into the real broker, on one core.

Runs the fleet simulator's fast path (`encoded_ticks`) straight into the shared Publisher for a
fixed number of messages per producer configuration, waits for every acknowledgement, and prints
GPU-samples/s for each. The last line is one JSON object: the best configuration's figures first.

    python bench/collectors.py [--scenario collectors/scenarios/all_faults.yaml] [--messages 30000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `collectors` package: put the repository root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from collectors.publisher import DEFAULT_PRODUCER_CONFIG, Publisher
from collectors.simulate import FleetSimulator, load_scenario
from laggard.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "default (lz4, linger 50 ms, 512 KiB)": {},
    "no compression": {"compression_type": None},
    "gzip": {"compression_type": "gzip"},
    "lz4, linger 5 ms, 64 KiB": {"linger_ms": 5, "batch_size": 64 * 1024},
}


def run(scenario: Path, messages: int, overrides: dict) -> dict:
    settings = get_settings()
    sim = FleetSimulator(load_scenario(scenario), start_ts=time.time() - 3600)
    topic = f"bench.collectors.{uuid.uuid4().hex[:8]}"
    sent = samples = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    with Publisher(settings, topic=topic, **overrides) as pub:
        for _ts, batch in sim.encoded_ticks():
            for key, value in batch:
                pub.publish_raw(key, value)
                samples += value.count(b'"index"')
            sent += len(batch)
            if sent >= messages:
                break
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert pub.stats.acked == sent and pub.stats.failed == 0, pub.stats.as_dict()
    return {
        "gpu_samples_per_s": round(samples / wall),
        "messages_per_s": round(sent / wall),
        "gpu_samples": samples,
        "messages": sent,
        "mb_per_s": round(pub.stats.bytes / wall / 1e6, 1),
        "cpu_per_wall": round(cpu / wall, 2),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=ROOT / "collectors/scenarios/all_faults.yaml")
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--only-default", action="store_true")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the issue asks
    results = {}
    for name, overrides in CONFIGS.items():
        results[name] = run(args.scenario, args.messages, overrides)
        print(f"{name:40s} {results[name]['gpu_samples_per_s']:>9,} GPU-samples/s  "
              f"{results[name]['messages_per_s']:>7,} msg/s  {results[name]['mb_per_s']} MB/s", flush=True)
        if args.only_default:
            break
    best = max(results, key=lambda n: results[n]["gpu_samples_per_s"])
    print(json.dumps({**results[best], "config": best, "producer": {**DEFAULT_PRODUCER_CONFIG, **CONFIGS[best]},
                      "all": results}))


if __name__ == "__main__":
    main()
