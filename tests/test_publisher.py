"""The shared Publisher against the real local broker: delivery exactly once, counters, the key ->
partition mapping, backpressure, and a collector stopped by SIGTERM keeping every acknowledged sample."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.fetcher import ConsumerRecord

from laggard.batches import decode_event
from laggard.collectors.publisher import Publisher, default_partition
from laggard.collectors.simulate import FleetSimulator, load_scenario
from laggard.commands.stack.process import wait_until
from laggard.events import decode_node_sample
from laggard.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
STATUS_LINE = re.compile(r"kafka sent (\d+) acked (\d+) failed (\d+)")
READ_LINE = re.compile(r"replay: \d+ ticks, (\d+) node samples")


def _consumer(settings: Settings) -> KafkaConsumer:
    return KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False)


def _end_offsets(consumer: KafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    partitions = consumer.partitions_for_topic(topic) or set()
    return consumer.end_offsets([TopicPartition(topic, p) for p in partitions]) if partitions else {}


def _read_all(settings: Settings, topic: str, timeout_s: float = 60) -> list[ConsumerRecord]:
    """Every record in `topic`, from the beginning up to the end offsets seen when reading starts."""
    consumer = _consumer(settings)
    try:
        end = _end_offsets(consumer, topic)
        consumer.assign(list(end))
        consumer.seek_to_beginning()
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < offset for tp, offset in end.items()):
            assert time.monotonic() < deadline, f"read {len(records)} of {sum(end.values())} records in time"
            for batch in consumer.poll(timeout_ms=500).values():
                records += batch
        return records
    finally:
        consumer.close()


def test_every_message_is_acked_and_read_back_exactly_once(stack, unique):
    topic = f"test.publisher.{unique}"
    messages = [(b"node-%02d" % (i % 24), b'{"n": %d, "pad": "%s"}' % (i, b"x" * (i % 300))) for i in range(600)]
    with Publisher(stack, topic=topic) as pub:
        for key, value in messages:
            pub.publish_raw(key, value)
    stats = pub.stats.as_dict()
    assert stats | {"last_error": ""} == {
        "sent": 600, "acked": 600, "retried": 0, "failed": 0, "blocked": 0,
        "bytes": sum(len(value) for _, value in messages), "in_flight_bytes": 0, "replaced_producers": 0,
        "last_error": "", "failed_reasons": {},
    }

    records = _read_all(stack, topic)
    assert Counter((r.key, r.value) for r in records) == Counter(messages)  # each exactly once
    with closing(_consumer(stack)) as consumer:
        partition_count = len(consumer.partitions_for_topic(topic))
    assert partition_count > 1  # otherwise the mapping below says nothing
    assert all(r.partition == default_partition(r.key, partition_count) for r in records)


def test_keys_land_where_kafka_pythons_default_partitioner_puts_them(stack, unique):
    topic = f"test.publisher.partitions.{unique}"
    keys = [b"h100-%03d" % i for i in range(40)]
    with Publisher(stack, topic=topic) as pub:
        for key in keys:
            pub.publish_raw(key, b"{}")
    ours = {r.key: r.partition for r in _read_all(stack, topic)}

    producer = KafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    try:
        theirs = {key: producer.send(topic, b"{}", key).get(timeout=30).partition for key in keys}
    finally:
        producer.close()
    assert len(set(theirs.values())) > 1
    assert ours == theirs


def test_tiny_in_flight_bound_blocks_but_delivers_everything(stack, unique):
    topic = f"test.publisher.backpressure.{unique}"
    values = [b"%06d:" % i + b"y" * 2000 for i in range(400)]
    with Publisher(stack, topic=topic, max_in_flight_bytes=8_000, linger_ms=5) as pub:
        for i, value in enumerate(values):
            pub.publish_raw(b"node-%d" % (i % 7), value)
            assert pub.stats.in_flight_bytes <= 8_000 + len(value)
    assert pub.stats.blocked > 0
    assert (pub.stats.acked, pub.stats.failed, pub.stats.in_flight_bytes) == (400, 0, 0)
    assert sorted(r.value for r in _read_all(stack, topic)) == values


def test_a_message_too_large_for_the_topic_fails_alone_and_the_others_arrive_once(stack, unique):
    topic = f"test.publisher.too-large.{unique}"
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, 3, 1, topic_configs={"max.message.bytes": "10000"})])
    finally:
        admin.close()
    good = [(b"node-%d" % (i % 5), b'{"n": %d}' % i) for i in range(400)]
    too_large = os.urandom(50_000)  # random bytes: lz4 cannot shrink it under the topic's limit
    with Publisher(stack, topic=topic) as pub:
        for key, value in good[:200]:
            pub.publish_raw(key, value)
        pub.publish_raw(b"node-big", too_large)
        for key, value in good[200:]:
            pub.publish_raw(key, value)
    # close() above returned: the producer kafka-python left in its fatal state was replaced
    assert (pub.stats.sent, pub.stats.acked, pub.stats.failed) == (401, 400, 1)
    assert pub.stats.failed_reasons == {"MessageSizeTooLargeError": 1}
    assert pub.stats.replaced_producers >= 1 and pub.stats.retried >= 1
    assert pub.stats.in_flight_bytes == 0
    assert Counter((r.key, r.value) for r in _read_all(stack, topic)) == Counter(good)  # each exactly once


def test_a_message_over_max_request_size_is_refused_before_sending(stack, unique):
    topic = f"test.publisher.max-request.{unique}"
    with Publisher(stack, topic=topic, max_request_size=10_000) as pub:
        pub.publish_raw(b"node-1", b"a")
        pub.publish_raw(b"node-1", b"b" * 20_000)
        pub.publish_raw(b"node-1", b"c")
    assert (pub.stats.sent, pub.stats.acked, pub.stats.failed, pub.stats.replaced_producers) == (3, 2, 1, 0)
    assert pub.stats.failed_reasons == {"MessageSizeTooLargeError": 1}
    assert "max_request_size" in pub.stats.last_error
    assert sorted(r.value for r in _read_all(stack, topic)) == [b"a", b"c"]


def _simulated_samples_file(path: Path) -> int:
    """Write the quiet scenario's NodeSamples as JSON lines (the `replay --format samples` input)."""
    sim = FleetSimulator(load_scenario(ROOT / "collectors/scenarios/quiet.yaml"), start_ts=time.time() - 3600)
    count = 0
    with path.open("wb") as out:
        for _ts, batch in sim.encoded_ticks():
            out.writelines(value + b"\n" for _key, value in batch)
            count += len(batch)
    return count


