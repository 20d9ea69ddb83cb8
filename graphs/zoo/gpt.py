"""GPT (GPT-2/3 and Alpa's GPT suite): learned positions, pre-LayerNorm, GELU MLP."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import TRITON, UNFUSED, triton_flash_attention, unfused_attention
from .config import ModelConfig

# one traced call, one IR op (graphs/zoo/attention.py)
torch.fx.wrap("unfused_attention")
torch.fx.wrap("triton_flash_attention")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.unfused = cfg.attn == UNFUSED
        self.triton = cfg.attn == TRITON
        self.dropout_p = cfg.attn_dropout
        self.q = nn.Linear(h, h)
        self.k = nn.Linear(h, h)
        self.v = nn.Linear(h, h)
        self.proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # by index, not unpacked: fx's symbolic trace unpacks a traced size by disassembling
        # the caller's bytecode, each call; both make the same nodes
        shape = x.shape
        b, s, h = shape[0], shape[1], shape[2]
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        p = self.dropout_p if self.training else 0.0
        if self.unfused:
            y = unfused_attention(q, k, v, True, p)
        elif self.triton:
            y = triton_flash_attention(q, k, v, True)     # no dropout (ModelConfig refuses it)
        elif p > 0.0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, h))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp: nn.Module | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        if mlp is None:
            self.mlp = MLP(cfg)
        else:
            self.moe = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        ffn = self.mlp if hasattr(self, "mlp") else self.moe
        return x + ffn(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq, cfg.hidden)
        self.blocks = nn.ModuleList(self.make_block(cfg, i) for i in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        if not cfg.tied:
            self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if self.wte.weight.device.type != "meta":
            # GPT-2's init: N(0, 1) embeddings would make the tied head's logits huge
            nn.init.normal_(self.wte.weight, std=0.02)
            nn.init.normal_(self.wpe.weight, std=0.02)

    def make_block(self, cfg: ModelConfig, index: int) -> nn.Module:
        return Block(cfg)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        s = ids.shape[1]
        # positions depend on no input, so they fold into a constant operand of the lookup
        x = self.wte(ids) + self.wpe(torch.arange(s, device=ids.device))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.cfg.tied:
            logits = F.linear(x, self.wte.weight)
        else:
            logits = self.head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
