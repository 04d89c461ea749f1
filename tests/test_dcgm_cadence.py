"""dcgm-exporter as people run it: its default counters, scraped every 30 s (its own refresh) over
real HTTP into the workers' 10 s windows, for 10 minutes of event time on fake clocks.

Three nodes of one 24-GPU training job, each node with its own collector (a DaemonSet), started
10 s apart: every 10 s window holds one node's scrape, so each GPU is in one window of three. No
GPU is found silent while all report, every window holds its node's every GPU once with the energy
of its whole 30 s, and a GPU that then stops reporting is found silent once it has missed its own
expected samples.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import pytest

from laggard.agents.detectors import FleetDetector
from laggard.agents.windows import Windower
from laggard.collectors.dcgm import DcgmSource
from laggard.events import NodeSample
from laggard.results import WindowResult
from tests.helpers.exporter_server import ExporterServer, Page
from tests.test_detectors import WINDOW_S, firing, run
from tests.test_sources import FakeClock
from tests.test_windows import T0

FIXTURE = Path(__file__).parent / "fixtures" / "dcgm-exporter-default-counters-8xh100.prom"
FIXTURE_HOST = 'Hostname="hgx-h100-017"'
ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{"
INTERVAL_S = 30.0
TICKS = 21  # 10 minutes of event time
# node -> when its collector's first scrape lands: mid-window, the three 10 s apart
NODES = {"hgx-h100-017": 3.7, "hgx-h100-018": 13.7, "hgx-h100-019": 23.7}
FIRST = next(iter(NODES))
STOPPED = 7  # the GPU of the first node that stops reporting (the pod's last: the others keep their ranks)
STOPS_AT = 12  # ...from this tick on
POWER_W = 640.0  # the energy counters advance at this rate between the exporter's refreshes


def page(node: str, tick: int, *, in_job: bool, without_gpu: int | None = None) -> str:
    """The fixture as `node`'s exporter serves it at `tick`: its own host name and GPU UUIDs, the
    job's pod labels (`in_job`), energy counters advanced, maybe a GPU gone."""
    n = list(NODES).index(node)
    pod = f',container="pytorch",namespace="ml-train",pod="llama-pretrain-worker-{n}"' if in_job else ""
    lines = []
    for line in FIXTURE.read_text().splitlines(keepends=True):
        if without_gpu is not None and f'{{gpu="{without_gpu}",' in line:
            continue
        line = line.replace(FIXTURE_HOST, f'Hostname="{node}"{pod}').replace('UUID="GPU-', f'UUID="GPU-{n}')
        if line.startswith(ENERGY):
            series, value = line.rsplit(" ", 1)
            line = f"{series} {int(value) + int(tick * INTERVAL_S * POWER_W * 1000)}\n"
        lines.append(line)
    return "".join(lines)


def scraped(node: str, *, in_job: bool, stop_at: int | None = None) -> list[NodeSample]:
    """One node's collector: TICKS scrapes of its exporter every 30 s of event time from its start;
    GPU STOPPED gone from tick `stop_at` on."""
    clock = FakeClock()
    started = clock.now
    with ExporterServer() as server:
        def serve(tick: int) -> None:
            gone = STOPPED if stop_at is not None and tick >= stop_at else None
            body = page(node, tick, in_job=in_job, without_gpu=gone)
            server.serve("/metrics", Page(body=body, headers={"Content-Type": "text/plain; version=0.0.4"}))

        serve(0)
        source = DcgmSource(server.url("/metrics"), cluster="c", interval_s=INTERVAL_S, clock=clock,
                            now=lambda: T0 + NODES[node] + (clock.now - started))
        out: list[NodeSample] = []
        with closing(source.ticks()) as scrapes:
            for k, tick in enumerate(scrapes):
                out.extend(tick)
                if k + 1 == TICKS:
                    break
                serve(k + 1)
        assert len(server.requests("/metrics")) == TICKS
    assert source.rejects.total == 0 and source.missed_ticks == 0
    return out


