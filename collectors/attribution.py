"""Which job and rank each GPU belongs to: the key to naming the rank that paces a job.

NVML knows devices, not jobs, so the collector asks, in this order, and takes the first answer:

1. Kubernetes (dcgm source only): dcgm-exporter's `pod`/`namespace`/`container` labels, see
   `k8s_assignments`. job = `<namespace>/<owner>` where owner is the first pod label present among
   JOB_LABELS (these appear when the exporter runs with pod labels enabled; names are sanitised,
   `batch.kubernetes.io/job-name` -> `batch_kubernetes_io_job_name`), else the pod name without its
   replica suffix (`trainer-7d9f8b6c4-x2k9q` -> `trainer`, `trainer-3` -> `trainer`). rank = pod index
   * GPUs of the pod + the GPU's position among them (torchrun's node_rank * nproc_per_node +
   local_rank), where the pod index comes from INDEX_LABELS or a StatefulSet-style `-<n>` name
   suffix; without a pod index the rank stays empty. Kubeflow's separate Master/Worker numbering
   is not folded together.
2. A mapping file (`--attribution FILE`, YAML or JSON), written by whoever schedules the work:

       GPU-5f2c8a3e-1b2d-4c1e-9a77-0c6f3b1e2d44: {job: llm-pretrain, rank: 12}
       3: {job: llm-pretrain, rank: 3}     # by index: a file per node

   Keys are GPU UUIDs (one file can serve a whole cluster) or node-local indexes. A broken file
   stops the collector at start with the reason: it is configuration, not telemetry.
3. A directory of per-GPU files that Slurm fills (`--slurm-dir`, default /run/laggard): the job's
   SLURM_JOB_ID, SLURM_PROCID and CUDA_VISIBLE_DEVICES exist only inside the job, so a prolog
   writes them where the collector can read them, and the epilog removes them:

       # slurm.conf: Prolog=/etc/slurm/laggard-prolog.sh  Epilog=/etc/slurm/laggard-epilog.sh
       # prolog (root, once per node): one file per GPU of the job, job only
       for g in ${SLURM_JOB_GPUS//,/ }; do
         echo "{\"job\": \"$SLURM_JOB_ID\"}" > /run/laggard/gpu-$g.json; done
       # TaskProlog or the launch wrapper (per rank, knows its GPU): add the rank
       echo "{\"job\": \"$SLURM_JOB_ID\", \"rank\": $SLURM_PROCID}" > /run/laggard/gpu-$SLURM_STEP_GPUS.json
       # epilog: rm -f /run/laggard/gpu-{${SLURM_JOB_GPUS}}.json

   Each file is `{"job": str, "rank": int | null}`, re-read when its mtime changes; a missing file
   means "no job"; an unreadable one is logged once and treated as missing.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from laggard.collectors.base import Rejects
from laggard.events import describe_validation_error

log = logging.getLogger("laggard.collectors")

DEFAULT_SLURM_DIR = Path("/run/laggard")

JOB_LABELS = (
    "job_name",
    "batch_kubernetes_io_job_name",
    "training_kubeflow_org_job_name",
    "jobset_sigs_k8s_io_jobset_name",
    "app_kubernetes_io_instance",
    "app",
)
INDEX_LABELS = (
    "training_kubeflow_org_replica_index",
    "batch_kubernetes_io_job_completion_index",
    "apps_kubernetes_io_pod_index",
)
# Kubernetes' random name suffixes use only these characters (no vowels, no 0, 1, 3), so a real
# word such as '-train' is never mistaken for one.
_RANDOM_SUFFIX = re.compile(r"-[bcdfghjklmnpqrstvwxz2456789]{5}$")
_TEMPLATE_HASH = re.compile(r"-[bcdfghjklmnpqrstvwxz2456789]{6,10}$")
_ORDINAL = re.compile(r"-(\d+)$")


class AttributionError(ValueError):
    """A mapping file that cannot be used; the message names the file and what is wrong."""


class Assignment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str = Field(min_length=1, max_length=256)
    rank: int | None = Field(default=None, ge=0, le=10_000_000)


class Lookup(Protocol):
    def lookup(self, index: int, uuid: str) -> Assignment | None: ...


_MAPPING = TypeAdapter(dict[str, Assignment])


class MappingFile:
    """GPU UUID or node-local index -> Assignment, from a YAML or JSON file (JSON is YAML)."""

    def __init__(self, path: Path) -> None:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise AttributionError(f"attribution file {path}: {err}") from None
        except UnicodeDecodeError as err:
            raise AttributionError(f"attribution file {path}: not UTF-8 text (byte {err.start})") from None
        if not isinstance(raw, dict):
            raise AttributionError(f"attribution file {path}: expected a mapping of GPU -> {{job, rank}}")
        try:
            self.by_key = _MAPPING.validate_python({str(k): v for k, v in raw.items()})
        except ValidationError as err:
            raise AttributionError(f"attribution file {path}: {describe_validation_error(err)}") from None

    def lookup(self, index: int, uuid: str) -> Assignment | None:
        return self.by_key.get(uuid) or self.by_key.get(str(index))


@dataclass
class SlurmDir:
    """Per-GPU files `gpu-<index>.json` written by a Slurm prolog, cached by mtime."""

    directory: Path = DEFAULT_SLURM_DIR
    _cache: dict[Path, tuple[int, Assignment | None]] = field(default_factory=dict)

    def lookup(self, index: int, uuid: str) -> Assignment | None:
        path = self.directory / f"gpu-{index}.json"
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        cached = self._cache.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
        try:
            found: Assignment | None = Assignment.model_validate_json(path.read_bytes())
        except ValidationError as err:
            log.warning("slurm attribution file %s ignored: %s", path, describe_validation_error(err))
            found = None
        except OSError as err:  # removed by the epilog between stat and read
            log.warning("slurm attribution file %s unreadable: %s", path, err)
            found = None
        self._cache[path] = (mtime, found)
        return found


class Attribution:
    """Asks each lookup in turn; the first that knows the GPU answers."""

    def __init__(self, *lookups: Lookup) -> None:
        self.lookups = lookups

    @classmethod
    def from_options(cls, mapping_file: Path | None, slurm_dir: Path | None) -> Attribution:
        lookups: list[Lookup] = [MappingFile(mapping_file)] if mapping_file else []
        if slurm_dir:
            lookups.append(SlurmDir(slurm_dir))
        return cls(*lookups)

    def fields(self, index: int, uuid: str) -> dict[str, str | int]:
        """{'job': ..., 'rank': ...} for a GpuSample, or {} when nobody knows the GPU."""
        for source in self.lookups:
            if found := source.lookup(index, uuid):
                return found.model_dump(exclude_none=True)
        return {}


def pod_owner(pod: str) -> str:
    """The pod name without what its controller appended: random suffix, template hash, ordinal."""
    owner = _RANDOM_SUFFIX.sub("", pod)
    owner = _TEMPLATE_HASH.sub("", owner) if owner != pod else owner
    return _ORDINAL.sub("", owner) or pod


def pod_index(pod: str, labels: Mapping[str, str]) -> int | None:
    """The pod's replica index from INDEX_LABELS, else a StatefulSet/indexed-Job name ordinal."""
    for name in INDEX_LABELS:
        if labels.get(name, "").isdigit():
            return int(labels[name])
    ordinal = _ORDINAL.search(_RANDOM_SUFFIX.sub("", pod))
    return int(ordinal.group(1)) if ordinal else None


