"""Unfused attention: the [s, s] scores materialised, as Megatron-LM before Megatron-Core (2019-2022,
SC21, Korthikanti et al.), Megatron-DeepSpeed (BLOOM) and OneFlow ran it.

QK^T and PV are batched GEMMs over every (batch, head); scale, causal mask and softmax stream the
scores (Megatron fuses them into one kernel), dropout streams them again and keeps a 1-byte mask.
Backward keeps the probabilities (and, with dropout, the dropped probabilities and the mask).

Models call `unfused_attention`, and each calling module registers it with `torch.fx.wrap`, so the
trace keeps it as ONE call (lowered to one ATTENTION op with attrs["impl"] == "unfused",
graphs/lower_rules.py) that the cost model prices from the closed form in graphs/annotate.py, and
the sharding rule splits by batch and heads like the fused op. Eager execution (the runtime, CPU
tests) runs the body below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNFUSED = "unfused"
TRITON = "triton"


def triton_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True) -> torch.Tensor:
    """Fused (flash) attention as the Triton FlashAttention kernel runs it (attn=triton: llm-foundry's
    attn_impl: triton, MPT's published runs). The same result, FLOPs and memory as sdpa; models
    register it with `torch.fx.wrap` so the trace keeps it as one ATTENTION op with
    attrs["impl"] == "triton" (graphs/lower_rules.py), priced as the slower kernel it was
    (autopar.costmodel.compute.TRITON_FLASH_SLOWDOWN). Eager execution runs torch's sdpa."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True,
                      dropout_p: float = 0.0) -> torch.Tensor:
    """q [b, hq, sq, d], k and v [b, hkv, skv, d] (hq a multiple of hkv) -> [b, hq, sq, d]. The
    same result as F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=...)
    (a causal mask aligned to the top left, as sdpa's)."""
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=-3)
        v = v.repeat_interleave(hq // hkv, dim=-3)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if is_causal:
        # the mask is made like the scores (not a fresh [s, s] tensor) so that it takes their
        # layout when the runtime runs this on DTensors split over batch and heads
        future = torch.ones_like(scores, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    # softmax in fp32, probabilities in the input dtype (Megatron's fused kernel does the same)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, v)
