"""The worker's Kafka consumer seeks back to the group's commit on every partition (agents/transport.py):
Faust relies on that seek to fetch again the messages it threw away during a rebalance."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka import KafkaProducer

from laggard.agents.transport import rewind_to_committed
from laggard.kafka_config import client_config
from laggard.topics import ensure_topics

MESSAGES_PER_PARTITION = 20


async def read_to_end(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
    end = await consumer.end_offsets(partitions)
    for _ in range(100):
        if all([await consumer.position(tp) >= end[tp] for tp in partitions]):
            return
        await consumer.getmany(timeout_ms=200)
    raise AssertionError({tp: await consumer.position(tp) for tp in partitions})


def test_rewind_moves_partitions_committed_at_zero_or_never(stack, unique):
    topic = f"test-rewind-{unique}"
    ensure_topics(stack.model_copy(update={"topic_samples": topic}))  # 8 partitions
    producer = KafkaProducer(**client_config(stack))
    partitions = [TopicPartition(topic, p) for p in range(3)]
    for tp in partitions:
        for n in range(MESSAGES_PER_PARTITION):
            producer.send(topic, value=b"%d" % n, partition=tp.partition)
    producer.flush()
    producer.close()
    never, at_zero, at_five = partitions

    async def scenario() -> dict[TopicPartition, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers, group_id=f"test-rewind-{unique}",
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign(partitions)
            await consumer.commit({at_zero: 0, at_five: 5})
            await read_to_end(consumer, partitions)
            committed = await rewind_to_committed(consumer, lambda tp: True)
            assert committed == {never: None, at_zero: 0, at_five: 5}
            return {tp: await consumer.position(tp) for tp in partitions}
        finally:
            await consumer.stop()

    # aiokafka's own seek_to_committed would leave `never` and `at_zero` at 20, their messages lost.
    assert asyncio.run(scenario()) == {never: 0, at_zero: 0, at_five: 5}
