"""Replay of broken traces: every bad line is counted and skipped, the replay goes on to the end;
bad timestamps never reach the scheduler; a bad --uuid-template is one line at startup."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from laggard.collectors.base import SystemClock
from laggard.collectors.cli import collect_app
from laggard.collectors.replay import ReplaySource
from tests.helpers.fixtures import NVML_TRACE

TRACE = NVML_TRACE / "trace.jsonl"
BASE = json.loads(TRACE.read_text().splitlines()[0])  # one real H200 reading
T0 = BASE["ts"]


class RecordingClock:
    """Monotonic time that moves only when waited on; remembers each wait."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += max(0.0, seconds)
        return False


def write_trace(path: Path, *lines: bytes | dict[str, object]) -> Path:
    raw = (line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines)
    path.write_bytes(b"".join(line + b"\n" for line in raw))
    return path


def reading(**changes: object) -> dict[str, object]:
    return BASE | changes


def replay(path: Path, **options: object) -> tuple[ReplaySource, list[list[tuple[int, float]]]]:
    """(source, per non-empty tick the (gpu index, ts) of each reading): a line with a bad value is an empty tick."""
    options = {"speed": 0} | options
    source = ReplaySource(path, cluster="lab", node="n", **options)  # type: ignore[arg-type]
    ticks = [[(g.index, s.ts) for s in tick for g in s.gpus] for tick in source.ticks() if tick]
    return source, ticks


@pytest.mark.parametrize(
    ("bad", "category"),
    [
        (b"\xff\xfe not utf-8", "not_json"),
        (b"[" * 200_000, "not_json"),  # deeper than the JSON parser's recursion
        (json.dumps(reading(gpu=[0])).encode(), "gpu:not_an_index"),
        (json.dumps(reading(gpu="0")).encode(), "gpu:not_an_index"),
        (json.dumps(reading(ts=10**400)).encode(), "ts:not_a_number"),
        (json.dumps(reading(power_mw=10**400)).encode(), "power_w:float_type"),
        (json.dumps(reading(util_gpu=10**400)).encode(), "util_gpu:float_type"),
    ],
    ids=["not-utf8", "deep", "gpu-list", "gpu-text", "huge-ts", "huge-power", "huge-util"],
)
def test_one_bad_line_is_counted_and_the_rest_replayed(tmp_path: Path, bad: bytes, category: str) -> None:
    trace = write_trace(tmp_path / "t.jsonl", reading(), bad, reading(ts=T0 + 0.1))
    source, ticks = replay(trace)
    assert ticks == [[(0, T0)], [(0, T0 + 0.1)]]
    assert source.rejects.by_category == {category: 1}


