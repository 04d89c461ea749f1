"""Kafka over TLS, for real: a private broker with a TLS listener (self-signed certificate for
127.0.0.1, made by keytool), and the whole pipeline (kafka-python publisher, Faust worker, topic
reads) pointed at that listener only, with `kafka_security_protocol=SSL` and the certificate as
`kafka_ssl_cafile`."""

from __future__ import annotations

import socket
import ssl

import pytest

from laggard.pipeline_run import PipelineRun
from laggard.settings import Settings
from laggard.stack.kafka import KafkaBroker
from laggard.stack.process import free_port
from laggard.topics import read_topic

SCENARIO = "tests/scenarios/small_eval.yaml"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory, stack: Settings):
    broker = KafkaBroker(tmp_path_factory.mktemp("tls-stack"), free_port(), free_port(), stack.kafka_version,
                         tls_port=free_port())
    broker.start()
    yield broker
    broker.stop()


def _handshake(port: int, context: ssl.SSLContext) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert()


def test_the_listener_speaks_tls_with_its_certificate(tls_broker: KafkaBroker) -> None:
    peer = _handshake(tls_broker.tls_port, ssl.create_default_context(cafile=tls_broker.tls_ca))
    assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
    with pytest.raises(ssl.SSLCertVerificationError):  # not trusted without the CA file
        _handshake(tls_broker.tls_port, ssl.create_default_context())


def test_pipeline_runs_over_tls_only(stack: Settings, tls_broker: KafkaBroker, tmp_path) -> None:
    tls = {"kafka_bootstrap_servers": f"127.0.0.1:{tls_broker.tls_port}", "kafka_security_protocol": "SSL",
           "kafka_ssl_cafile": tls_broker.tls_ca}
    with PipelineRun(stack, prefix="test-tls", overrides=tls, state_root=tmp_path) as run:
        run.start_worker()
        run.publish_scenario(SCENARIO)
        stats = run.wait_until_quiet(timeout_s=180)
        findings = run.findings()
        on_broker = len(read_topic(run.settings, run.settings.topic_samples))
    assert stats["accepted"] == run.published == on_broker > 0
    assert {(f.job, f.rank) for f in findings if f.kind == "straggler" and f.state == "firing"} == \
        {(t.job, t.rank) for t in run.truth if t.kind == "straggler"}
