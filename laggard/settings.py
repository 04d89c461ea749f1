"""Where things are: one settings object read from the environment (LAGGARD_*) and an optional
env file, with the local stack's values as defaults so the same code points at production.

Secrets (InfluxDB token and password, Kafka SASL password) are SecretStr: they print as '**********'.
A secret can also come from a file: set LAGGARD_SECRETS_DIR to a folder holding one file per
setting name (e.g. `influx_token`, or `laggard_influx_token`), the Docker/Kubernetes secrets convention.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SecretsSettingsSource, SettingsConfigDict

from laggard import redaction


def _default_state_dir() -> Path:
    return Path(os.environ.get("LAGGARD_STATE_DIR", Path.cwd() / ".stack"))



def local_influx2_token_file(state_dir: Path) -> Path:
    """Where `stack up --influx 2` keeps the token it generated for the local InfluxDB 2 (mode 600)."""
    return state_dir / "influx2" / "token"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LAGGARD_",
        env_file=os.environ.get("LAGGARD_ENV_FILE", "laggard.env"),
        env_file_encoding="utf-8",
        secrets_dir=os.environ.get("LAGGARD_SECRETS_DIR") or None,
        extra="ignore",
    )

    cluster: str = "local"

    # Kafka
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    # How long a client may take to reach its first broker before it gives up (a wrong address
    # fails in this time, with one line, instead of kafka-python's 30 s).
    kafka_bootstrap_timeout_s: float = Field(default=10.0, gt=0)
    topic_samples: str = "gpu.samples"
    topic_deadletter: str = "laggard.deadletter"
    topic_windows: str = "laggard.windows"
    topic_findings: str = "laggard.findings"
    topic_truth: str = "laggard.truth"
    topic_fleet: str = "laggard.fleet"
    # Compacted, one partition each: silences (`laggard silence`) and the live alerts (`laggard alerts list`)
    # that every worker and command shares (rules/shared_state.py).
    topic_silences: str = "laggard.silences"
    topic_alerts: str = "laggard.alerts"
    topic_partitions: int = Field(default=8, ge=1)
    # Replicas of every topic laggard creates, changelogs included (3 on a production cluster).
    topic_replication_factor: int = Field(default=1, ge=1)
    # False where an admin creates the topics (no CREATE permission): laggard then only checks
    # that they exist and names those missing (`laggard topics` lists names and partitions).
    topic_create: bool = True

    # InfluxDB: version 1 speaks /write + InfluxQL (database), 2 and 3 speak /api/v2 (org, bucket,
    # token). None means: detect from the server's /ping headers.
    influx_url: str = "http://127.0.0.1:8086"
    influx_version: int | None = Field(default=None, ge=1, le=3)
    influx_database: str = "laggard"
    influx_org: str = "laggard"
    influx_bucket: str = "laggard"
    influx_token: SecretStr | None = None
    influx_username: str | None = None
    influx_password: SecretStr | None = None

    # Local stack (laggard stack up): ports and the folder with data, logs and pids.
    state_dir: Path = Field(default_factory=_default_state_dir)
    kafka_version: str = "4.1.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_tls_port: int | None = None  # local stack: also a TLS listener; its self-signed CA: <state_dir>/kafka/tls/ca.pem
    # local stack: also a SASL_SSL listener (same certificate), user `laggard`, PLAIN or SCRAM-SHA-512,
    # password in <state_dir>/kafka/sasl/password
    kafka_sasl_port: int | None = None
    influx_port: int = 8086
    # Which InfluxDB `stack up` runs: 1 = Debian's 1.6.7 on influx_port, 2 = InfluxDB 2.7 built from
    # source (commands/stack/build_influxd.py) on influx2_port. With 2, influx_url and influx_token
    # default to that local server and the token `stack up` generated.
    local_influx_version: int = Field(default=1, ge=1, le=2)
    influx2_port: int = 8087

    # Worker
    window_s: float = Field(default=10.0, gt=0)
    trend_window_s: float = Field(default=300.0, gt=0)
    late_grace_s: float = Field(default=5.0, ge=0)
    # Wall time a window waits for results from other partitions before it is judged anyway.
    window_hold_s: float = Field(default=15.0, gt=0)
    # Also run the naive "utilization below X%" detector (for `laggard eval` comparisons).
    baseline_detector: bool = False
    baseline_util_pct: float = Field(default=50.0, ge=0, le=100)
    rules_file: Path | None = None  # alert rules and receivers; None = rules/default.yaml
    worker_app_id: str = "laggard-worker"  # Faust app id: consumer group and table topics
    worker_web_host: str = "127.0.0.1"
    worker_web_port: int = 6066

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Secret files named after the setting (`influx_token`, as compose and Kubernetes mount them)
        as well as with the prefix (`laggard_influx_token`, pydantic-settings' own naming), which wins."""
        secrets_dir = getattr(file_secret_settings, "secrets_dir", None)  # the config's, or `_secrets_dir=`
        plain = (SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir, env_prefix=""),) if secrets_dir else ()
        return init_settings, env_settings, dotenv_settings, file_secret_settings, *plain

    @model_validator(mode="after")
    def _point_at_local_influx2(self) -> Settings:
        if self.local_influx_version == 2:
            local = f"http://127.0.0.1:{self.influx2_port}"
            if "influx_url" not in self.model_fields_set:
                self.influx_url = local
            # The local server's token goes to the local server only, never to another URL.
            token_file = local_influx2_token_file(self.state_dir)
            if self.influx_token is None and self.influx_url.rstrip("/") == local and token_file.exists():
                self.influx_token = SecretStr(token_file.read_text().strip())
        return self


    def secret_values(self) -> list[str]:
        """The secrets these settings hold (passwords, tokens, the password in influx_url), for log redaction."""
        secrets = [s.get_secret_value() for s in (self.influx_token, self.influx_password, self.kafka_sasl_password) if s]
        password = urlsplit(self.influx_url).password
        return [*secrets, *([password] if password else [])]


_COMPARISONS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
                "less_than_equal": ("le", "<=")}


def _problem(item: Any) -> str:
    """What is wrong with one value, in a few words ('must be > 0')."""
    ctx = item.get("ctx") or {}
    if item["type"] in _COMPARISONS:
        key, op = _COMPARISONS[item["type"]]
        bound = ctx.get(key)
        return f"must be {op} {bound:g}" if isinstance(bound, float) else f"must be {op} {bound}"
    message = str(item["msg"]).removeprefix("Value error, ")
    return message.replace("Input should be", "must be", 1)


def describe_invalid(err: ValidationError) -> str:
    """One line naming each invalid setting as its environment variable, with its value (never a
    secret's) and what is wrong: 'invalid setting LAGGARD_WINDOW_S=-1: must be > 0'."""
    parts = []
    for item in err.errors(include_url=False):
        name = ".".join(str(part) for part in item["loc"])
        field = Settings.model_fields.get(str(item["loc"][0])) if item["loc"] else None
        if not name:
            parts.append(_problem(item))
            continue
        variable = f"LAGGARD_{name.upper()}"
        if field is not None and "SecretStr" in str(field.annotation):
            shown = variable
        elif "input" in item and isinstance(item["input"], (str, int, float)):
            shown = f"{variable}={redaction.redact(str(item['input']))}"
        else:
            shown = variable
        parts.append(f"{shown}: {_problem(item)}")
    return f"invalid setting{'s' if len(parts) > 1 else ''} " + "; ".join(parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings, read once; their secrets are redacted from every log line from then on."""
    settings = Settings()
    for secret in settings.secret_values():
        redaction.add_secret(secret)
    return settings
