"""One laggard worker's throughput through the real broker, in GPU-samples/s.

Pre-publishes the simulator's messages for --scenario (by default bench/colossus_slice.yaml:
20,480 GPUs at 1 Hz for a minute; event time in the past; at most --messages of them) to a unique
samples topic, as schema-2 batches of --flush-interval seconds (0: version 1, a message per node
per tick),
then starts one `laggard worker` (baseline detector on, as `laggard eval` runs it) and polls its
/stats: the timed span runs from the first poll that sees an accepted sample to the one that sees
all of them, so Faust's start-up and its consumer-group join are not counted. With --profile,
py-spy samples the worker for --profile-s seconds of that span and the functions with the most
own time go to stderr (py-spy slows the worker a little, so profile and measure in separate runs).
Then, on the same topic, a no-op Faust agent with the worker's consumer settings
(bench/faust_noop.py) gives Faust's own ceiling, and `share_of_faust_ceiling` how close the worker
gets to it. Last, laggard's own stage-1 work (decode, window, and what a closed window becomes:
agents.outputs) is timed in this process on the same messages, with no Kafka and no Faust:
`stage1_alone_gpu_samples_per_s` is what the worker could reach if Faust cost nothing. The last
line is one JSON object.

    python bench/agents.py [--scenario bench/colossus_slice.yaml] [--flush-interval 10] [--messages N] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from laggard.agents.outputs import window_outputs
from laggard.agents.stages import SampleStage
from laggard.collectors.simulate import FleetSimulator, load_scenario
from laggard.commands.detection_eval import EVAL_OVERRIDES
from laggard.commands.pipeline_run import PipelineRun
from laggard.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.1


def top_functions(raw_profile: Path, count: int = 15) -> list[tuple[int, str]]:
    """(samples, function) with the most own time, from py-spy's raw (collapsed stacks) output."""
    own: collections.Counter[str] = collections.Counter()
    for line in raw_profile.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if stack:
            own[stack.split(";")[-1]] += int(samples)
    return [(samples, function) for function, samples in own.most_common(count)]


# Where a worker's CPU goes, by the outermost laggard frame on the stack (py-spy frame prefixes).
PARTS = (
    ("window_samples ", "stage 1: samples -> windows (agents/worker.py window_samples)"),
    ("detect ", "stage 2: detectors (detect)"),
    ("fleet_kpi ", "stage 3: fleet KPI (fleet_kpi)"),
    ("close_idle_windows ", "1 s timer (close_idle_windows)"),
    ("alert_", "alerting"),
    ("InfluxSink.write ", "InfluxDB writes (its thread)"),
)
IDLE_LEAVES = ("EpollSelector.select ", "wait (threading.py", "_wait_for_tstate_lock ", "select (selectors.py")


def _labels(frame: str) -> tuple[str, str]:
    """A py-spy frame ('Worker.detect (agents/worker.py:244)') as 'Worker.detect ' and 'detect '."""
    function = frame.split(" (", 1)[0]
    return function + " ", function.rsplit(".", 1)[-1] + " "


