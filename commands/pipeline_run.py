"""Run a scenario through the real pipeline: simulator -> Kafka -> one `laggard worker` process.

Each run gets its own topics, Faust app id and web port (and, with `state_root`, its own state
folder), so runs never see each other's data or state. Used by `laggard demo`, `laggard eval`,
bench/agents.py and the worker's integration tests:

    with PipelineRun(settings, prefix="demo") as run:   # creates the run's topics
        run.start_worker()
        run.publish_scenario(path)
        stats = run.wait_until_quiet(timeout_s=150)
        findings = run.findings()
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from laggard.batches import gpu_sample_count
from laggard.collectors.publisher import Publisher
from laggard.collectors.simulate import FleetSimulator, load_scenario
from laggard.commands.stack.process import free_port, log_tail
from laggard.events import EARLIEST_TS, FaultTruth, encode
from laggard.results import Finding
from laggard.settings import Settings
from laggard.topics import ensure_topics, read_topic

# Event time of the first tick lies this far before (now - duration): all of it is in the past,
# so every window closes by event time.
PAST_MARGIN_S = 60.0
STOP_GRACE_S = 20.0  # Faust can hang on shutdown: SIGKILL after this
POLL_S = 0.5
# Counts unchanged this long, with no work held, is the end of a run (findings published just
# before, say, still reach the alerting agent).
QUIET_SETTLE_S = 3.0
PROGRESS_EVERY = 1000  # messages between calls of publish_scenario's progress
# Settings the worker subprocess must share with its run, passed as LAGGARD_* variables; anything
# else it reads from the same environment and env file as this process.
WORKER_SETTINGS = ("topic_samples", "topic_windows", "topic_fleet", "topic_findings", "topic_deadletter",
                   "topic_truth", "topic_silences", "topic_alerts", "worker_app_id", "worker_web_port", "state_dir",
                   "baseline_detector", "kafka_bootstrap_servers", "window_s", "window_hold_s", "topic_partitions")


RUN_TOPICS = ("samples", "windows", "fleet", "findings", "deadletter", "truth", "silences", "alerts")


class PipelineError(RuntimeError):
    """A run that could not be completed; the message says which step and why."""


def past_start_ts(duration_s: float, now: float | None = None) -> float:
    """First tick's event time: the whole run ends PAST_MARGIN_S before now, and is still a valid timestamp."""
    start = (time.time() if now is None else now) - duration_s - PAST_MARGIN_S
    if start < EARLIEST_TS:
        raise PipelineError(f"scenario duration {duration_s} s reaches before 2020-01-01, which events reject")
    return start


def env_value(value: Any) -> str:
    """A setting as its environment variable's text; a secret's real value (for the worker only)."""
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def messages_taken(stats: Mapping[str, Any]) -> int:
    """Samples the worker has dealt with, per its /stats: accepted, rejected or too late."""
    return stats.get("accepted", 0) + stats.get("rejected", 0) + stats.get("late", 0)


