"""Model configs of the zoo: a frozen dataclass, the presets, and spec strings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import SpecError, UnknownModelError

FAMILIES = ("gpt", "llama", "moe")
# How a block computes attention: "flash" is torch's fused scaled_dot_product_attention (scores
# never leave the kernel); "unfused" materialises the [s, s] scores as pre-FlashAttention
# Megatron-LM and BLOOM did (graphs/zoo/attention.py); "triton" is the same fused algorithm run by
# the Triton FlashAttention kernel of 2022-2023 (flash-attn's flash_attn_triton.py, llm-foundry's
# attn_impl: triton, on the pre-MLIR Triton compiler), which MPT's published runs used: the same
# FLOPs and memory as "flash", a slower kernel (autopar.costmodel.compute.TRITON_FLASH_SLOWDOWN).
ATTENTION_IMPLS = ("flash", "unfused", "triton")
# Families whose blocks build each impl (the Triton kernel only where a published run used it: GPT-style MPT)
ATTENTION_IMPL_FAMILIES = {"triton": ("gpt",)}

# Bounds on a config's sizes (inclusive). Tracing and planning time grow with layers (the stage
# DP looks at every layer range), so 256 is twice the deepest published model (Llama 3 405B:
# 126, Megatron-LM 1T: 128); the widths keep every traced tensor's element count within int64.
LIMITS: dict[str, tuple[int, int]] = {
    "hidden": (1, 1 << 17), "layers": (1, 256), "heads": (1, 1 << 12), "kv_heads": (0, 1 << 12),
    "vocab": (1, 1 << 22), "seq": (1, 1 << 20), "ffn": (0, 1 << 20), "experts": (0, 1 << 12),
    "top_k": (1, 1 << 12), "moe_every": (1, 256),
}


@dataclass(frozen=True)
class ModelConfig:
    family: str                 # "gpt" | "llama" | "moe"
    hidden: int
    layers: int
    heads: int
    vocab: int
    seq: int                    # default sequence length (max positions for gpt/moe)
    kv_heads: int = 0           # 0: = heads (no GQA)
    ffn: int = 0                # 0: 4·hidden (gpt), 8·hidden (moe, as Alpa), ~8/3·h (llama)
    experts: int = 0            # moe only
    tied: bool = False          # head shares the token embedding's weight
    name: str = ""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    capacity_factor: float = 1.25   # moe: expert capacity = ceil(top_k·s/E · factor)
    top_k: int = 2                  # moe: experts per token
    moe_every: int = 2              # moe: every moe_every-th block (1, 3, 5, ...) is MoE
    attn: str = "flash"             # one of ATTENTION_IMPLS
    attn_dropout: float = 0.0       # dropout on the attention probabilities, in training

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise SpecError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        for key, (lo, hi) in LIMITS.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpecError(f"{key} must be a whole number, got {v!r}")
            if not lo <= v <= hi:
                raise SpecError(f"{key}={v} is out of range: use {lo} to {hi:,}" + (
                    " (0 picks the family's default)" if lo == 0 else ""))
        for key in ("norm_eps", "rope_theta", "capacity_factor"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SpecError(f"{key} must be a finite number > 0, got {v!r}")
        if self.attn not in ATTENTION_IMPLS:
            raise SpecError(f"attn must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attn!r}")
        if self.family not in ATTENTION_IMPL_FAMILIES.get(self.attn, FAMILIES):
            raise SpecError(f"attn={self.attn} is built for the {', '.join(ATTENTION_IMPL_FAMILIES[self.attn])} "
                            f"family only, not {self.family}")
        p = self.attn_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise SpecError(f"attn_dropout must be a number in [0, 1), got {p!r}")
        if self.attn == "triton" and p > 0.0:
            raise SpecError("attn=triton is modelled without attention dropout (MPT's runs had none)")
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.ffn == 0:
            if self.family == "llama":
                # Llama's default: 2/3 of 4h rounded up to a multiple of 256
                object.__setattr__(self, "ffn", 256 * ((8 * self.hidden // 3 + 255) // 256))
            elif self.family == "moe":
                # Alpa's MoE suite uses mlp_factor 8 (dense and expert MLPs alike); with it
                # the preset names match their parameter counts
                object.__setattr__(self, "ffn", 8 * self.hidden)
            else:
                object.__setattr__(self, "ffn", 4 * self.hidden)
        if self.hidden % self.heads:
            raise SpecError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise SpecError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.kv_heads > self.heads:
            raise SpecError(f"kv_heads={self.kv_heads} is more than heads={self.heads}; use kv_heads <= heads")
        if self.family == "moe":
            if self.experts < self.top_k:
                raise SpecError(f"moe needs experts >= top_k={self.top_k}, got "
                                f"experts={self.experts}; set experts=8, say")
        elif self.experts:
            raise SpecError(f"experts={self.experts} only applies to family 'moe'")
        if self.family == "llama" and (self.hidden // self.heads) % 2:
            raise SpecError("llama's RoPE needs an even head dim (hidden/heads)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _gpt(name, h, l, a, seq=1024, vocab=51200):
    return ModelConfig("gpt", hidden=h, layers=l, heads=a, vocab=vocab, seq=seq, tied=True,
                       name=name)


def _llama(name, h, l, a, kv, ffn, vocab, seq, theta):
    return ModelConfig("llama", hidden=h, layers=l, heads=a, kv_heads=kv, ffn=ffn, vocab=vocab,
                       seq=seq, name=name, rope_theta=theta, norm_eps=1e-5)


def _moe(name, h, l, e):
    return ModelConfig("moe", hidden=h, layers=l, heads=16, vocab=32000, seq=1024, experts=e,
                       tied=True, name=name)


PRESETS: dict[str, ModelConfig] = {c.name: c for c in [
    # Alpa's GPT suite (Table 4 of the paper): seq 1024, vocab 51200, tied head
    _gpt("gpt-350m", 1024, 24, 16),
    _gpt("gpt-760m", 1536, 24, 16),
    _gpt("gpt-1.3b", 2048, 24, 32),
    _gpt("gpt-2.6b", 2560, 32, 32),
    _gpt("gpt-6.7b", 4096, 32, 32),
    _gpt("gpt-15b", 5120, 48, 40),
    _gpt("gpt-39b", 8192, 48, 64),
    _gpt("gpt3-175b", 12288, 96, 96, seq=2048),
    # Meta's published configs
    _llama("llama2-7b", 4096, 32, 32, 32, 11008, 32000, 4096, 10000.0),
    _llama("llama2-13b", 5120, 40, 40, 40, 13824, 32000, 4096, 10000.0),
    _llama("llama2-70b", 8192, 80, 64, 8, 28672, 32000, 4096, 10000.0),
    _llama("llama3-8b", 4096, 32, 32, 8, 14336, 128256, 8192, 500000.0),
    _llama("llama3-70b", 8192, 80, 64, 8, 28672, 128256, 8192, 500000.0),
    # Alpa's GShard MoE suite: seq 1024, vocab 32000, 16 heads, MLPs 8h, every 2nd block MoE
    _moe("moe-380m", 768, 8, 8),
    _moe("moe-1.3b", 768, 16, 16),
    _moe("moe-2.4b", 1024, 16, 16),
    _moe("moe-10b", 1536, 16, 32),
    _moe("moe-27b", 2048, 16, 48),
    _moe("moe-70b", 2048, 32, 64),
]}

SPEC_KEYS = ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab", "seq", "experts", "tied",
             "norm_eps", "rope_theta", "capacity_factor", "top_k", "moe_every", "attn", "attn_dropout")
REQUIRED_KEYS = ("hidden", "layers", "heads")
FAMILY_DEFAULTS = {"gpt": {"vocab": 51200, "seq": 1024, "tied": True},
                   "llama": {"vocab": 32000, "seq": 4096},
                   "moe": {"vocab": 32000, "seq": 1024, "tied": True, "experts": 8}}


def list_models() -> list[str]:
    return list(PRESETS)


def _known_message() -> str:
    return (f"known models: {', '.join(PRESETS)}; or a spec like "
            "'gpt:hidden=1024,layers=24,heads=16' (families: " + ", ".join(FAMILIES) +
            "; a preset name also works as the base: 'gpt-1.3b:layers=4'), 'hf:path/to/"
            "config.json', or 'path/to/file.py:factory'")


def get_config(name: str) -> ModelConfig:
    """A preset by name, or a spec string 'family:key=value,...' / 'preset:key=value,...'."""
    name = name.strip()
    if ":" in name:
        return parse_spec(name)
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; {_known_message()}") from None


def _parse_value(key: str, text: str, kind):
    try:
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if not text.isascii():
            raise ValueError(text)
        if kind is int:
            return int(float(text)) if "e" in text.lower() else int(text)
        return kind(text)
    except (ValueError, OverflowError):
        raise SpecError(f"bad value {text!r} for {key!r}: expected {kind.__name__}") from None


def parse_spec(spec: str) -> ModelConfig:
    base, _, body = spec.partition(":")
    base = base.strip().lower()
    if base in PRESETS:
        fields: dict = {}
        start = PRESETS[base]
    elif base in FAMILIES:
        fields = {"family": base, **FAMILY_DEFAULTS[base]}
        start = None
    else:
        raise UnknownModelError(f"unknown model family {base!r} in spec {spec!r}; "
                                f"{_known_message()}")
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in SPEC_KEYS:
            what = f"unknown key {key!r}" if eq else f"item {item!r} is not key=value"
            raise SpecError(f"bad model spec {spec!r}: {what}; valid keys: "
                            f"{', '.join(SPEC_KEYS)}")
        fields[key] = _parse_value(key, value.strip(), kinds[str(types[key])])
    if start is not None:
        return start.replace(name=spec, **fields)
    missing = [k for k in REQUIRED_KEYS if k not in fields]
    if missing:
        raise SpecError(f"model spec {spec!r} is missing {', '.join(missing)}; valid keys: "
                        f"{', '.join(SPEC_KEYS)} (required: {', '.join(REQUIRED_KEYS)})")
    return ModelConfig(name=spec, **fields)
