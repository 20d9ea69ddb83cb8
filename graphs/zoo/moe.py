"""GShard-style mixture of experts on the GPT backbone (Alpa's MoE suite).

Every `moe_every`-th block (1, 3, 5, ... by default) replaces its MLP with an MoE layer: a
top-2 gate, expert capacity C = ceil(top_k·s/E · capacity_factor) per group, and dispatch /
combine written as einsums with the batch dim as GShard's group dim, so the graph shows

    dispatch  "bsec,bsm->ebcm"     experts "ebcm,emf->ebcf", "ebcf,efm->ebcm"
    combine   "bsec,ebcm->bsm"

GShard's auxiliary load-balancing loss is left out: it is tiny and does not change the
parallelisation problem.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .gpt import GPT, Block


def expert_capacity(tokens: int, experts: int, top_k: int, factor: float) -> int:
    return max(1, math.ceil(top_k * tokens / experts * factor))


# a leaf for symbolic tracing: computed from the traced sequence length during propagation
torch.fx.wrap("expert_capacity")


def one_hot(index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """F.one_hot without a data-dependent class count (traceable, runs on meta)."""
    return (index.unsqueeze(-1) == torch.arange(n, device=index.device)).to(dtype)


def gshard_combine(top_p: torch.Tensor, top_i: torch.Tensor, n_exp: int, cap: int,
                   bsk: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """GShard's combine weights [b, s, E, C] from the top-k gate weights and expert ids
    [b, s, k]: token s's gate weight at its slot c of expert e, 0 where it was not sent
    (not chosen, or over the capacity C)."""
    b, s, k = bsk
    # choices rank-major, so every first choice takes a slot before any second choice
    mask = one_hot(top_i, n_exp, dtype).transpose(1, 2).reshape(b, k * s, n_exp)
    pos = torch.cumsum(mask, dim=1) - mask                       # slot in the expert
    keep = mask * (pos < cap).to(dtype)                          # over capacity: dropped
    slot = one_hot((pos * keep).sum(dim=-1).long(), cap, dtype)  # [b, k*s, C]
    gates = top_p.transpose(1, 2).reshape(b, k * s, 1)
    return torch.einsum("bkse,bksc->bsec", (keep * gates).view(b, k, s, n_exp),
                        slot.view(b, k, s, cap))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.experts, self.top_k, self.capacity_factor = cfg.experts, cfg.top_k, cfg.capacity_factor
        self.gate = nn.Linear(cfg.hidden, cfg.experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(cfg.experts, cfg.hidden, cfg.ffn))
        self.w2 = nn.Parameter(torch.empty(cfg.experts, cfg.ffn, cfg.hidden))
        if self.w1.device.type != "meta":
            nn.init.normal_(self.w1, std=cfg.hidden ** -0.5)
            nn.init.normal_(self.w2, std=cfg.ffn ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, m = x.shape
        k, n_exp = self.top_k, self.experts
        cap = expert_capacity(s, n_exp, k, self.capacity_factor)
        probs = F.softmax(self.gate(x), dim=-1)                      # [b, s, E]
        top_p, top_i = torch.topk(probs, k, dim=-1)                  # [b, s, k]
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        combine = gshard_combine(top_p, top_i, n_exp, cap, (b, s, k), x.dtype)   # [b, s, E, C]
        dispatch = (combine > 0).to(x.dtype)
        xe = torch.einsum("bsec,bsm->ebcm", dispatch, x)
        hidden = F.gelu(torch.einsum("ebcm,emf->ebcf", xe, self.w1))
        ye = torch.einsum("ebcf,efm->ebcm", hidden, self.w2)
        return torch.einsum("bsec,ebcm->bsm", combine, ye)


class MoEGPT(GPT):
    def make_block(self, cfg: ModelConfig, index: int) -> nn.Module:
        if index % cfg.moe_every == cfg.moe_every - 1:
            return Block(cfg, mlp=MoE(cfg))
        return Block(cfg)
