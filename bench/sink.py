"""GPU-window points per second into the local InfluxDB through the real InfluxSink.

Each run writes --points `gpu_window` lines (agents.points.window_line, as the worker does) for a
fleet of --gpus GPUs, window after window, in batches of --batch lines (the worker writes one batch
per closed window per partition), into a cluster tag of its own so the data never mixes with a
real run. Encoding (window_line) and writing (HTTP /write, until InfluxDB answered 204) are timed
separately. Each batch size runs --repeats times, interleaved; the median run is reported. The
last line is one JSON object.

    python bench/sink.py [--points 50000] [--gpus 1000] [--batch 1000 5000 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `sink` import below; the repository root goes there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from laggard.agents.points import window_line  # noqa: E402
from laggard.agents.sink import InfluxSink  # noqa: E402
from laggard.results import Labels, WindowResult  # noqa: E402
from laggard.settings import get_settings  # noqa: E402

WINDOW_S = 10.0


def window_results(cluster: str, gpus: int, points: int, t0: float) -> list[WindowResult]:
    """`points` GPU window results: `gpus` GPUs (8 a node, one 64-rank job per 8 nodes) per window."""
    out = []
    for i in range(points):
        window, g = divmod(i, gpus)
        util = 40.0 + (i * 37 % 60)
        out.append(WindowResult(
            scope="gpu", key=f"{cluster}/n{g // 8}/{g % 8}", window_start=t0 + window * WINDOW_S, window_s=WINDOW_S,
            labels=Labels(cluster=cluster, node=f"n{g // 8:04d}", gpu=g % 8, job=f"job{g // 64}", rank=g % 64,
                          model="H200"),
            samples=10, gpus=1, allocated_gpus=1, idle_allocated_gpus=0, util_mean=util, util_min=util - 5,
            util_max=util + 5, util_p50=util, util_p95=util + 4, effective_util=util / 105, power_w_mean=300 + util * 4,
            idle_power_w=120.0, energy_wh=(300 + util * 4) * WINDOW_S / 3600, sm_clock_mhz_mean=1830.0,
            temp_c_mean=55.0, temp_c_max=58.0, throttled_share=0.0,
            throttle_share={"power_cap": 0.0, "hw_slowdown": 0.0, "sw_thermal": 0.0, "hw_thermal": 0.0,
                            "power_brake": 0.0},
            xid_count=0,
        ))
    return out


def run(sink: InfluxSink, results: list[WindowResult], batch: int) -> dict[str, float]:
    started = time.perf_counter()
    lines = [window_line(r) for r in results]
    encoded = time.perf_counter()
    for i in range(0, len(lines), batch):
        sink.write(lines[i:i + batch], "ms")
    written = time.perf_counter()
    return {"points_per_s": round(len(lines) / (written - started)),
            "write_points_per_s": round(len(lines) / (written - encoded)),
            "encode_us_per_point": round((encoded - started) / len(lines) * 1e6, 2),
            "mb": round(sum(len(line) + 1 for line in lines) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=50_000)
    parser.add_argument("--gpus", type=int, default=1000)
    parser.add_argument("--batch", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = get_settings()
    sink = InfluxSink(settings, give_up_after_s=30)
    runs: dict[int, list[dict[str, float]]] = {b: [] for b in args.batch}
    try:
        sink.write([f"bench_warmup v=1 {int(time.time())}"], "s")  # version detection, connection
        for _round in range(args.repeats):
            for batch in args.batch:
                # A fresh cluster tag each run: new series, so no run overwrites an earlier one.
                cluster = f"bench-{uuid.uuid4().hex[:8]}"
                t0 = (time.time() // WINDOW_S - 10_000) * WINDOW_S
                runs[batch].append(run(sink, window_results(cluster, args.gpus, args.points, t0), batch))
    finally:
        sink.close()
    results = {}
    for batch, batch_runs in runs.items():
        median = sorted(batch_runs, key=lambda r: r["points_per_s"])[len(batch_runs) // 2]
        results[batch] = {**median, "runs_points_per_s": [r["points_per_s"] for r in batch_runs]}
        print(f"batch {batch:>6,}: {median['points_per_s']:>9,} points/s end to end, {median['write_points_per_s']:>9,} "
              f"points/s writing, {median['encode_us_per_point']} us/point encoding ({median['mb']} MB)  "
              f"runs {results[batch]['runs_points_per_s']}", flush=True)
    best = max(results, key=lambda b: results[b]["points_per_s"])
    print(json.dumps({"points_per_s": results[best]["points_per_s"], "batch": best, "influx_url": sink.url,
                      "influx_version": sink.version, "points": args.points, "gpus": args.gpus,
                      "all": {str(b): r for b, r in results.items()}}))


if __name__ == "__main__":
    main()
