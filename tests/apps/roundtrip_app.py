"""A minimal Faust app for the foundation's end-to-end test: NodeSample in, one point per GPU
out to InfluxDB through the real sink. Topic and measurement come from the environment."""

import os

import faust
from influxdb_client import Point

from laggard.agents.sink import InfluxSink
from laggard.events import EventRejected, decode_node_sample
from laggard.settings import get_settings

settings = get_settings()
topic_name = os.environ["ROUNDTRIP_TOPIC"]
measurement = os.environ["ROUNDTRIP_MEASUREMENT"]
app = faust.App(
    f"roundtrip-{topic_name}", broker=f"kafka://{settings.kafka_bootstrap_servers}", store="memory://",
    web_enabled=False, consumer_auto_offset_reset="earliest", topic_partitions=1,
)
topic = app.topic(topic_name, value_serializer="raw")
sink = InfluxSink(settings)


@app.agent(topic)
async def write_samples(stream):
    async for raw in stream:
        try:
            sample = decode_node_sample(raw)
        except EventRejected:
            continue
        sink.write(
            Point(measurement).tag("node", sample.node).tag("gpu", str(gpu.index))
            .field("util_gpu", gpu.util_gpu).time(int(sample.ts), "s")
            for gpu in sample.gpus
        )


if __name__ == "__main__":
    app.main()
