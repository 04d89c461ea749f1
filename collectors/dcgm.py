"""Scrape a dcgm-exporter `/metrics` endpoint and turn each scrape into one NodeSample per host.

The text is parsed with prometheus_client's parser. Mapping decisions, each tested:

- Series are grouped per GPU by the `gpu` label, per MIG instance by `GPU_I_ID` (with
  `GPU_I_PROFILE`), and per host by `Hostname` (released exporters) or `hostname` (newest).
  `--node` overrides the label: in Kubernetes the label is the exporter pod's name unless the
  DaemonSet sets NODE_NAME.
- A MIG instance inherits the clocks and temperature of its parent GPU (one chip) when it has
  none of its own, but not its profiling ratios (DCGM reports those per instance) and not its
  whole power: power, energy and limit are the parent's times the instance's share of the GPU's
  compute slices (`3g.40gb`: 3 of 7), marked `power_estimated`. A GPU with MIG instances is
  reported per instance only.
  `util_gpu` is DCGM_FI_DEV_GPU_UTIL, or DCGM_FI_PROF_GR_ENGINE_ACTIVE x 100 where that is absent
  (it is under MIG); `util_mem` likewise falls back to DCGM_FI_PROF_DRAM_ACTIVE x 100.
- Memory total = FB_USED + FB_FREE (+ FB_RESERVED where exported), all MiB. Energy mJ -> J.
- The power limit is not in dcgm-exporter's default counters: where neither POWER_MGMT_LIMIT nor
  ENFORCED_POWER_LIMIT is exported, the board's default limit for a known model is used (logged
  once, the samples marked `power_estimated`); for an unknown model the GPU is rejected naming
  `power_limit_w`. Missing utilization or power (what detection cannot do without) rejects the
  GPU with the field named; optional fields (SM clock, temperature, memory, profiling ratios,
  energy, clocks-event reasons, XID) are just left out, and detection does without them.
- DCGM_FI_DEV_XID_ERRORS holds the last XID ever seen; it is reported as `xid` only when it
  changes to a non-zero value, so one XID is one event, not one per scrape.
- Several targets: the URLs given and those of Prometheus-style file_sd files (collectors.discovery,
  re-read when they change; a bad file keeps its previous targets, logged once). Every target is
  scraped every tick, in parallel, each with its own XID memory and counts (`Target.summary`); one
  that fails costs its own samples only.
- A scrape with DCGM series but no usable GPU logs one error saying which required fields the GPUs
  lack and which series would give them (again only when that changes).
- A failed or unparsable scrape is counted ('scrape_failed', 'parse_failed'), logged, and the tick
  yields nothing; the next tick tries again. A scrape is bounded in all by `timeout_s` and
  MAX_BODY_BYTES (a server trickling its body would otherwise hold it, and a stop, for ever) and
  ends early when the source is asked to stop. Redirects are followed, as Prometheus does.
- Prometheus text ends with a newline: a body delimited only by the connection's close (no
  Content-Length, not chunked) that lacks one was cut mid-line and is not used ('truncated_body'),
  since its last value may be a prefix of the real one. A 200 without any DCGM series is counted ('no_dcgm_series').
- One odd series does not cost the scrape: a series whose `gpu`/`GPU_I_ID` label is missing or not
  an index ('bad_gpu_label') and an exact repeat of an earlier series ('duplicate_series', the
  first is kept) are counted and skipped.
- Each URL is checked once at start, or when its file is read (ValueError), and logged without
  credentials or query.
- Job and rank come from the Kubernetes labels (see collectors.attribution), else from the
  attribution lookups (mapping file by UUID or index).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from laggard.collectors.attribution import Attribution, k8s_assignments
from laggard.collectors.base import (
    Clock,
    FixedRateScheduler,
    Rejects,
    Source,
    SystemClock,
    Tick,
    build_node_sample,
    short_model,
)
from laggard.collectors.discovery import FileSd, FileSdError
from laggard.events import GpuSample, NodeSample

log = logging.getLogger("laggard.collectors")

DEFAULT_URL = "http://127.0.0.1:9400/metrics"
# A node with 8 GPUs and the profiling counters is ~100 KiB of text; far more is not an exporter.
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_PARALLEL = 32  # targets scraped at once

# GpuSample field <- (DCGM metric, divisor to the schema's unit), in order of preference. The
# profiling ratios stand in for utilization where the device counters are absent (under MIG).
FIELDS: dict[str, tuple[tuple[str, float], ...]] = {
    "util_gpu": (("DCGM_FI_DEV_GPU_UTIL", 1.0), ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", 0.01)),
    "util_mem": (("DCGM_FI_DEV_MEM_COPY_UTIL", 1.0), ("DCGM_FI_PROF_DRAM_ACTIVE", 0.01)),
    "power_w": (("DCGM_FI_DEV_POWER_USAGE", 1.0),),
    "power_limit_w": (("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", 1.0), ("DCGM_FI_DEV_POWER_MGMT_LIMIT", 1.0)),
    "sm_clock_mhz": (("DCGM_FI_DEV_SM_CLOCK", 1.0),),
    "mem_clock_mhz": (("DCGM_FI_DEV_MEM_CLOCK", 1.0),),
    "temp_c": (("DCGM_FI_DEV_GPU_TEMP", 1.0),),
    "mem_used_mib": (("DCGM_FI_DEV_FB_USED", 1.0),),
    "clocks_event_reasons": (("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", 1.0), ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", 1.0)),
    "energy_j": (("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 1000.0),),
    "sm_active": (("DCGM_FI_PROF_SM_ACTIVE", 1.0),),
    "tensor_active": (("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 1.0),),
    "dram_active": (("DCGM_FI_PROF_DRAM_ACTIVE", 1.0),),
}
FB_PARTS = ("DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE")
FB_RESERVED = "DCGM_FI_DEV_FB_RESERVED"
XID = "DCGM_FI_DEV_XID_ERRORS"
KNOWN_METRICS = {metric for choices in FIELDS.values() for metric, _ in choices} | {FB_RESERVED, XID, *FB_PARTS}

# Default board power limits (W) by the exporter's modelName, used only when no limit is exported.
BOARD_POWER_LIMIT_W = {
    "NVIDIA H100 80GB HBM3": 700.0,
    "NVIDIA H100 PCIe": 350.0,
    "NVIDIA H100 NVL": 400.0,
    "NVIDIA H200": 700.0,
    "NVIDIA H200 NVL": 600.0,
    "NVIDIA GB200": 1200.0,
    "NVIDIA B200": 1000.0,
    "NVIDIA A100-SXM4-80GB": 400.0,
    "NVIDIA A100-SXM4-40GB": 400.0,
    "NVIDIA A100 80GB PCIe": 300.0,
}

GpuKey = tuple[str, int, int | None]  # host, gpu index, MIG instance


@dataclass
class ScrapedGpu:
    """Everything one scrape says about one GPU or MIG instance."""

    labels: dict[str, str] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)


def label_index(labels: dict[str, str], name: str) -> int:
    """The non-negative integer in label `name`; ValueError naming the label otherwise."""
    value = labels.get(name)
    if value is None:
        raise ValueError(f"no {name} label")
    if not (value.isascii() and value.isdecimal()):
        raise ValueError(f"{name} label {value!r} is not an index")
    return int(value)


def parse_exporter_text(text: str, rejects: Rejects | None = None) -> dict[GpuKey, ScrapedGpu]:
    """Group the known DCGM series by host, GPU and MIG instance. Raises ValueError on bad text.

    Series that cannot be placed (bad `gpu`/`GPU_I_ID` label) or repeat an earlier one exactly are
    counted in `rejects` and skipped. A GPU's first series of a metric wins, as its labels do.
    """
    rejects = rejects or Rejects("dcgm")
    gpus: dict[GpuKey, ScrapedGpu] = defaultdict(ScrapedGpu)
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for family in text_string_to_metric_families(text):
        if family.name not in KNOWN_METRICS:
            continue
        for sample in family.samples:
            labels = sample.labels
            series = (sample.name, tuple(sorted(labels.items())))
            if series in seen:
                rejects.count("duplicate_series", f"series {sample.name}", "repeated with the same labels; first kept")
                continue
            seen.add(series)
            try:
                index = label_index(labels, "gpu")
                instance = label_index(labels, "GPU_I_ID") if labels.get("GPU_I_ID") else None
            except ValueError as err:
                rejects.count("bad_gpu_label", f"series {sample.name}", f"{err}; series skipped")
                continue
            host = labels.get("Hostname") or labels.get("hostname") or ""
            gpu = gpus[(host, index, instance)]
            gpu.values.setdefault(family.name, sample.value)
            for name, value in labels.items():
                gpu.labels.setdefault(name, value)
    return dict(gpus)


def checked_url(url: str) -> httpx.URL:
    """`url` parsed, or ValueError saying what is wrong: a bad URL would fail every scrape for ever."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as err:
        raise ValueError(f"dcgm-exporter URL is not a URL: {err}") from None
    shown = redacted_url(parsed)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"dcgm-exporter URL {shown!r} must start with http:// or https://")
    if not parsed.host:
        raise ValueError(f"dcgm-exporter URL {shown!r} has no host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ValueError(f"dcgm-exporter URL {shown!r}: port {parsed.port} is not in 1-65535")
    return parsed


def cut_short(headers: httpx.Headers, body: bytes) -> bool:
    """A body ended by the connection's close (no Content-Length, not chunked) that stops mid-line.

    Such a body looks complete when the connection drops; Prometheus text ends with a newline. A
    framed body cut short is an httpx error already.
    """
    framed = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
    return not framed and bool(body) and not body.endswith(b"\n")


def redacted_url(url: httpx.URL) -> str:
    """Scheme, host, port and path only: user:password and ?token=... never reach the log."""
    return str(url.copy_with(userinfo=b"", query=None, fragment=None))


# Compute slices of a MIG-capable GPU (A100, H100, H200, B200): a `3g.40gb` instance has 3 of them.
MIG_SLICES = 7
# A MIG instance's share of these is its slices' share of its GPU's.
POWER_METRICS = frozenset({"DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                           "DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "DCGM_FI_DEV_POWER_MGMT_LIMIT"})


def _slice_share(profile: str | None) -> float:
    """A MIG profile's share of its GPU's compute slices ('3g.40gb' -> 3/7); the whole GPU if unknown."""
    head = (profile or "").split("g.", 1)[0]
    return min(1.0, int(head) / MIG_SLICES) if head.isdigit() and int(head) > 0 else 1.0


def _chip_values(parent: ScrapedGpu, profile: str | None) -> dict[str, float]:
    """What a MIG instance takes from its parent GPU's series: device-wide values (clocks,
    temperature, memory, throttle reasons, XID); power figures scaled to its share of the slices;
    never the parent's profiling ratios (DCGM reports those per instance)."""
    share = _slice_share(profile)
    return {metric: value * share if metric in POWER_METRICS else value
            for metric, value in parent.values.items() if not metric.startswith("DCGM_FI_PROF_")}


@dataclass
class Mapper:
    """Turns parsed scrapes into GpuSample fields; remembers XIDs and logged defaults between scrapes."""

    attribution: Attribution = field(default_factory=Attribution)
    last_xid: dict[GpuKey, float] = field(default_factory=dict)
    defaulted_models: set[str] = field(default_factory=set)

    def gpu_fields(self, key: GpuKey, gpu: ScrapedGpu, parent: ScrapedGpu | None) -> dict[str, Any]:
        labels = gpu.labels
        values = {**_chip_values(parent, labels.get("GPU_I_PROFILE")), **gpu.values} if parent else gpu.values
        out: dict[str, Any] = {
            "index": key[1],
            "uuid": labels.get("UUID", ""),
            "model": short_model(labels.get("modelName", "")),
        }
        for name, choices in FIELDS.items():
            found = next((values[metric] / divisor for metric, divisor in choices if metric in values), None)
            if found is not None:
                out[name] = found
        if all(part in values for part in FB_PARTS):
            out["mem_total_mib"] = sum(values[part] for part in FB_PARTS) + values.get(FB_RESERVED, 0.0)
        if "power_limit_w" not in out:
            out.update(self._board_power_limit(labels.get("modelName", "")))
            if "power_limit_w" in out:
                out["power_limit_w"] *= _slice_share(labels.get("GPU_I_PROFILE")) if key[2] is not None else 1.0
                out["power_estimated"] = True
        if parent is not None and POWER_METRICS & parent.values.keys() - gpu.values.keys():
            out["power_estimated"] = True
        if key[2] is not None:
            out["mig_instance"] = key[2]
            out["mig_profile"] = labels.get("GPU_I_PROFILE")
        xid = values.get(XID)
        if xid is not None and xid != 0 and xid != self.last_xid.get(key):
            out["xid"] = xid
        if xid is not None:
            self.last_xid[key] = xid
        return out

    def _board_power_limit(self, model_name: str) -> dict[str, float]:
        limit = BOARD_POWER_LIMIT_W.get(model_name)
        if limit is None:
            return {}
        if model_name not in self.defaulted_models:
            self.defaulted_models.add(model_name)
            log.warning(
                "dcgm: no power limit exported for %s; using its board default %.0f W "
                "(add DCGM_FI_DEV_POWER_MGMT_LIMIT to the exporter's counters)",
                model_name,
                limit,
            )
        return {"power_limit_w": limit}

    def node_fields(self, gpus: dict[GpuKey, ScrapedGpu], rejects: Rejects) -> dict[str, list[dict[str, Any]]]:
        """host -> GpuSample field dicts; MIG GPUs reported per instance, with job/rank filled in."""
        with_instances = {(host, index) for host, index, instance in gpus if instance is not None}
        reported = {
            key: gpu for key, gpu in gpus.items() if key[2] is not None or (key[0], key[1]) not in with_instances
        }
        pods = k8s_assignments({key: gpu.labels for key, gpu in reported.items()}, rejects)
        by_host: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for key in sorted(reported, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2])):
            fields = self.gpu_fields(key, reported[key], gpus.get((key[0], key[1], None)))
            assigned = pods.get(key)
            if assigned is not None:
                fields.update(assigned.model_dump(exclude_none=True))
            else:
                fields.update(self.attribution.fields(key[1], fields["uuid"]))
            by_host[key[0]].append(fields)
        return dict(by_host)


