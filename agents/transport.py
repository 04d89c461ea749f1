"""Faust's Kafka transport (aiokafka) with one fix: seeking back to the group's commit moves every
partition, including one the group has committed at offset 0 or not at all.

Faust throws away messages it fetched while its flow was stopped (a rebalance, a table recovery)
and calls `Consumer.perform_seek` to fetch them again from the group's committed offsets.
aiokafka's `seek_to_committed` seeks only partitions committed above 0 (`if offset and offset > 0`
in aiokafka 0.14), so on a partition nobody had committed yet (a new topic, a second worker joining
a busy group) the thrown-away messages were never delivered: the worker held the partition, Faust's
read offset stayed at 0 and aiokafka's position at the end. `bench/scale.py` with two workers saw
it in most runs (issue 12).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP


async def rewind_to_committed(consumer: AIOKafkaConsumer,
                              rewinds: Callable[[TopicPartition], bool]) -> dict[TopicPartition, int | None]:
    """Seek every assigned partition to the group's committed offset, and those of them that
    `rewinds` picks and that are committed at 0 or not at all to their beginning (where the
    group resumes them: laggard's consumers start at the earliest). Returns the committed offsets."""
    committed = await consumer.seek_to_committed()
    unmoved = [tp for tp, offset in committed.items() if not offset and rewinds(tp)]
    if unmoved:
        await consumer.seek_to_beginning(*unmoved)
    return committed


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[TP, int]:
        # Changelog partitions are positioned by Faust's table recovery, not by the group's commit.
        changelogs = self.app.tables.changelog_topics
        return await self.call_thread(rewind_to_committed, self._ensure_consumer(),
                                      lambda tp: tp.topic not in changelogs)


class Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer


class App(faust.App):
    """A Faust app whose consumer is the one above."""

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
