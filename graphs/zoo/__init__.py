"""Model zoo: GPT, Llama and GShard-MoE presets and specs, HF configs, user factories."""

from __future__ import annotations

import torch

from .config import FAMILIES, PRESETS, SPEC_KEYS, ModelConfig, get_config, list_models, parse_spec
from .gpt import GPT
from .llama import Llama
from .moe import MoEGPT

__all__ = ["FAMILIES", "PRESETS", "SPEC_KEYS", "ModelConfig", "get_config", "list_models",
           "parse_spec", "build_module", "example_inputs", "GPT", "Llama", "MoEGPT"]

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "fp64": torch.float64}


def build_module(cfg: ModelConfig | str, device: str | torch.device = "meta",
                 dtype: torch.dtype | str | None = None) -> torch.nn.Module:
    """The nn.Module of a config. On "meta" nothing is allocated (any size builds in ms)."""
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    cls = {"gpt": GPT, "llama": Llama, "moe": MoEGPT}[cfg.family]
    with torch.device(device):
        module = cls(cfg)
    if dtype is not None:
        module = module.to(_TORCH_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    return module


def example_inputs(cfg: ModelConfig | str, batch: int = 1, seq: int | None = None,
                   device: str | torch.device = "meta") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets), int64 [batch, seq]; random token ids off the meta device."""
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    seq = seq or cfg.seq
    if torch.device(device).type == "meta":
        ids = torch.empty(batch, seq, dtype=torch.long, device="meta")
        return ids, torch.empty(batch, seq, dtype=torch.long, device="meta")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab, (batch, seq), generator=gen).to(device)
    targets = torch.randint(0, cfg.vocab, (batch, seq), generator=gen).to(device)
    return ids, targets