class PipelineRun:
    """One run's settings and worker; use it as a context manager (entering creates the topics,
    leaving stops the worker). `overrides` are settings changed for this run and its worker (e.g.
    {"baseline_detector": True}); `extra_env` goes to the worker only (e.g. a webhook URL)."""

    def __init__(self, base: Settings, prefix: str = "run", extra_env: Mapping[str, str] | None = None,
                 state_root: Path | None = None, overrides: Mapping[str, Any] | None = None) -> None:
        self.run_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.prefix, self.state_root = prefix, state_root
        update: dict[str, Any] = {
            **{f"topic_{name}": f"{self.run_id}.{name}" for name in RUN_TOPICS},
            "worker_app_id": self.run_id, "worker_web_port": free_port(), **(overrides or {}),
        }
        if state_root is not None:
            update["state_dir"] = state_root / self.run_id
        self.settings = base.model_copy(update=update)
        names = dict.fromkeys([*WORKER_SETTINGS, *(overrides or {})])
        # A local 2.x server's token lives in the stack's state folder, not the run's: always passed.
        names.update(dict.fromkeys(["influx_token"] if self.settings.influx_token else []))
        self.env = {**os.environ, **{f"LAGGARD_{name.upper()}": env_value(getattr(self.settings, name)) for name in names},
                    **(extra_env or {})}
        self.log_path = self.settings.state_dir / f"{self.run_id}.worker.log"
        self.worker: subprocess.Popen[bytes] | None = None
        self.published = 0  # messages on the samples topic, as the worker should count them
        self.gpu_samples = 0
        self.truth: list[FaultTruth] = []
        self.start_ts = 0.0  # event time of the published scenario's first tick

    def member(self) -> PipelineRun:
        """Another worker's run in this run's consumer group, on this run's topics (with its own
        web port and state folder): how a user grows past one worker."""
        shared = {f"topic_{name}": getattr(self.settings, f"topic_{name}") for name in RUN_TOPICS}
        return PipelineRun(self.settings, prefix=self.prefix, state_root=self.state_root,
                           overrides={**shared, "worker_app_id": self.settings.worker_app_id})

    def __enter__(self) -> PipelineRun:
        ensure_topics(self.settings)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_worker()

    def start_worker(self, log_path: Path | None = None, log_level: str = "warn") -> None:
        """Start `laggard worker` on this run's settings; its output goes to `log_path` (default
        `self.log_path`), whose tail is quoted when the worker fails."""
        self.log_path = log_path or self.log_path
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "laggard.commands.cli", "worker", "-l", log_level], env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def publish_scenario(self, scenario: Path | str, progress: Callable[[int], None] | None = None,
                         limit: int | None = None, flush_s: float = 0.0) -> None:
        """Publish the scenario's messages (at most `limit`) as fast as possible, stamped in the
        recent past (see past_start_ts), and its truth to the truth topic: schema-2 batches of
        `flush_s` seconds, or version-1 messages (one per node per tick) when it is 0. `progress`
        gets the running count of published messages every PROGRESS_EVERY."""
        spec = load_scenario(Path(scenario))
        self.start_ts = past_start_ts(spec.duration_s)
        sim = FleetSimulator(spec, start_ts=self.start_ts)
        self.truth = sim.truth()
        with Publisher(self.settings) as publisher:
            for truth in self.truth:
                publisher.publish_raw((truth.job or truth.node or truth.scenario).encode(), encode(truth),
                                      topic=self.settings.topic_truth)
            messages = (message for _ts, batch in sim.encoded(flush_s) for message in batch)
            for key, value in itertools.islice(messages, limit):
                publisher.publish_raw(key, value)
                self.published += 1
                self.gpu_samples += gpu_sample_count(value)
                if progress and self.published % PROGRESS_EVERY == 0:
                    progress(self.published)
        if publisher.stats.failed:
            raise PipelineError(f"{publisher.stats.failed} messages failed to publish: {publisher.stats.last_error}")

    def _worker_error(self, what: str) -> PipelineError:
        return PipelineError(f"{what}; worker log {self.log_path}:\n{log_tail(self.log_path)}")

    def stats(self) -> dict[str, Any]:
        """The worker's /stats, or {} while it is not answering yet; PipelineError if it has exited."""
        if self.worker is not None and self.worker.poll() is not None:
            raise self._worker_error(f"the worker exited with code {self.worker.returncode}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.settings.worker_web_port}/stats", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_until_quiet(self, timeout_s: float, settle_s: float = QUIET_SETTLE_S,
                         progress: Callable[[dict[str, Any]], None] | None = None,
                         must_take: int | None = None) -> dict[str, Any]:
        """Poll the worker until it has taken `must_take` messages (default: every published one;
        a worker that took over from another counts only its own), holds no work (no unread input,
        no open or waiting window: windows close on the hold timer after the last sample), and its
        counts have not moved for `settle_s`; returns the last stats. PipelineError past `timeout_s`."""
        must_take = self.published if must_take is None else must_take
        deadline = time.monotonic() + timeout_s
        last_change, last_key = time.monotonic(), None
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            stats = self.stats()
            key = (messages_taken(stats), stats.get("findings"), stats.get("fleet_windows"),
                   stats.get("notifications"), stats.get("influx_points_written"))
            if key != last_key:
                last_change, last_key = time.monotonic(), key
            if progress:
                progress(stats)
            idle = stats.get("backlog") is not None and not any(stats["backlog"].values())
            if messages_taken(stats) >= must_take and idle and time.monotonic() - last_change >= settle_s:
                return stats
            time.sleep(POLL_S)
        raise self._worker_error(f"the worker did not settle within {timeout_s:.0f} s (last stats {stats})")

    def describe(self) -> str:
        """What the worker reports and the end of its log, for a failure message."""
        try:
            return f"worker {self.run_id}: stats {self.stats()}\n{log_tail(self.log_path, 40)}"
        except PipelineError as err:  # it has exited: the error quotes its log
            return str(err)

    def findings(self) -> list[Finding]:
        """Every finding on the run's findings topic, once each (a replayed one has the same idempotency key)."""
        found = (Finding.model_validate_json(v) for v in read_topic(self.settings, self.settings.topic_findings))
        return list({finding.idempotency_key: finding for finding in found}.values())

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in read_topic(self.settings, self.settings.topic_deadletter)]

    def stop_worker(self, grace_s: float = STOP_GRACE_S) -> None:
        if self.worker is None or self.worker.poll() is not None:
            return
        os.killpg(self.worker.pid, signal.SIGTERM)
        try:
            self.worker.wait(grace_s)
        except subprocess.TimeoutExpired:  # Faust can hang on shutdown; the data is in Kafka
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()
