"""Tests of the GPU profiler and the shipped profiles (CPU only: CI has no GPU)."""

import json
import math
import re

import pytest

from autopar.hardware import profiles as HP
from autopar.profiling import gpu as P

SHIPPED = ["h100_sxm", "h200"]


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    return request.param, HP.load_gpu_profile_file(request.param)


def _mm(prof, dtype, m, n, k):
    for r in prof["matmul"]:
        if (r["dtype"], r["m"], r["n"], r["k"]) == (dtype, m, n, k):
            return r
    raise KeyError((dtype, m, n, k))


def test_shipped_profiles_are_listed():
    assert set(SHIPPED) <= set(HP.list_gpu_profiles())


def test_shipped_profile_schema(shipped):
    name, prof = shipped
    assert prof["schema"] == "autopar.gpu_profile/v1"
    assert set(HP.GPU_TOP_KEYS) <= set(prof)
    for sec, keys in (("matmul", HP.MATMUL_KEYS), ("attention", HP.ATTENTION_KEYS),
                      ("memory_bound", HP.MEMORY_BOUND_KEYS)):
        assert prof[sec], f"{name}: {sec} is empty"
        for r in prof[sec]:
            assert set(r) == set(keys), (name, sec, r)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", prof["date"])
    assert prof["sm_count"] == 132  # both H100 SXM and H200 have 132 SMs
    assert prof["torch"].startswith("2.")
    assert {r["dtype"] for r in prof["matmul"]} == {"bf16", "fp16", "fp32", "tf32"}
    # the backward kernels were added after the H100 was lent (its backwards price on the
    # forward's rows, costmodel/compute.py _kernel_bytes_per_s)
    # and the eager recipe's kernels (bench/elementwise_sizes.py, bench/update_profile.py) only on
    # the H200, where they were measured
    forward = {k for k in HP.MEMORY_BOUND_KERNELS if not k.endswith("_backward")}
    kinds = {r["kernel"] for r in prof["memory_bound"]}
    assert forward <= kinds <= set(HP.MEMORY_BOUND_KERNELS) | set(HP.EAGER_KERNELS)
    if name == "h200":
        assert kinds == set(HP.MEMORY_BOUND_KERNELS) | set(HP.EAGER_KERNELS)


def test_shipped_profile_gpu_identity():
    h100, h200 = HP.load_gpu_profile_file("h100_sxm"), HP.load_gpu_profile_file("h200")
    assert "H100" in h100["gpu"]
    assert "H200" in h200["gpu"]
    assert 75 * 2**30 < h100["memory_bytes"] < 82 * 2**30
    assert 130 * 2**30 < h200["memory_bytes"] < 145 * 2**30


def test_rates_consistent_with_times(shipped):
    _, prof = shipped
    for r in prof["matmul"]:
        assert r["time_s"] > 0
        assert math.isclose(r["tflops"], 2 * r["m"] * r["n"] * r["k"] / r["time_s"] / 1e12,
                            rel_tol=1e-6)
        assert (r["m"] * r["k"] + r["k"] * r["n"] + r["m"] * r["n"]) * (
            2 if r["dtype"] in ("bf16", "fp16") else 4) <= P.MAX_OPERAND_BYTES
    for r in prof["memory_bound"]:
        assert math.isclose(r["gbps"], r["bytes"] / r["time_s"] / 1e9, rel_tol=1e-6)
    for r in prof["attention"]:
        assert r["fwd_s"] > 0 and r["bwd_s"] > 0