def fleet(*, in_job: bool = True, stop_at: int | None = None) -> list[NodeSample]:
    """Every node's samples in event-time order; the first node's GPU STOPPED stops at tick `stop_at`."""
    samples = [s for node in NODES for s in scraped(node, in_job=in_job, stop_at=stop_at if node == FIRST else None)]
    return sorted(samples, key=lambda s: s.ts)


def closed_windows(samples: list[NodeSample]) -> tuple[dict[int, list[WindowResult]], int]:
    """Window index -> its GPU results, and the late samples, windowed as the worker does."""
    windower = Windower(WINDOW_S, grace_s=2.0)
    out: dict[int, list[WindowResult]] = {}
    for sample in samples:
        windower.add(sample)
        for closed in windower.pop_closed():
            out[int((closed.window_start - T0) // WINDOW_S)] = closed.gpu_results()
    for closed in windower.flush():
        out[int((closed.window_start - T0) // WINDOW_S)] = closed.gpu_results()
    return out, windower.late_samples


@pytest.fixture(scope="module")
def steady() -> list[NodeSample]:
    return fleet()


def test_default_counters_become_samples_with_the_board_power_limit(steady: list[NodeSample]) -> None:
    assert len(steady) == TICKS * len(NODES) and {s.node for s in steady} == set(NODES)
    gpus = steady[0].gpus
    assert [g.index for g in gpus] == list(range(8))
    assert {g.model for g in gpus} == {"H100"}
    assert {g.power_limit_w for g in gpus} == {700.0}  # the board default: the exporter sends no limit
    assert all(g.sm_active is None and g.clocks_event_reasons == 0 for g in gpus)
    assert sorted(g.rank for s in steady[:3] for g in s.gpus) == list(range(24))  # from the pod labels
    first = [s.ts for s in steady if s.node == FIRST]
    assert [ts - first[0] for ts in first] == [k * INTERVAL_S for k in range(TICKS)]


def test_every_window_is_whole(steady: list[NodeSample]) -> None:
    windows, late = closed_windows(steady)
    assert late == 0
    assert sorted(w for w, results in windows.items() if results) == list(range(3 * TICKS))
    nodes = list(NODES)
    for w, results in windows.items():  # each 10 s window holds one node's scrape, all of it
        assert {r.labels.node for r in results} == {nodes[w % 3]}, w
        assert sorted(r.labels.gpu for r in results) == list(range(8)), w
        assert {r.samples for r in results} == {1}, w
        if w >= 3:  # the energy of the whole 30 s since its previous scrape, none lost between windows
            assert [r.energy_wh for r in results] == pytest.approx([POWER_W * INTERVAL_S / 3600] * 8), w


def test_no_gpu_is_silent_while_all_report_every_30_s(steady: list[NodeSample]) -> None:
    assert firing(run(steady, FleetDetector()), "silent_gpu") == []


def test_no_unallocated_gpu_is_silent_while_all_report_every_30_s() -> None:
    assert firing(run(fleet(in_job=False), FleetDetector()), "silent_gpu") == []


def test_a_gpu_that_stops_is_silent_after_missing_its_own_expected_samples() -> None:
    samples = fleet(stop_at=STOPS_AT)
    first = [s for s in samples if s.node == FIRST]
    assert [len(s.gpus) for s in first] == [8] * STOPS_AT + [7] * (TICKS - STOPS_AT)
    [(w, finding)] = firing(run(samples, FleetDetector()), "silent_gpu")
    assert (finding.node, finding.gpu, finding.rank) == (FIRST, STOPPED, STOPPED)
    last_seen = 3 * (STOPS_AT - 1)
    assert finding.evidence["last_window_start"] == T0 + last_seen * WINDOW_S
    # Not before its next sample was due (3 windows on), and within the detector's persistence after.
    assert last_seen + 3 <= w <= last_seen + 3 + 2


def test_an_unallocated_gpu_that_stops_is_silent_too() -> None:
    """Its node, the group it is compared with, reports one window in three: that is not the node
    leaving, so the GPU it stopped sending is found (it was skipped every other window, never fired)."""
    samples = fleet(in_job=False, stop_at=STOPS_AT)
    [(_, finding)] = firing(run(samples, FleetDetector()), "silent_gpu")
    assert (finding.node, finding.gpu, finding.job) == (FIRST, STOPPED, None)
