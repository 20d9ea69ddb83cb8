"""GPU clusters: presets from published figures, YAML/JSON files, submeshes and logical meshes.

Units: FLOP/s, bytes, bytes/s, seconds. Link bandwidths are per direction.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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

    def with_size(self, n_nodes: int | None = None, gpus_per_node: int | None = None) -> "Cluster":
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


# ---- presets ---------------------------------------------------------------------------------
# V100 SXM2 16 GB: 125 TFLOP/s fp16 tensor, 15.7 fp32, 900 GB/s HBM2 (NVIDIA V100 datasheet).
# Large fp16 GEMMs reach ~70-75% of the tensor-core peak on V100 (NVIDIA Deep Learning
# Performance Guide, "Matrix Multiplication Background"); no V100 was available to measure.
V100_16GB = GPU("V100-SXM2-16GB", {"fp16": 125e12, "fp32": 15.7e12},   # no bf16 or tf32 on Volta
                16e9, 900e9, matmul_efficiency=0.72)
# A100 SXM4 80 GB: 312 TFLOP/s bf16/fp16 dense, 156 tf32, 19.5 fp32, 2039 GB/s (A100 datasheet).
# Large bf16 GEMMs reach ~80% of peak (same guide); no A100 was available to measure.
A100_80GB = GPU("A100-SXM4-80GB", {"fp16": 312e12, "bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
                80e9, 2039e9, matmul_efficiency=0.80)
# H100 SXM5 80 GB: 989 TFLOP/s bf16 dense, 495 tf32, 67 fp32, 3.35 TB/s (H100 datasheet).
# Efficiencies come from autopar/profiles/h100_sxm.json, measured on a lent H100.
H100_80GB = GPU("H100-SXM5-80GB", {"fp16": 989e12, "bf16": 989e12, "tf32": 495e12, "fp32": 67e12},
                80e9, 3.35e12, profile="h100_sxm.json", matmul_efficiency=0.75)
# H200 SXM 141 GB: same compute as H100, 4.8 TB/s HBM3e (H200 datasheet).
H200_141GB = GPU("H200-SXM-141GB", {"fp16": 989e12, "bf16": 989e12, "tf32": 495e12, "fp32": 67e12},
                 141e9, 4.8e12, profile="h200.json", matmul_efficiency=0.75)

# Link latencies: NCCL's per-step latency is a few microseconds on NVLink and InfiniBand
# (nccl-tests small-message all-reduce times), tens of microseconds over TCP (AWS ENA).
PRESETS: dict[str, Cluster] = {
    # Alpa's testbed. NVLink 2.0: 6 links x 25 GB/s per direction per GPU (V100 datasheet,
    # 300 GB/s total bidirectional); 25 Gb/s Ethernet between instances (AWS p3.16xlarge page).
    "p3.16xlarge": Cluster("p3.16xlarge", 8, 8, V100_16GB, Link(150e9, 5e-6), Link(25e9 / 8, 30e-6),
                           "AWS p3.16xlarge: 8x V100 16GB, NVLink, 25 Gb/s network"),
    # DGX A100: NVSwitch, NVLink 3.0 600 GB/s bidirectional per GPU; 8x 200 Gb/s HDR IB.
    "dgx-a100": Cluster("dgx-a100", 8, 8, A100_80GB, Link(300e9, 3e-6), Link(8 * 200e9 / 8, 5e-6),
                        "NVIDIA DGX A100 datasheet: 8x A100 80GB, NVSwitch, 8x 200 Gb/s IB"),
    # DGX H100: NVLink 4.0 900 GB/s bidirectional per GPU; 8x 400 Gb/s ConnectX-7.
    "dgx-h100": Cluster("dgx-h100", 8, 8, H100_80GB, Link(450e9, 3e-6), Link(8 * 400e9 / 8, 5e-6),
                        "NVIDIA DGX H100 datasheet: 8x H100 80GB, NVSwitch, 8x 400 Gb/s IB"),
    # DGX H200: as DGX H100 with H200 GPUs.
    "dgx-h200": Cluster("dgx-h200", 8, 8, H200_141GB, Link(450e9, 3e-6), Link(8 * 400e9 / 8, 5e-6),
                        "NVIDIA DGX H200 datasheet: 8x H200 141GB, NVSwitch, 8x 400 Gb/s IB"),
}
GPUS = {g.name: g for g in (V100_16GB, A100_80GB, H100_80GB, H200_141GB)}

# Presets whose intra-node link may have a measured communication profile: a file under
# autopar/profiles/ written by `python -m autopar.commprofile fit` from bench/nccl_bench.py's
# timings. When the file is shipped, `load_cluster(preset)` takes intra_link from its fitted
# alpha-beta instead of the datasheet figures above, and says so in Cluster.source; when it
# is not, the preset is unchanged.
COMM_PROFILES: dict[str, str] = {
    "dgx-h100": "comm_h100_nvlink.json",
    "dgx-h200": "comm_h200_nvlink.json",
}


def preset(name: str) -> Cluster:
    """The preset `name` as `load_cluster` gives it: with its measured intra_link where its
    comm profile (COMM_PROFILES) is shipped, else PRESETS[name] itself."""
    c = PRESETS[name]
    file_name = COMM_PROFILES.get(name)
    if file_name is None:
        return c
    from .commprofile import CommProfileError, measured_link
    try:
        found = measured_link(file_name)
    except (CommProfileError, ValueError, OSError) as e:
        raise ClusterError(f"preset {name!r}: its comm profile autopar/profiles/{file_name} is unreadable: {e}") from None
    if found is None:
        return c
    link, note = found
    return dataclasses.replace(c, intra_link=link,
                               source=f"{c.source}; {note}, instead of the datasheet's "
                                      f"{c.intra_link.bandwidth_bytes_per_s / 1e9:.0f} GB/s, "
                                      f"{c.intra_link.latency_s * 1e6:g} us")


def validate(c: Cluster) -> Cluster:
    def need(cond: bool, field_name: str, rule: str):
        if not cond:
            raise ClusterError(f"cluster {c.name!r}: field {field_name!r} {rule}")

    need(isinstance(c.n_nodes, int) and c.n_nodes >= 1, "nodes", f"must be an integer >= 1 (got {c.n_nodes!r})")
    need(isinstance(c.gpus_per_node, int) and c.gpus_per_node >= 1, "gpus_per_node",
         f"must be an integer >= 1 (got {c.gpus_per_node!r})")
    need(c.gpus_per_node & (c.gpus_per_node - 1) == 0, "gpus_per_node",
         f"must be a power of two, as Alpa's submeshes (1, 2^k) need (got {c.gpus_per_node})")
    need(c.gpu.memory_bytes > 0, "gpu.memory_bytes", f"must be > 0 (got {c.gpu.memory_bytes})")
    need(c.gpu.hbm_bytes_per_s > 0, "gpu.hbm_bytes_per_s", f"must be > 0 (got {c.gpu.hbm_bytes_per_s})")
    need(bool(c.gpu.peak_flops) and all(v > 0 for v in c.gpu.peak_flops.values()), "gpu.peak_flops",
         f"must give a positive FLOP/s per dtype (got {c.gpu.peak_flops})")
    for name in ("matmul_efficiency", "memory_efficiency"):
        v = getattr(c.gpu, name)
        need(0 < v <= 1, f"gpu.{name}", f"must be a fraction of peak in (0, 1] (got {v})")
    if c.gpu.profile is not None:
        from .cost import load_profile
        need(load_profile(c.gpu.profile) is not None, "gpu.profile",
             f"must name a profile shipped in autopar/profiles/ (got {c.gpu.profile!r})")
    for name, link in (("intra_link", c.intra_link), ("inter_link", c.inter_link)):
        need(link.bandwidth_bytes_per_s > 0, f"{name}.bandwidth_bytes_per_s",
             f"must be > 0 (got {link.bandwidth_bytes_per_s})")
        need(link.latency_s >= 0, f"{name}.latency_s", f"must be >= 0 (got {link.latency_s})")
    return c


def _from_dict(d: dict[str, Any], origin: str) -> Cluster:
    """Build from a file's mapping. A `base` preset may be given and partly overridden."""
    known = {"name", "base", "nodes", "gpus_per_node", "gpu", "intra_link", "inter_link", "source"}
    extra = set(d) - known
    if extra:
        raise ClusterError(f"{origin}: unknown field(s) {sorted(extra)}; known fields: {sorted(known)}")
    base = preset(d["base"]) if d.get("base") in PRESETS else None
    if "base" in d and base is None:
        raise ClusterError(f"{origin}: unknown base preset {d['base']!r}; known: {sorted(PRESETS)}")

    def number(v, where: str) -> float:
        # YAML 1.1 reads 312.0e12 (no sign in the exponent) as a string: accept numeric text.
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ClusterError(f"{origin}: field {where} must be a number (got {v!r})")
        return float(v)

    def num(mapping: dict, key: str, where: str, default=None):
        if key not in mapping:
            if default is None:
                raise ClusterError(f"{origin}: missing field {where}.{key}")
            return default
        return number(mapping[key], f"{where}.{key}")

    g = d.get("gpu")
    if g is None:
        if base is None:
            raise ClusterError(f"{origin}: missing field 'gpu' (or give 'base': one of {sorted(PRESETS)})")
        gpu = base.gpu
    elif isinstance(g, str):
        if g not in GPUS:
            raise ClusterError(f"{origin}: unknown gpu {g!r}; known: {sorted(GPUS)}")
        gpu = GPUS[g]
    else:
        if not isinstance(g, dict):
            raise ClusterError(f"{origin}: field 'gpu' must be a GPU name ({sorted(GPUS)}) or a mapping of "
                               f"its fields (got {g!r})")
        _known_fields(g, "gpu", {f.name for f in dataclasses.fields(GPU)}, origin)
        bg = base.gpu if base else None
        peak = g.get("peak_flops", bg.peak_flops if bg else None)
        if not isinstance(peak, dict):
            raise ClusterError(f"{origin}: missing field gpu.peak_flops (a mapping dtype -> FLOP/s)")
        gpu = GPU(name=str(g.get("name", bg.name if bg else "custom-gpu")),
                  peak_flops={k: number(v, f"gpu.peak_flops.{k}") for k, v in peak.items()},
                  memory_bytes=num(g, "memory_bytes", "gpu", bg.memory_bytes if bg else None),
                  hbm_bytes_per_s=num(g, "hbm_bytes_per_s", "gpu", bg.hbm_bytes_per_s if bg else None),
                  profile=g.get("profile", bg.profile if bg else None),
                  matmul_efficiency=num(g, "matmul_efficiency", "gpu", bg.matmul_efficiency if bg else 0.75),
                  memory_efficiency=num(g, "memory_efficiency", "gpu", bg.memory_efficiency if bg else 0.8))

    def link(key: str, default: Link | None) -> Link:
        m = d.get(key)
        if m is None:
            if default is None:
                raise ClusterError(f"{origin}: missing field {key!r} (bandwidth_bytes_per_s, latency_s)")
            return default
        if not isinstance(m, dict):
            raise ClusterError(f"{origin}: field {key!r} must be a mapping with bandwidth_bytes_per_s and "
                               f"latency_s (got {m!r})")
        _known_fields(m, key, {"bandwidth_bytes_per_s", "latency_s"}, origin)
        return Link(num(m, "bandwidth_bytes_per_s", key, default.bandwidth_bytes_per_s if default else None),
                    num(m, "latency_s", key, default.latency_s if default else None))

    def count(key: str, default):
        v = d.get(key, default)
        if v is None:
            raise ClusterError(f"{origin}: missing field {key!r}")
        if isinstance(v, bool) or not isinstance(v, int):
            raise ClusterError(f"{origin}: field {key!r} must be an integer (got {v!r})")
        return v

    c = Cluster(name=str(d.get("name", base.name if base else Path(origin).stem)),
                n_nodes=count("nodes", base.n_nodes if base else None),
                gpus_per_node=count("gpus_per_node", base.gpus_per_node if base else None),
                gpu=gpu,
                intra_link=link("intra_link", base.intra_link if base else None),
                inter_link=link("inter_link", base.inter_link if base else None),
                source=str(d.get("source", origin)))
    return validate(c)


