"""Send notifications to webhooks: retries, 429 handling, rate limits, dead letters, no URL leaks.

- Network errors, timeouts and 5xx are retried with exponential backoff and jitter (tenacity).
- 429 waits what the service asks: the Retry-After header, or Discord's `retry_after` JSON field
  (seconds, may be fractional); the receiver's rate limiter is paused for that long too.
- Each receiver has a rate limiter (GCRA, equivalent to a token bucket of `burst` tokens
  refilled at `rate_per_s`).
- A notification still undelivered after the retry budget (the webhook is down, or asks with a
  429 to wait longer than max_retry_after) is deferred: tried again every RETRY_DEFERRED_S (or
  after the wait asked for) until delivered. Later notifications of its group queue behind it, so
  the receiver gets every one, in order (firing before resolved); the worker checkpoints what is
  deferred, so an outage of any length loses nothing. One refused for good (4xx), or that cannot
  be sent at all (a URL httpx will not build, say), goes to the dead-letter callable with the
  reason, and is counted. Nothing a notification contains can raise out of `dispatch`.
- The sent log remembers idempotency keys, so a replay after a restart does not send twice; each
  request carries its key in an `Idempotency-Key` header (and the generic webhook's body), so a
  receiver can drop the repeat that at-least-once delivery still allows: a retry after a timeout
  (the receiver may have taken the first request; counted as `timeout`), or a crash between the
  send and the checkpoint.
- Webhook URLs are secrets (the path or a query value is the credential). httpx puts URLs in its
  exception messages and its INFO log line, so errors are rebuilt from scratch with URLs
  redacted, and a logging filter redacts URLs in httpx/httpcore log records. Error pages that
  echo a URL JSON-escaped (`http:\\/\\/...`) or a credential alone are redacted too.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import re
import time
from collections import Counter, OrderedDict
from email.utils import parsedate_to_datetime
from typing import Any, Awaitable, Callable, Iterable, Literal, Sequence
from urllib.parse import parse_qsl, urlsplit

import httpx
from pydantic import BaseModel, SecretStr
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from laggard.rules.alert_lifecycle import Notification
from laggard.rules.model import ReceiverConfig
from laggard.rules.receivers import PAYLOAD_BUILDERS

log = logging.getLogger("laggard.rules.delivery")

IDEMPOTENCY_HEADER = "Idempotency-Key"

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# A secret URL's path segments and query values this long are treated as credentials on their own.
SECRET_PART_MIN = 8
# How often a notification the webhook did not take (after its retries) is tried again.
RETRY_DEFERRED_S = 60.0


def _credentials(url: str) -> list[tuple[str, str]]:
    """(text, replacement) for every form in which `url`'s credential may be echoed, longest first."""
    parts = urlsplit(url)
    forms = [(url, "<redacted-url>"), (url.replace("/", "\\/"), "<redacted-url>")]
    if len(parts.path) > 1:  # error pages echo the path alone ("Cannot POST /hooks/...")
        forms += [(parts.path, "/<redacted>"), (parts.path.replace("/", "\\/"), "\\/<redacted>")]
    # Token-like path segments and query values (Teams' ?sig=...), wherever they appear.
    forms += [(seg, "<redacted>") for seg in parts.path.split("/") if len(seg) >= SECRET_PART_MIN]
    forms += [(value, "<redacted>") for _, value in parse_qsl(parts.query) if len(value) >= SECRET_PART_MIN]
    return sorted(forms, key=lambda form: -len(form[0]))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace known secret URLs (and their parts, escaped or not), then any URL's path, query and
    credentials, keeping the host."""
    for secret in secrets:
        if secret:
            for form, replacement in _credentials(secret):
                text = text.replace(form, replacement)

    def _host_only(found: re.Match[str]) -> str:
        parts = urlsplit(found.group())
        host = parts.hostname or "?"
        return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}/<redacted>"

    return _URL.sub(_host_only, text)


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as text ("nan", "inf"): JSON has no NaN, and httpx refuses it."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class RedactUrls(logging.Filter):
    """Rewrites a record's message with URLs redacted (httpx logs every request URL at INFO)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()  # () not None: mode's formatter wraps None into (None,)
        return True


