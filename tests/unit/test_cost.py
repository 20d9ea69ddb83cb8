"""Cost model: alpha-beta collectives, mesh axes on real clusters, roofline compute."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autopar.costmodel.collectives import all_gather_s, all_reduce_s, all_to_all_s, p2p_s, reduce_scatter_s
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import MeshAxis, Submesh, mesh_axes
from autopar.hardware.presets import GPUS, PRESETS, load_cluster
from autopar.hardware.profiles import load_gpu_profile as load_profile
from autopar.hardware.specs import Link

AXES = [MeshAxis(n, bw, lat, False) for n in (2, 3, 4, 8, 16) for bw, lat in ((150e9, 5e-6), (3.125e9, 30e-6))]


# ---- collectives --------------------------------------------------------------------------------

@pytest.mark.parametrize("ax", AXES, ids=lambda a: f"n{a.size}-bw{a.bandwidth_bytes_per_s:.3g}")
@pytest.mark.parametrize("nbytes", [1.0, 4096.0, 2.0**30])
def test_ring_collectives_closed_forms(ax, nbytes):
    n, bw, a = ax.size, ax.bandwidth_bytes_per_s, ax.latency_s
    ar = 2 * (n - 1) * a + 2 * (n - 1) / n * nbytes / bw
    assert all_reduce_s(nbytes, ax) == pytest.approx(ar, rel=1e-12)
    # all-gather and reduce-scatter are each half a ring all-reduce (latency terms included)
    assert all_gather_s(nbytes, ax) == pytest.approx(ar / 2, rel=1e-12)
    assert reduce_scatter_s(nbytes, ax) == pytest.approx(ar / 2, rel=1e-12)
    assert all_to_all_s(nbytes, ax) == pytest.approx((n - 1) * a + (n - 1) / n**2 * nbytes / bw, rel=1e-12)


def test_collectives_degenerate_groups_cost_nothing():
    one = MeshAxis(1, math.inf, 0.0, False)
    big = MeshAxis(8, 1e9, 1e-6, False)
    for f in (all_reduce_s, all_gather_s, reduce_scatter_s, all_to_all_s):
        assert f(1e9, one) == 0.0
        assert f(0.0, big) == 0.0


def test_p2p():
    link = Link(25e9, 7e-6)
    assert p2p_s(1e9, link) == pytest.approx(7e-6 + 1e9 / 25e9, rel=1e-12)
    assert p2p_s(0, link) == 0.0


# ---- mesh axes ----------------------------------------------------------------------------------

def _ax(size, bw, lat, crosses):
    return MeshAxis(size, bw, lat, crosses)


P3_NV, P3_NV_LAT = 150e9, 5e-6              # NVLink per GPU, per direction
P3_NIC, P3_NIC_LAT = 25e9 / 8, 30e-6        # 25 Gb/s per node
A100_NV, A100_NV_LAT = 300e9, 3e-6
A100_NIC, A100_NIC_LAT = 8 * 200e9 / 8, 5e-6   # 8 x HDR 200 Gb/s per node
NONE = MeshAxis(1, math.inf, 0.0, False)


@pytest.mark.parametrize("preset,nv,nvl,nic,nicl", [
    ("p3.16xlarge", P3_NV, P3_NV_LAT, P3_NIC, P3_NIC_LAT),
    ("dgx-a100", A100_NV, A100_NV_LAT, A100_NIC, A100_NIC_LAT),
])
def test_mesh_axes_by_hand(preset, nv, nvl, nic, nicl):
    cl = PRESETS[preset]
    assert cl.intra_link == Link(nv, nvl) and cl.inter_link == Link(nic, nicl)
    # inside one node: every group rides NVLink
    assert mesh_axes(cl, Submesh(1, 8), (1, 8)) == (NONE, _ax(8, nv, nvl, False), _ax(8, nv, nvl, False))
    assert mesh_axes(cl, Submesh(1, 8), (8, 1)) == (_ax(8, nv, nvl, False), NONE, _ax(8, nv, nvl, False))
    assert mesh_axes(cl, Submesh(1, 4), (2, 2)) == (_ax(2, nv, nvl, False), _ax(2, nv, nvl, False),
                                                    _ax(4, nv, nvl, False))
    # two nodes as (2, 8): axis 1 is a node (NVLink); axis 0 pairs one GPU per node, so each of
    # the 8 concurrent groups gets 1/8 of the node's NIC bandwidth; both axes: the whole NIC
    a0, a1, both = mesh_axes(cl, Submesh(2, 8), (2, 8))
    assert a1 == _ax(8, nv, nvl, False)
    assert a0 == _ax(2, nic * 1 / 8, nicl, True)
    assert both == _ax(16, nic, nicl, True)
    # (16, 1): one group of 16 spanning both nodes, 8 GPUs per node -> the node's whole NIC
    a0, a1, both = mesh_axes(cl, Submesh(2, 8), (16, 1))
    assert a0 == _ax(16, nic * 8 / 8, nicl, True) and a1 == NONE and both == a0
    # (4, 4): axis 1 inside a node; axis 0 strides by 4, 2 GPUs per node -> 2/8 of the NIC
    a0, a1, both = mesh_axes(cl, Submesh(2, 8), (4, 4))
    assert a1 == _ax(4, nv, nvl, False) and a0 == _ax(4, nic * 2 / 8, nicl, True)
    # (1, 16): one group over both nodes
    assert mesh_axes(cl, Submesh(2, 8), (1, 16))[1] == _ax(16, nic, nicl, True)


def test_mesh_axes_rejects_wrong_device_count():
    with pytest.raises(ValueError, match="does not have 16 devices"):
        mesh_axes(PRESETS["p3.16xlarge"], Submesh(2, 8), (4, 2))


def test_all_reduce_over_two_p3_nodes_by_hand():
    """1 GiB of fp16 gradients all-reduced over (2, 8) -> (16, 1): 2*15/16 GiB over 25 Gb/s."""
    ax = mesh_axes(PRESETS["p3.16xlarge"], Submesh(2, 8), (16, 1))[0]
    want = 2 * 15 * 30e-6 + 2 * 15 / 16 * 2**30 / (25e9 / 8)
    assert all_reduce_s(2**30, ax) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(0.6451, abs=1e-4)


# ---- compute ------------------------------------------------------------------------------------

def test_default_curve_roofline_v100():
    """No V100 profile: eff = matmul_efficiency * prod d/(d+64); op = max(kernel + gap, dispatch)."""
    gpu = GPUS["V100-SXM2-16GB"]
    cm = ComputeModel(gpu, "fp16")
    assert cm.profile is None and cm.launch_s == 5e-6 and cm.gap_s == 1e-6
    m = n = k = 4096
    eff = 0.72 * (4096 / 4160) ** 3
    assert cm.matmul_efficiency(m, n, k) == pytest.approx(eff, rel=1e-12)
    assert cm.matmul_s(m, n, k) == pytest.approx(2 * m * n * k / (125e12 * eff) + 1e-6, rel=1e-12)
    # streaming: HBM x memory efficiency
    assert cm.stream_bytes_per_s == pytest.approx(900e9 * 0.8)
    assert cm.memory_bound_s(1e9) == pytest.approx(1e9 / 720e9 + 1e-6, rel=1e-12)
    # a tiny op waits on the host's dispatch, not the GPU
    assert cm.memory_bound_s(64) == 5e-6
    assert cm.matmul_s(8, 8, 8) == 5e-6
    assert cm.matmul_s(0, 8, 8) == 0.0 and cm.memory_bound_s(0) == 0.0


def test_h100_profile_reproduces_measured_rows():
    """At a measured shape the model returns the measured time (plus the in-graph kernel gap)."""
    gpu = GPUS["H100-SXM5-80GB"]
    cm = ComputeModel(gpu, "bf16")
    prof = load_profile(gpu.profile)
    assert cm.launch_s == prof["launch_overhead_s"]
    assert cm.gap_s == prof["meta"]["launch_in_graph_s"]
    for r in prof["matmul"]:
        if r["dtype"] == "bf16" and (r["m"], r["n"], r["k"]) in {(8192, 4096, 4096), (4096, 16384, 4096),
                                                                  (16384, 16384, 16384)}:
            assert cm.matmul_s(r["m"], r["n"], r["k"]) == pytest.approx(max(r["time_s"] + cm.gap_s, cm.launch_s),
                                                                      rel=1e-9)
    for r in prof["attention"]:
        if r["dtype"] == "bf16" and r["batch"] == 4 and r["heads"] == 32 and r["head_dim"] == 128:
            got_f = cm.attention_s(r["batch"], r["heads"], r["seq"], r["head_dim"], r["causal"])
            got_b = cm.attention_s(r["batch"], r["heads"], r["seq"], r["head_dim"], r["causal"], backward=True)
            assert got_f == pytest.approx(max(r["fwd_s"] + cm.gap_s, cm.launch_s), rel=1e-9)
            assert got_b == pytest.approx(max(r["bwd_s"] + cm.gap_s, cm.launch_s), rel=1e-9)


def test_attention_efficiency_depends_on_batch_times_heads():
    """Flash attention at seq 2048 runs ~1.7x faster per FLOP with 4x32 heads than 1x16 (measured)."""
    cm = ComputeModel(GPUS["H100-SXM5-80GB"], "bf16")
    small = cm.attention_s(1, 16, 2048, 128, True) / (1 * 16)
    big = cm.attention_s(4, 32, 2048, 128, True) / (4 * 32)
    assert small / big == pytest.approx(285 / 170, rel=0.05)


def test_h100_stream_bandwidth_comes_from_add_rows():
    """HBM streaming bandwidth: median of the `add` kernel rows of 256 MiB and more (the `copy`
    rows fall to 2.4 TB/s above 1 GiB on this GPU, add holds ~3.04 TB/s)."""
    gpu = GPUS["H100-SXM5-80GB"]
    prof = load_profile(gpu.profile)
    adds = [r["gbps"] for r in prof["memory_bound"] if r["kernel"] == "add" and r["bytes"] >= 2**28]
    cm = ComputeModel(gpu, "bf16")
    assert cm.stream_bytes_per_s == pytest.approx(float(np.median(adds)) * 1e9)
    assert 2.9e12 < cm.stream_bytes_per_s < 3.2e12
    assert cm.stream_bytes_per_s < gpu.hbm_bytes_per_s


def test_h200_profile_loads_and_is_faster_memory_than_h100():
    h100 = ComputeModel(GPUS["H100-SXM5-80GB"], "bf16")
    h200 = ComputeModel(GPUS["H200-SXM-141GB"], "bf16")
    assert h200.stream_bytes_per_s > 1.3 * h100.stream_bytes_per_s
    assert h200.memory_bound_s(2**30) < h100.memory_bound_s(2**30)


def test_matmul_efficiency_monotone_in_size_without_profile():
    cm = ComputeModel(GPUS["A100-SXM4-80GB"], "bf16")
    effs = [cm.matmul_efficiency(d, d, d) for d in (64, 256, 1024, 4096, 16384)]
    assert effs == sorted(effs) and effs[-1] < 0.8


# ---- one GPT layer on an H100: predicted vs measured ----------------------------------------------

def _gpu_layer_predict():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_layer_predict.py"
    spec = importlib.util.spec_from_file_location("gpu_layer_predict", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, json.loads((path.parent / "results" / "gpu_layer_h100.json").read_text())


def test_gpt_layer_h100_within_15_percent():
    """bench/results/gpu_layer_h100.json: one GPT layer (h=4096, 32 heads, s=2048, b=4, bf16,
    eager PyTorch) measured on an H100; the cost model predicts forward and forward+backward
    within 15%."""
    mod, doc = _gpu_layer_predict()
    row = next(r for r in doc["rows"] if (r["hidden"], r["heads"], r["seq"], r["batch"]) == (4096, 32, 2048, 4))
    fwd, fwd_bwd = mod.predict(4096, 32, 2048, 4)
    assert fwd == pytest.approx(row["fwd_s"], rel=0.15)
    assert fwd_bwd == pytest.approx(row["fwd_bwd_s"], rel=0.15)


def test_gpt_layers_h100_gpu_bound_rows_within_15_percent():
    """Every measured layer that keeps the GPU busy (forward+backward >= 4 ms) is predicted
    within 15% forward+backward. Smaller layers are bound by eager PyTorch's host dispatch
    (~30-40 us per op with autograd recording), which the profile does not measure."""
    mod, doc = _gpu_layer_predict()
    big = [r for r in doc["rows"] if r["fwd_bwd_s"] >= 4e-3]
    assert len(big) >= 12
    for r in big:
        _, fb = mod.predict(r["hidden"], r["heads"], r["seq"], r["batch"])
        assert fb == pytest.approx(r["fwd_bwd_s"], rel=0.15), r


# ---- resharding and stage-to-stage transfers ------------------------------------------------------

def test_reshard_by_hand():
    from autopar.hardware.mesh import Mesh
    from autopar.sharding.spec import reshard_s
    cl = PRESETS["p3.16xlarge"]
    mesh = Mesh(cl, Submesh(2, 8), (2, 8))
    a0, a1, _ = mesh.axes
    shape, eb = (16, 64, 256), 2
    full = 16 * 64 * 256 * 2
    assert reshard_s(shape, eb, (0, 0, 0), (1, 0, 2), mesh) == 0.0          # slicing is free
    assert reshard_s(shape, eb, (1, 0, 0), (0, 0, 0), mesh) == pytest.approx(all_gather_s(full, a0))
    assert reshard_s(shape, eb, (0, 0, 2), (0, 0, 0), mesh) == pytest.approx(all_gather_s(full, a1))
    # a split moved to another dim: all-to-all of the tensor over that axis
    assert reshard_s(shape, eb, (2, 0, 0), (0, 2, 0), mesh) == pytest.approx(all_to_all_s(full, a1))
    # S01 -> R: gather over axis 0 (on the 1/d1 slice), then over axis 1 (the whole tensor)
    assert reshard_s(shape, eb, (3, 0, 0), (0, 0, 0), mesh) == pytest.approx(
        all_gather_s(full / 8, a0) + all_gather_s(full, a1))
    # (S0, S1) -> (S1, S0): two all-to-alls
    assert reshard_s(shape, eb, (1, 2, 0), (2, 1, 0), mesh) == pytest.approx(
        all_to_all_s(full / 8, a0) + all_to_all_s(full / 2, a1))


def test_p2p_between_stages_by_hand():
    from autopar.evaluation.evaluator import p2p_time_s
    from autopar.plan import StagePlan
    cl = load_cluster("p3.16xlarge", 2)

    def stage(ids):
        return StagePlan(0, (0, 1), [], (1, len(ids)), list(ids), (1, len(ids)), {})
    nbytes = 64e6
    # inside a node: the 4 pairs send in parallel over NVLink
    assert p2p_time_s(cl, stage(range(0, 4)), stage(range(4, 8)), nbytes) == pytest.approx(
        5e-6 + nbytes / 4 / 150e9)
    # node to node: the NIC (25 Gb/s) bounds it however many GPUs send
    assert p2p_time_s(cl, stage(range(0, 8)), stage(range(8, 16)), nbytes) == pytest.approx(
        30e-6 + nbytes / (25e9 / 8))
    assert p2p_time_s(cl, stage(range(0, 8)), stage(range(8, 16)), 0) == 0.0
