"""What the sink writes: one InfluxDB point per window result, fleet KPI and finding.

Measurements `<scope>_window` (gpu, node), `fleet`, `finding`. Tags are bounded labels only
(cluster, node, gpu, model, job, rank, kind, state); the point time is the window start, so a
replayed window lands on the same series and timestamp and overwrites instead of doubling.
"""

from __future__ import annotations

from influxdb_client import Point

from laggard.agents.stages import FleetKpi
from laggard.results import FLEET_METRICS, Finding, WindowResult

WINDOW_FIELDS = (
    "samples", "util_mean", "util_min", "util_max", "util_p50", "util_p95", "effective_util",
    "power_w_mean", "energy_wh", "sm_clock_mhz_mean", "temp_c_mean", "temp_c_max", "throttled_share", "xid_count",
)


def _ms(ts: float) -> int:
    return round(ts * 1000)


_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_LABELS = ("cluster", "node", "gpu", "model", "job", "rank")


def window_line(result: WindowResult) -> str:
    """Line protocol for one window result, written directly: this runs for every GPU every
    window, and influxdb-client's Point costs ~20 µs a point (its escaping is generic)."""
    labels = result.labels
    tags = "".join(
        f",{name}={str(value).translate(_TAG_ESCAPES)}"
        for name in _LABELS if (value := getattr(labels, name)) is not None
    )
    fields = [f"{name}={float(getattr(result, name))!r}" for name in WINDOW_FIELDS]
    fields += [f"throttle_{reason}={float(share)!r}" for reason, share in result.throttle_share.items()]
    if result.scope != "gpu":
        fields += [f"gpus={result.gpus}i", f"idle_allocated_gpus={result.idle_allocated_gpus}i"]
    return f"{result.scope}_window{tags} {','.join(fields)} {_ms(result.window_start)}"


def fleet_point(kpi: FleetKpi) -> Point:
    point = Point("fleet").tag("cluster", kpi.cluster)
    for name in FLEET_METRICS:
        point.field(name, float(getattr(kpi, name)))
    return point.time(_ms(kpi.window_start), "ms")


def finding_point(finding: Finding) -> Point:
    point = Point("finding").tag("kind", finding.kind).tag("state", finding.state).tag("cluster", finding.cluster)
    for tag in ("job", "node", "gpu", "rank", "model"):
        value = getattr(finding, tag)
        if value is not None:
            point.tag(tag, str(value))
    point.field("summary", finding.summary).field("firing", int(finding.state == "firing"))
    for name, value in {**finding.evidence, **{f"cost_{k}": v for k, v in finding.cost.items()}}.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            point.field(name, float(value))
    return point.time(_ms(finding.window_start), "ms")
