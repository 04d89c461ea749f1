"""The local stack: `laggard stack up | down | status` runs Kafka and InfluxDB on this machine."""

from __future__ import annotations

import shutil

from laggard.settings import Settings
from laggard.stack.influx import InfluxDB
from laggard.stack.kafka import KafkaBroker
from laggard.stack.process import ManagedService, ServiceStatus, StackError

__all__ = ["services", "up", "down", "status", "StackError", "ServiceStatus"]


def services(settings: Settings) -> list[ManagedService]:
    return [
        KafkaBroker(settings.state_dir, settings.kafka_port, settings.kafka_controller_port, settings.kafka_version),
        InfluxDB(settings.state_dir, settings.influx_port, settings.influx_database),
    ]


def up(settings: Settings, reset: bool = False) -> list[str]:
    """Start what is not running and wait for it to answer. Raises StackError naming the service."""
    lines = []
    if reset:
        lines += down(settings)
        for service in services(settings):
            shutil.rmtree(service.home, ignore_errors=True)
            lines.append(f"{service.name}: data wiped ({service.home})")
    for service in services(settings):
        lines.append(service.start())
    from laggard.topics import ensure_topics

    created = ensure_topics(settings)
    if created:
        lines.append("kafka: created topics " + ", ".join(created))
    return lines


def down(settings: Settings) -> list[str]:
    return [service.stop() for service in reversed(services(settings))]


def status(settings: Settings) -> list[ServiceStatus]:
    return [service.status() for service in services(settings)]
