"""Unfused attention (graphs/zoo/attention.py, zoo spec attn=unfused) against closed forms: the
traced op, its FLOPs and bytes (graphs/annotate.py), its time on the default GEMM curve and at
streaming bandwidth (ComputeModel.unfused_attention_s), the scores it keeps for backward, and
the batch / head splits of its sharding rule, which divide all of them exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.sharding.rules.attention import attention_strategies
from graphs.annotate import annotate
from graphs.errors import SpecError
from graphs.ir import ATTENTION, MATMUL, Operand, OpNode
from graphs.zoo.attention import unfused_attention
from graphs.zoo.config import get_config

P3 = load_cluster("p3.16xlarge", 1)      # V100: no profile, the default curve (c = 64)
CM = ComputeModel(P3.gpu, "fp16")
B, A, S, D = 4, 8, 1024, 64


def _node(b=B, a=A, s=S, d=D, dropout=0.1, dtype="fp16") -> OpNode:
    ops = [Operand((b, a, s, d), dtype, source=f"x{i}") for i in range(3)]
    node = OpNode("attn", "unfused_attention", ATTENTION, ops, [(b, a, s, d)], dtype,
                  {"is_causal": True, "dropout_p": dropout, "impl": "unfused", "requires_grad": True})
    return annotate(node, [True] * 3)


# ---- closed forms, written out here without the implementation's helpers ---------------------

def _op_s(kernel_s: float) -> float:
    return max(kernel_s + 1e-6, 5e-6)      # unprofiled GPU: 1 us gap, 5 us host dispatch


def _eff(m, n, k) -> float:
    return P3.gpu.matmul_efficiency * m / (m + 64) * n / (n + 64) * k / (k + 64)


def _gemm_s(bh, m, n, k, nbytes) -> float:
    stream = P3.gpu.hbm_bytes_per_s * P3.gpu.memory_efficiency
    return _op_s(max(2.0 * bh * m * n * k / (P3.gpu.peak("fp16") * _eff(bh * m, n, k)), nbytes / stream))


def _expected_s(b, a, s, d, dropout: bool, backward: bool) -> float:
    bh = b * a
    stream = P3.gpu.hbm_bytes_per_s * P3.gpu.memory_efficiency
    scores, sd = 2.0 * bh * s * s, 2.0 * bh * s * d          # fp16 bytes of S and of one of q, k, v, o
    wide = _gemm_s(bh, s, s, d, scores + 2 * sd)               # QK^T; backward dP = dO V^T
    narrow = _gemm_s(bh, s, d, s, scores + 2 * sd)             # PV; backward dV, dQ, dK
    elems = bh * s * s
    if backward:
        passes = [5, 6] if dropout else [6]                    # dropout bwd 2e+1, softmax bwd 3e
        return wide + 3 * narrow + sum(_op_s(p * elems / stream) for p in passes)
    passes = [4, 5] if dropout else [4]                        # softmax 2e, dropout 2e+1
    return wide + narrow + sum(_op_s(p * elems / stream) for p in passes)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_flops_and_bytes_closed_form(dropout):
    n = _node(dropout=dropout)
    bh, elems, qkvo = B * A, B * A * S * S, 4 * B * A * S * D * 2
    assert n.fwd_flops == 4.0 * bh * S * S * D                 # QK^T + PV, the full score matrix
    assert n.bwd_flops == 8.0 * bh * S * S * D                 # dP, dV, dQ, dK
    fwd_passes, bwd_passes = (4 + 5, 5 + 6) if dropout else (4, 6)
    assert n.fwd_bytes == qkvo + elems * (2 * 2 + fwd_passes)  # + S written, P' read by the GEMMs
    # backward: dO, the saved q, k, v, and dq, dk, dv; + dP, P', dS twice through the GEMMs
    assert n.bwd_bytes == (B * A * S * D * 2) * 7 + elems * (4 * 2 + bwd_passes)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_time_closed_form(dropout, backward):
    got = CM.unfused_attention_s(B, A, S, D, dropout, backward=backward)
    assert got == pytest.approx(_expected_s(B, A, S, D, dropout, backward), rel=1e-12)


def test_unfused_is_dearer_than_flash_and_grows_with_seq_squared():
    flash = CM.attention_s(B, A, S, D, True) + CM.attention_s(B, A, S, D, True, True)
    unfused = CM.unfused_attention_s(B, A, S, D, True) + CM.unfused_attention_s(B, A, S, D, True, True)
    assert unfused > flash
    # at long sequences the score passes dominate: 4x the time for 2x the sequence, within 10%
    long = CM.unfused_attention_s(B, A, 4096, D, True)
    assert 3.6 < long / CM.unfused_attention_s(B, A, 2048, D, True) < 4.4


# ---- the sharding rule ------------------------------------------------------------------------

def _mesh(d0: int, d1: int) -> Mesh:
    return Mesh(P3, Submesh(1, d0 * d1), (d0, d1))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_rule_splits_batch_and_heads_exactly(dropout):
    node = _node(dropout=dropout)
    kept_per_elem = 5 if dropout else 2                        # P (+ P' and the 1-byte mask)
    whole = {s.name: s for s in attention_strategies(node, _mesh(1, 1), CM)}["R"]
    out_bytes = B * A * S * D * 2
    assert whole.out_bytes_local == out_bytes + B * A * S * S * kept_per_elem
    assert whole.fwd_s == CM.unfused_attention_s(B, A, S, D, dropout > 0)
    sts = {s.name: s for s in attention_strategies(node, _mesh(2, 2), CM)}
    assert not any("s@" in name for name in sts)              # no sequence (context-parallel) split
    for name, (fb, fh) in {"b@0": (2, 1), "h@1": (1, 2), "b@0,h@1": (2, 2), "h@01": (1, 4), "b@01": (4, 1)}.items():
        st = sts[name]
        assert not st.collectives
        assert st.fwd_s == CM.unfused_attention_s(B // fb, A // fh, S, D, dropout > 0)
        assert st.bwd_s == CM.unfused_attention_s(B // fb, A // fh, S, D, dropout > 0, backward=True)
        # the kept scores and the output divide exactly by the devices sharing the op
        assert st.out_bytes_local * fb * fh == whole.out_bytes_local
        assert st.out_bytes_local == (B // fb) * (A // fh) * (S * D * 2 + S * S * kept_per_elem)


# ---- the zoo and the trace -------------------------------------------------------------------

@pytest.mark.parametrize("kv", [4, 2])
def test_unfused_attention_matches_sdpa(kv):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8)
    k, v = torch.randn(2, kv, 16, 8), torch.randn(2, kv, 16, 8)
    kr, vr = k.repeat_interleave(4 // kv, 1), v.repeat_interleave(4 // kv, 1)
    want = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    assert torch.allclose(unfused_attention(q, k, v, True, 0.0), want, atol=1e-5)


def test_spec_keys():
    assert get_config("gpt-350m").attn == "flash"
    c = get_config("gpt:hidden=64,layers=2,heads=4,attn=unfused,attn_dropout=0.1")
    assert (c.attn, c.attn_dropout) == ("unfused", 0.1)
    with pytest.raises(SpecError):
        get_config("gpt:hidden=64,layers=2,heads=4,attn=eager")
    with pytest.raises(SpecError):
        get_config("gpt:hidden=64,layers=2,heads=4,attn_dropout=1.5")


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_trace_keeps_one_attention_op(family, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE", "0")
    base = f"{family}:hidden=64,layers=2,heads=4,seq=32,vocab=128"
    flash = ModelSource(base, seq=32, dtype="bf16").graph(2)
    unfused = ModelSource(base + ",attn=unfused,attn_dropout=0.1", seq=32, dtype="bf16").graph(2)
    att = [n for n in unfused.nodes() if n.kind == ATTENTION]
    assert len(att) == 2 and all(n.attrs["impl"] == "unfused" and n.attrs["dropout_p"] == 0.1 for n in att)
    assert [n.kind for n in flash.nodes()] == [n.kind for n in unfused.nodes()]   # same graph otherwise
    # no [s, s] activation matmul: the scores live inside the one op
    assert not any(n.kind == MATMUL and n.out_shape[-2:] == (32, 32) for n in unfused.nodes())
    assert all(n.attrs.get("impl") is None for n in flash.nodes() if n.kind == ATTENTION)


# ---- the fitted A100 curve below its fitted range (compute._default_eff) ------------------------

def test_fitted_curve_falls_off_as_the_datasheet_below_its_fitted_range():
    from autopar.costmodel.compute import _default_eff
    from autopar.hardware.presets import GPUS
    a100, v100 = GPUS["A100-SXM4-80GB"], GPUS["V100-SXM2-16GB"]

    def fitted(*dims):
        out = 0.798
        for d in dims:
            out *= d / (d + 396.0)
        return out

    def datasheet(e_max, *dims):
        # the curve before the fitted range existed, in its order of operations (bit-identical)
        sat = 1.0
        for d in dims:
            sat *= d / (d + 64.0)
        return e_max * sat

    # inside the fitted range (every dim >= 768): the fitted curve
    assert _default_eff(a100, 8192, 2304, 6144) == pytest.approx(fitted(8192, 2304, 6144), rel=1e-12)
    assert _default_eff(a100, 768, 768, 768) == pytest.approx(fitted(768, 768, 768), rel=1e-12)
    # below it, one dim of 128: the fitted value at the edge times the datasheet fall-off to 128
    want = fitted(65536, 2048, 768) * (128 / 192) / (768 / 832)
    assert _default_eff(a100, 65536, 2048, 128) == pytest.approx(want, rel=1e-12)
    # continuous at the edge, monotone below it
    assert _default_eff(a100, 4096, 4096, 767) == pytest.approx(_default_eff(a100, 4096, 4096, 768), rel=2e-3)
    assert _default_eff(a100, 4096, 4096, 64) < _default_eff(a100, 4096, 4096, 128) < _default_eff(a100, 4096, 4096, 767)
    # a GPU without a fitted curve keeps the datasheet curve everywhere
    for dims in [(8192, 8192, 8192), (65536, 2048, 128), (64, 64, 64)]:
        assert _default_eff(v100, *dims) == datasheet(0.72, *dims)


def test_selective_recompute_drops_the_kept_scores_only():
    # Korthikanti's selective recomputation: the unfused core's kept scores are rebuilt in the
    # backward, its [b, h, s, d] output (read by the output projection) stays
    from autopar.evaluation.baselines import Config3D, build_3d
    from graphs.annotate import unfused_score_passes
    spec = "gpt:hidden=64,layers=2,heads=4,seq=32,vocab=128,attn=unfused,attn_dropout=0.1"
    cl = load_cluster("p3.16xlarge", 1, 1)
    plans = {rc: build_3d(ModelSource(spec), cl, 2, Config3D(1, 1, 1, 2, recompute=rc)) for rc in ("none", "selective")}
    stash = {rc: p.stages[0].memory.stash_per_microbatch_bytes for rc, p in plans.items()}
    kept = 2 * 4 * 32 * 32 * unfused_score_passes(2, True)[2]          # batch 2, 4 heads, 32 x 32, fp16
    assert stash["none"] - stash["selective"] == pytest.approx(2 * kept, rel=1e-12)   # 2 layers
    rerun = 2 * _expected_s(2, 4, 32, 16, True, False)                  # each layer's core forward again
    assert plans["selective"].stages[0].bwd_s - plans["none"].stages[0].bwd_s == pytest.approx(rerun, rel=1e-9)
