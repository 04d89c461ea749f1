"""The local stack: `laggard stack up | down | status` runs Kafka and InfluxDB on this machine.
Which InfluxDB is `settings.local_influx_version`: 1 (Debian's 1.6.7) or 2 (2.7, built once)."""

from __future__ import annotations

import shutil

from pydantic import SecretStr

from laggard.commands.stack.influx import InfluxDB
from laggard.commands.stack.influx2 import InfluxDB2
from laggard.commands.stack.kafka import SASL_MECHANISMS, SASL_USER, KafkaBroker
from laggard.commands.stack.process import ManagedService, ServiceStatus, StackError
from laggard.settings import Settings

__all__ = ["services", "up", "down", "status", "StackError", "ServiceStatus"]


def influx_services(settings: Settings) -> dict[int, ManagedService]:
    return {
        1: InfluxDB(settings.state_dir, settings.influx_port, settings.influx_database),
        2: InfluxDB2(settings.state_dir, settings.influx2_port, settings.influx_org, settings.influx_bucket),
    }


def services(settings: Settings) -> list[ManagedService]:
    kafka = KafkaBroker(settings.state_dir, settings.kafka_port, settings.kafka_controller_port, settings.kafka_version,
                        settings.kafka_tls_port, settings.kafka_sasl_port)
    return [kafka, influx_services(settings)[settings.local_influx_version]]


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
        if isinstance(service, KafkaBroker) and service.tls_port:
            lines.append(f"kafka: TLS listener on 127.0.0.1:{service.tls_port}, certificate {service.tls_ca}")
        if isinstance(service, KafkaBroker) and service.sasl_port:
            lines.append(f"kafka: SASL_SSL listener on 127.0.0.1:{service.sasl_port} ({', '.join(SASL_MECHANISMS)}), "
                         f"user {SASL_USER}, password in {service.sasl_password_file}, certificate {service.tls_ca}")
        if isinstance(service, InfluxDB2) and (reset or settings.influx_token is None):
            # Generated just now (a reset wiped the old one): hand it to the caller's clients.
            settings.influx_token = SecretStr(service.token())
    from laggard.topics import ensure_topics

    created = ensure_topics(settings)
    if created:
        lines.append("kafka: created topics " + ", ".join(created))
    return lines


def down(settings: Settings) -> list[str]:
    """Stops the stack, and the other InfluxDB kind too when it runs (after `local_influx_version` changed)."""
    other = [s for v, s in influx_services(settings).items() if v != settings.local_influx_version and s.pid()]
    return [service.stop() for service in reversed(services(settings) + other)]


def status(settings: Settings) -> list[ServiceStatus]:
    return [service.status() for service in services(settings)]
