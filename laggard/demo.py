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

from rich.console import Console
from rich.table import Table

from agents.sink import InfluxSink
from laggard.pipeline_run import PipelineRun
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


def run_demo(settings: Settings, console: Console, scenario: Path = SCENARIO) -> None:
    started = time.monotonic()
    receiver = PrintingReceiver(console)
    run = PipelineRun(settings, prefix="demo", extra_env={"LAGGARD_SLACK_WEBHOOK_URL": receiver.url})
    log = settings.state_dir / "demo-worker.log"
    with run, console.status("starting a worker ...") as status:
        run.start_worker(log)
        status.update("publishing the simulated fleet to Kafka ...")
        run.publish_scenario(scenario, lambda n: status.update(f"publishing: {n:,} node samples"))
        console.print(f"published {run.published:,} node samples ({run.gpu_samples:,} GPU samples) of {scenario.name}")

        def show(stats: dict) -> None:
            status.update(f"worker: {stats.get('accepted', 0):,}/{run.published:,} node samples, "
                          f"{stats.get('findings', 0)} findings, {stats.get('notifications', 0)} notifications")

        stats = run.wait_until_quiet(timeout_s=150, progress=show)
        status.update("waiting for the first notifications (group_wait) ...")
        deadline = time.monotonic() + 45
        while receiver.received == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        findings = run.findings()
    receiver.shutdown()
    firing = [f for f in findings if f.state == "firing"]
    table = Table("kind", "firing", "resolved", "example")
    for kind, count in collections.Counter(f.kind for f in firing).most_common():
        example = next(f.summary for f in firing if f.kind == kind)
        resolved = sum(1 for f in findings if f.kind == kind and f.state == "resolved")
        table.add_row(kind, str(count), str(resolved), example[:110])
    console.print(table)
    sink = InfluxSink(settings)
    fleet = sink.query('SELECT mean("util_mean"), mean("effective_util"), max("idle_allocated_gpus") FROM "fleet" '
                       "WHERE \"cluster\" = 'demo' AND time > now() - 10m")
    sink.close()
    if fleet:
        console.print(f"fleet: utilization {fleet[0]['mean']:.1f}%, effective {fleet[0]['mean_1'] * 100:.1f}%, "
                      f"up to {fleet[0]['max']:.0f} allocated GPUs idle")
    truth = collections.Counter(t.kind for t in run.truth)
    console.print(f"injected faults: {dict(truth)}")
    console.print(f"{stats.get('accepted', 0):,} node samples processed, {len(findings)} findings, "
                  f"{receiver.received} webhook notifications, in {time.monotonic() - started:.0f} s")
    console.print(f"data: InfluxDB {settings.influx_url} database '{settings.influx_database}', measurements "
                  "gpu_window, node_window, fleet, finding (cluster 'demo'); findings on Kafka topic "
                  f"{run.settings.topic_findings}; worker log {log}")
