"""kafka-python client settings (bootstrap servers, TLS, SASL) from laggard's Settings."""

from __future__ import annotations

from typing import Any

from laggard.settings import Settings


def client_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers.split(","),
        "security_protocol": settings.kafka_security_protocol,
        "request_timeout_ms": 30_000,
        "bootstrap_timeout_ms": int(settings.kafka_bootstrap_timeout_s * 1000),
    }
    if settings.kafka_ssl_cafile:
        config["ssl_cafile"] = str(settings.kafka_ssl_cafile)
    if settings.kafka_sasl_mechanism:
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            config["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return config


def unreachable(settings: Settings, err: Exception) -> str:
    """One line for a client that could not connect: where, how, and what to check."""
    within = f" within {settings.kafka_bootstrap_timeout_s:g} s" if "bootstrap" in str(err) else ""
    line = (f"cannot reach Kafka at {settings.kafka_bootstrap_servers} over {settings.kafka_security_protocol}{within}: "
            f"{err}. Check LAGGARD_KAFKA_BOOTSTRAP_SERVERS and that the broker runs "
            "(`laggard stack status` for the local one)")
    if settings.kafka_security_protocol.startswith("SASL"):
        line += (f"; kafka-python reports a refused {settings.kafka_sasl_mechanism} login the same way, so check "
                 "LAGGARD_KAFKA_SASL_USERNAME and the password too (the broker's log names failed logins)")
    return line + "."
