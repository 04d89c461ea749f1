"""The worker end to end on the real broker and InfluxDB: a simulated fleet with injected faults
and malformed messages goes in; findings naming the culprits, window points, and dead letters
with reasons come out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from kafka import KafkaProducer

from laggard.agents.offline import detect_offline
from laggard.agents.sink import InfluxSink
from laggard.collectors.publisher import Publisher
from laggard.collectors.simulate import FleetSimulator, load_scenario
from laggard.commands.pipeline_run import PipelineRun
from laggard.kafka_config import client_config
from laggard.results import Finding
from tests.helpers.samples import node_sample

SCENARIO = "collectors/scenarios/demo.yaml"
TOMBSTONES = 100


def hostile(field: str, value: object, where: str = "gpu") -> bytes:
    sample = json.loads(node_sample().model_dump_json())
    (sample["gpus"][0] if where == "gpu" else sample)[field] = value
    return json.dumps(sample).encode()


def test_worker_finds_injected_faults_and_dead_letters_bad_input(stack, tmp_path):
    with PipelineRun(stack, prefix="test-worker") as run:
        run.start_worker(tmp_path / "worker.log")
        bad = {
            "bad json": b"{not json",
            "unknown version": json.dumps({**json.loads(node_sample().model_dump_json()), "v": 99}).encode(),
            "absurd power": node_sample().model_dump_json().replace('"power_w":600.0', '"power_w":-40.0').encode(),
            "huge": b"{" + b" " * 3_000_000 + b"}",
            # issue 18: a poison pill (once crashed the worker on every restart), labels that would
            # inject a line-protocol point or end a C string, loose types, a clock a day fast
            "400-digit xid": hostile("xid", 10**400),
            "newline label": hostile("job", "inj\nfleet"),
            "nul label": hostile("node", "a\u0000b", where="node"),
            "bool float": hostile("util_gpu", True),
            "string float": hostile("power_w", "50"),
            "a day ahead": hostile("ts", time.time() + 23 * 3600, where="node"),
        }
        with Publisher(stack, topic=run.settings.topic_samples) as publisher:
            for value in bad.values():
                publisher.publish_raw(b"bad", value)
        producer = KafkaProducer(**client_config(stack))
        for _ in range(TOMBSTONES):  # null values: once a restart of the agent each
            producer.send(run.settings.topic_samples, key=b"tombstone", value=None)
        producer.flush(30)
        producer.close()
        run.published += len(bad) + TOMBSTONES
        run.publish_scenario(SCENARIO)
        stats = run.wait_until_quiet(timeout_s=240)
        health = httpx.get(f"http://127.0.0.1:{run.settings.worker_web_port}/healthz", timeout=10)
        findings = run.findings()
        letters = [d for d in run.dead_letters() if d.get("topic") == run.settings.topic_samples]

    assert (health.status_code, health.json()) == (200, {"status": "ok", "problems": []})
    assert stats["rejected"] == len(bad) + TOMBSTONES
    reasons = [letter["reason"] for letter in letters]
    assert len(letters) == len(bad) + TOMBSTONES
    assert sum("tombstone" in r for r in reasons) == TOMBSTONES
    assert any(r.startswith("gpus.0.xid = 1000") for r in reasons)
    assert sum("no control characters" in r for r in reasons) == 2
    assert sum("Input should be a valid number" in r for r in reasons) == 2
    assert any("ahead of the worker's clock" in r for r in reasons)
    assert "Crashed reason" not in (tmp_path / "worker.log").read_text()  # no agent restarted on them
    assert any("Invalid JSON" in r or "not a JSON" in r for r in reasons)
    assert any(r.startswith("v = 99") for r in reasons)
    assert any("power_w = -40" in r for r in reasons)
    assert any("exceeds" in r for r in reasons)

    stragglers = {(f.job, f.rank) for f in findings if f.kind == "straggler" and f.state == "firing"}
    expected = {(t.job, t.rank) for t in run.truth if t.kind == "straggler"}
    assert stragglers == expected
    first = min((f for f in findings if f.kind == "straggler" and f.job == "llm-70b"), key=lambda f: f.window_start)
    onset = next(t.start for t in run.truth if t.kind == "straggler" and t.job == "llm-70b")
    assert (first.window_end - onset) / stack.window_s <= 3  # persistence of 2 windows after onset
    kinds = {f.kind for f in findings}
    assert {"xid", "silent_gpu", "idle_allocated", "job_stalled", "mixed_generation"} <= kinds

    sink = InfluxSink(stack)
    since = int(min(t.start for t in run.truth)) - 120
    rows = sink.query(f"SELECT \"util_mean\", \"sm_clock_mhz_mean\" FROM \"gpu_window\" WHERE \"job\" = 'llm-70b' "
                      f"AND \"rank\" = '17' AND time >= {since}s AND time <= {int(time.time())}s")
    sink.close()
    assert rows and max(r["util_mean"] for r in rows) > 90

    # `laggard detect` runs the same stages offline: on the same samples, the same findings.
    spec = load_scenario(Path(SCENARIO))
    recorded = (value for _ts, batch in FleetSimulator(spec, start_ts=run.start_ts).encoded_ticks() for _key, value in batch)
    offline = list(detect_offline(recorded, stack.window_s, stack.late_grace_s))

    def identity(f: Finding) -> tuple[object, ...]:
        return f.kind, f.state, f.job, f.rank, f.node, f.gpu, f.window_start

    assert sorted(map(identity, offline)) == sorted(map(identity, findings))
