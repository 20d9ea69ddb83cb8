"""Cluster presets from published figures, and loading a cluster from a preset or a file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .profiles import CommProfileError, measured_link
from .specs import GPU, Cluster, ClusterError, Link, validate

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
# autopar/profiles/ written by `python -m autopar.profiling.comm fit` from bench/nccl_bench.py's
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
    try:
        found = measured_link(file_name)
    except (CommProfileError, ValueError, OSError) as e:
        raise ClusterError(f"preset {name!r}: its comm profile autopar/profiles/{file_name} is unreadable: {e}") from None
    if found is None:
        return c
    bandwidth, latency, note = found
    link = Link(bandwidth, latency)
    return dataclasses.replace(c, intra_link=link,
                               source=f"{c.source}; {note}, instead of the datasheet's "
                                      f"{c.intra_link.bandwidth_bytes_per_s / 1e9:.0f} GB/s, "
                                      f"{c.intra_link.latency_s * 1e6:g} us")


def _from_dict(d: dict[str, Any], origin: str) -> Cluster:
    """Build from a file's mapping. A `base` preset may be given and partly overridden."""
    known = {"name", "base", "nodes", "gpus_per_node", "gpu", "intra_link", "inter_link", "source"}
    extra = set(d) - known
    if extra:
        raise ClusterError(f"{origin}: unknown field(s) {sorted(extra)}; known fields: {sorted(known)}")
    base_name = d.get("base")
    base = preset(base_name) if isinstance(base_name, str) and base_name in PRESETS else None
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
        try:
            return float(v)
        except OverflowError:
            raise ClusterError(f"{origin}: field {where} is too large to be a number of this kind "
                               f"({str(v)[:20]}...)") from None

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
        if not path.is_file():
            raise ClusterError(f"cluster file {spec!r} is not a file (a folder?)")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ClusterError(f"cluster file {spec!r} cannot be read: {getattr(e, 'strerror', None) or e}") from None
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


