"""What the sink writes: one InfluxDB line-protocol point per window result, fleet KPI and finding.

Measurements `<scope>_window` (gpu, node), `fleet`, `finding`. Tags are bounded labels only
(cluster, node, gpu, model, job, rank, kind, state); the point time is the window start, so a
replayed window lands on the same series and timestamp and overwrites instead of doubling.

Every point is written here by hand, through one tag-value encoder and one string-field encoder,
so a label cannot change the shape of a line whichever writer it goes through, and every point is
exactly one line. Labels are validated at the edge (laggard/events.py), but these encoders hold
on their own. What InfluxDB 1.x's parser (1.6.7, checked against the real server) allows, and so
what we do:

- A control character (U+0000-U+001F, U+007F-U+009F) becomes U+FFFD, visibly not part of a real
  name and never a separator, in tags and string fields alike: in a tag a newline ends the line
  (the rest is parsed as a point of its own); in a quoted string InfluxDB would take it, but a
  point that spans lines breaks whatever splits a batch into lines (the dead-letter payload).
  So does a lone surrogate (json.loads makes them from "\\ud800"), which UTF-8 cannot encode.
- In a tag value, `,`, `=` and space are escaped with a backslash; any other backslash is literal
  (`\\\\` is not an escape: it is two backslashes), so a label's own backslashes are written as
  they are. A backslash at the very end cannot be written: it would escape the separator after
  it (the line is refused, or, with influxdb-client's trailing space, silently loses the
  backslash), so a final backslash becomes U+FFFD. An empty tag value is left out (InfluxDB
  refuses `tag=`), as influxdb-client does.
- A string field is quoted, with `"` and `\\` escaped.
"""

from __future__ import annotations

import math
import re

from laggard.agents.stages import FleetKpi
from laggard.results import FLEET_METRICS, Finding, WindowResult

WINDOW_FIELDS = (
    "samples", "util_mean", "util_min", "util_max", "util_p50", "util_p95", "effective_util",
    "power_w_mean", "energy_wh", "sm_clock_mhz_mean", "temp_c_mean", "temp_c_max", "throttled_share", "xid_count",
)

# What a point cannot carry (see the module docstring), and what stands in for it.
UNWRITABLE = "\ufffd"
_UNWRITABLE_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_STRING_ESCAPES = str.maketrans({'"': r"\"", "\\": r"\\"})
_LABELS = ("cluster", "node", "gpu", "model", "job", "rank")


def _ms(ts: float) -> int:
    return round(ts * 1000)


def escape_tag_value(value: object) -> str:
    """A label as a line-protocol tag value (or tag or field key): one token that ends exactly
    where the tag ends. Unwritable characters become U+FFFD (module docstring)."""
    text = _UNWRITABLE_CHARS.sub(UNWRITABLE, str(value))
    if text.endswith("\\"):
        text = text[:-1] + UNWRITABLE
    return text.translate(_TAG_ESCAPES)


def escape_field_string(value: str) -> str:
    """A string field value, quotes included, on one line."""
    return '"' + _UNWRITABLE_CHARS.sub(UNWRITABLE, value).translate(_STRING_ESCAPES) + '"'


def _tags(pairs: list[tuple[str, object]]) -> str:
    """`,name=value` for each label that is set; None and empty values are left out."""
    return "".join(f",{name}={escape_tag_value(value)}" for name, value in pairs if value is not None and value != "")


def _float_fields(values: dict[str, object]) -> list[str]:
    """Numeric values as float fields; non-finite ones are left out (line protocol has no NaN),
    booleans and strings are not numbers here."""
    return [
        f"{escape_tag_value(name)}={float(value)!r}"
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ]


def window_line(result: WindowResult) -> str:
    """Line protocol for one window result: this runs for every GPU every window, so it is
    written directly (influxdb-client's Point costs ~20 µs a point)."""
    labels = result.labels
    tags = _tags([(name, getattr(labels, name)) for name in _LABELS])
    fields = [f"{name}={float(value)!r}" for name in WINDOW_FIELDS if (value := getattr(result, name)) is not None]
    fields += [f"throttle_{reason}={float(share)!r}" for reason, share in result.throttle_share.items()]
    if result.power_estimated_share:  # only where a source estimates power: most points never carry it
        fields.append(f"power_estimated_share={float(result.power_estimated_share)!r}")
    if result.scope != "gpu":
        fields += [f"gpus={result.gpus}i", f"idle_allocated_gpus={result.idle_allocated_gpus}i"]
    return f"{result.scope}_window{tags} {','.join(fields)} {_ms(result.window_start)}"


def fleet_point(kpi: FleetKpi) -> str:
    fields = _float_fields({name: getattr(kpi, name) for name in FLEET_METRICS})
    return f"fleet{_tags([('cluster', kpi.cluster)])} {','.join(fields)} {_ms(kpi.window_start)}"


def finding_point(finding: Finding, measurement: str = "finding") -> str:
    """A finding's transition (`finding`), or a window it was going on in (`finding_active`)."""
    tags = _tags([("kind", finding.kind), ("state", finding.state), ("cluster", finding.cluster)]
                 + [(name, getattr(finding, name)) for name in ("job", "node", "gpu", "rank", "model")])
    fields = [f"summary={escape_field_string(finding.summary)}", f"firing={int(finding.state == 'firing')}i"]
    fields += _float_fields({**finding.evidence, **{f"cost_{k}": v for k, v in finding.cost.items()}})
    return f"{measurement}{tags} {','.join(fields)} {_ms(finding.window_start)}"
