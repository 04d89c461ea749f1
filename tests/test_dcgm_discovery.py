"""Several dcgm-exporter endpoints per collector, and Prometheus-style file discovery (file_sd).

Every target is scraped every tick, each on its own: one that fails or hangs costs its own samples
only and is counted apart; credentials never reach the log. A file_sd file (JSON or YAML) is
re-read when it changes, and a file that cannot be used keeps the previous targets, said once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from laggard.collectors.cli import collect_app
from laggard.collectors.dcgm import DcgmSource, checked_url
from laggard.collectors.discovery import Discovered, FileSd, FileSdError, load_file_sd, parse_groups, target_url
from tests.helpers.exporter_server import ExporterServer, Page
from tests.helpers.samples import printed_samples
from tests.test_dcgm_faults import G0, G1, REPO, exporter_text, logged, scrape_once

runner = CliRunner()
NODE_A = exporter_text(G0, G1)  # node-a, GPUs 0 and 1
NODE_B = exporter_text(G0.replace("node-a", "node-b").replace("GPU-aaaa", "GPU-cccc"))


@pytest.fixture
def server() -> Iterator[ExporterServer]:
    with ExporterServer() as running:
        running.serve("/a", Page(body=NODE_A))
        running.serve("/b", Page(body=NODE_B))
        running.serve("/broken", Page(status=500, body="oops"))
        yield running


def host_port(server: ExporterServer) -> str:
    return server.url("").removeprefix("http://")


def write(path: Path, text: str) -> None:
    """Replace `path` whole (a new inode), as config management and Kubernetes do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- several endpoints ------------------------------------------------------------------------


def test_every_endpoint_is_scraped_each_tick_and_a_failing_one_costs_only_its_own(
    server: ExporterServer, caplog: pytest.LogCaptureFixture
) -> None:
    broken = server.url("/broken").replace("http://", "http://admin:hunter2@")
    source = DcgmSource([server.url("/a"), broken, server.url("/b")], cluster="k8s")
    with caplog.at_level("WARNING", logger="laggard.collectors"):
        ticks = [scrape_once(source) for _ in range(2)]
    assert [sorted(s.node for s in tick) for tick in ticks] == [["node-a", "node-b"]] * 2
    assert [len(server.requests(path)) for path in ("/a", "/broken", "/b")] == [2, 2, 2]
    counts = {t.where: (t.scrapes, t.failed, t.samples) for t in source.targets.values()}
    assert counts == {server.url("/a"): (2, 0, 2), server.url("/broken"): (2, 2, 0), server.url("/b"): (2, 0, 2)}
    assert source.rejects.by_category == {"scrape_failed": 2}
    lines = logged(caplog)
    assert any(f"dcgm rejected {server.url('/broken')}: HTTP 500" in line for line in lines)
    assert not any("hunter2" in line for line in lines)


def test_a_hanging_endpoint_does_not_hold_the_others(server: ExporterServer) -> None:
    server.serve("/slow", Page(body=NODE_B, trickle_s=0.05))  # would take minutes
    source = DcgmSource([server.url("/slow"), server.url("/a")], cluster="k8s", timeout_s=0.5)
    assert [s.node for s in scrape_once(source)] == ["node-a"]
    assert {t.where: t.failed for t in source.targets.values()} == {server.url("/slow"): 1, server.url("/a"): 0}
    assert source.rejects.by_category == {"scrape_failed": 1}


def test_each_endpoint_remembers_its_own_xids(server: ExporterServer) -> None:
    for path, host in (("/x1", "node-a"), ("/x2", "node-b")):
        text = exporter_text(G0.replace("node-a", host)).replace('XID_ERRORS{' + G0.replace("node-a", host) + '} 0',
                                                                 'XID_ERRORS{' + G0.replace("node-a", host) + '} 79')
        server.serve(path, Page(body=text))
    source = DcgmSource([server.url("/x1"), server.url("/x2")], cluster="k8s")
    first, again = scrape_once(source), scrape_once(source)
    assert [(s.node, s.gpus[0].xid) for s in first] == [("node-a", 79), ("node-b", 79)]
    assert [s.gpus[0].xid for s in again] == [None, None]  # the same sticky XID is one event per GPU