_HTTP_LOGGERS = ("httpx", "httpcore", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy")


def install_log_redaction() -> None:
    for name in _HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactUrls) for f in logger.filters):
            logger.addFilter(RedactUrls())


install_log_redaction()


class DeliveryFailed(Exception):
    """A failed send; `reason` is safe to log (no URL)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientFailure(DeliveryFailed):
    """Worth retrying: network error, timeout, 5xx."""


class RateLimited(TransientFailure):
    def __init__(self, reason: str, retry_after: float | None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class RetryLater(DeliveryFailed):
    """A 429 asking to wait longer than the receiver's max_retry_after: deferred, not retried now."""

    def __init__(self, reason: str, after: float) -> None:
        super().__init__(reason)
        self.after = after


class PermanentFailure(DeliveryFailed):
    """Retrying will not help: 4xx other than 429/408."""


class RateLimiter:
    """GCRA: at most `burst` sends at once, then one per 1/rate_per_s seconds."""

    def __init__(self, rate_per_s: float, burst: int = 1) -> None:
        self.interval = 1.0 / rate_per_s
        self.tolerance = (burst - 1) * self.interval
        self.tat = float("-inf")  # theoretical arrival time of the next send

    def reserve(self, now: float) -> float:
        """Take a slot; returns how long to wait before using it."""
        tat = max(self.tat, now)
        self.tat = tat + self.interval
        return max(0.0, tat - self.tolerance - now)

    def block_until(self, until: float) -> None:
        """The service said "not before `until`": no slot before then."""
        self.tat = max(self.tat, until + self.tolerance)


def retry_after_seconds(headers: httpx.Headers, body: bytes, wall_now: float) -> float | None:
    """Seconds to wait from a 429: Discord's JSON `retry_after` (fractional), else the Retry-After
    header (seconds or an HTTP date). None if the response gives no hint."""
    try:
        data = json.loads(body) if body else None
    except ValueError:  # not JSON (Slack answers plain text)
        data = None
    if isinstance(data, dict) and isinstance(data.get("retry_after"), (int, float)):
        return max(0.0, float(data["retry_after"]))
    header = headers.get("retry-after")
    if header is None:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(header).timestamp() - wall_now)
    except (TypeError, ValueError):
        return None


class DeadLetter(BaseModel):
    idempotency_key: str
    receiver: str
    reason: str
    attempts: int
    failed_at: float
    notification: dict[str, Any]


class DeliveryOutcome(BaseModel):
    idempotency_key: str
    receiver: str
    status: Literal["sent", "duplicate", "deferred", "dead_lettered"]
    attempts: int = 0
    reason: str | None = None


