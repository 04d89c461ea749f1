"""No secret reaches a log line, and every record still formats (issue #18, logging).

Real records from real libraries: httpx logging a request to a real HTTP server at a URL with
user:password (its %-style args hold an httpx.URL and an int), urllib3 logging its Retry warning
for a webhook path on a closed port, our own retry warning, and an exception's traceback; each
formatted by a real handler, with logging's formatter and with the worker's (mode's), with the
webhook filter of rules/receivers/delivery.py on httpx as in the worker."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import urllib3
from mode.utils.logging import ExtensionFormatter

import laggard.rules.receivers.delivery  # noqa: F401 (installs its httpx URL filter, as in the worker)
from laggard import redaction
from laggard.commands.stack.process import free_port
from laggard.settings import Settings

PASSWORD = "S3cretPassw0rd-x"
TOKEN_PATH = "/services/T0123/B0456/XoXoWebhookToken123"
SECRETS = (PASSWORD, "XoXoWebhookToken123", TOKEN_PATH)
FORMAT = "%(levelname)s %(name)s %(message)s"


class _NoContent(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoContent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    factory = logging.getLogRecordFactory()
    levels = {name: logging.getLogger(name).level for name in ("httpx", "urllib3", "laggard.test")}
    yield
    logging.setLogRecordFactory(factory)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    redaction.forget_secrets()


def log_everything(http_port: int) -> None:
    """What a worker logs with InfluxDB credentials in its URL and a webhook that is down."""
    for name in ("httpx", "urllib3", "laggard.test"):
        logging.getLogger(name).setLevel(logging.INFO)
    influx = f"http://alice:{PASSWORD}@127.0.0.1:{http_port}"
    webhook = f"http://127.0.0.1:{free_port()}{TOKEN_PATH}"
    redaction.add_secret_url(webhook)  # as the worker's CLI does with its receivers' URLs
    with httpx.Client() as client:
        assert client.get(f"{influx}/ping?db=laggard&u=alice&p={PASSWORD}").status_code == 204
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        urllib3.PoolManager().request("GET", webhook, retries=urllib3.Retry(total=1, backoff_factor=0))
    log = logging.getLogger("laggard.test")
    log.warning("InfluxDB at %s unavailable (%s: %s); retry %d", influx, "ConnectError", "refused", 3)
    try:
        raise ConnectionError(f"cannot post to {webhook} with {influx}")
    except ConnectionError:
        log.exception("delivery failed")


def formatted(install: bool, formatter: logging.Formatter, http_port: int) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    if install:
        redaction.install()
    else:
        handler.addFilter(redaction.RedactSecrets())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        log_everything(http_port)
    finally:
        root.removeHandler(handler)
    return stream.getvalue()


FORMATTERS: dict[str, Callable[[], logging.Formatter]] = {
    "logging": lambda: logging.Formatter(FORMAT),
    "mode (the worker's)": lambda: ExtensionFormatter(stream=io.StringIO(), fmt=FORMAT),
}


@pytest.mark.parametrize("install", [True, False], ids=["installed", "handler-filter"])
@pytest.mark.parametrize("formatter", list(FORMATTERS), ids=list(FORMATTERS))
def test_every_record_formats_with_its_message_and_no_secret(
        install: bool, formatter: str, http_port: int, restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    text = formatted(install, FORMATTERS[formatter](), http_port)
    stderr = capsys.readouterr().err
    assert "Logging error" not in stderr and "Traceback" not in stderr, stderr
    lines = text.splitlines()
    # httpx's line: its URL (user:password and a secret query value in it) redacted, the rest intact.
    assert any(line.startswith(f"INFO httpx HTTP Request: GET http://127.0.0.1:{http_port}/")
               and line.endswith(' 204 No Content"') for line in lines), text
    # urllib3's Retry warning names the webhook's path, which is the credential.
    assert any(line.startswith("WARNING urllib3.connectionpool Retrying (Retry(total=0") and "<redacted>" in line
               for line in lines), text
    assert f"WARNING laggard.test InfluxDB at http://***@127.0.0.1:{http_port} unavailable (ConnectError: refused); " \
           "retry 3" in lines, text
    assert "ERROR laggard.test delivery failed" in lines and "ConnectionError: cannot post to" in text, text
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.parametrize("text,expected", [
    ("at http://bob:pw@10.0.0.1:8086/write now", "at http://***@10.0.0.1:8086/write now"),
    ("kafka://u:p%40ss@broker:9093", "kafka://***@broker:9093"),
    ("GET /query?u=bob&p=hunter2&q=SHOW", "GET /query?u=bob&p=***&q=SHOW"),
    ("POST /hook?api-version=1&sig=S1gValue", "POST /hook?api-version=1&sig=***"),
    ("headers {'Authorization': 'Token abc.def-123'}", "headers {'Authorization': 'Token <redacted>'}"),
    ("Authorization: Basic YWxpY2U6cHc=", "Authorization: Basic <redacted>"),
    ("Basic authentication failed for http://127.0.0.1:8086/ping", "Basic authentication failed for http://127.0.0.1:8086/ping"),
])
def test_redact_patterns(text: str, expected: str) -> None:
    assert redaction.redact(text) == expected


def test_known_secrets_are_redacted_escaped_too(restore_logging: None) -> None:
    redaction.add_secret("tok-3x4mpl3-value")
    redaction.add_secret("abc")  # too short to replace wherever it appears
    assert redaction.redact('{"token": "tok-3x4mpl3-value"} abc') == '{"token": "<redacted>"} abc'
    redaction.add_secret_url(f"https://hooks.example.com{TOKEN_PATH}")
    assert redaction.redact('{"url": "https:\\/\\/hooks.example.com\\/services\\/T0123\\/B0456\\/XoXoWebhookToken123"}') \
        == '{"url": "<redacted>"}'


def test_settings_secrets_include_the_password_in_the_influx_url() -> None:
    settings = Settings(influx_url=f"http://alice:{PASSWORD}@127.0.0.1:8086", influx_token="t0ken-value",
                        _env_file=None)
    assert set(settings.secret_values()) == {PASSWORD, "t0ken-value"}