def test_node_option_with_several_endpoints_is_refused(server: ExporterServer) -> None:
    with pytest.raises(ValueError, match="--node names one exporter's node"):
        DcgmSource([server.url("/a"), server.url("/b")], cluster="k8s", node="n1")


def test_the_dcgm_command_scrapes_every_url_and_counts_each(server: ExporterServer) -> None:
    args = ["dcgm", "--url", server.url("/a"), "--url", server.url("/broken"), "--url", server.url("/b"),
            "--interval", "0.05", "--count", "2", "--stdout"]
    result = runner.invoke(collect_app, args)
    assert result.exit_code == 0, result.output
    samples = printed_samples(result.stdout)
    assert sorted(s.node for s in samples) == ["node-a", "node-a", "node-b", "node-b"]
    assert f"dcgm {server.url('/broken')}: 2 scrapes, 2 gave nothing, 0 node samples" in result.stderr
    assert f"dcgm {server.url('/a')}: 2 scrapes, 0 gave nothing, 2 node samples" in result.stderr


# --- file_sd: the pure functions -----------------------------------------------------------------


def test_groups_from_json_and_yaml_give_the_same_targets() -> None:
    groups = [{"targets": ["n1:9400", "n2:9400"], "labels": {"rack": "r7"}},
              {"targets": ["n3:443"], "labels": {"__scheme__": "https", "__metrics_path__": "/dcgm/metrics"}}]
    yaml_text = ("- targets: [n1:9400, n2:9400]\n  labels: {rack: r7}\n"
                 "- targets: ['n3:443']\n  labels: {__scheme__: https, __metrics_path__: /dcgm/metrics}\n")
    assert parse_groups(json.dumps(groups), yaml_syntax=False) == parse_groups(yaml_text, yaml_syntax=True)


def test_targets_become_urls_with_scheme_and_metrics_path(tmp_path: Path) -> None:
    path = tmp_path / "dcgm.json"
    path.write_text(json.dumps([
        {"targets": ["n1:9400", "n2:9400"], "labels": {"rack": "r7"}},
        {"targets": ["n3:443", "n1:9400"], "labels": {"__scheme__": "https", "__metrics_path__": "/dcgm"}},
        {"targets": []},
    ]))
    assert load_file_sd(path) == [
        Discovered("http://n1:9400/metrics", {"rack": "r7"}),
        Discovered("http://n2:9400/metrics", {"rack": "r7"}),
        Discovered("https://n3:443/dcgm", {"__scheme__": "https", "__metrics_path__": "/dcgm"}),
        Discovered("https://n1:9400/dcgm", {"__scheme__": "https", "__metrics_path__": "/dcgm"}),
    ]


@pytest.mark.parametrize(("name", "text", "says"), [
    ("t.json", "[{\"targets\": [\"n1:9400\"]", "not valid JSON"),
    ("t.yaml", "- targets: [n1:9400\n", "not valid YAML"),
    ("t.json", "{\"targets\": [\"n1:9400\"]}", "not a list of {targets: [...], labels: {...}} groups"),
    ("t.yml", "- targets: n1:9400\n", "0.targets = 'n1:9400': Input should be a valid list"),
    ("t.yml", "- target: [n1:9400]\n", "0.target"),
    ("t.yml", "- targets: [n1:9400]\n  labels: {__scheme__: ftp}\n", "group 0: __scheme__ 'ftp' is not http or https"),
    ("t.yml", "- targets: [n1:9400, 'n2:9400/x']\n", "group 0: target 'n2:9400/x' is not host:port"),
    ("t.yml", "- targets: ['n1:99999']\n", "group 0: dcgm-exporter URL 'http://n1:99999/metrics': port 99999"),
])
def test_a_bad_file_is_one_error_naming_the_file_and_what_is_wrong(
    tmp_path: Path, name: str, text: str, says: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(FileSdError) as refused:
        load_file_sd(path, checked_url)
    assert str(refused.value).startswith(f"file_sd {path}: ") and says in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileSdError, match=f"file_sd {tmp_path / 'nope.yaml'}: cannot read it"):
        FileSd(tmp_path / "nope.yaml")