class SentLog:
    """Idempotency keys already handled (sent or dead-lettered), oldest dropped past `max_keys`.
    Serialisable so the worker can persist it beside the engine state."""

    def __init__(self, keys: dict[str, str] | None = None, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._keys: OrderedDict[str, str] = OrderedDict(keys or {})

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def record(self, key: str, outcome: str) -> None:
        self._keys[key] = outcome
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def to_dict(self) -> dict[str, str]:
        return dict(self._keys)


class DeliveryStats:
    """Counts per (receiver, event): sent, duplicate, retry, timeout, rate_limited, deferred, dead_lettered."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def incr(self, receiver: str, event: str) -> None:
        self.counts[(receiver, event)] += 1

    def get(self, receiver: str, event: str) -> int:
        return self.counts[(receiver, event)]


DeadLetterSink = Callable[[DeadLetter], Awaitable[None] | None]


class Dispatcher:
    """Delivers notifications to the receivers of a rules file."""

    def __init__(
        self,
        receivers: Sequence[ReceiverConfig],
        *,
        dead_letter: DeadLetterSink,
        environ: dict[str, str] | None = None,
        sent_log: SentLog | None = None,
        stats: DeliveryStats | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        deferred: Iterable[dict[str, Any]] = (),
    ) -> None:
        self.receivers = {r.name: r for r in receivers}
        self.dead_letter = dead_letter
        self.sent_log = sent_log if sent_log is not None else SentLog()
        self.stats = stats if stats is not None else DeliveryStats()
        self.clock, self.wall_clock = clock, wall_clock
        self.urls: dict[str, SecretStr] = {}
        self.problems: dict[str, str] = {}  # receiver -> why it cannot send (no URL)
        for receiver in receivers:
            try:
                self.urls[receiver.name] = receiver.resolve_url(environ)
            except LookupError as err:
                self.problems[receiver.name] = str(err)
        self._limiters = {r.name: RateLimiter(r.rate_per_s, r.burst) for r in receivers}
        self._in_flight: set[str] = set()
        self._client = httpx.AsyncClient(transport=transport, follow_redirects=False)
        # group key -> (its undelivered notifications, oldest first; when to try again); restored ones at once.
        self.deferred: dict[str, tuple[list[Notification], float]] = {}
        for data in deferred:
            notification = Notification.model_validate(data)
            self.deferred.setdefault(notification.group_key, ([], clock()))[0].append(notification)

    def deferred_state(self) -> list[dict[str, Any]]:
        """What is deferred, in order, for the worker's checkpoint (pass it back as `deferred`)."""
        return [n.model_dump(mode="json") for queue, _ in self.deferred.values() for n in queue]

    async def retry_deferred(self) -> list[DeliveryOutcome]:
        """Try again the groups whose deferred notifications are due, each group's in order: one
        that fails again stays first in its queue (what follows it waits)."""
        now = self.clock()
        outcomes = []
        for group in [g for g, (_, at) in self.deferred.items() if at <= now]:
            queue, _ = self.deferred.pop(group)
            while queue:
                outcome = await self.dispatch(queue.pop(0))
                outcomes.append(outcome)
                if outcome.status == "deferred":  # back in front of its queue: the rest follow it
                    self.deferred[group][0].extend(queue)
                    break
        return outcomes

    async def __aenter__(self) -> Dispatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def dispatch(self, notification: Notification) -> DeliveryOutcome:
        key, name, group = notification.idempotency_key, notification.receiver, notification.group_key
        if key in self.sent_log or key in self._in_flight:
            self.stats.incr(name, "duplicate")
            return DeliveryOutcome(idempotency_key=key, receiver=name, status="duplicate")
        queued = self.deferred.get(group)
        if queued is not None:  # behind its group's undelivered ones: the receiver gets them in order
            if all(n.idempotency_key != key for n in queued[0]):
                queued[0].append(notification)
                self.stats.incr(name, "deferred")
            return DeliveryOutcome(idempotency_key=key, receiver=name, status="deferred",
                                   reason="queued behind an undelivered notification of its group")
        self._in_flight.add(key)
        try:
            attempts, failure = await self._deliver(notification)
        except Exception as err:  # anything else: this notification cannot be sent as it is
            attempts, failure = 1, PermanentFailure(f"cannot send: {type(err).__name__}")
        finally:
            self._in_flight.discard(key)
        if failure is None:
            self.sent_log.record(key, "sent")
            self.stats.incr(name, "sent")
            return DeliveryOutcome(idempotency_key=key, receiver=name, status="sent", attempts=attempts)
        if isinstance(failure, (TransientFailure, RetryLater)):
            delay = max(RETRY_DEFERRED_S, failure.after if isinstance(failure, RetryLater) else 0.0)
            self.deferred[group] = ([notification], self.clock() + delay)
            self.stats.incr(name, "deferred")
            log.warning("notification %s for receiver %s not delivered after %d attempt(s): %s; trying again in "
                        "%g s", key, name, attempts, failure.reason, delay)
            return DeliveryOutcome(idempotency_key=key, receiver=name, status="deferred", attempts=attempts,
                                   reason=failure.reason)
        reason = failure.reason
        log.warning("notification %s for receiver %s dead-lettered after %d attempt(s): %s", key, name, attempts, reason)
        letter = DeadLetter(
            idempotency_key=key,
            receiver=name,
            reason=reason,
            attempts=attempts,
            failed_at=self.wall_clock(),
            notification=notification.model_dump(mode="json"),
        )
        try:
            result = self.dead_letter(letter)
            if inspect.isawaitable(result):
                await result
        except Exception as err:  # the dead-letter topic is away: keep it here rather than lose it
            log.error("notification %s cannot be dead-lettered (%s); deferred instead", key, type(err).__name__)
            self.deferred[group] = ([notification], self.clock() + RETRY_DEFERRED_S)
            self.stats.incr(name, "deferred")
            return DeliveryOutcome(idempotency_key=key, receiver=name, status="deferred", attempts=attempts, reason=reason)
        self.sent_log.record(key, "dead_lettered")
        self.stats.incr(name, "dead_lettered")
        return DeliveryOutcome(idempotency_key=key, receiver=name, status="dead_lettered", attempts=attempts, reason=reason)

    async def _deliver(self, notification: Notification) -> tuple[int, DeliveryFailed | None]:
        """(attempts, None) when sent, else (attempts, the last failure)."""
        name = notification.receiver
        receiver = self.receivers.get(name)
        if receiver is None:
            return 0, PermanentFailure(f"unknown receiver {name!r}")
        if name in self.problems:
            return 0, PermanentFailure(f"receiver not configured: {self.problems[name]}")
        body = json_safe(PAYLOAD_BUILDERS[receiver.kind](notification))
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(receiver.max_attempts),
            wait=self._wait_strategy(receiver),
            retry=retry_if_exception_type(TransientFailure),
            before_sleep=lambda state: self._before_retry(name, state),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    await asyncio.sleep(self._limiters[name].reserve(self.clock()))
                    await self._post(receiver, body, notification.idempotency_key)
        except DeliveryFailed as failure:
            return attempts, failure
        return attempts, None

    def _wait_strategy(self, receiver: ReceiverConfig) -> Callable[[RetryCallState], float]:
        # initial, 2x, 4x ... capped at backoff_max, plus up to `initial` of random jitter.
        backoff = wait_exponential(multiplier=receiver.backoff_initial, max=receiver.backoff_max) + wait_random(
            0, receiver.backoff_initial
        )

        def wait(state: RetryCallState) -> float:
            failure = state.outcome.exception() if state.outcome else None
            if isinstance(failure, RateLimited) and failure.retry_after is not None:
                return failure.retry_after
            return backoff(state)

        return wait

    def _before_retry(self, name: str, state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        self.stats.incr(name, "retry")
        log.info("receiver %s: attempt %d failed (%s); retrying", name, state.attempt_number, getattr(failure, "reason", "?"))

    async def _post(self, receiver: ReceiverConfig, body: dict[str, Any] | list[Any], key: str) -> None:
        url = self.urls[receiver.name].get_secret_value()
        failure: DeliveryFailed | None = None
        # Build our own error outside the `except` so the httpx exception (which holds the URL)
        # is not even attached as __context__.
        try:
            # httpx's timeout bounds each read; wait_for bounds the whole request (a trickling server).
            response = await asyncio.wait_for(
                self._client.post(url, json=body, headers={IDEMPOTENCY_HEADER: key}, timeout=receiver.timeout),
                receiver.timeout)
        except (httpx.TimeoutException, asyncio.TimeoutError) as err:
            # The receiver may have taken it: the retry carries the same key, for it to drop.
            self.stats.incr(receiver.name, "timeout")
            failure = TransientFailure(f"timed out after {receiver.timeout:g}s ({type(err).__name__})")
        except httpx.TransportError as err:
            failure = TransientFailure(f"network error: {type(err).__name__}: {redact(str(err), [url])}")
        if failure is not None:
            raise failure
        self._check(receiver, response, url)

    def _check(self, receiver: ReceiverConfig, response: httpx.Response, url: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        snippet = redact(response.text, [url])[:200]  # redact first: a cut could split the URL
        if status == 429:
            self.stats.incr(receiver.name, "rate_limited")
            wait = retry_after_seconds(response.headers, response.content, self.wall_clock())
            if wait is not None and wait > receiver.max_retry_after:
                raise RetryLater(f"HTTP 429: asked to wait {wait:g}s, more than max_retry_after "
                                 f"{receiver.max_retry_after:g}s", wait)
            if wait is not None:
                self._limiters[receiver.name].block_until(self.clock() + wait)
            raise RateLimited(f"HTTP 429 (retry after {wait if wait is not None else 'unspecified'}s)", wait)
        if status >= 500 or status == 408:
            raise TransientFailure(f"HTTP {status}: {snippet}")
        raise PermanentFailure(f"HTTP {status}: {snippet}")
