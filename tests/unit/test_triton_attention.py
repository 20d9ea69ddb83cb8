"""The Triton FlashAttention kernel (zoo spec attn=triton, MPT's attn_impl: triton) against closed
forms: the traced op is the flash op with attrs["impl"] == "triton" (same FLOPs, bytes and
graph), its time is the flash time per FLOP times TRITON_FLASH_SLOWDOWN (ComputeModel.attention_s,
written out below for an unprofiled GPU), every split of the sharding rule keeps that ratio,
and eager execution computes sdpa's result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autopar.costmodel.compute import TRITON_FLASH_SLOWDOWN, ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.sharding.rules.attention import attention_strategies
from graphs.errors import SpecError
from graphs.ir import ATTENTION
from graphs.zoo.attention import triton_flash_attention
from graphs.zoo.config import get_config

A100 = load_cluster("dgx-a100", 1)       # no profile: the documented flash curve
CM = ComputeModel(A100.gpu, "bf16")


def _flash_kernel_s(b, h, s, d, backward: bool) -> float:
    """compute._attention_eff without a profile: matmul_efficiency x 0.85 forward (0.75
    backward) x s / (s + 256); causal halves the FLOPs, backward is 2.5x the forward's."""
    flops = 4.0 * b * h * s * s * d * 0.5 * (2.5 if backward else 1.0)
    eff = A100.gpu.matmul_efficiency * (0.75 if backward else 0.85) * s / (s + 256.0)
    return flops / (A100.gpu.peak("bf16") * eff)


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("shape", [(4, 16, 2048, 128), (1, 12, 32768, 128)])
def test_time_closed_form(shape, backward):
    gap, launch = 1e-6, 5e-6                # unprofiled GPU: 1 us gap, 5 us host dispatch
    flash = CM.attention_s(*shape, causal=True, backward=backward)
    triton = CM.attention_s(*shape, causal=True, backward=backward, kernel="triton")
    assert flash == pytest.approx(max(_flash_kernel_s(*shape, backward) + gap, launch), rel=1e-12)
    assert triton == pytest.approx(max(TRITON_FLASH_SLOWDOWN * _flash_kernel_s(*shape, backward) + gap, launch),
                                   rel=1e-12)
    with pytest.raises(ValueError, match="unknown fused attention kernel"):
        CM.attention_s(*shape, causal=True, kernel="xformers")


def test_spec_keys():
    assert get_config("gpt:hidden=64,layers=2,heads=4,attn=triton").attn == "triton"
    with pytest.raises(SpecError, match="gpt family only"):
        get_config("llama:hidden=64,layers=2,heads=4,attn=triton")
    with pytest.raises(SpecError, match="without attention dropout"):
        get_config("gpt:hidden=64,layers=2,heads=4,attn=triton,attn_dropout=0.1")


def test_trace_and_rule(monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE", "0")
    base = "gpt:hidden=512,layers=2,heads=4,seq=4096,vocab=128"   # attention well above the 5 us dispatch
    flash = ModelSource(base, seq=4096, dtype="bf16").graph(2)
    triton = ModelSource(base + ",attn=triton", seq=4096, dtype="bf16").graph(2)
    assert [n.kind for n in flash.nodes()] == [n.kind for n in triton.nodes()]   # the same graph
    fa = [n for n in flash.nodes() if n.kind == ATTENTION]
    ta = [n for n in triton.nodes() if n.kind == ATTENTION]
    assert len(ta) == 2 and all(n.attrs["impl"] == "triton" and n.attrs["is_causal"] for n in ta)
    for f, t in zip(fa, ta):
        assert (t.fwd_flops, t.bwd_flops, t.fwd_bytes, t.bwd_bytes) == (f.fwd_flops, f.bwd_flops, f.fwd_bytes,
                                                                         f.bwd_bytes)
    # every split (none, batch, heads, sequence) prices the same work on the slower kernel
    mesh = Mesh(A100, Submesh(1, 2), (1, 2))
    fs = {s.name: s for s in attention_strategies(fa[0], mesh, CM, prune_seq=False)}
    ts = {s.name: s for s in attention_strategies(ta[0], mesh, CM, prune_seq=False)}
    assert fs.keys() == ts.keys() and len(ts) >= 3
    gap = 1e-6
    for name, t in ts.items():
        f = fs[name]
        if not f.collectives:
            assert t.fwd_s - gap == pytest.approx(TRITON_FLASH_SLOWDOWN * (f.fwd_s - gap), rel=1e-9), name
            assert t.bwd_s - gap == pytest.approx(TRITON_FLASH_SLOWDOWN * (f.bwd_s - gap), rel=1e-9), name
        assert t.out_bytes_local == f.out_bytes_local, name


def test_eager_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    assert torch.allclose(triton_flash_attention(q, k, v, True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