def test_target_url_defaults_as_prometheus_does() -> None:
    assert target_url("10.0.0.7:9400", {}) == "http://10.0.0.7:9400/metrics"
    assert target_url("[::1]:9400", {"__metrics_path__": "/m"}) == "http://[::1]:9400/m"


def test_file_is_reread_when_it_changes_and_a_bad_version_keeps_the_targets(tmp_path: Path) -> None:
    path = tmp_path / "dcgm.yaml"
    write(path, "- targets: [n1:9400]\n")
    found = FileSd(path)
    assert [t.url for t in found.targets] == ["http://n1:9400/metrics"]
    assert found.refresh() is False  # unchanged: not even read
    write(path, "- targets: [n1:9400, n2:9400]\n")
    assert found.refresh() is True
    assert [t.url for t in found.targets] == ["http://n1:9400/metrics", "http://n2:9400/metrics"]
    write(path, "- targets: [n1:9400\n")
    with pytest.raises(FileSdError, match="not valid YAML.*keeping its 2 previous target"):
        found.refresh()
    assert found.refresh() is False  # the same bad version is said once
    assert len(found.targets) == 2
    path.unlink()
    with pytest.raises(FileSdError, match="it is gone; keeping its 2 previous target"):
        found.refresh()
    write(path, "- targets: [n3:9400]\n")
    assert found.refresh() is True and [t.url for t in found.targets] == ["http://n3:9400/metrics"]


# --- file_sd: scraping what it lists ------------------------------------------------------------


def test_source_scrapes_discovered_targets_and_follows_the_file(
    server: ExporterServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "dcgm.json"
    write(path, json.dumps([{"targets": [host_port(server)], "labels": {"__metrics_path__": "/a"}}]))
    source = DcgmSource([], file_sd=[path], cluster="k8s")
    assert [s.node for s in scrape_once(source)] == ["node-a"]

    write(path, json.dumps([{"targets": [host_port(server)], "labels": {"__metrics_path__": "/b"}}]))
    assert [s.node for s in scrape_once(source)] == ["node-b"]
    assert len(server.requests("/a")) == 1 and len(server.requests("/b")) == 1

    write(path, "[{\"targets\": 7}]")
    with caplog.at_level(logging.ERROR, logger="laggard.collectors"):
        assert [s.node for s in scrape_once(source)] == ["node-b"]  # the previous targets go on
        assert [s.node for s in scrape_once(source)] == ["node-b"]
    [line] = logged(caplog)
    assert line.startswith(f"dcgm: file_sd {path}: ") and "targets" in line and "keeping its 1 previous" in line


def test_urls_and_file_targets_together_once_each(server: ExporterServer, tmp_path: Path) -> None:
    path = tmp_path / "dcgm.yaml"
    write(path, f"- targets: ['{host_port(server)}']\n  labels: {{__metrics_path__: /a}}\n")
    source = DcgmSource([server.url("/a"), server.url("/b")], file_sd=[path], cluster="k8s")
    assert sorted(s.node for s in scrape_once(source)) == ["node-a", "node-b"]
    assert len(source.targets) == 2 and len(server.requests("/a")) == 1


def test_the_dcgm_command_with_file_sd(server: ExporterServer, tmp_path: Path) -> None:
    path = tmp_path / "dcgm.yaml"
    write(path, f"- targets: ['{host_port(server)}']\n  labels: {{__metrics_path__: /b}}\n")
    result = runner.invoke(collect_app, ["dcgm", "--file-sd", str(path), "--interval", "0.05", "--count", "2",
                                         "--stdout"])
    assert result.exit_code == 0, result.output
    samples = printed_samples(result.stdout)
    assert [s.node for s in samples] == ["node-b", "node-b"]
    assert len(server.requests("/metrics")) == 0  # no default URL beside the file's targets


def test_the_dcgm_command_refuses_a_bad_file_at_start_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "dcgm.json"
    path.write_text("[{\"targets\": [\"n1:9400\"], \"labels\": {\"__scheme__\": \"gopher\"}}]")
    done = subprocess.run([sys.executable, "-m", "laggard.collectors.cli", "dcgm", "--file-sd", str(path),
                           "--stdout", "--count", "1"], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"laggard collect: file_sd {path}: group 0: __scheme__ 'gopher' is not http or https"
