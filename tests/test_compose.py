"""docker-compose.yml cannot run here (no Docker engine), so check what can be checked: the
services exist and every laggard setting it names is one the code reads."""

from __future__ import annotations

from pathlib import Path

import yaml

from laggard.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_the_production_services():
    services = _compose()["services"]
    assert {"kafka", "influxdb", "grafana", "laggard-worker", "laggard-collector"} <= set(services)
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["influxdb"]["environment"]["DOCKER_INFLUXDB_INIT_MODE"] == "setup"


def test_compose_setting_names_are_the_codes():
    fields = set(Settings.model_fields)
    for name in ("laggard-worker", "laggard-collector"):
        env = _compose()["services"][name]["environment"]
        names = [k for k in env if k.startswith("LAGGARD_")]
        assert names, name
        unknown = [k for k in names if k.removeprefix("LAGGARD_").lower() not in fields | {"secrets_dir"}]
        assert unknown == [], f"{name} sets settings the code does not read: {unknown}"
    # Secrets are read from files named after settings (pydantic-settings secrets_dir).
    secret_names = set(_compose()["services"]["laggard-worker"]["secrets"])
    assert secret_names <= fields


def test_compose_points_laggard_at_its_own_services():
    env = _compose()["services"]["laggard-worker"]["environment"]
    settings = Settings(**{k.removeprefix("LAGGARD_").lower(): v for k, v in env.items()
                           if k not in ("LAGGARD_SECRETS_DIR",)})
    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.influx_url == "http://influxdb:8086" and settings.influx_version == 2


def test_secret_files_are_read_under_the_names_compose_mounts(tmp_path: Path) -> None:
    """deploy/secrets/influx_token mounted at /run/secrets/influx_token is the worker's influx_token
    (pydantic-settings alone reads only laggard_influx_token, and an empty token fails silently)."""
    (tmp_path / "influx_token").write_text("from-compose")
    (tmp_path / "kafka_sasl_password").write_text("sasl-secret")
    settings = Settings(_secrets_dir=tmp_path)
    assert settings.influx_token is not None and settings.influx_token.get_secret_value() == "from-compose"
    assert settings.kafka_sasl_password is not None and settings.kafka_sasl_password.get_secret_value() == "sasl-secret"
    (tmp_path / "laggard_influx_token").write_text("prefixed")
    assert Settings(_secrets_dir=tmp_path).influx_token.get_secret_value() == "prefixed"  # type: ignore[union-attr]


def test_the_deployment_can_write_its_state_and_keep_its_data():
    """The worker runs as `nobody` in an image whose /app is root's: its state folder must be one
    the image gives to `nobody`. Kafka's data lives on its volume; the collector restarts."""
    services = _compose()["services"]
    state_dir = services["laggard-worker"]["environment"]["LAGGARD_STATE_DIR"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"chown nobody {state_dir}" in dockerfile and "USER nobody" in dockerfile
    kafka = services["kafka"]
    assert f"kafka-data:{kafka['environment']['KAFKA_LOG_DIRS']}" in kafka["volumes"]
    assert services["laggard-collector"]["restart"] == "unless-stopped"
