"""Run a scenario through the real pipeline: simulator -> Kafka -> one `laggard worker` process.

Each run gets its own topics and Faust app id, so runs never see each other's data or state.
Used by `laggard demo` and the worker's integration tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from agents.findings import Finding
from collectors.publisher import Publisher
from collectors.simulate import FleetSimulator, load_scenario
from laggard.events import FaultTruth, encode
from laggard.settings import Settings
from laggard.topics import ensure_topics, read_topic


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PipelineRun:
    def __init__(self, base: Settings, prefix: str = "run", extra_env: dict[str, str] | None = None) -> None:
        self.run_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        port = free_port()
        topics = {f"topic_{name}": f"{self.run_id}.{name}"
                  for name in ("samples", "windows", "fleet", "findings", "deadletter", "truth")}
        self.settings = base.model_copy(update={**topics, "worker_app_id": self.run_id, "worker_web_port": port})
        self.env = {**os.environ, **{f"LAGGARD_{k.upper()}": v for k, v in topics.items()},
                    "LAGGARD_WORKER_APP_ID": self.run_id, "LAGGARD_WORKER_WEB_PORT": str(port),
                    **(extra_env or {})}
        self.worker: subprocess.Popen | None = None
        self.published = 0
        self.truth: list[FaultTruth] = []

    def start_worker(self, log_path: Path) -> None:
        ensure_topics(self.settings)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "laggard.cli", "worker", "-l", "warn"], env=self.env,
            stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def publish_scenario(self, scenario: Path, progress: Callable[[int], None] | None = None) -> int:
        """Publish the whole scenario as fast as possible, stamped in the recent past so that
        every window closes by event time."""
        spec = load_scenario(scenario)
        sim = FleetSimulator(spec, start_ts=time.time() - spec.duration_s - 60)
        self.truth = sim.truth()
        gpus = 0
        with Publisher(self.settings) as publisher:
            for truth in self.truth:
                publisher.publish_raw(b"truth", encode(truth), topic=self.settings.topic_truth)
            for _ts, batch in sim.encoded_ticks():
                for key, value in batch:
                    publisher.publish_raw(key, value)
                    gpus += value.count(b'"index"')
                self.published += len(batch)
                if progress:
                    progress(self.published)
        return gpus

    def stats(self) -> dict[str, Any]:
        try:
            return httpx.get(f"http://127.0.0.1:{self.settings.worker_web_port}/stats", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_until_quiet(self, timeout_s: float, settle_s: float,
                         progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll the worker until it has taken every published message and its findings count has
        not moved for `settle_s` (windows close on the hold timer after the last sample)."""
        deadline = time.monotonic() + timeout_s
        last_change, last_key = time.monotonic(), None
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {self.worker.returncode}")
            stats = self.stats()
            key = (stats.get("accepted"), stats.get("findings"), stats.get("fleet_windows"), stats.get("notifications"))
            if key != last_key:
                last_change, last_key = time.monotonic(), key
            if progress:
                progress(stats)
            done = stats.get("accepted", 0) + stats.get("rejected", 0) + stats.get("late", 0) >= self.published
            if done and time.monotonic() - last_change >= settle_s:
                return stats
            time.sleep(0.5)
        raise TimeoutError(f"worker not done after {timeout_s:.0f} s: {stats}")

    def read_topic(self, topic: str) -> list[bytes]:
        return read_topic(self.settings, topic)

    def findings(self) -> list[Finding]:
        return [Finding.model_validate_json(v) for v in self.read_topic(self.settings.topic_findings)]

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.read_topic(self.settings.topic_deadletter)]

    def stop_worker(self, grace_s: float = 20) -> None:
        if self.worker is None or self.worker.poll() is not None:
            return
        os.killpg(self.worker.pid, signal.SIGTERM)
        try:
            self.worker.wait(grace_s)
        except subprocess.TimeoutExpired:  # Faust can hang on shutdown; the data is in Kafka
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()

    def __enter__(self) -> PipelineRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_worker()
