"""Secrets never reach a log line: credentials in URLs and secret query values (replaced with
`***`), Authorization values and every secret value the process knows (settings' passwords and
tokens, webhook URLs; replaced with `<redacted>`) are redacted in each record's message,
exception text and stack, whatever logger wrote it (ours, httpx, urllib3, influxdb-client,
Faust) and whatever handler prints it.

`install()` makes every LogRecord created from then on a RedactingLogRecord, whose getMessage()
formats the message as logging always does and redacts the result: the record's msg and args are
never touched, so any formatter (mode's, which rewrites args, included) formats it as before.
`add_secret(value)` and `add_secret_url(url)` teach it secrets that no pattern can recognise.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

REDACTED = "<redacted>"
# Inside a URL (its userinfo, a query value) the mark is URL-safe, so the URL stays one URL to
# whatever reads it next (rules/receivers/delivery.py's filter redacts httpx's URLs once more).
IN_URL = "***"
# Shorter known secrets are not replaced wherever they appear (they would maim ordinary words);
# URL credentials and secret query values are redacted by their position whatever their length.
MIN_SECRET_LEN = 6
# A secret URL's path segments and query values at least this long are secrets on their own (a
# webhook's token is echoed without the rest of the URL: urllib3 logs the path alone).
SECRET_PART_MIN = 8

# scheme://USERINFO@host: userinfo runs up to the last '@' before the host's end.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#@'\"<>]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:p|pw|pwd|passwd|password|token|access_token|auth|api[-_]?key|key|secret|sig|signature"
    r"|client_secret)=)(?P<value>[^&;#\s'\"<>]+)", re.IGNORECASE)
_AUTHORIZATION = re.compile(
    r"(?P<key>\b(?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?(?:(?:token|bearer|basic)\s+)?)(?P<value>[^\s'\",}]+)",
    re.IGNORECASE)

_lock = threading.Lock()
_secrets: list[str] = []  # longest first


def add_secret(value: str | None) -> None:
    """Redact `value` wherever it appears from now on (ignored when shorter than MIN_SECRET_LEN)."""
    if not value or len(value) < MIN_SECRET_LEN:
        return
    forms = {value, value.replace("/", "\\/")}  # JSON-escaped too, as error pages echo it
    with _lock:
        for form in forms - set(_secrets):
            _secrets.append(form)
        _secrets.sort(key=len, reverse=True)


def add_secret_url(url: str | None) -> None:
    """A URL that is a credential as a whole (a webhook): the URL, its path, its long path segments
    and query values, and the password in its userinfo are all redacted from now on."""
    if not url:
        return
    add_secret(url)
    parts = urlsplit(url)
    if len(parts.path) > 1:
        add_secret(parts.path)
    for segment in parts.path.split("/"):
        if len(segment) >= SECRET_PART_MIN:
            add_secret(segment)
    for _, value in parse_qsl(parts.query):
        if len(value) >= SECRET_PART_MIN:
            add_secret(value)
    if parts.password:
        add_secret(parts.password)
        add_secret(unquote(parts.password))


def forget_secrets() -> None:
    """Forget every secret added (for tests)."""
    with _lock:
        _secrets.clear()


def redact(text: str) -> str:
    """`text` with known secrets, URL userinfo, secret query values and Authorization values replaced."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{IN_URL}@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m['key']}{IN_URL}", text)
    text = _AUTHORIZATION.sub(lambda m: f"{m['key']}{REDACTED}", text)
    for secret in list(_secrets):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _redacted_attribute(name: str) -> property:
    """A record attribute stored as logging sets it and read back redacted."""

    def get(record: logging.LogRecord) -> str | None:
        text = record.__dict__.get(name)
        return redact(text) if text else text

    def put(record: logging.LogRecord, value: str | None) -> None:
        record.__dict__[name] = value

    return property(get, put)


class RedactingLogRecord(logging.LogRecord):
    """A LogRecord whose formatted message, exception text and stack are redacted. Formatting is
    logging's own (msg % args, whatever the args are); only its result is rewritten."""

    def getMessage(self) -> str:  # noqa: N802 (logging's name)
        return redact(super().getMessage())

    # logging.Formatter caches the formatted traceback in exc_text and prints it from there.
    exc_text = _redacted_attribute("exc_text")
    stack_info = _redacted_attribute("stack_info")


class RedactSecrets(logging.Filter):
    """For a handler or logger of a process that did not `install()`: rewrites the record's message
    redacted. The message is formatted first (any args, of any type), then args become () and
    not None: mode's formatter turns None into (None,), and 'msg % (None,)' is a logging error."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001: a record that cannot format is logging's to report, as it is
            return True
        record.msg, record.args = redact(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _redacting(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        if type(record) is logging.LogRecord:  # a plain record: the same layout, only the class changes
            record.__class__ = RedactingLogRecord
        return record

    make._laggard_redacting = True  # type: ignore[attr-defined]
    return make


def install() -> None:
    """Every log record created from now on, by any logger of this process, is redacted (idempotent)."""
    current = logging.getLogRecordFactory()
    if current is RedactingLogRecord or getattr(current, "_laggard_redacting", False):
        return
    logging.setLogRecordFactory(RedactingLogRecord if current is logging.LogRecord else _redacting(current))
