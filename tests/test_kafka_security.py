"""Kafka over TLS and SASL, for real: a private broker with a TLS listener (self-signed
certificate for 127.0.0.1, made by keytool) and a SASL_SSL listener (PLAIN and SCRAM-SHA-512), and
the whole pipeline (kafka-python publisher, Faust worker, topic reads) pointed at one of them
only, through laggard's settings."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys

import pytest
from kafka import KafkaAdminClient
from pydantic import SecretStr

from laggard.commands.pipeline_run import PipelineRun, env_value
from laggard.commands.stack.kafka import SASL_USER, KafkaBroker
from laggard.commands.stack.process import free_port
from laggard.kafka_config import client_config
from laggard.settings import Settings
from laggard.topics import read_topic

SCENARIO = "tests/scenarios/small_eval.yaml"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory, stack: Settings):
    broker = KafkaBroker(tmp_path_factory.mktemp("tls-stack"), free_port(), free_port(), stack.kafka_version,
                         tls_port=free_port(), sasl_port=free_port())
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


def sasl_settings(broker: KafkaBroker, mechanism: str, password: str) -> dict:
    return {"kafka_bootstrap_servers": f"127.0.0.1:{broker.sasl_port}", "kafka_security_protocol": "SASL_SSL",
            "kafka_ssl_cafile": broker.tls_ca, "kafka_sasl_mechanism": mechanism, "kafka_sasl_username": SASL_USER,
            "kafka_sasl_password": SecretStr(password)}


def list_topics(stack: Settings, overrides: dict) -> list[str]:
    admin = KafkaAdminClient(**client_config(stack.model_copy(update=overrides)), client_id="test-security")
    try:
        return admin.list_topics()
    finally:
        admin.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
def test_sasl_takes_the_password(stack: Settings, tls_broker: KafkaBroker, mechanism: str) -> None:
    secured = sasl_settings(tls_broker, mechanism, tls_broker.sasl_password_file.read_text())
    assert isinstance(list_topics(stack, secured), list)
    assert stat.S_IMODE(tls_broker.sasl_password_file.stat().st_mode) == 0o600


def test_a_wrong_sasl_password_ends_in_one_line_that_names_what_to_check(tls_broker: KafkaBroker, tmp_path) -> None:
    wrong = "not-" + tls_broker.sasl_password_file.read_text()
    secured = sasl_settings(tls_broker, "SCRAM-SHA-512", wrong)
    env = {**os.environ, **{f"LAGGARD_{name.upper()}": env_value(value) for name, value in secured.items()},
           "LAGGARD_STATE_DIR": str(tmp_path)}
    failed_logins = tls_broker.log_path.read_text().count("Failed authentication")
    done = subprocess.run([sys.executable, "-m", "laggard.commands.cli", "simulate", "tests/scenarios/small_eval.yaml",
                           "--as-fast-as-possible"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert "cannot reach Kafka" in done.stderr and "LAGGARD_KAFKA_SASL_USERNAME" in done.stderr
    assert "Traceback" not in done.stderr and wrong not in done.stderr + done.stdout
    assert tls_broker.log_path.read_text().count("Failed authentication") > failed_logins  # refused, not unreachable


@pytest.mark.parametrize("listener", ["tls", "sasl-scram"])
def test_pipeline_runs_over_one_secured_listener_only(stack: Settings, tls_broker: KafkaBroker, tmp_path,
                                                        listener: str) -> None:
    secured = sasl_settings(tls_broker, "SCRAM-SHA-512", tls_broker.sasl_password_file.read_text()) \
        if listener == "sasl-scram" else {"kafka_bootstrap_servers": f"127.0.0.1:{tls_broker.tls_port}",
                                          "kafka_security_protocol": "SSL", "kafka_ssl_cafile": tls_broker.tls_ca}
    with PipelineRun(stack, prefix=f"test-{listener}", overrides=secured, state_root=tmp_path) as run:
        run.start_worker()
        run.publish_scenario(SCENARIO)
        stats = run.wait_until_quiet(timeout_s=180)
        findings = run.findings()
        on_broker = len(read_topic(run.settings, run.settings.topic_samples))
    assert stats["accepted"] == run.published == on_broker > 0
    assert {(f.job, f.rank) for f in findings if f.kind == "straggler" and f.state == "firing"} == \
        {(t.job, t.rank) for t in run.truth if t.kind == "straggler"}