@dataclass
class Target:
    """One exporter endpoint: its URL, what the log calls it, its own mapping state and its counts."""

    url: httpx.URL
    where: str  # the URL without credentials or query: what the log says
    mapper: Mapper
    labels: dict[str, str] = field(default_factory=dict)  # its file_sd group's labels
    scrapes: int = 0
    failed: int = 0  # scrapes that gave no sample (failed, cut short, unparsable, no usable GPU)
    samples: int = 0  # node samples made from its scrapes
    no_gpu_said: str = ""  # the last 'gave no usable GPU' line logged for it (not repeated every tick)

    def summary(self) -> str:
        return f"dcgm {self.where}: {self.scrapes} scrapes, {self.failed} gave nothing, {self.samples} node samples"


@dataclass(frozen=True)
class Fetched:
    """A body, or why there is none ('' when the scrape was stopped, which is not a failure)."""

    body: bytes | None = None
    category: str = ""
    detail: str = ""


# The GpuSample fields every sample needs, and what an exporter must send for each.
REQUIRED = tuple(name for name, info in GpuSample.model_fields.items() if info.is_required())
NEEDS: dict[str, str] = {
    **{name: " or ".join(metric for metric, _ in choices) for name, choices in FIELDS.items()},
    "mem_total_mib": " and ".join(FB_PARTS),
    "uuid": "the UUID label",
    "model": "the modelName label",
    "power_limit_w": "DCGM_FI_DEV_POWER_MGMT_LIMIT (or a model with a known board limit)",
}


