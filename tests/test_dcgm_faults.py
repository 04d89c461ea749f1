"""dcgm-exporter scrapes that go wrong, against a real HTTP server on 127.0.0.1: each fault is
counted and logged in one line (never with the URL's credentials), costs at most that scrape or
that series, and never ends the collector."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from laggard.collectors.attribution import AttributionError, MappingFile
from laggard.collectors.base import SystemClock
from laggard.collectors.dcgm import DcgmSource
from laggard.events import NodeSample
from tests.helpers.exporter_server import ExporterServer, Page

REPO = Path(__file__).resolve().parents[1]

G0 = 'gpu="0",UUID="GPU-aaaa",modelName="NVIDIA H100 80GB HBM3",Hostname="node-a"'
G1 = G0.replace('gpu="0"', 'gpu="1"').replace("GPU-aaaa", "GPU-bbbb")
# Power last, so that a body cut near its end cuts a power value.
VALUES = {
    "DCGM_FI_DEV_GPU_UTIL": "99",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "40",
    "DCGM_FI_DEV_POWER_MGMT_LIMIT": "700",
    "DCGM_FI_DEV_SM_CLOCK": "1980",
    "DCGM_FI_DEV_MEM_CLOCK": "2619",
    "DCGM_FI_DEV_GPU_TEMP": "71",
    "DCGM_FI_DEV_FB_USED": "80048",
    "DCGM_FI_DEV_FB_FREE": "1024",
    "DCGM_FI_DEV_XID_ERRORS": "0",
    "DCGM_FI_DEV_POWER_USAGE": "690.5",
}


def exporter_text(*gpus: str, extra: str = "") -> str:
    """dcgm-exporter's text for GPUs with these label sets, every one at VALUES."""
    lines = []
    for metric, value in VALUES.items():
        lines.append(f"# HELP {metric} x\n# TYPE {metric} gauge\n")
        lines.extend(f"{metric}{{{labels}}} {value}\n" for labels in gpus)
    return "".join(lines) + extra


@pytest.fixture
def exporter_server() -> Iterator[ExporterServer]:
    with ExporterServer() as server:
        yield server


def scrape_once(source: DcgmSource) -> list[NodeSample]:
    with httpx.Client(timeout=5) as client:
        return source.scrape(client)


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# --- 1. attribution that does not fit the schema ---------------------------------------------


def test_pod_name_ending_in_a_date_keeps_the_job_and_drops_the_rank(
    exporter_server: ExporterServer, caplog: pytest.LogCaptureFixture
) -> None:
    dated = G0 + ',namespace="ml",pod="nightly-eval-20241126"'  # "ordinal" 20241126 > 10,000,000
    ranked = G1 + ',namespace="ml",pod="trainer-2"'
    exporter_server.serve("/metrics", Page(body=exporter_text(dated, ranked)))
    source = DcgmSource(exporter_server.url("/metrics"), cluster="k8s")
    with caplog.at_level("WARNING", logger="laggard.collectors"):
        samples = scrape_once(source)
    gpus = {g.index: g for g in samples[0].gpus}
    assert (gpus[0].job, gpus[0].rank) == ("ml/nightly-eval", None)
    assert (gpus[1].job, gpus[1].rank) == ("ml/trainer", 2)
    assert source.rejects.by_category == {"rank:less_than_equal": 1}
    assert any("pod ml/nightly-eval-20241126" in line and "rank = 20241126" in line for line in logged(caplog))


def test_job_name_too_long_leaves_that_gpu_unattributed(exporter_server: ExporterServer) -> None:
    long_pod = G0 + ',namespace="' + "n" * 63 + '",pod="' + "p" * 200 + '"'
    exporter_server.serve("/metrics", Page(body=exporter_text(long_pod, G1 + ',namespace="ml",pod="trainer-2"')))
    source = DcgmSource(exporter_server.url("/metrics"), cluster="k8s")
    gpus = {g.index: g for g in scrape_once(source)[0].gpus}
    assert (gpus[0].job, gpus[0].rank) == (None, None)
    assert (gpus[1].job, gpus[1].rank) == ("ml/trainer", 2)
    assert source.rejects.by_category == {"job:string_too_long": 1}