def cpu_by_part(raw_profile: Path) -> dict[str, float]:
    """Share of the worker's busy samples per part; the rest is Faust, aiokafka and asyncio."""
    busy: collections.Counter[str] = collections.Counter()
    for line in raw_profile.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or frames[-1].startswith(IDLE_LEAVES):
            continue
        part = next((name for frame in frames for label in _labels(frame) for prefix, name in PARTS
                     if label.startswith(prefix)), "Faust, aiokafka and asyncio around the agents")
        busy[part] += int(samples)
    total = sum(busy.values())
    return {part: round(n / total, 3) for part, n in busy.most_common()}


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--format", "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def faust_ceiling(env: dict[str, str], messages: int, timeout_s: float) -> int:
    """Messages/s of a no-op Faust agent over the same topic (bench/faust_noop.py)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench/faust_noop.py")], cwd=ROOT,
                          env={**env, "LAGGARD_BENCH_MESSAGES": str(messages), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=timeout_s)
    for line in done.stderr.splitlines():
        if line.startswith("noop_messages_per_s="):
            return int(line.split("=", 1)[1])
    sys.exit(f"the no-op Faust agent reported nothing:\n{done.stderr[-2000:]}")


def stage1_seconds(scenario: Path, start_ts: float, count: int, flush_s: float) -> float:
    """Seconds laggard's stage-1 code takes for the first `count` messages of the run, in process."""
    settings = get_settings()
    sim = FleetSimulator(load_scenario(scenario), start_ts=start_ts)
    messages = [value for _key, value in itertools.islice(
        (message for _ts, batch in sim.encoded(flush_s) for message in batch), count)]
    stage = SampleStage(settings.window_s, settings.late_grace_s)
    started = time.perf_counter()
    for offset, raw in enumerate(messages):
        stage.add(raw, offset)
        for closed in stage.closed():
            window_outputs(closed, 0)
    for closed in stage.windower.flush():
        window_outputs(closed, 0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=ROOT / "bench/colossus_slice.yaml")
    parser.add_argument("--flush-interval", type=float, default=10.0, help="seconds per batch; 0: version 1")
    parser.add_argument("--messages", type=int, default=None, help="at most this many messages [all]")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--profile", action="store_true", help="py-spy the worker; top functions to stderr")
    parser.add_argument("--profile-s", type=float, default=15.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="laggard-bench-") as tmp:
        with PipelineRun(get_settings(), prefix="bench", state_root=Path(tmp), overrides=EVAL_OVERRIDES) as run:
            run.publish_scenario(args.scenario, limit=args.messages, flush_s=args.flush_interval)
            print(f"published {run.published:,} messages ({run.gpu_samples:,} GPU samples)", file=sys.stderr)
            profile = None
            run.start_worker()
            deadline = time.monotonic() + args.timeout_s
            first: tuple[float, int] | None = None
            while True:
                stats = run.stats()
                now, accepted = time.perf_counter(), stats.get("accepted", 0)
                if first is None and accepted > 0:
                    first = (now, accepted)
                    if args.profile:
                        profile = start_profile(run.worker.pid, args.profile_s, Path(tmp) / "profile.txt")
                if accepted >= run.published:
                    break
                if time.monotonic() > deadline:
                    sys.exit(f"worker took only {accepted:,} of {run.published:,} messages in {args.timeout_s} s")
                time.sleep(POLL_S)
            run.stop_worker()
            noop_rate = faust_ceiling(run.env, run.published, args.timeout_s)
        stage1_s = stage1_seconds(args.scenario, run.start_ts, run.published, args.flush_interval)
        assert first is not None
        seconds = now - first[0]
        messages = run.published - first[1]
        gpus_per_message = run.gpu_samples / run.published
        parts: dict[str, float] = {}
        if profile is not None:
            _, errors = profile.communicate()
            out = Path(tmp) / "profile.txt"
            if out.exists():
                print("worker functions with the most own time (py-spy samples):", file=sys.stderr)
                for samples, function in top_functions(out):
                    print(f"{samples:8d}  {function}", file=sys.stderr)
                parts = cpu_by_part(out)
                print("worker CPU by part (py-spy busy samples):", file=sys.stderr)
                for part, share in parts.items():
                    print(f"{share:8.1%}  {part}", file=sys.stderr)
            else:
                print(f"py-spy wrote no profile: {errors.decode(errors='replace')}", file=sys.stderr)
    print(json.dumps({
        "gpu_samples_per_s": round(messages * gpus_per_message / seconds),
        "messages_per_s": round(messages / seconds),
        "messages": messages,
        "seconds": round(seconds, 2),
        "gpus_per_message": round(gpus_per_message, 2),
        "faust_noop_messages_per_s": noop_rate,
        "share_of_faust_ceiling": round(messages / seconds / noop_rate, 2),
        "faust_noop_gpu_samples_per_s": round(noop_rate * gpus_per_message),
        "stage1_alone_us_per_message": round(stage1_s / run.published * 1e6, 1),
        "stage1_alone_gpu_samples_per_s": round(run.gpu_samples / stage1_s),
        "profiled": args.profile,
        **({"cpu_by_part": parts} if parts else {}),
    }))


if __name__ == "__main__":
    main()