def _known_fields(mapping: dict, where: str, known: set[str], origin: str) -> None:
    extra = set(mapping) - known
    if extra:
        raise ClusterError(f"{origin}: unknown field(s) {sorted(f'{where}.{k}' for k in extra)}; known "
                           f"fields of {where}: {sorted(known)}")


def load_cluster(spec: str | Cluster, n_nodes: int | None = None, gpus_per_node: int | None = None) -> Cluster:
    """A preset name or a YAML/JSON file path, with optional size overrides."""
    if isinstance(spec, Cluster):
        c = spec
    elif spec in PRESETS:
        c = preset(spec)
    else:
        path = Path(spec)
        if not path.suffix.lower() in (".yaml", ".yml", ".json"):
            raise ClusterError(f"unknown cluster {spec!r}: give a preset ({', '.join(sorted(PRESETS))}) "
                               f"or a .yaml/.json file")
        if not path.exists():
            raise ClusterError(f"cluster file {spec!r} does not exist")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml
                data = yaml.safe_load(text)
        except Exception as e:  # parse errors of either format
            raise ClusterError(f"cluster file {spec!r} is not valid {path.suffix[1:].upper()}: {e}") from None
        if not isinstance(data, dict):
            raise ClusterError(f"cluster file {spec!r} must hold a mapping of fields, got {type(data).__name__}")
        c = _from_dict(data, str(spec))
    if n_nodes is not None or gpus_per_node is not None:
        c = c.with_size(n_nodes, gpus_per_node)
    return validate(c)


