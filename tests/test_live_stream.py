"""A live stream on a small fleet: two nodes fill at most two of the eight samples partitions.
Findings and the fleet KPI must come while the stream goes on, not only once it pauses: the empty
partitions send heartbeat marks (agents/worker.py), so stages 2 and 3 do not wait for them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from laggard.collectors.publisher import Publisher
from laggard.collectors.simulate import FleetSimulator, load_scenario
from laggard.commands.pipeline_run import PipelineRun
from laggard.commands.stack.process import wait_until
from laggard.settings import Settings

SCENARIO = """\
name: live-two-nodes
seed: 3
duration_s: 300
tick_s: 1.0
cluster: sim-live
nodes:
  - {prefix: h100-, count: 2, model: H100}
jobs:
  - {name: small-train, nodes: [{group: h100-, first: 0, count: 2}], step_s: 1.0}
faults:
  - {kind: straggler, job: small-train, rank: 3, cause: thermal, clock_mhz: 1100, start_s: 5}
"""


def test_findings_and_fleet_kpi_come_while_a_small_fleet_streams(stack: Settings, tmp_path: Path) -> None:
    path = tmp_path / "live.yaml"
    path.write_text(SCENARIO)
    stop, last_publish = threading.Event(), [0.0]
    with PipelineRun(stack, prefix="test-live", state_root=tmp_path) as run:
        run.start_worker()
        sim = FleetSimulator(load_scenario(path), start_ts=time.time())

        def stream() -> None:  # one tick a second, stamped now, until told to stop
            with Publisher(run.settings) as publisher:
                for ts, batch in sim.encoded_ticks():
                    if stop.wait(max(0.0, ts - time.time())):
                        return
                    for key, value in batch:
                        publisher.publish_raw(key, value)
                    last_publish[0] = time.monotonic()

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        try:
            came = wait_until(lambda: run.stats().get("findings", 0) > 0 and run.stats().get("fleet_windows", 0) > 0,
                              150, 1.0)
            streaming = streamer.is_alive() and time.monotonic() - last_publish[0] < 3.0
            stats = run.stats()
        finally:
            stop.set()
            streamer.join(timeout=30)
    assert came, f"no findings or fleet KPI while streaming: {stats}"
    assert streaming  # the stream had not paused: nothing was released by the quiet timer
