"""Faust's own ceiling: a worker whose only agent counts the samples topic's messages, with the
laggard worker's consumer settings. bench/agents.py runs it on the same pre-published topic as
the real worker; the ratio says how much of a worker's time is laggard's and how much Faust's.
It prints `noop_messages_per_s=N` on stderr once it has counted `LAGGARD_BENCH_MESSAGES`.

    LAGGARD_TOPIC_SAMPLES=... LAGGARD_WORKER_APP_ID=... LAGGARD_BENCH_MESSAGES=N python bench/faust_noop.py
"""

from __future__ import annotations

import os
import sys
import time

import faust

from laggard.settings import get_settings

settings = get_settings()
expected = int(os.environ["LAGGARD_BENCH_MESSAGES"])
app = faust.App(f"{settings.worker_app_id}-noop", broker=f"kafka://{settings.kafka_bootstrap_servers}",
                store="memory://", web_enabled=False, consumer_auto_offset_reset="earliest",
                stream_buffer_maxsize=16384, consumer_max_fetch_size=8 * 1024 * 1024,
                datadir=str(settings.state_dir / "workers" / f"{settings.worker_app_id}-noop"))
samples_topic = app.topic(settings.topic_samples, value_serializer="raw", key_serializer="raw")
seen = {"count": 0, "first": 0.0}


@app.agent(samples_topic)
async def count(stream: faust.StreamT) -> None:
    async for _event in stream.events():
        seen["count"] += 1
        if seen["count"] == 1:
            seen["first"] = time.perf_counter()
        elif seen["count"] == expected:
            rate = (expected - 1) / (time.perf_counter() - seen["first"])
            sys.__stderr__.write(f"noop_messages_per_s={rate:.0f}\n")
            sys.__stderr__.flush()
            os._exit(0)  # a measurement, not a service: no graceful shutdown to wait for


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn"]
    app.main()
