"""What a cluster is: GPU and link specs and the cluster they make (frozen dataclasses).

Units: FLOP/s, bytes, bytes/s, seconds. Link bandwidths are per direction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .profiles import list_gpu_profiles, load_gpu_profile


class ClusterError(ValueError):
    """A cluster description is missing a value or has an impossible one."""


@dataclass(frozen=True, eq=False)   # hashed by identity: presets are shared objects
class GPU:
    name: str
    peak_flops: dict[str, float]          # dense, per dtype: "bf16", "fp16", "tf32", "fp32"
    memory_bytes: float
    hbm_bytes_per_s: float
    profile: str | None = None            # file name under autopar/profiles/ (measured)
    matmul_efficiency: float = 0.75       # large-GEMM fraction of peak when no profile
    memory_efficiency: float = 0.8        # fraction of HBM bandwidth a streaming kernel gets

    def training_dtype(self, dtype: str | None = None) -> str:
        """The mixed-precision dtype to train in: bf16 where the GPU has it, else fp16."""
        if dtype is None:
            return "bf16" if "bf16" in self.peak_flops else "fp16"
        if dtype not in self.peak_flops:
            raise ClusterError(f"GPU {self.name} does not support {dtype} (supported: "
                               f"{', '.join(sorted(self.peak_flops))}); use --dtype "
                               f"{'fp16' if 'fp16' in self.peak_flops else 'fp32'} or leave --dtype out")
        return dtype

    def peak(self, dtype: str) -> float:
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise ClusterError(f"GPU {self.name} has no peak FLOP/s for dtype {dtype!r}; "
                               f"known: {sorted(self.peak_flops)}") from None


@dataclass(frozen=True)
class Link:
    bandwidth_bytes_per_s: float          # per direction
    latency_s: float


@dataclass(frozen=True)
class Cluster:
    name: str
    n_nodes: int
    gpus_per_node: int
    gpu: GPU
    intra_link: Link                      # per GPU (NVLink / NVSwitch)
    inter_link: Link                      # per node, all its NICs together
    source: str = ""                      # where the figures come from

    @property
    def n_gpus(self) -> int:
        return self.n_nodes * self.gpus_per_node

    def with_size(self, n_nodes: int | None = None, gpus_per_node: int | None = None) -> Cluster:
        c = dataclasses.replace(self, n_nodes=self.n_nodes if n_nodes is None else n_nodes,
                                gpus_per_node=self.gpus_per_node if gpus_per_node is None else gpus_per_node)
        validate(c)
        return c

    def to_dict(self) -> dict[str, Any]:
        """The cluster as a YAML/JSON file's mapping: `load_cluster` reads it back unchanged."""
        d = dataclasses.asdict(self)
        d["nodes"] = d.pop("n_nodes")
        if d["gpu"]["profile"] is None:
            del d["gpu"]["profile"]
        return d


# The planner's stage DP enumerates whole-node submeshes and places stages node by node, so its
# time grows with the node count; 4096 GPUs covers a 1T GPT on 3072 A100s (issue 15, item 6)
# and keeps every search bounded.
MAX_GPUS = 4096


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(c: Cluster) -> Cluster:
    def need(cond: bool, field_name: str, rule: str):
        if not cond:
            raise ClusterError(f"cluster {c.name!r}: field {field_name!r} {rule}")

    need(isinstance(c.n_nodes, int) and not isinstance(c.n_nodes, bool) and c.n_nodes >= 1, "nodes",
         f"must be an integer >= 1 (got {c.n_nodes!r})")
    need(isinstance(c.gpus_per_node, int) and not isinstance(c.gpus_per_node, bool) and c.gpus_per_node >= 1,
         "gpus_per_node", f"must be an integer >= 1 (got {c.gpus_per_node!r})")
    need(c.gpus_per_node & (c.gpus_per_node - 1) == 0, "gpus_per_node",
         f"must be a power of two, as Alpa's submeshes (1, 2^k) need (got {c.gpus_per_node})")
    need(c.gpus_per_node <= MAX_GPUS, "gpus_per_node",
         f"is over autopar's limit of {MAX_GPUS} GPUs in all (got {c.gpus_per_node:.3g})")
    need(c.n_nodes <= MAX_GPUS // c.gpus_per_node, "nodes",
         f"x gpus_per_node is over autopar's limit of {MAX_GPUS} GPUs (got {c.n_nodes:.3g} nodes of "
         f"{c.gpus_per_node}); use at most {MAX_GPUS // c.gpus_per_node} nodes of {c.gpus_per_node}")
    for name in ("memory_bytes", "hbm_bytes_per_s"):
        v = getattr(c.gpu, name)
        need(_finite(v) and v > 0, f"gpu.{name}", f"must be > 0 and finite (got {v!r})")
    need(isinstance(c.gpu.peak_flops, dict) and bool(c.gpu.peak_flops)
         and all(_finite(v) and v > 0 for v in c.gpu.peak_flops.values()), "gpu.peak_flops",
         f"must give a positive, finite FLOP/s per dtype (got {c.gpu.peak_flops})")
    for name in ("matmul_efficiency", "memory_efficiency"):
        v = getattr(c.gpu, name)
        need(_finite(v) and 0 < v <= 1, f"gpu.{name}", f"must be a fraction of peak in (0, 1] (got {v!r})")
    if c.gpu.profile is not None:
        need(isinstance(c.gpu.profile, str) and load_gpu_profile(c.gpu.profile) is not None, "gpu.profile",
             f"must name a profile shipped in autopar/profiles/ (got {c.gpu.profile!r}; shipped: "
             f"{', '.join(f'{n}.json' for n in list_gpu_profiles())})")
    for name, link in (("intra_link", c.intra_link), ("inter_link", c.inter_link)):
        bw, lat = link.bandwidth_bytes_per_s, link.latency_s
        need(_finite(bw) and bw > 0, f"{name}.bandwidth_bytes_per_s", f"must be > 0 and finite (got {bw!r})")
        need(_finite(lat) and lat >= 0, f"{name}.latency_s", f"must be >= 0 and finite (got {lat!r})")
    return c