def test_mapping_file_not_utf8_is_an_attribution_error_naming_the_file(tmp_path: Path) -> None:
    mapping = tmp_path / "jobs.yaml"
    mapping.write_bytes(b"0: {job: caf\xe9, rank: 1}\n")  # Latin-1
    with pytest.raises(AttributionError, match=r"jobs\.yaml: not UTF-8"):
        MappingFile(mapping)


# --- 2. credentials never logged --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"), [("/metrics", 401), ("/metrics?token=abc123SECRET", 500), ("/gone", 404)]
)
def test_failing_scrape_logs_status_and_url_without_credentials(
    exporter_server: ExporterServer, caplog: pytest.LogCaptureFixture, path: str, status: int
) -> None:
    exporter_server.serve(path, Page(status=status, body="no"))
    url = exporter_server.url(path).replace("http://", "http://admin:hunter2@")
    source = DcgmSource(url, cluster="k8s")
    with caplog.at_level("WARNING", logger="laggard.collectors"):
        assert scrape_once(source) == []
    assert source.rejects.by_category == {"scrape_failed": 1}
    [line] = logged(caplog)
    assert "hunter2" not in line and "abc123SECRET" not in line and "\n" not in line
    bare = exporter_server.url(path.split("?")[0])
    assert f"dcgm rejected {bare}: HTTP {status} " in line


def test_unreachable_url_with_credentials_is_logged_redacted(caplog: pytest.LogCaptureFixture) -> None:
    source = DcgmSource(f"http://admin:hunter2@127.0.0.1:{free_port()}/metrics?token=abc123SECRET", cluster="k8s")
    with caplog.at_level("WARNING", logger="laggard.collectors"):
        assert scrape_once(source) == []
    [line] = logged(caplog)
    assert "ConnectError" in line and "hunter2" not in line and "abc123SECRET" not in line


