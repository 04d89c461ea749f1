"""`laggard demo`: the README's main job on the local stack."""

from __future__ import annotations

import time
import uuid

from kafka import KafkaConsumer

from laggard.events import GpuSample, NodeSample, decode_node_sample
from laggard.kafka_config import client_config
from laggard.settings import Settings


def round_trip(settings: Settings, nodes: int = 4, gpus_per_node: int = 8) -> list[str]:
    """Publish one tick of a small fleet, read it back from Kafka, write it to InfluxDB and query it."""
    from agents.sink import InfluxSink
    from collectors.publisher import Publisher

    run = uuid.uuid4().hex[:8]
    topic, ts = f"laggard.demo.{run}", float(int(time.time()))
    samples = [
        NodeSample(ts=ts, cluster=settings.cluster, node=f"demo-{n:02d}", source="demo", gpus=[
            GpuSample(index=g, uuid=f"GPU-demo-{n}-{g}", model="H200", util_gpu=50 + 5 * g, util_mem=20,
                      power_w=300 + 40 * g, power_limit_w=700, sm_clock_mhz=1980, mem_clock_mhz=3201,
                      temp_c=45, mem_used_mib=1000, mem_total_mib=143_771)
            for g in range(gpus_per_node)])
        for n in range(nodes)
    ]
    with Publisher(settings, topic=topic) as publisher:
        for sample in samples:
            publisher.publish(sample)
    consumer = KafkaConsumer(topic, **client_config(settings), auto_offset_reset="earliest",
                             consumer_timeout_ms=15_000, group_id=f"laggard-demo-{run}")
    received = [decode_node_sample(record.value) for record in consumer]
    consumer.close()
    sink = InfluxSink(settings)
    sink.write(f"demo_roundtrip,run={run},node={s.node} gpus={len(s.gpus)}i,util_mean={sum(g.util_gpu for g in s.gpus) / len(s.gpus)} {int(s.ts)}"
               for s in received)
    rows = sink.query(f"SELECT count(\"gpus\"), mean(\"util_mean\") FROM \"demo_roundtrip\" WHERE \"run\" = '{run}'")
    sink.close()
    return [
        f"published {len(samples)} node samples ({nodes * gpus_per_node} GPUs) to Kafka topic {topic}: "
        f"{publisher.stats.acked} acknowledged",
        f"read back {len(received)} from Kafka; wrote them to InfluxDB {settings.influx_url} db={settings.influx_database}",
        f"InfluxQL says: {rows[0]['count']} points, mean utilization {rows[0]['mean']:.1f}%" if rows else "InfluxQL returned nothing",
    ]