def test_matmul_values_sane(shipped):
    name, prof = shipped
    big = [r["tflops"] for r in prof["matmul"]
           if r["dtype"] == "bf16" and min(r["m"], r["n"], r["k"]) >= 4096]
    assert len(big) > 50
    # H100/H200 SXM dense bf16 peak is ~989 TFLOP/s; measured large shapes land 600-850.
    assert all(300 < t < 1000 for t in big), (name, min(big), max(big))
    big.sort()
    assert 500 < big[len(big) // 2] < 900
    # tiny matmuls are far from peak, big ones close to it
    assert _mm(prof, "bf16", 128, 128, 128)["tflops"] < 50
    # precision ordering at 4096^3: fp32 (no TF32) << tf32 < bf16
    fp32 = _mm(prof, "fp32", 4096, 4096, 4096)["tflops"]
    tf32 = _mm(prof, "tf32", 4096, 4096, 4096)["tflops"]
    bf16 = _mm(prof, "bf16", 4096, 4096, 4096)["tflops"]
    assert 30 < fp32 < 70
    assert 3 * fp32 < tf32 < bf16
    # the two transformer shapes the cost model leans on most
    for shape in [(8192, 4096, 4096), (2048, 12288, 4096)]:
        assert 500 < _mm(prof, "bf16", *shape)["tflops"] < 1000


def test_memory_bound_values_sane(shipped):
    name, prof = shipped
    hi = 4.0 if name == "h100_sxm" else 5.0  # HBM3 3.35 TB/s; H200 HBM3e 4.8 TB/s
    large = [r for r in prof["memory_bound"] if r["bytes"] >= 256 * 2**20]
    for r in large:
        if r["kernel"] in ("copy", "add"):
            assert 1000 < r["gbps"] < hi * 1000, (name, r)
        else:
            assert 500 < r["gbps"] < hi * 1000, (name, r)
    # a 1 MB kernel is latency-bound: far under the large-size bandwidth
    small = {r["kernel"]: r["gbps"] for r in prof["memory_bound"] if r["bytes"] <= 2**20}
    best = max(r["gbps"] for r in large if r["kernel"] == "copy")
    assert small["copy"] < best / 2


def test_attention_values_sane(shipped):
    _, prof = shipped
    rows = {(r["batch"], r["heads"], r["seq"], r["head_dim"], r["causal"]): r
            for r in prof["attention"]}
    # the H200's rows (SDPA's own pick, bench/update_profile.py) go on to 16384 tokens
    assert {512, 1024, 2048, 4096, 8192} <= {r["seq"] for r in prof["attention"]} <= {512, 1024, 2048, 4096, 8192, 16384}
    assert {r["head_dim"] for r in prof["attention"]} == {64, 128}
    c, nc = rows[(4, 32, 2048, 128, True)], rows[(4, 32, 2048, 128, False)]
    assert c["fwd_s"] < nc["fwd_s"]
    assert c["bwd_s"] > c["fwd_s"] and nc["bwd_s"] > nc["fwd_s"]
    flops = 4 * 4 * 32 * 2048 ** 2 * 128
    assert 150 < flops / nc["fwd_s"] / 1e12 < 900
    assert 100 < 2.5 * flops / nc["bwd_s"] / 1e12 < 900
    # doubling the sequence length at least doubles non-causal time (quadratic term)
    assert rows[(4, 32, 4096, 128, False)]["fwd_s"] > 2 * nc["fwd_s"]


def test_launch_overhead_sane(shipped):
    _, prof = shipped
    assert 1e-6 < prof["launch_overhead_s"] < 1e-4


def test_measure_profile_refuses_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        P.measure_profile(device="cpu")


def test_measure_profile_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        P.measure_profile(device="cuda")


def test_cli_refuses_cpu(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert P.main(["--out", str(out), "--device", "cpu"]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not out.exists()


def test_grids():
    mm = P.matmul_grid()
    assert {d for d, *_ in mm} == {"bf16", "fp16", "fp32", "tf32"}
    assert ("bf16", 8192, 4096, 4096) in mm and ("bf16", 2048, 12288, 4096) in mm
    assert max(m for _, m, _, _ in mm) == 65536
    assert all((m * k + k * n + m * n) * P._DTYPE_BYTES[d] <= P.MAX_OPERAND_BYTES
               for d, m, n, k in mm)
    quick = P.matmul_grid(quick=True)
    assert set(quick) <= set(mm) and len(quick) < len(mm) / 5
    mb = P.memory_bound_grid()
    assert min(b for _, b in mb) == 2**20 and max(b for _, b in mb) == 2**32


def test_validate_profile_rejects_bad():
    prof = HP.load_gpu_profile_file("h100_sxm")
    bad = dict(prof, schema="other")
    with pytest.raises(ValueError, match="schema"):
        HP.validate_gpu_profile(bad)
    bad = {k: v for k, v in prof.items() if k != "matmul"}
    with pytest.raises(ValueError, match="matmul"):
        HP.validate_gpu_profile(bad)
    bad = dict(prof, attention=[{"dtype": "bf16"}])
    with pytest.raises(ValueError, match="attention"):
        HP.validate_gpu_profile(bad)


def test_load_profile_by_path(tmp_path):
    prof = HP.load_gpu_profile_file("h200")
    p = tmp_path / "x.json"
    p.write_text(json.dumps(prof))
    assert HP.load_gpu_profile_file(p) == prof


def _tiny_profile(gpu, t_mm, t_f, t_copy, launch):
    return {"schema": HP.GPU_SCHEMA, "gpu": gpu, "memory_bytes": 1, "sm_count": 1, "torch": "2",
            "cuda": "13", "date": "2026-01-01",
            "matmul": [{"dtype": "bf16", "m": 1024, "n": 1024, "k": 1024, "time_s": t_mm,
                        "tflops": 2 * 1024**3 / t_mm / 1e12}],
            "attention": [{"dtype": "bf16", "batch": 1, "heads": 1, "seq": 512,
                           "head_dim": 64, "causal": True, "fwd_s": t_f, "bwd_s": 2 * t_f}],
            "memory_bound": [{"kernel": "copy", "bytes": 2**20, "time_s": t_copy,
                              "gbps": 2**20 / t_copy / 1e9}],
            "launch_overhead_s": launch}


def test_merge_profiles():
    a = _tiny_profile("G", 1e-3, 1e-4, 1e-6, 5e-6)
    b = _tiny_profile("G", 1.2e-3, 5e-4, 1.1e-6, 7e-6)
    m = P.merge_profiles([a, b])
    HP.validate_gpu_profile(m)
    mm = m["matmul"][0]
    assert math.isclose(mm["time_s"], 1.1e-3)  # within 1.5x: mean
    assert math.isclose(mm["tflops"], 2 * 1024**3 / 1.1e-3 / 1e12)
    at = m["attention"][0]
    assert at["fwd_s"] == 1e-4  # 5x apart: the faster one
    assert math.isclose(at["bwd_s"], 2e-4)
    assert math.isclose(m["memory_bound"][0]["gbps"], 2**20 / 1.05e-6 / 1e9)
    assert math.isclose(m["launch_overhead_s"], 6e-6)
    assert m["meta"]["merged_runs"] == 2
    with pytest.raises(ValueError, match="different GPUs"):
        P.merge_profiles([a, _tiny_profile("H", 1e-3, 1e-4, 1e-6, 5e-6)])


def test_measure_code_paths_on_cpu():
    """The measuring code runs end to end (CPU stand-in for the GPU; numbers meaningless)."""
    pytest.importorskip("torch")
    prof = P._measure(
        "cpu", quick=True, log=lambda s: None,
        grids={"matmul": [("bf16", 64, 128, 32), ("fp32", 32, 32, 32), ("tf32", 32, 64, 32)],
               "attention": [(1, 2, 64, 16, True), (1, 2, 64, 16, False)],
               "memory_bound": [(k, 2**16) for k in HP.MEMORY_BOUND_KERNELS]})
    HP.validate_gpu_profile(prof)
    assert [r["dtype"] for r in prof["matmul"]] == ["bf16", "fp32", "tf32"]
    assert len(prof["attention"]) == 2 and len(prof["memory_bound"]) == len(HP.MEMORY_BOUND_KERNELS)
    for r in prof["memory_bound"]:
        # tensors x bf16 row: an add and a backward read two and write one
        row_bytes = (3 if r["kernel"] in ("add", "gelu_backward", "layernorm_backward") else 2) * P.ROW_DIM * 2
        assert 2**16 // 2 < r["bytes"] <= 2**16 and r["bytes"] % row_bytes == 0
    assert "tf32" in P.summarize(prof)