def free_port() -> int:
    """A port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- 3. the whole scrape is bounded, and a stop ends it --------------------------------------

TRICKLE_S = 0.05  # one byte every 50 ms: the whole body would take over a minute


def trickle_seconds() -> float:
    return len(exporter_text(G0)) * TRICKLE_S


def test_trickling_body_fails_the_scrape_at_its_timeout(exporter_server: ExporterServer) -> None:
    exporter_server.serve("/slow", Page(body=exporter_text(G0), trickle_s=TRICKLE_S))
    source = DcgmSource(exporter_server.url("/slow"), cluster="k8s", timeout_s=0.5)
    started = time.monotonic()
    assert scrape_once(source) == []
    assert time.monotonic() - started < trickle_seconds() / 2  # gave up long before the body ended
    assert source.rejects.by_category == {"scrape_failed": 1}


def test_stop_ends_a_scrape_in_progress(exporter_server: ExporterServer) -> None:
    exporter_server.serve("/slow", Page(body=exporter_text(G0), trickle_s=TRICKLE_S))
    clock = SystemClock()
    source = DcgmSource(exporter_server.url("/slow"), cluster="k8s", timeout_s=600, clock=clock)

    def stop_once_asked() -> None:
        exporter_server.wait_for(1, "/slow")
        clock.stop.set()

    stopper = threading.Thread(target=stop_once_asked)
    stopper.start()
    started = time.monotonic()
    assert scrape_once(source) == []
    assert time.monotonic() - started < trickle_seconds() / 2
    stopper.join()
    assert source.rejects.total == 0  # stopping is not a failure


def test_sigterm_ends_the_dcgm_command_during_a_slow_scrape(exporter_server: ExporterServer) -> None:
    exporter_server.serve("/slow", Page(body=exporter_text(G0), trickle_s=TRICKLE_S))
    command = [sys.executable, "-m", "laggard.collectors.cli", "dcgm", "--url", exporter_server.url("/slow")]
    command += ["--timeout", "600", "--stdout"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        exporter_server.wait_for(1, "/slow", timeout=30)
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=trickle_seconds() / 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert out == "" and "dcgm: 1 ticks" in err


# --- 4. a close-delimited body cut mid-line ---------------------------------------------------


def test_close_delimited_body_cut_mid_line_publishes_nothing(
    exporter_server: ExporterServer, caplog: pytest.LogCaptureFixture
) -> None:
    text = exporter_text(G0)
    exporter_server.serve("/cut", Page(body=text[: text.rindex("690.5") + 2], framing="close"))  # "... 69"
    exporter_server.serve("/whole", Page(body=text, framing="close"))
    source = DcgmSource(exporter_server.url("/cut"), cluster="k8s")
    with caplog.at_level("WARNING", logger="laggard.collectors"):
        assert scrape_once(source) == []
    assert source.rejects.by_category == {"truncated_body": 1}
    assert any("ends mid-line" in line for line in logged(caplog))
    whole = scrape_once(DcgmSource(exporter_server.url("/whole"), cluster="k8s"))
    assert whole[0].gpus[0].power_w == 690.5


# --- 5. a 200 without DCGM series -------------------------------------------------------------


@pytest.mark.parametrize("body", ["", "# HELP node_load1 x\n# TYPE node_load1 gauge\nnode_load1 0.5\n"])
def test_response_without_dcgm_series_is_counted(
    exporter_server: ExporterServer, caplog: pytest.LogCaptureFixture, body: str
) -> None:
    exporter_server.serve("/metrics?token=abc123SECRET", Page(body=body))
    source = DcgmSource(exporter_server.url("/metrics?token=abc123SECRET"), cluster="k8s")
    with caplog.at_level("WARNING", logger="laggard.collectors"):
        assert scrape_once(source) == []
    assert source.rejects.by_category == {"no_dcgm_series": 1}
    [line] = logged(caplog)
    assert exporter_server.url("/metrics") + ":" in line and "abc123SECRET" not in line


# --- 6. one odd series costs that series only -------------------------------------------------


def test_series_with_a_bad_or_missing_gpu_label_is_skipped_alone(
    exporter_server: ExporterServer, caplog: pytest.LogCaptureFixture
) -> None:
    odd = G1.replace('gpu="1"', 'gpu="nvidia1"')
    no_gpu = 'DCGM_FI_DEV_XID_ERRORS{Hostname="node-a"} 0\n'
    exporter_server.serve("/metrics", Page(body=exporter_text(G0, odd) + no_gpu))
    source = DcgmSource(exporter_server.url("/metrics"), cluster="k8s")
    with caplog.at_level("WARNING", logger="laggard.collectors"):
        samples = scrape_once(source)
    assert [g.index for g in samples[0].gpus] == [0]
    assert source.rejects.by_category == {"bad_gpu_label": len(VALUES) + 1}  # each series of GPU nvidia1
    lines = logged(caplog)
    assert "series DCGM_FI_DEV_GPU_UTIL: gpu label 'nvidia1' is not an index" in lines[0]
    exporter_server.serve("/metrics", Page(body=exporter_text(G0) + no_gpu))
    with caplog.at_level("WARNING", logger="laggard.collectors"):
        assert [g.index for g in scrape_once(DcgmSource(exporter_server.url("/metrics"), cluster="k8s"))[0].gpus] == [0]
    assert "series DCGM_FI_DEV_XID_ERRORS: no gpu label" in logged(caplog)[-1]


# --- 7. redirects -----------------------------------------------------------------------------


def test_redirect_is_followed(exporter_server: ExporterServer) -> None:
    exporter_server.serve("/old", Page(status=301, headers={"Location": "/metrics"}))
    exporter_server.serve("/metrics", Page(body=exporter_text(G0)))
    source = DcgmSource(exporter_server.url("/old"), cluster="k8s")
    assert [g.index for g in scrape_once(source)[0].gpus] == [0]
    assert len(exporter_server.requests("/metrics")) == 1 and source.rejects.total == 0


# --- 8. duplicate series ----------------------------------------------------------------------


def test_duplicate_series_is_counted_and_the_first_kept(exporter_server: ExporterServer) -> None:
    first = f"DCGM_FI_DEV_GPU_UTIL{{{G0}}} 99\n"
    exporter_server.serve("/metrics", Page(body=exporter_text(G0).replace(first, first + first.replace("99", "5"))))
    source = DcgmSource(exporter_server.url("/metrics"), cluster="k8s")
    assert scrape_once(source)[0].gpus[0].util_gpu == 99
    assert source.rejects.by_category == {"duplicate_series": 1}


# --- 9. a scrape with DCGM series but no usable GPU says which fields are missing -------------


def test_a_scrape_without_a_usable_gpu_is_one_error_naming_the_missing_fields(
    exporter_server: ExporterServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A trimmed counter list without the power draw, on a model with no known board power limit.
    trimmed = exporter_text(G0, G1).replace("NVIDIA H100 80GB HBM3", "NVIDIA Quadro X1")
    trimmed = "".join(line for line in trimmed.splitlines(keepends=True)
                      if "POWER_USAGE" not in line and "POWER_MGMT_LIMIT" not in line)
    exporter_server.serve("/metrics", Page(body=trimmed))
    source = DcgmSource(exporter_server.url("/metrics"), cluster="k8s")
    with caplog.at_level(logging.ERROR, logger="laggard.collectors"):
        assert scrape_once(source) == [] and scrape_once(source) == []
    [line] = logged(caplog)  # once, not once per scrape
    assert line.startswith(f"dcgm: {exporter_server.url('/metrics')} gave no usable GPU: ")
    assert "2 of 2 lack power_limit_w (export DCGM_FI_DEV_POWER_MGMT_LIMIT" in line
    assert "2 of 2 lack power_w (export DCGM_FI_DEV_POWER_USAGE)" in line

    exporter_server.serve("/metrics", Page(body=exporter_text(G0)))
    assert scrape_once(source)
    exporter_server.serve("/metrics", Page(body=trimmed))
    with caplog.at_level(logging.ERROR, logger="laggard.collectors"):
        assert scrape_once(source) == []
    assert len(logged(caplog)) == 2  # said again after GPUs came back in between


def test_a_scrape_whose_gpus_are_all_refused_by_value_says_why(
    exporter_server: ExporterServer, caplog: pytest.LogCaptureFixture
) -> None:
    exporter_server.serve("/metrics", Page(body=exporter_text(G0).replace("DCGM_FI_DEV_GPU_TEMP{" + G0 + "} 71",
                                                                          "DCGM_FI_DEV_GPU_TEMP{" + G0 + "} NaN")))
    source = DcgmSource(exporter_server.url("/metrics"), cluster="k8s")
    with caplog.at_level(logging.ERROR, logger="laggard.collectors"):
        assert scrape_once(source) == []
    assert logged(caplog) == [f"dcgm: {exporter_server.url('/metrics')} gave no usable GPU: every GPU was refused "
                              "(1 temp_c:finite_number)"]


# --- 10. a URL that can never work is refused at start ----------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "must start with http:// or https://"),
        ("localhost:9400/metrics", "must start with http:// or https://"),
        ("http:///metrics", "has no host"),
        ("http://127.0.0.1:99999/metrics", "port 99999 is not in 1-65535"),
        ("http://127.0.0.1:abc/metrics", "Invalid port"),
        ("ftp://admin:hunter2@host/metrics?token=abc123SECRET", "'ftp://host/metrics' must start with http://"),
    ],
)
def test_unusable_url_is_refused_at_start(url: str, says: str) -> None:
    with pytest.raises(ValueError, match="dcgm-exporter URL") as refused:
        DcgmSource(url, cluster="k8s")
    assert says in str(refused.value) and "hunter2" not in str(refused.value)
    assert "abc123SECRET" not in str(refused.value)


def test_good_urls_are_accepted() -> None:
    for url in ("http://127.0.0.1:9400/metrics", "https://[::1]/metrics", "http://dcgm-exporter.gpu:9400/metrics"):
        assert DcgmSource(url, cluster="k8s").where == url


def test_the_dcgm_command_refuses_an_unusable_url_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "laggard.collectors.cli", "dcgm", "--url", "http://127.0.0.1:99999/metrics",
                           "--stdout", "--count", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "laggard collect: dcgm-exporter URL 'http://127.0.0.1:99999/metrics': port 99999 is not in 1-65535"


def test_the_dcgm_command_exits_1_when_every_scrape_failed(exporter_server: ExporterServer) -> None:
    done = subprocess.run([sys.executable, "-m", "laggard.collectors.cli", "dcgm", "--url", exporter_server.url("/gone"),
                           "--interval", "0.05", "--stdout", "--count", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "laggard collect: no sample in 2 tick(s): every read was refused (2 scrape_failed)" in done.stderr
    assert done.stdout == ""
