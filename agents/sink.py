"""Writes line-protocol points to InfluxDB: 1.x through `/write?db=` (Debian's 1.6.7 has nothing
else), 2.x and 3.x through influxdb-client's synchronous write API (`/api/v2/write`, token, org,
bucket). The version is a setting, detected from `/ping` when unset.

A write that fails is retried with capped exponential backoff until it succeeds: the agent calling
it does not finish the event, so Faust does not commit past it and the results wait in Kafka while
InfluxDB is down. The synchronous API is used on purpose: the batching WriteApi loses what it
buffered unless closed, and its flush() does nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import httpx
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from laggard.settings import Settings, get_settings

log = logging.getLogger(__name__)


class InfluxUnavailable(RuntimeError):
    pass


class InfluxRejected(ValueError):
    """InfluxDB refused the points themselves (HTTP 4xx: a field type conflict, bad syntax):
    retrying cannot help, so the caller dead-letters them."""


def detect_version(url: str, timeout_s: float = 5.0) -> int:
    """1, 2 or 3 from the `X-Influxdb-Version` header of /ping (e.g. '1.6.7~rc0', 'v2.7.11', '3.0.1')."""
    reply = httpx.get(f"{url}/ping", timeout=timeout_s)
    version = reply.headers.get("X-Influxdb-Version", "").lstrip("v")
    if not version[:1].isdigit():
        raise InfluxUnavailable(f"{url}/ping gave no X-Influxdb-Version header; set LAGGARD_INFLUX_VERSION")
    return int(version.split(".")[0])


def to_lines(points: Iterable[Point | str]) -> list[str]:
    return [p if isinstance(p, str) else p.to_line_protocol() for p in points]


class InfluxSink:
    """`sink.write(points)` blocks until InfluxDB has them (or `give_up_after_s` passes)."""

    def __init__(self, settings: Settings | None = None, give_up_after_s: float | None = None) -> None:
        self.settings = settings or get_settings()
        self.url = self.settings.influx_url.rstrip("/")
        self.give_up_after_s = give_up_after_s
        self._version = self.settings.influx_version
        self._client: InfluxDBClient | None = None
        self._http = httpx.Client(timeout=30)
        self.points_written = 0
        self.write_failures = 0

    @property
    def version(self) -> int:
        if self._version is None:
            self._version = self._retrying(lambda: detect_version(self.url))
        return self._version

    def _retrying(self, fn: Any) -> Any:
        stop = stop_after_delay(self.give_up_after_s) if self.give_up_after_s is not None else (lambda _: False)
        for attempt in Retrying(
            retry=retry_if_exception_type((httpx.HTTPError, InfluxUnavailable, OSError)),
            wait=wait_exponential_jitter(multiplier=0.2, max=10), stop=stop, reraise=True,
            before_sleep=self._log_retry,
        ):
            with attempt:
                return fn()
        return None

    def _log_retry(self, state: Any) -> None:
        self.write_failures += 1
        err = state.outcome.exception()
        log.warning("InfluxDB at %s unavailable (%s); retry %d", self.url, type(err).__name__, state.attempt_number)

    def write(self, points: Iterable[Point | str], precision: str = "s") -> None:
        lines = to_lines(points)
        if not lines:
            return
        body = "\n".join(lines)
        self._retrying(lambda: self._write_once(body, precision))
        self.points_written += len(lines)

    def _write_once(self, body: str, precision: str) -> None:
        if self.version == 1:
            params = {"db": self.settings.influx_database, "precision": precision}
            auth = self._v1_auth()
            reply = self._http.post(f"{self.url}/write", params=params, content=body.encode(), auth=auth)
            if reply.status_code >= 500:
                raise InfluxUnavailable(f"HTTP {reply.status_code}")
            if reply.status_code != 204:
                raise InfluxRejected(f"InfluxDB rejected the write: HTTP {reply.status_code} {reply.text[:300]}")
            return
        self._v2_client().write_api(write_options=SYNCHRONOUS).write(
            bucket=self.settings.influx_bucket, org=self.settings.influx_org, record=body,
            write_precision=getattr(WritePrecision, precision.upper()),
        )

    def _v1_auth(self) -> tuple[str, str] | None:
        if self.settings.influx_username and self.settings.influx_password:
            return (self.settings.influx_username, self.settings.influx_password.get_secret_value())
        return None

    def _v2_client(self) -> InfluxDBClient:
        if self._client is None:
            token = self.settings.influx_token.get_secret_value() if self.settings.influx_token else ""
            self._client = InfluxDBClient(url=self.url, token=token, org=self.settings.influx_org)
        return self._client

    def query(self, influxql: str) -> list[dict[str, Any]]:
        """Run InfluxQL (1.x natively; 2.x/3.x through their /query compatibility endpoint)."""
        params = {"db": self.settings.influx_database if self.version == 1 else self.settings.influx_bucket,
                  "q": influxql, "epoch": "s"}
        headers = {}
        if self.version != 1 and self.settings.influx_token:
            headers["Authorization"] = f"Token {self.settings.influx_token.get_secret_value()}"
        reply = self._http.get(f"{self.url}/query", params=params, headers=headers, auth=self._v1_auth())
        reply.raise_for_status()
        rows: list[dict[str, Any]] = []
        for result in reply.json().get("results", []):
            if "error" in result:
                raise ValueError(f"InfluxQL error: {result['error']}")
            for series in result.get("series", []):
                for values in series["values"]:
                    rows.append({**series.get("tags", {}), **dict(zip(series["columns"], values))})
        return rows

    def close(self) -> None:
        self._http.close()
        if self._client is not None:
            self._client.close()