def test_a_millisecond_timestamp_is_skipped_before_it_is_waited_for(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", reading(), reading(ts=T0 * 1000), reading(ts=T0 + 0.05))
    source, ticks = replay(trace, speed=1.0)  # the real clock: waiting ~1.8e12 s used to raise OverflowError
    assert ticks == [[(0, T0)], [(0, T0 + 0.05)]]
    assert source.rejects.by_category == {"ts:implausible": 1}
    assert source.waits_skipped == 0


def test_a_clock_jump_of_decades_is_skipped(tmp_path: Path) -> None:
    clock = RecordingClock()
    trace = write_trace(tmp_path / "t.jsonl", reading(), reading(ts=T0 + 1e9), reading(ts=T0 + 0.5))
    source, ticks = replay(trace, speed=1.0, clock=clock)
    assert ticks == [[(0, T0)], [(0, T0 + 0.5)]]
    assert source.rejects.by_category == {"ts:implausible": 1}
    assert clock.now == pytest.approx(0.5)  # not 31 years


def test_the_system_clock_waits_beyond_what_threading_allows() -> None:
    stop = threading.Event()
    timer = threading.Timer(0.05, stop.set)
    timer.start()
    try:
        assert SystemClock(stop).wait(1e300) is True  # used to raise OverflowError: timeout value is too large
    finally:
        timer.cancel()


def test_a_tiny_speed_does_not_crash_or_stall(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", reading(), reading(ts=T0 + 0.1), reading(ts=T0 + 0.2))
    started = time.monotonic()
    source, ticks = replay(trace, speed=1e-12)  # each 0.1 s gap would be a 1e11 s wait
    assert [t[0][1] for t in ticks] == [T0, T0 + 0.1, T0 + 0.2]
    assert source.waits_skipped == 2
    assert time.monotonic() - started < 60  # the waits were not sat out


def test_a_break_in_the_recording_is_not_waited_out_and_the_schedule_resumes(tmp_path: Path) -> None:
    clock = RecordingClock()
    day = 86_400.0
    trace = write_trace(
        tmp_path / "t.jsonl",
        reading(ts=T0 - 2 * day),
        reading(ts=T0 - 2 * day + 1.0),
        reading(ts=T0),  # two days later: the collector was down
        reading(ts=T0 + 1.0),
    )
    source = ReplaySource(trace, cluster="lab", speed=1.0, clock=clock, max_wait_s=60.0)
    emitted = [(clock.now, tick[0].ts) for tick in source.ticks()]
    assert emitted == [(0.0, T0 - 2 * day), (1.0, T0 - 2 * day + 1.0), (1.0, T0), (2.0, T0 + 1.0)]
    assert source.waits_skipped == 1 and source.rejects.total == 0


def test_one_missing_line_does_not_shift_a_gpus_data_for_the_rest_of_the_trace(tmp_path: Path) -> None:
    def pair(k: int, *gpus: int) -> list[dict[str, object]]:
        # temp_c carries the tick number, so a reading that lands in the wrong tick shows
        return [reading(gpu=g, ts=T0 + k + g * 0.001, temp_c=30 + k) for g in gpus]

    trace = write_trace(tmp_path / "t.jsonl", *pair(0, 0, 1), *pair(1, 1), *pair(2, 0, 1), *pair(3, 0, 1))
    source = ReplaySource(trace, cluster="lab", node="n", speed=0)
    ticks = [[(g.index, g.temp_c) for s in tick for g in s.gpus] for tick in source.ticks()]
    assert ticks == [[(0, 30), (1, 30)], [(1, 31)], [(0, 32), (1, 32)], [(0, 33), (1, 33)]]


def test_a_missing_first_gpu_of_a_tick_does_not_merge_two_ticks(tmp_path: Path) -> None:
    rows = [reading(gpu=g, ts=T0 + k + g * 0.001, temp_c=30 + k) for k in range(6) for g in range(4)]
    del rows[12]  # tick 3 has no GPU 0: by GPU indexes alone, its GPUs 1-3 and tick 4's GPU 0 are one tick
    source = ReplaySource(write_trace(tmp_path / "t.jsonl", *rows), cluster="lab", speed=0)
    ticks = [sorted({g.temp_c for g in tick[0].gpus}) for tick in source.ticks()]
    assert ticks == [[30 + k] for k in range(6)]


@pytest.mark.parametrize("template", ["GPU-{host}", "GPU-{}", "GPU-{gpu[0]}", "GPU-{", "G" * 200])
def test_a_bad_uuid_template_is_refused_at_startup(template: str) -> None:
    with pytest.raises(ValueError, match="--uuid-template"):
        ReplaySource(TRACE, cluster="lab", uuid_template=template)
    result = CliRunner().invoke(collect_app, ["replay", str(TRACE), "--uuid-template", template, "--stdout"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "--uuid-template" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_uuid_that_cannot_be_formatted_for_one_gpu_is_counted(tmp_path: Path) -> None:
    # {gpu:c} works for index 65 ('A') but not for an index beyond Unicode: only that reading is lost
    beyond_unicode = reading(gpu=0x110000, ts=T0 + 0.001)
    trace = write_trace(tmp_path / "t.jsonl", reading(gpu=65), beyond_unicode, reading(gpu=65, ts=T0 + 0.1))
    source, ticks = replay(trace, uuid_template="GPU-{gpu:c}")
    assert ticks == [[(65, T0)], [(65, T0 + 0.1)]]
    assert source.rejects.by_category == {"uuid:template_failed": 1}


def test_shift_to_end_passes_over_a_broken_last_line(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", reading(), reading(ts=T0 + 1.0), b'{"ts": 17')
    source, ticks = replay(trace, shift="end", now=lambda: T0 + 100.0)
    assert ticks == [[(0, T0 + 99.0)], [(0, T0 + 100.0)]]
    assert source.rejects.by_category == {"not_json": 1}