def _sigterm_once_published(stack: Settings, command: list[str], env: dict[str, str], topic: str,
                            at_least: int) -> tuple[int, str]:
    """Run `command`, SIGTERM it once `topic` holds `at_least` messages; its exit code and stderr.
    It must still be running then, and must exit within the deadline."""
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        with closing(_consumer(stack)) as consumer:
            published = wait_until(
                lambda: process.poll() is not None or sum(_end_offsets(consumer, topic).values()) >= at_least,
                timeout_s=90, interval_s=0.05,
            )
        assert published and process.poll() is None, "it published nothing, or ended, before SIGTERM"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)  # the deadline: one SIGTERM is enough
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr


def test_sigterm_while_publishing_keeps_every_acknowledged_sample(stack, unique, tmp_path):
    topic = f"test.publisher.sigterm.{unique}"
    samples_file = tmp_path / "quiet.jsonl"
    total = _simulated_samples_file(samples_file)
    command = [sys.executable, "-m", "laggard.collectors.cli", "replay", str(samples_file), "--format", "samples",
               "--speed", "0"]
    returncode, stderr = _sigterm_once_published(stack, command, {"LAGGARD_TOPIC_SAMPLES": topic}, topic, 300)
    assert returncode == 0, stderr[-2000:]
    status = STATUS_LINE.search(stderr)
    read = READ_LINE.search(stderr)
    assert status is not None and read is not None, stderr[-2000:]
    sent, acked, failed = map(int, status.groups())
    assert failed == 0 and acked == sent
    node_samples = int(read.group(1))
    assert 300 <= acked and node_samples < total  # stopped part-way, with what was sent flushed

    # Every node sample the source read before the signal is in the topic, in the batches held then too.
    in_topic = Counter((s.node, s.ts) for r in _read_all(stack, topic) for s in decode_event(r.value).samples())
    assert sum(in_topic.values()) >= node_samples
    with samples_file.open("rb") as lines:
        read_first = [decode_node_sample(next(lines)) for _ in range(node_samples)]  # replay keeps file order
    assert not [(s.node, s.ts) for s in read_first if (s.node, s.ts) not in in_topic]


def test_sigterm_stops_an_unpaced_simulation_with_everything_acknowledged_in_the_topic(stack, unique):
    topic = f"test.publisher.simulate-sigterm.{unique}"
    env = {"LAGGARD_TOPIC_SAMPLES": topic, "LAGGARD_TOPIC_TRUTH": f"{topic}.truth"}
    # The quiet fleet (128 nodes, no faults, so no truth messages) for an hour: far more than it
    # can publish before the signal.
    command = [sys.executable, "-m", "laggard.commands.cli", "simulate", str(ROOT / "collectors/scenarios/quiet.yaml"),
               "--as-fast-as-possible", "--duration", "3600"]
    returncode, stderr = _sigterm_once_published(stack, command, env, topic, 300)
    assert returncode == 0, stderr[-2000:]
    assert "(stopped)" in stderr, stderr[-2000:]
    status = STATUS_LINE.search(stderr)
    assert status is not None, stderr[-2000:]
    sent, acked, failed = map(int, status.groups())
    assert failed == 0 and acked == sent
    in_topic = len(_read_all(stack, topic))
    assert 300 <= acked <= in_topic < 128 * 3600
