"""The rules' remembered kernel times (rules.common.matmul_s and memory_bound_s) against the
ComputeModel calls they replace: every strategy of every op of GPT layers, on meshes of a GPU
with a measured profile (H100, where each call re-reads it) and one without (V100), equal
field by field (floats to the bit) to the strategies built with the direct calls."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from builders import megatron_gpt

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.search.layer_solver import boundary_specs
from autopar.sharding.rules import common, decision_strategies, einsum, is_decision, leader_operand

follow = importlib.import_module("autopar.sharding.rules.follow")     # the module (the package exports its function)


def _direct(monkeypatch) -> None:
    """The rules as they were: every kernel time asked of the ComputeModel."""
    monkeypatch.setattr(einsum, "matmul_s", lambda cm, m, n, k, batch=1: cm.matmul_s(m, n, k, batch))
    monkeypatch.setattr(follow, "memory_bound_s",
                        lambda cm, nbytes, flops=0.0, kernel="add": cm.memory_bound_s(nbytes, flops, kernel))


def _all_strategies(g, mesh, cm) -> list:
    out = []
    for layer in g.layers:
        for name in layer.nodes:
            n = g.node(name)
            if is_decision(n):
                out.append(tuple(decision_strategies(n, mesh, cm)))
                continue
            li = leader_operand(n)
            shape = tuple(n.operands[li].shape)
            for spec in boundary_specs(shape, mesh) if len(shape) <= 3 else [(0,) * len(shape)]:
                out.append(follow.follow(n, spec, mesh, cm))
    return out


@pytest.mark.parametrize("cluster,nodes", [("dgx-h100", 2), ("p3.16xlarge", 2)])
@pytest.mark.parametrize("shape,sub", [((1, 8), (1, 8)), ((2, 4), (1, 8)), ((2, 8), (2, 8)), ((4, 1), (1, 4))])
def test_remembered_kernel_times_give_the_same_strategies(monkeypatch, cluster, nodes, shape, sub):
    cl = load_cluster(cluster, nodes)
    cm = ComputeModel(cl.gpu, cl.gpu.training_dtype())
    mesh = Mesh(cl, Submesh(*sub), shape)
    g = megatron_gpt(64, 4, 32, 16, layers=2, fused_qkv=shape == (2, 4))
    common.matmul_s.cache_clear()
    common.memory_bound_s.cache_clear()
    got = _all_strategies(g, mesh, cm)
    again = _all_strategies(g, mesh, cm)        # now from the memo
    assert common.matmul_s.cache_info().hits > 0 and common.memory_bound_s.cache_info().hits > 0
    with monkeypatch.context() as mp:
        _direct(mp)
        want = _all_strategies(g, mesh, cm)
    assert len(got) == len(want) > 0
    assert got == want and again == want        # dataclass equality: every field, floats exactly


def test_remembered_calls_equal_the_model_to_the_bit():
    rng = np.random.default_rng(5)
    for cluster in ("dgx-h100", "p3.16xlarge"):
        cl = load_cluster(cluster, 1)
        cm = ComputeModel(cl.gpu, cl.gpu.training_dtype())
        for _ in range(200):
            m, n, k, b = (int(x) for x in rng.integers(0, 5000, 4))
            assert common.matmul_s(cm, m, n, k, b) == cm.matmul_s(m, n, k, b)
            nbytes, flops = float(rng.random() * 1e9), float(rng.random() * 1e9) * (rng.random() < 0.5)
            assert common.memory_bound_s(cm, nbytes, flops) == cm.memory_bound_s(nbytes, flops)
            kernel = ("add", "gelu", "layernorm_backward", "copy")[int(rng.integers(0, 4))]
            assert common.memory_bound_s(cm, nbytes, flops, kernel) == cm.memory_bound_s(nbytes, flops, kernel)
        assert common.memory_bound_s(cm, 0.0, 0.0) == cm.memory_bound_s(0.0, 0.0) == 0.0
