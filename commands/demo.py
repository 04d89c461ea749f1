"""`laggard demo`: the README's main job. On the local stack it simulates a ~1,000-GPU fleet
with one of each fault, runs a worker, the InfluxDB sink and alerting to a local webhook
receiver that prints what it gets, then prints what was found and where the data is."""

from __future__ import annotations

import collections
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from laggard.agents.sink import InfluxSink
from laggard.commands.pipeline_run import PipelineRun
from laggard.logs import print_table
from laggard.rules.loader import DEFAULT_RULES, load_rules
from laggard.settings import Settings

SCENARIO = Path(__file__).resolve().parents[1] / "collectors" / "scenarios" / "demo.yaml"


class PrintingReceiver(ThreadingHTTPServer):
    """A local chat webhook: prints each notification's text and counts them."""

    def __init__(self, console: Console) -> None:
        self.console, self.received = console, 0
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.server.received += 1
        text = body.get("text") or json.dumps(body)[:300]
        self.server.console.print(f"[bold magenta]webhook[/] {text[:400]}", highlight=False)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def demo_rules(path: Path) -> Path:
    """The default rules with timings for a fleet simulated in a minute and a half: alerts fire on
    their first finding (no `for`), groups wait 2 s, not 30, before their first notification, and
    a fault that the fast-forwarded fleet clears within seconds keeps firing long enough to be sent."""
    config = load_rules(DEFAULT_RULES)
    config = config.model_copy(update={
        "route": config.route.model_copy(update={"group_wait": 2.0, "group_interval": 10.0}),
        "rules": [rule.model_copy(update={"for_": 0.0, "keep_firing_for": max(rule.keep_firing_for, 10.0)})
                  for rule in config.rules],
    })
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False))
    return path


def wait_for_notifications(receiver: PrintingReceiver, first_within_s: float, quiet_s: float) -> None:
    """Until the first notification arrives (alert groups wait group_wait before their first), then
    until none has arrived for `quiet_s`: groups that started together send together."""
    deadline = time.monotonic() + first_within_s
    last_count, last_change = 0, time.monotonic()
    while time.monotonic() < deadline + quiet_s:
        if receiver.received != last_count:
            last_count, last_change = receiver.received, time.monotonic()
        if last_count and time.monotonic() - last_change >= quiet_s:
            return
        if not last_count and time.monotonic() >= deadline:
            return
        time.sleep(0.5)  # polled against the deadlines above


def run_demo(settings: Settings, console: Console, scenario: Path = SCENARIO) -> None:
    started = time.monotonic()
    receiver = PrintingReceiver(console)
    rules = demo_rules(settings.state_dir / "demo-rules.yaml")
    run = PipelineRun(settings, prefix="demo", extra_env={"LAGGARD_SLACK_WEBHOOK_URL": receiver.url},
                      overrides={"rules_file": rules})
    log = settings.state_dir / "demo-worker.log"
    with run, console.status("starting a worker ...") as status:
        run.start_worker(log)
        status.update("publishing the simulated fleet to Kafka ...")
        run.publish_scenario(scenario, lambda n: status.update(f"publishing: {n:,} node batches"),
                             flush_s=settings.window_s)
        console.print(f"published {run.published:,} node batches ({run.gpu_samples:,} GPU samples) of {scenario.name}")

        def show(stats: dict) -> None:
            status.update(f"worker: {stats.get('accepted', 0):,}/{run.published:,} node batches, "
                          f"{stats.get('findings', 0)} findings, {stats.get('notifications', 0)} notifications")

        stats = run.wait_until_quiet(timeout_s=150, progress=show)
        status.update("waiting for the notifications (each alert group's group_wait) ...")
        wait_for_notifications(receiver, first_within_s=45, quiet_s=5)
        findings = run.findings()
    receiver.shutdown()
    firing = [f for f in findings if f.state == "firing"]
    table = Table("kind", "firing", "resolved", "example")
    for kind, count in collections.Counter(f.kind for f in firing).most_common():
        example = next(f.summary for f in firing if f.kind == kind)
        resolved = sum(1 for f in findings if f.kind == kind and f.state == "resolved")
        table.add_row(kind, str(count), str(resolved), example[:110])
    print_table(console, table)
    sink = InfluxSink(settings)
    fleet = sink.query('SELECT mean("util_mean"), mean("effective_util"), max("idle_allocated_gpus") FROM "fleet" '
                       "WHERE \"cluster\" = 'demo' AND time > now() - 10m")
    sink.close()
    if fleet:
        console.print(f"fleet: utilization {fleet[0]['mean']:.1f}%, effective {fleet[0]['mean_1'] * 100:.1f}%, "
                      f"up to {fleet[0]['max']:.0f} allocated GPUs idle")
    truth = collections.Counter(t.kind for t in run.truth)
    console.print(f"injected faults: {dict(truth)}")
    console.print(f"{stats.get('accepted', 0):,} node batches processed, {len(findings)} findings, "
                  f"{receiver.received} webhook notifications, in {time.monotonic() - started:.0f} s")
    console.print(f"data: InfluxDB {settings.influx_url} database '{settings.influx_database}', measurements "
                  "gpu_window, node_window, fleet, finding (cluster 'demo'); findings on Kafka topic "
                  f"{run.settings.topic_findings}; worker log {log}")
