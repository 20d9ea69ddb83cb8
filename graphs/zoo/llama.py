"""Llama 2/3: RMSNorm, rotary position embedding, grouped-query attention, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import UNFUSED, unfused_attention
from .config import ModelConfig

# one traced call, one IR op (graphs/zoo/attention.py)
torch.fx.wrap("unfused_attention")

# sdpa's enable_gqa arrived in torch 2.5; before it, k/v heads are repeated by a view
_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def rope_tables(seq: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [seq, head_dim] for the rotate-half formulation."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d]; cos/sin [s, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    cos: torch.Tensor    # RoPE buffers, registered in __init__
    sin: torch.Tensor
    # K and V repeated to the query heads before SDPA instead of enable_gqa (torchtitan's
    # repeat_kv): torch's ring attention (context parallelism) takes equal head counts
    repeat_kv = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, d
        self.unfused = cfg.attn == UNFUSED
        self.dropout_p = cfg.attn_dropout
        self.wq = nn.Linear(h, cfg.heads * d, bias=False)
        self.wk = nn.Linear(h, cfg.kv_heads * d, bias=False)
        self.wv = nn.Linear(h, cfg.kv_heads * d, bias=False)
        self.wo = nn.Linear(cfg.heads * d, h, bias=False)
        # tables are buffers of each block, read inside it: a block's only activation input
        # is the residual stream
        cos, sin = rope_tables(cfg.seq, d, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # by index, not unpacked: fx's symbolic trace unpacks a traced size by disassembling
        # the caller's bytecode, each call; both make the same nodes
        shape = x.shape
        b, s, _ = shape[0], shape[1], shape[2]
        q = self.wq(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        # narrow, not [:s]: symbolic tracing cannot slice a real tensor by a traced size
        cos, sin = self.cos.narrow(0, 0, s).to(x.dtype), self.sin.narrow(0, 0, s).to(x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout_p if self.training else 0.0
        if self.unfused:
            # grouped K, V are repeated to the query heads inside, as Megatron-LM did
            y = unfused_attention(q, k, v, True, p)
        elif p > 0.0:
            if self.kv_heads != self.heads:
                rep = self.heads // self.kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif self.kv_heads == self.heads:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif _HAS_ENABLE_GQA and not self.repeat_kv:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            rep = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(
                b, self.heads, s, self.head_dim)
            v = v[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(
                b, self.heads, s, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)   # gate
        self.w3 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)   # up
        self.w2 = nn.Linear(cfg.ffn, cfg.hidden, bias=False)   # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        if not cfg.tied:
            self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if self.tok_emb.weight.device.type != "meta":
            nn.init.normal_(self.tok_emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok_emb(ids)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        logits = F.linear(x, self.tok_emb.weight) if self.cfg.tied else self.head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
