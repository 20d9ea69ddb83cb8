"""Cluster presets, YAML/JSON files and their errors, size overrides, submeshes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from autopar.hardware.mesh import Submesh, submeshes
from autopar.hardware.presets import PRESETS, load_cluster
from autopar.hardware.specs import ClusterError


def _write(tmp_path, doc, ext="yaml", name="cluster"):
    p = tmp_path / f"{name}.{ext}"
    p.write_text(yaml.safe_dump(doc) if ext in ("yaml", "yml") else json.dumps(doc))
    return str(p)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("ext", ["yaml", "json"])
def test_presets_round_trip_through_files(tmp_path, preset, ext):
    c = PRESETS[preset]
    c2 = load_cluster(_write(tmp_path, c.to_dict(), ext))
    assert dataclasses.asdict(c2) == dataclasses.asdict(c)


def test_preset_figures():
    p3 = PRESETS["p3.16xlarge"]
    assert (p3.n_nodes, p3.gpus_per_node, p3.n_gpus) == (8, 8, 64)
    assert p3.gpu.memory_bytes == 16e9 and p3.gpu.peak("fp16") == 125e12
    assert p3.inter_link.bandwidth_bytes_per_s == 25e9 / 8          # 25 Gb/s per node
    a100 = PRESETS["dgx-a100"]
    assert a100.inter_link.bandwidth_bytes_per_s == 200e9             # 8 x 200 Gb/s
    assert a100.gpu.peak("bf16") == 312e12 and a100.gpu.memory_bytes == 80e9
    with pytest.raises(ClusterError, match="no peak FLOP/s for dtype 'fp8'"):
        p3.gpu.peak("fp8")


def test_base_preset_partly_overridden(tmp_path):
    c = load_cluster(_write(tmp_path, {"base": "dgx-a100", "nodes": 2,
                                       "inter_link": {"bandwidth_bytes_per_s": 100e9}}))
    assert c.n_nodes == 2 and c.gpus_per_node == 8
    assert c.inter_link.bandwidth_bytes_per_s == 100e9
    assert c.inter_link.latency_s == PRESETS["dgx-a100"].inter_link.latency_s
    assert c.gpu is PRESETS["dgx-a100"].gpu


def test_custom_gpu_by_name_and_by_fields(tmp_path):
    doc = {"name": "mine", "nodes": 2, "gpus_per_node": 4, "gpu": "A100-SXM4-80GB",
           "intra_link": {"bandwidth_bytes_per_s": 1e11, "latency_s": 1e-6},
           "inter_link": {"bandwidth_bytes_per_s": 1e10, "latency_s": 1e-5}}
    c = load_cluster(_write(tmp_path, doc, "json"))
    assert (c.name, c.n_nodes, c.gpus_per_node, c.gpu.name) == ("mine", 2, 4, "A100-SXM4-80GB")
    doc["gpu"] = {"name": "X", "peak_flops": {"bf16": 1e14}, "memory_bytes": 24e9, "hbm_bytes_per_s": 1e12}
    c = load_cluster(_write(tmp_path, doc, "yml"))
    assert c.gpu.peak("bf16") == 1e14 and c.gpu.matmul_efficiency == 0.75


def test_nodes_override():
    assert load_cluster("p3.16xlarge", 2).n_gpus == 16
    assert load_cluster("dgx-h100", 1, 1).n_gpus == 1
    c = load_cluster("p3.16xlarge", n_nodes=3)
    assert (c.n_nodes, c.gpus_per_node) == (3, 8)


def test_nodes_override_file(tmp_path):
    path = _write(tmp_path, {"base": "p3.16xlarge"})
    assert load_cluster(path, 4).n_nodes == 4


BAD = [
    ({"nodes": 1, "gpus_per_node": 8}, "missing field 'gpu'"),
    ({"gpu": "V100-SXM2-16GB", "gpus_per_node": 8,
      "intra_link": {"bandwidth_bytes_per_s": 1, "latency_s": 0},
      "inter_link": {"bandwidth_bytes_per_s": 1, "latency_s": 0}}, "missing field 'nodes'"),
    ({"gpu": "V100-SXM2-16GB", "nodes": 1, "gpus_per_node": 8,
      "inter_link": {"bandwidth_bytes_per_s": 1, "latency_s": 0}}, "missing field 'intra_link'"),
    ({"gpu": "V100-SXM2-16GB", "nodes": 1, "gpus_per_node": 8,
      "intra_link": {"bandwidth_bytes_per_s": 1, "latency_s": 0},
      "inter_link": {"bandwidth_bytes_per_s": 1}}, r"missing field inter_link\.latency_s"),
    ({"base": "p3.16xlarge", "gpus_per_node": 0}, "'gpus_per_node' must be an integer >= 1"),
    ({"base": "p3.16xlarge", "nodes": 0}, "'nodes' must be an integer >= 1"),
    ({"base": "p3.16xlarge", "nodes": 2.5}, "'nodes' must be an integer"),
    ({"base": "p3.16xlarge", "gpus_per_node": 6}, "'gpus_per_node' must be a power of two"),
    ({"base": "p3.16xlarge", "inter_link": {"bandwidth_bytes_per_s": -1}},
     r"'inter_link\.bandwidth_bytes_per_s' must be > 0"),
    ({"base": "p3.16xlarge", "intra_link": {"latency_s": -1e-6}}, r"'intra_link\.latency_s' must be >= 0"),
    ({"base": "p3.16xlarge", "intra_link": {"bandwidth_bytes_per_s": "fast"}},
     r"intra_link\.bandwidth_bytes_per_s must be a number"),
    ({"base": "p3.16xlarge", "gpu": {"memory_bytes": -5}}, r"'gpu\.memory_bytes' must be > 0"),
    ({"base": "p3.16xlarge", "gpu": {"peak_flops": {"bf16": 0}}}, r"'gpu\.peak_flops' must give a positive"),
    ({"base": "p3.16xlarge", "gpu": {"peak_flops": {"bf16": "lots"}}}, r"gpu\.peak_flops\.bf16 must be a number"),
    ({"base": "p3.16xlarge", "gpu": {"matmul_efficiency": 0}}, r"'gpu\.matmul_efficiency' must be a fraction"),
    ({"base": "dgx-h100", "gpu": {"profile": "nope.json"}}, r"'gpu\.profile' must name a profile"),
    ({"base": "p3.16xlarge", "gpus": 8}, r"unknown field\(s\) \['gpus'\]"),
    ({"base": "p3.16xlarge", "gpu": {"memory_gb": 32}}, r"unknown field\(s\) \['gpu\.memory_gb'\]"),
    ({"base": "p3.16xlarge", "inter_link": {"bw": 1e9}}, r"unknown field\(s\) \['inter_link\.bw'\]"),
    ({"base": "p3.16xlarge", "gpu": "K80"}, "unknown gpu 'K80'"),
    ({"base": "p3.16xlarge", "gpu": 5}, "field 'gpu' must be a GPU name"),
    ({"base": "p5"}, "unknown base preset 'p5'"),
]


@pytest.mark.parametrize("doc,msg", BAD, ids=[m for _, m in BAD])
@pytest.mark.parametrize("ext", ["yaml", "json"])
def test_bad_cluster_files_name_the_field(tmp_path, doc, msg, ext):
    with pytest.raises(ClusterError, match=msg):
        load_cluster(_write(tmp_path, doc, ext))


def test_bad_cluster_sources(tmp_path):
    with pytest.raises(ClusterError, match="unknown cluster 'p9'"):
        load_cluster("p9")
    with pytest.raises(ClusterError, match="does not exist"):
        load_cluster(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [1,\n")
    with pytest.raises(ClusterError, match="not valid YAML"):
        load_cluster(str(bad))
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(ClusterError, match="must hold a mapping"):
        load_cluster(str(lst))


@pytest.mark.parametrize("nodes,gpn", [(0, None), (-2, None), (None, 0), (None, 3)])
def test_bad_size_overrides(nodes, gpn):
    with pytest.raises(ClusterError, match="nodes|gpus_per_node"):
        load_cluster("p3.16xlarge", nodes, gpn)


def test_submeshes_and_logical_meshes():
    c = load_cluster("p3.16xlarge", 3)
    assert submeshes(c) == [Submesh(1, 1), Submesh(1, 2), Submesh(1, 4), Submesh(1, 8),
                            Submesh(2, 8), Submesh(3, 8)]
    assert Submesh(2, 8).logical_meshes() == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]
    big = submeshes(load_cluster("dgx-a100", 32))
    assert [s.n_nodes for s in big if s.n_nodes > 1] == [2, 4, 8, 16, 32]   # powers of two past 16 nodes
