"""Memory-bound ops are priced on their own kind's measured rows, by size (costmodel/compute.py
memory_bound_s; hardware.profiles.MEMORY_BOUND_KERNELS): the closed form against the profile's
rows, the fall-backs, which kind each op of a traced graph takes, and the profiler's option to
measure only some parts (its backward kernels run in tests/unit/test_profile.py's CPU pass)."""

from __future__ import annotations

import math

import pytest

import graphs
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.presets import load_cluster
from autopar.hardware.profiles import MEMORY_BOUND_KERNELS, load_gpu_profile
from autopar.sharding.rules.common import backward_kernel, memory_kernel
from graphs.ir import NORM, VIEW


def _rows(profile: dict, kernel: str) -> list[tuple[int, float]]:
    return sorted((r["bytes"], r["gbps"] * 1e9) for r in profile["memory_bound"] if r["kernel"] == kernel)


@pytest.fixture(scope="module")
def h200():
    cm = ComputeModel(load_cluster("dgx-h200", 1, 1).gpu)
    return cm, load_gpu_profile(cm.gpu.profile)


def test_at_a_measured_size_the_kernel_takes_its_measured_time(h200):
    cm, prof = h200
    for kernel in MEMORY_BOUND_KERNELS:
        for nbytes, bw in _rows(prof, kernel):
            assert cm.memory_bound_s(nbytes, kernel=kernel) == pytest.approx(cm.op_s(nbytes / bw), rel=1e-12)


def test_between_sizes_the_bandwidth_is_interpolated_in_log_size(h200):
    cm, prof = h200
    (b0, bw0), (b1, bw1) = _rows(prof, "layernorm_backward")[5:7]
    mid = math.sqrt(b0 * b1)                        # halfway in log2(bytes)
    assert cm.memory_bound_s(mid, kernel="layernorm_backward") == pytest.approx(cm.op_s(mid / ((bw0 + bw1) / 2)))
    # beyond the rows: the end rows' bandwidth
    big_b, big_bw = _rows(prof, "gelu")[-1]
    assert cm.memory_bound_s(4 * big_b, kernel="gelu") == pytest.approx(cm.op_s(4 * big_b / big_bw))


def test_kinds_differ_as_measured(h200):
    # at 256 MiB the measured H200 rows: softmax < layernorm backward < layernorm < gelu < add
    cm, _ = h200
    t = {k: cm.memory_bound_s(2**28, kernel=k) for k in ("add", "gelu", "layernorm", "layernorm_backward", "softmax")}
    assert t["add"] < t["gelu"] < t["layernorm"] < t["layernorm_backward"] < t["softmax"]
    # a small add reaches a fraction of a large one's bandwidth (launch tails, not the stream)
    assert cm.memory_bound_s(2**20) / 2**20 > 2 * cm.memory_bound_s(2**30) / 2**30


def test_fall_backs():
    # a profile without backward rows prices a backward on its forward's rows (H100: no
    # *_backward rows yet); a GPU without a profile keeps the one streaming bandwidth
    h100 = ComputeModel(load_cluster("dgx-h100", 1, 1).gpu)
    assert not _rows(load_gpu_profile(h100.gpu.profile), "gelu_backward")
    assert h100.memory_bound_s(3e8, kernel="gelu_backward") == h100.memory_bound_s(3e8, kernel="gelu")
    v100 = ComputeModel(load_cluster("p3.16xlarge", 1, 1).gpu)
    assert v100.gpu.profile is None
    for kernel in MEMORY_BOUND_KERNELS:
        assert v100.memory_bound_s(3e8, kernel=kernel) == pytest.approx(v100.op_s(3e8 / v100.stream_bytes_per_s))


def test_each_traced_op_takes_its_kind():
    g = graphs.load("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=512", batch=2)
    kinds = {n.op: memory_kernel(n) for n in g.nodes() if n.fwd_bytes}
    assert kinds["gelu"] == "gelu" and backward_kernel("gelu") == "gelu_backward"
    assert kinds["layer_norm"] == "layernorm" and backward_kernel("layernorm") == "layernorm_backward"
    assert kinds["add"] == "add" and backward_kernel("add") == "add"
    assert all(memory_kernel(n) == "copy" for n in g.nodes() if n.kind == VIEW)
    assert all(memory_kernel(n) == "layernorm" for n in g.nodes() if n.kind == NORM)


def test_profile_sections_option_rejects_unknown_parts(tmp_path, capsys):
    from autopar.profiling import gpu
    assert gpu.main(["--out", str(tmp_path / "p.json"), "--sections", "memory_bound,gemm"]) == 2
    assert "gemm" in capsys.readouterr().err and not (tmp_path / "p.json").exists()
