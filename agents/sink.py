"""Writes line-protocol points to InfluxDB: 1.x through `/write?db=` (Debian's 1.6.7 has nothing
else), 2.x and 3.x through `/api/v2/write` (token, org, bucket). The version is a setting,
detected from `/ping` when unset.

A write that fails is retried with capped exponential backoff until it succeeds: the agent calling
it does not finish the event, so Faust does not commit past it and the results wait in Kafka while
InfluxDB is down. Only a refusal of the points themselves (HTTP 400, 413, 422: a field type
conflict, bad syntax, too large) is not retried: it raises InfluxRejected, which carries the lines
InfluxDB refused (the others in a partial write were written), and the caller dead-letters them.
InfluxDB's answer does not say which lines it refused (1.x names at most one unparseable line and
leaves unparseable lines out of its `dropped=` count), so the sink finds them by writing the
refused batch again in halves: a point InfluxDB accepted is overwritten by the same point, so
this never doubles one, and a line is dead-lettered only if InfluxDB refused it.
A wrong token, a missing database or bucket (401, 403, 404) is retried like an outage,
logged with InfluxDB's answer, so fixing the setting loses nothing.

Both versions go through one httpx client, so every failure is one of the exceptions above:
influxdb-client's write API raised its own ApiException for refusals and urllib3's for a server
that was down, which neither the retry nor the caller caught.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Iterable

import httpx
from influxdb_client import Point
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_any,
    stop_never,
    wait_exponential_jitter,
)

from laggard.settings import Settings, get_settings

log = logging.getLogger(__name__)


class InfluxUnavailable(RuntimeError):
    pass


class InfluxRejected(ValueError):
    """InfluxDB refused the points themselves: retrying cannot help, so the caller dead-letters
    them. From `InfluxSink.write`, `rejected` holds the lines InfluxDB did not write (a superset
    only past MAX_ISOLATING_WRITES) and `dropped` is their number; from a single request, `dropped` is what InfluxDB's answer says it
    dropped (None when it does not say) and `rejected` is empty (not yet known)."""

    def __init__(self, message: str, dropped: int | None, rejected: list[str] | None = None) -> None:
        super().__init__(message)
        self.dropped = dropped
        self.rejected = rejected or []


# Statuses that refuse the points themselves; any other failure is retried.
REJECTED_STATUSES = frozenset({400, 413, 422})
_DROPPED = re.compile(r"dropped=(\d+)")
# Most extra requests spent finding which lines of a refused batch were refused; past it, the
# lines not yet told apart are all reported as refused (a replay of those that were written
# overwrites them with themselves).
MAX_ISOLATING_WRITES = 256


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

    def __init__(self, settings: Settings | None = None, give_up_after_s: float | None = None,
                 stopping: threading.Event | None = None) -> None:
        self.settings = settings or get_settings()
        # Set when the process is told to stop: retrying gives up (raising the last failure) so
        # a worker stops while InfluxDB is down; what it held is re-read at its next start.
        self.stopping = stopping or threading.Event()
        self.url = self.settings.influx_url.rstrip("/")
        self.give_up_after_s = give_up_after_s
        self._version = self.settings.influx_version
        self._http = httpx.Client(timeout=30)
        self.points_written = 0
        self.write_failures = 0
        self.unavailable_since: float | None = None  # unix time of the first failure of the current outage

    @property
    def version(self) -> int:
        if self._version is None:
            self._version = self._retrying(lambda: detect_version(self.url))
        return self._version

    def _retrying(self, fn: Any) -> Any:
        stop = stop_after_delay(self.give_up_after_s) if self.give_up_after_s is not None else stop_never
        for attempt in Retrying(
            retry=retry_if_exception_type((httpx.HTTPError, InfluxUnavailable, OSError)),
            wait=wait_exponential_jitter(multiplier=0.2, max=10), stop=stop_any(stop, lambda _: self.stopping.is_set()),
            sleep=self.stopping.wait, reraise=True, before_sleep=self._log_retry,
        ):
            with attempt:
                result = fn()
                self.unavailable_since = None
                return result
        return None

    def _log_retry(self, state: Any) -> None:
        self.write_failures += 1
        if self.unavailable_since is None:
            self.unavailable_since = time.time()
        err = state.outcome.exception()
        log.warning("InfluxDB at %s unavailable (%s: %s); retry %d", self.url, type(err).__name__, err,
                    state.attempt_number)

    def write(self, points: Iterable[Point | str], precision: str = "s") -> None:
        lines = to_lines(points)
        if not lines:
            return
        try:
            self._write_lines(lines, precision)
        except InfluxRejected as err:
            rejected = self._refused_lines(lines, precision, err)
            self.points_written += len(lines) - len(rejected)
            if rejected:  # else every part went in when written again
                raise InfluxRejected(str(err), len(rejected), rejected) from None
            return
        self.points_written += len(lines)

    def _write_lines(self, lines: list[str], precision: str) -> None:
        body = "\n".join(lines)
        self._retrying(lambda: self._write_once(body, precision))

    def _refused_lines(self, lines: list[str], precision: str, refusal: InfluxRejected) -> list[str]:
        """The lines of a batch InfluxDB refused. A part InfluxDB did not take whole is written
        again in halves, each half followed at once by its own halves, so every point's last write
        is still its last line in the batch (the same point twice keeps the later value). A part
        InfluxDB says it dropped whole (`dropped=` its size) is not split further."""
        budget = MAX_ISOLATING_WRITES

        def refused_in(part: list[str], err: InfluxRejected) -> list[str]:
            nonlocal budget
            if len(part) == 1 or err.dropped == len(part) or budget <= 0:
                return part
            refused: list[str] = []
            for half in (part[: len(part) // 2], part[len(part) // 2 :]):
                budget -= 1
                try:
                    self._write_lines(half, precision)
                except InfluxRejected as half_err:
                    refused += refused_in(half, half_err)
            return refused

        return refused_in(lines, refusal)

    def _write_once(self, body: str, precision: str) -> None:
        if self.version == 1:
            url, params = f"{self.url}/write", {"db": self.settings.influx_database, "precision": precision}
        else:
            url = f"{self.url}/api/v2/write"
            params = {"org": self.settings.influx_org, "bucket": self.settings.influx_bucket, "precision": precision}
        reply = self._http.post(url, params=params, content=body.encode(), headers=self._v2_headers(),
                                auth=self._v1_auth())
        if reply.status_code == 204:
            return
        answer = f"HTTP {reply.status_code} {reply.text[:300]}"
        if reply.status_code in REJECTED_STATUSES:
            dropped = _DROPPED.search(reply.text)
            raise InfluxRejected(f"InfluxDB rejected the write: {answer}", int(dropped[1]) if dropped else None)
        raise InfluxUnavailable(answer)

    def _v1_auth(self) -> tuple[str, str] | None:
        if self.settings.influx_username and self.settings.influx_password:
            return (self.settings.influx_username, self.settings.influx_password.get_secret_value())
        return None

    def _v2_headers(self) -> dict[str, str]:
        if self.version != 1 and self.settings.influx_token:
            return {"Authorization": f"Token {self.settings.influx_token.get_secret_value()}"}
        return {}

    def query(self, influxql: str) -> list[dict[str, Any]]:
        """Run InfluxQL (1.x natively; 2.x/3.x through their /query compatibility endpoint)."""
        params = {"db": self.settings.influx_database if self.version == 1 else self.settings.influx_bucket,
                  "q": influxql, "epoch": "s"}
        reply = self._http.get(f"{self.url}/query", params=params, headers=self._v2_headers(), auth=self._v1_auth())
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