K = TypeVar("K", bound=Hashable)


def k8s_assignments(
    gpu_labels: Mapping[K, Mapping[str, str]], rejects: Rejects | None = None
) -> dict[K, Assignment]:
    """Job and rank per GPU from dcgm-exporter's pod labels; GPUs without a pod are left out.

    `gpu_labels` maps a sortable per-GPU key (index, MIG instance) to that GPU's labels. A job
    name or rank out of Assignment's bounds (a pod named `eval-20241126` has "ordinal" 20241126)
    is counted in `rejects` (once per pod) and logged: a bad rank leaves the job alone, a bad job
    leaves that pod's GPUs unattributed.
    """
    rejects = rejects or Rejects("k8s")
    by_pod: dict[tuple[str, str], list[K]] = defaultdict(list)
    for key, labels in gpu_labels.items():
        if labels.get("pod"):
            by_pod[(labels.get("namespace", ""), labels["pod"])].append(key)
    found: dict[K, Assignment] = {}
    for (namespace, pod), keys in by_pod.items():
        labels = gpu_labels[keys[0]]
        owner = next((labels[name] for name in JOB_LABELS if labels.get(name)), None) or pod_owner(pod)
        job = f"{namespace}/{owner}" if namespace else owner
        where = f"pod {namespace}/{pod}"
        if (job_only := rejects.validate(Assignment, {"job": job}, where)) is None:
            continue
        index = pod_index(pod, labels)
        if index is not None:
            # Validated for the pod's highest rank, so a bad index is one reject, not one per GPU.
            top = {"job": job, "rank": index * len(keys) + len(keys) - 1}
            index = index if rejects.validate(Assignment, top, where) is not None else None
        for local, key in enumerate(sorted(keys)):  # type: ignore[type-var]
            found[key] = job_only if index is None else Assignment(job=job, rank=index * len(keys) + local)
    return found