def missing_fields(fields: dict[str, Any]) -> list[str]:
    """The required GpuSample fields a GPU's mapped fields lack (or hold empty)."""
    return [name for name in REQUIRED if fields.get(name) in (None, "")]


def no_gpu_message(where: str, gpus: int, missing: Counter[str], rejects: Counter[str]) -> str:
    """Why a scrape with DCGM series gave no usable GPU: the missing fields and the series that give them."""
    if missing:
        lacking = "; ".join(f"{n} of {gpus} lack {name} (export {NEEDS.get(name, name)})"
                            for name, n in missing.most_common())
        return f"dcgm: {where} gave no usable GPU: {lacking}"
    reasons = ", ".join(f"{n} {category}" for category, n in rejects.most_common()) or "see the lines above"
    return f"dcgm: {where} gave no usable GPU: every GPU was refused ({reasons})"


class DcgmSource(Source):
    """Scrapes every target every `interval_s` (dcgm-exporter itself refreshes every 30 s by default).

    Targets are the URLs given plus those of the `file_sd` files, which are re-read when they
    change. Each target is scraped independently, in parallel when there are several: one that
    fails costs its own samples only, and each counts its own scrapes (`Target.summary`).
    """

    name = "dcgm"

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        file_sd: Sequence[Path] = (),
        interval_s: float = 30.0,
        cluster: str,
        node: str | None = None,
        attribution: Attribution | None = None,
        timeout_s: float = 5.0,
        clock: Clock | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        if not timeout_s > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout_s!r}")
        urls = [url] if isinstance(url, str) else list(url)
        if not urls and not file_sd:
            raise ValueError("no dcgm-exporter URL and no file_sd file: nothing to scrape")
        if node is not None and (len(urls) > 1 or file_sd):
            raise ValueError("--node names one exporter's node; with several, their Hostname labels name them")
        self.static = [checked_url(u) for u in urls]
        self.discovery = [FileSd(path, check=checked_url) for path in file_sd]  # FileSdError is a ValueError
        self.cluster = cluster
        self.node = node
        self.timeout_s = timeout_s
        self.attribution = attribution or Attribution()
        self.defaulted_models: set[str] = set()  # board power limits logged, once for all targets
        self.clock = clock or SystemClock()
        self.now = now
        self.scheduler = FixedRateScheduler(interval_s, self.clock)
        self.targets: dict[str, Target] = {}
        self._sync_targets()
        if not self.targets:
            log.warning("dcgm: no targets yet in %s; waiting for them", ", ".join(str(f.path) for f in self.discovery))

    @property
    def url(self) -> httpx.URL:
        """The first target's URL."""
        return next(iter(self.targets.values())).url

    @property
    def where(self) -> str:
        """The first target's URL as the log shows it."""
        return next(iter(self.targets.values())).where

    @property
    def missed_ticks(self) -> int:
        return self.scheduler.missed

    def _sync_targets(self) -> None:
        """The targets now: the given URLs, then each file's; a target kept keeps its state and counts."""
        wanted: dict[str, tuple[httpx.URL, dict[str, str]]] = {str(u): (u, {}) for u in self.static}
        for found in self.discovery:
            for target in found.targets:
                wanted.setdefault(target.url, (httpx.URL(target.url), target.labels))
        old = self.targets
        self.targets = {
            key: old[key] if key in old else Target(url, redacted_url(url), self._mapper(), labels)
            for key, (url, labels) in wanted.items()
        }
        added, gone = self.targets.keys() - old.keys(), old.keys() - self.targets.keys()
        if old and (added or gone):
            log.info("dcgm: %d target(s) now, %d added, %d gone", len(self.targets), len(added), len(gone))

    def _mapper(self) -> Mapper:
        return Mapper(self.attribution, defaulted_models=self.defaulted_models)

    def refresh_targets(self) -> None:
        """Re-read the file_sd files that changed; a file that cannot be used keeps its targets (logged once)."""
        changed = False
        for found in self.discovery:
            try:
                changed |= found.refresh()
            except FileSdError as err:
                log.error("dcgm: %s", err)
        if changed:
            self._sync_targets()

    def scrape(self, client: httpx.Client) -> list[NodeSample]:
        """One scrape of every target: fetch (in parallel), parse, map. A target's failures are
        counted and cost its own samples only."""
        self.refresh_targets()
        targets = list(self.targets.values())
        if len(targets) <= 1:
            fetched = [self.fetch(client, t) for t in targets]
        else:
            with ThreadPoolExecutor(min(len(targets), MAX_PARALLEL), thread_name_prefix="dcgm-scrape") as pool:
                fetched = list(pool.map(lambda t: self.fetch(client, t), targets))
        ts = self.now()
        samples: list[NodeSample] = []
        for target, got in zip(targets, fetched):
            target.scrapes += 1
            made = self._samples(target, got, ts)
            target.samples += len(made)
            if not made and (got.body is not None or got.category):  # a stop is not a failure
                target.failed += 1
            samples.extend(made)
        return samples

    def _samples(self, target: Target, got: Fetched, ts: float) -> list[NodeSample]:
        """The node samples in one target's fetched body; failures counted and logged."""
        if got.body is None:
            if got.category:
                self.rejects.count(got.category, target.where, got.detail)
            return []
        try:
            gpus = parse_exporter_text(got.body.decode("utf-8", errors="replace"), self.rejects)
        except ValueError as err:
            self.rejects.count("parse_failed", target.where, f"{type(err).__name__}: {err}")
            return []
        if not gpus:
            detail = f"no usable DCGM series in {len(got.body)} bytes; is this a dcgm-exporter's /metrics?"
            self.rejects.count("no_dcgm_series", target.where, detail)
            return []
        before = self.rejects.by_category.copy()
        missing: Counter[str] = Counter()
        tried = 0
        samples = []
        for host, fields in target.mapper.node_fields(gpus, self.rejects).items():
            tried += len(fields)
            missing.update(name for gpu in fields for name in missing_fields(gpu))
            node = self.node or host or "unknown"
            sample = build_node_sample(self.rejects, ts=ts, cluster=self.cluster, node=node, gpus=fields)
            if sample is not None:
                samples.append(sample)
        if samples:
            target.no_gpu_said = ""
        else:  # one line naming what is missing, again only when that changes
            said = no_gpu_message(target.where, tried, missing, self.rejects.by_category - before)
            if said != target.no_gpu_said:
                target.no_gpu_said = said
                log.error("%s", said)
        return samples

    def fetch(self, client: httpx.Client, target: Target) -> Fetched:
        """The whole body, or why not ('scrape_failed', 'truncated_body'; nothing when asked to stop).

        The client's timeout bounds each socket read; the deadline and size limit bound the scrape.
        Counts nothing itself: it runs on the scrape threads.
        """
        deadline = time.monotonic() + self.timeout_s
        chunks: list[bytes] = []
        size = 0
        try:
            with client.stream("GET", target.url, follow_redirects=True) as response:
                response.raise_for_status()
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if self.clock.wait(0):
                        return Fetched()
                    if size > MAX_BODY_BYTES:
                        return Fetched(None, "scrape_failed", f"body larger than {MAX_BODY_BYTES} bytes")
                    if time.monotonic() > deadline:
                        detail = f"body still arriving after {self.timeout_s:g} s ({size} bytes so far)"
                        return Fetched(None, "scrape_failed", detail)
        except httpx.HTTPStatusError as err:
            return Fetched(None, "scrape_failed", f"HTTP {err.response.status_code} {err.response.reason_phrase}")
        except httpx.HTTPError as err:  # its text may hold the URL as given, credentials and all
            detail = f"{type(err).__name__}: {str(err).replace(str(target.url), target.where)}"
            return Fetched(None, "scrape_failed", detail)
        body = b"".join(chunks)
        if cut_short(response.headers, body):
            detail = f"the body ({size} bytes, no Content-Length) ends mid-line: cut short, not used"
            return Fetched(None, "truncated_body", detail)
        return Fetched(body)

    def ticks(self) -> Iterator[Tick]:
        with httpx.Client(timeout=self.timeout_s) as client:
            for _ in self.scheduler:
                yield self.scrape(client)
