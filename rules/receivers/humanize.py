"""Evidence and cost in human units, for people on call: `sm_clock_mhz=1410.0` reads
"SM clock 1410 MHz", `peer_wait_share=0.286` "peer wait share 28.6%", `last_window_start` a UTC
time, `gpu_s_idle=40.0` "GPU time idle 40s"; None is left out and no number is ever written in
e-notation. Also the UTC times and durations every chat message shows.

One function decides how a key reads (`evidence_item`): its unit comes from the key's suffix
tokens, the detectors' naming convention (agents/detectors.py): `_pct` (0-100), `_share` (0-1),
`_mhz`, `_c` (°C), `_w`, `_wh`, `_s` (seconds), `_ms`, `_mib`, `_gib`, `_bytes`; time stamps are
keys ending in `_start`, `_end`, `_at`, `_ts` or `_time`. The result is plain text: the chat
receivers escape it like any other label-derived text.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

# Keys whose words read better another way.
_LABELS = {
    "last_window_start": "last sample",
    "last_busy_window_end": "busy until",
    "effective_util": "effective utilization",
    "util_mean": "utilization",
}
# Metrics whose unit their name does not carry (laggard.results.FLEET_METRICS, window metrics).
_UNITS = {"effective_util": "share", "util_mean": "pct", "util_min": "pct", "util_max": "pct", "util_p50": "pct",
          "util_p95": "pct", "energy_wh": "wh", "power_w_mean": "w"}
_UNIT_TOKENS = ("pct", "share", "mhz", "c", "w", "wh", "s", "ms", "mib", "gib", "bytes")
_TIME_SUFFIXES = ("start", "end", "at", "ts", "time")
_WORDS = {"gpu": "GPU", "gpus": "GPUs", "sm": "SM", "xid": "XID", "cpu": "CPU", "util": "util", "temp": "temperature"}
_EPOCH_MIN = 1e8  # a time stamp, not a small count of seconds (1973 onwards)


def number(value: float, digits: int = 3) -> str:
    """A number with about `digits` significant digits, trailing zeros dropped, never in
    e-notation: 1410.0 -> '1410', 0.2864 -> '0.286', 85.25 -> '85.3', 123456.7 -> '123,457'."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** digits:
        return f"{value:,.0f}" if magnitude >= 10_000 else f"{value:.0f}"
    if magnitude < 0.001:
        return "<0.001" if value > 0 else ">-0.001"
    decimals = max(0, digits - 1 - math.floor(math.log10(magnitude)))
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def duration(seconds: float) -> str:
    """'3m 20s', '1h 5m', '2d 3h', '45s', '0.4s': the two largest units."""
    if not math.isfinite(seconds):
        return str(seconds)
    if 0 < abs(seconds) < 10 and seconds != int(seconds):
        return f"{number(seconds, 2)}s"
    sign, rest = ("-" if seconds < 0 else ""), int(round(abs(seconds)))
    days, rest = divmod(rest, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if v]
    return sign + (" ".join(parts[:2]) or "0s")


def utc_time(ts: float, now: float | None = None) -> str:
    """'12:03:10 UTC' when on the same UTC day as `now`, else '2026-12-02 12:03:10 UTC'."""
    when = datetime.fromtimestamp(ts, tz=timezone.utc)
    if now is not None and datetime.fromtimestamp(now, tz=timezone.utc).date() == when.date():
        return when.strftime("%H:%M:%S UTC")
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _unit(key: str) -> tuple[str | None, list[str]]:
    """(unit, the key's other words) from its suffix tokens."""
    tokens = key.lower().split("_")
    if key in _UNITS:
        return _UNITS[key], [t for t in tokens if t not in ("w", "wh")]
    for i in range(len(tokens) - 1, 0, -1):  # the last unit token that is not the key's first word
        if tokens[i] in _UNIT_TOKENS:
            unit = tokens[i]
            words = tokens[:i] + tokens[i + 1:]
            if unit == "share":
                words = tokens  # "wait share 28.6%"
            if unit == "s" and i > 0 and tokens[i - 1] == "gpu":
                words = tokens[:i] + ["time"] + tokens[i + 1:]  # GPU-seconds: "GPU time idle 40s"
            return unit, words
    return None, tokens


def _label(key: str, words: list[str]) -> str:
    if key in _LABELS:
        return _LABELS[key]
    return " ".join(_WORDS.get(w, w) for w in words if w) or key


def _with_unit(value: float, unit: str | None) -> str:
    if unit == "pct":
        return f"{number(value)}%"
    if unit == "share":
        return f"{number(value * 100)}%"
    if unit == "mhz":
        return f"{number(value, 4)} MHz"
    if unit == "c":
        return f"{number(value)} °C"
    if unit == "w":
        return f"{number(value / 1000)} kW" if abs(value) >= 10_000 else f"{number(value, 4)} W"
    if unit == "wh":
        return f"{number(value / 1000)} kWh" if abs(value) >= 1000 else f"{number(value)} Wh"
    if unit == "s":
        return duration(value)
    if unit == "ms":
        return f"{number(value)} ms" if abs(value) < 1000 else duration(value / 1000)
    if unit in ("mib", "gib", "bytes"):
        size = value * {"mib": 2**20, "gib": 2**30, "bytes": 1}[unit]
        for name, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(size) >= scale:
                return f"{number(size / scale)} {name}"
        return f"{number(size)} B"
    return number(value)


def _is_time(key: str, value: float) -> bool:
    return key.lower().rsplit("_", 1)[-1] in _TIME_SUFFIXES and value > _EPOCH_MIN


def value_text(key: str, value: Any, now: float | None = None) -> str | None:
    """`value` of evidence or cost key `key` in human units; None for a value not worth showing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if _is_time(key, float(value)):
            return utc_time(float(value), now)
        unit, _ = _unit(key)
        if unit is None and isinstance(value, int):
            return str(value)
        return _with_unit(float(value), unit)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    text = str(value)
    return text if text.strip() else None


def evidence_item(key: str, value: Any, now: float | None = None) -> str | None:
    """'SM clock 1410 MHz'; None when there is nothing to say (the value is None or empty)."""
    text = value_text(key, value, now)
    if text is None:
        return None
    _, words = _unit(key)
    return f"{_label(key, words)} {text}"


def evidence_text(values: dict[str, Any], now: float | None = None) -> str:
    """Every item of an evidence or cost dict in human units, in the detector's order, ', '-joined."""
    items = (evidence_item(str(k), v, now) for k, v in values.items())
    return ", ".join(item for item in items if item)