# ---- submeshes and logical meshes -----------------------------------------------------------

@dataclass(frozen=True)
class Submesh:
    """Alpa's physical submesh: (1, 2^k) inside a node, or (n, M) whole nodes."""

    n_nodes: int
    gpus_per_node: int

    @property
    def n_devices(self) -> int:
        return self.n_nodes * self.gpus_per_node

    def logical_meshes(self) -> list[tuple[int, int]]:
        d = self.n_devices
        return [(d0, d // d0) for d0 in range(1, d + 1) if d % d0 == 0]

    def __str__(self) -> str:
        return f"({self.n_nodes},{self.gpus_per_node})"


def submeshes(cluster: Cluster) -> list[Submesh]:
    """Alpa's submesh shapes: (1, 2^k) inside a node and (n, M) whole nodes. Beyond 16 nodes
    only power-of-two node counts are offered: every (n, M) shape multiplies the ILPs to solve,
    and large clusters are built from power-of-two pipeline stages in practice."""
    out = [Submesh(1, 2 ** k) for k in range(int(math.log2(cluster.gpus_per_node)) + 1)]
    counts = range(2, cluster.n_nodes + 1) if cluster.n_nodes <= 16 else \
        sorted({n for n in (2 ** k for k in range(1, int(math.log2(cluster.n_nodes)) + 1))} | {cluster.n_nodes})
    out += [Submesh(n, cluster.gpus_per_node) for n in counts]
    return out


@dataclass(frozen=True)
class MeshAxis:
    """One axis of a logical mesh placed on a submesh: its size and the link it uses."""

    size: int
    bandwidth_bytes_per_s: float
    latency_s: float
    crosses_nodes: bool


def mesh_axes(cluster: Cluster, submesh: Submesh, mesh: tuple[int, int]) -> tuple[MeshAxis, MeshAxis, MeshAxis]:
    """Axis 0, axis 1, and both axes together, for a logical mesh laid row-major over devices
    ordered (node, gpu). Axis 1 groups consecutive devices; axis 0 strides by d1.

    A group that spans nodes is bounded by the nodes' NICs: all groups of a node communicate at
    once, so each gets node bandwidth x (its GPUs per node) / (GPUs per node) — a full-node
    group sees the whole node's NIC bandwidth (NCCL's hierarchical collectives), a
    one-GPU-per-node group an eighth of it.
    """
    d0, d1 = mesh
    if d0 * d1 != submesh.n_devices:
        raise ValueError(f"logical mesh {mesh} does not have {submesh.n_devices} devices")
    m = submesh.gpus_per_node

    def axis(size: int, members_per_node: int) -> MeshAxis:
        if size <= 1:
            return MeshAxis(1, math.inf, 0.0, False)
        if members_per_node >= size:
            return MeshAxis(size, cluster.intra_link.bandwidth_bytes_per_s, cluster.intra_link.latency_s, False)
        bw = cluster.inter_link.bandwidth_bytes_per_s * members_per_node / cluster.gpus_per_node
        return MeshAxis(size, bw, cluster.inter_link.latency_s, True)

    a1 = axis(d1, min(d1, m))
    a0 = axis(d0, max(1, min(d0, m // d1)) if d1 < m else 1)
    both = axis(d0 * d1, min(d0 * d1, m))
    return a0, a1, both
