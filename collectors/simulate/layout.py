"""The fleet as flat per-GPU arrays: which node, which model, which job and rank, when.

GPUs are numbered across the fleet in node order, then GPU index; every per-tick quantity the
simulator computes is one numpy array over that numbering.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from laggard.collectors.simulate.physics import MODELS
from laggard.collectors.simulate.scenario import JobSpec, Scenario

_UUID_NAMESPACE = uuid.UUID("6c1b8c6e-2f55-4a8e-9a57-2b3f4c0d7e11")


@dataclass(frozen=True)
class FleetLayout:
    nodes: list[str]
    node_first_gpu: np.ndarray  # index of each node's first GPU; node n holds [first[n], first[n + 1])
    gpu_node: np.ndarray
    gpu_index: np.ndarray  # GPU index within its node
    gpu_model: list[str]
    gpu_uuid: list[str]
    job_gpus: list[np.ndarray]  # per job, its GPUs in rank order
    job_start_s: np.ndarray
    job_end_s: np.ndarray

    @property
    def gpu_count(self) -> int:
        return len(self.gpu_node)

    def spec_array(self, field: str) -> np.ndarray:
        """One GpuModelSpec field for every GPU."""
        by_model = {name: float(getattr(spec, field)) for name, spec in MODELS.items()}
        return np.array([by_model[m] for m in self.gpu_model])

    def gpu_of(self, node: str, gpu: int) -> int:
        return int(self.node_first_gpu[self.nodes.index(node)]) + gpu

    def allocation(self, t_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(job index or -1, rank or -1) of every GPU at scenario time t_s."""
        job = np.full(self.gpu_count, -1)
        rank = np.full(self.gpu_count, -1)
        for j, gpus in enumerate(self.job_gpus):
            if self.job_start_s[j] <= t_s < self.job_end_s[j]:
                job[gpus] = j
                rank[gpus] = np.arange(len(gpus))
        return job, rank


def build_layout(scenario: Scenario) -> FleetLayout:
    nodes: list[str] = []
    first: list[int] = []
    gpu_node: list[int] = []
    gpu_index: list[int] = []
    gpu_model: list[str] = []
    for group in scenario.nodes:
        for i in range(group.count):
            first.append(len(gpu_node))
            gpu_node += [len(nodes)] * group.gpus
            gpu_index += range(group.gpus)
            gpu_model += [group.model] * group.gpus
            nodes.append(group.node_name(i))
    first.append(len(gpu_node))
    uuids = [
        f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{scenario.cluster}/{nodes[n]}/{g}')}" for n, g in zip(gpu_node, gpu_index)
    ]
    node_first = np.array(first)
    node_pos = {name: n for n, name in enumerate(nodes)}

    def gpus_of(job: JobSpec) -> np.ndarray:
        ranges = []
        for r in job.nodes:
            group = scenario.group(r.group)
            lo = node_first[node_pos[group.node_name(r.first)]]
            ranges.append(np.arange(lo, lo + r.count * group.gpus))
        return np.concatenate(ranges)

    return FleetLayout(
        nodes=nodes,
        node_first_gpu=node_first,
        gpu_node=np.array(gpu_node),
        gpu_index=np.array(gpu_index),
        gpu_model=gpu_model,
        gpu_uuid=uuids,
        job_gpus=[gpus_of(j) for j in scenario.jobs],
        job_start_s=np.array([j.start_s for j in scenario.jobs], dtype=float),
        job_end_s=np.array([scenario.duration_s if j.end_s is None else j.end_s for j in scenario.jobs], dtype=float),
    )
