"""`laggard stack` lifecycle on a second, private stack instance (own state folder and ports), so
it can be stopped and killed without disturbing the session's shared stack."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from laggard.agents.sink import InfluxSink
from laggard.collectors.publisher import Publisher
from laggard.commands import stack
from laggard.commands.stack.kafka import KafkaBroker
from laggard.commands.stack.process import StackError, free_port, wait_until
from laggard.settings import Settings
from laggard.topics import read_topic

pytestmark = pytest.mark.stack  # private instances of the services


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> Settings:
    kafka, controller, influx = free_port(), free_port(), free_port()
    settings = Settings(
        state_dir=tmp_path_factory.mktemp("stack"), kafka_port=kafka, kafka_controller_port=controller,
        influx_port=influx, kafka_bootstrap_servers=f"127.0.0.1:{kafka}", influx_url=f"http://127.0.0.1:{influx}",
    )
    yield settings
    stack.down(settings)


def _influx_values(settings: Settings) -> list[float]:
    sink = InfluxSink(settings)
    try:
        return [row["v"] for row in sink.query('SELECT "v" FROM "persist"')]
    finally:
        sink.close()


def test_up_down_up_and_sigkill_keep_data(private):
    first = stack.up(private)
    assert any(line.startswith("kafka: started") for line in first)
    assert any(line.startswith("influx: started") for line in first)

    again = stack.up(private)
    assert "kafka: already running" in again[0] and "influx: already running" in again[1]

    with Publisher(private, topic="persist") as pub:
        for i in range(50):
            pub.publish_raw(b"k%d" % (i % 5), b"message-%d" % i)
    assert pub.stats.acked == 50
    sink = InfluxSink(private)
    sink.write([f"persist v={i} {1_800_000_000 + i}" for i in range(10)])
    sink.close()

    assert all("stopped" in line for line in stack.down(private))
    assert not any(s.running for s in stack.status(private))
    stack.up(private)
    assert sorted(read_topic(private, "persist")) == sorted(b"message-%d" % i for i in range(50))
    assert sorted(_influx_values(private)) == list(range(10))

    broker = KafkaBroker(private.state_dir, private.kafka_port, private.kafka_controller_port, private.kafka_version)
    pid = broker.pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: broker.pid() is None, 30), f"broker pid {pid} still running after SIGKILL"
    assert [s.healthy for s in stack.status(private)] == [False, True]
    lines = stack.up(private)
    assert lines[0].startswith("kafka: started")
    assert sorted(read_topic(private, "persist")) == sorted(b"message-%d" % i for i in range(50))


def test_port_taken_is_named(private, tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = Settings(state_dir=tmp_path, influx_port=port, kafka_port=private.kafka_port,
                            kafka_controller_port=private.kafka_controller_port)
        influx = stack.services(settings)[1]
        with pytest.raises(StackError, match=f"port {port} is already taken.*LAGGARD_INFLUX_PORT"):
            influx.start()


def test_missing_java_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    broker = KafkaBroker(tmp_path, 1, 2, "4.1.1")
    with pytest.raises(StackError, match="no `java` on PATH.*Java 17.*apt-get install"):
        broker.prepare()


def test_maven_failure_names_the_artifact(tmp_path, monkeypatch):
    monkeypatch.setattr("laggard.commands.stack.kafka.CACHE_ROOT", tmp_path / "cache")
    broker = KafkaBroker(tmp_path, 1, 2, "0.0.0-does-not-exist")
    with pytest.raises(StackError, match=r"Maven could not resolve org\.apache\.kafka:kafka_2\.13:0\.0\.0-does-not-exist"):
        broker.resolve()
