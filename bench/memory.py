"""Peak memory of one worker's stages tracking --gpus GPUs, in process (no Kafka, no Faust).

The simulator's batches for --gpus GPUs (H100 nodes of 8, jobs of --job-nodes nodes, 1 Hz for
--seconds) go through stage 1 (windows, and what a closed window becomes) and stage 2 (every
detector) as `laggard detect` runs them. Two child processes read the same batches: one only
decodes them (the simulator and the messages' own share), one runs the stages; the difference of
their peak RSS (VmHWM) is what the stages hold at their worst: open windows, the results of a
closing one, each GPU's last sample, the detectors' history. A worker adds Faust and its clients
(~117 MiB idle, bench/scale.py). The last line is one JSON object.

    python bench/memory.py [--gpus 220000] [--seconds 40]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

from laggard.agents.offline import detect_offline
from laggard.batches import decode_event
from laggard.collectors.simulate import FleetSimulator
from laggard.collectors.simulate.scenario import Scenario


def fleet(gpus: int, job_nodes: int, seconds: float) -> Scenario:
    nodes = gpus // 8
    jobs = [{"name": f"job-{j:03d}", "step_s": 2.0,
             "nodes": [{"group": "h100-", "first": first, "count": min(job_nodes, nodes - first)}]}
            for j, first in enumerate(range(0, nodes, job_nodes))]
    return Scenario.model_validate({
        "name": "memory", "seed": 5, "duration_s": seconds, "tick_s": 1.0, "cluster": "sim-memory",
        "nodes": [{"prefix": "h100-", "count": nodes, "model": "H100"}], "jobs": jobs})


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run(spec: Scenario, stages: bool, out: multiprocessing.Queue) -> None:
    messages = (value for _ts, batch in FleetSimulator(spec, start_ts=time.time() - 3600).encoded_batches(10.0)
                for _key, value in batch)
    started = time.perf_counter()
    if stages:
        findings = sum(1 for _ in detect_offline(messages, 10.0, 5.0))
    else:
        findings = sum(1 for value in messages if decode_event(value))
    out.put({"peak_rss_mib": round(peak_rss_mib()), "seconds": round(time.perf_counter() - started, 1),
             "count": findings})


def measure(spec: Scenario, stages: bool) -> dict:
    out: multiprocessing.Queue = multiprocessing.Queue()
    child = multiprocessing.Process(target=run, args=(spec, stages, out))
    child.start()
    result = out.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=220_000)
    parser.add_argument("--job-nodes", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()
    spec = fleet(args.gpus, args.job_nodes, args.seconds)
    reading = measure(spec, stages=False)
    worker = measure(spec, stages=True)
    print(json.dumps({"gpus": args.gpus, "stages_peak_rss_mib": worker["peak_rss_mib"] - reading["peak_rss_mib"],
                      "with_stages": worker, "reading_only": reading}))


if __name__ == "__main__":
    main()
