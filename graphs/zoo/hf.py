"""HuggingFace models from a config.json, built on the meta device (extra: autopar[hf]).

The module is built to be traced and planned, never run for its numbers (`autopar run` runs
zoo models only), so three of transformers' own kernels are swapped, through the interfaces
transformers provides for that, for ones of the same shapes and cost whose IR is the zoo's:

* attention: `F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=...)` with no
  materialised mask. Under torch.export transformers' sdpa path builds a [b, 1, s, s] mask and
  calls sdpa with is_causal=False, so the planner would cost full, non-causal attention;
  Gemma-2's logit soft-capping is refused by sdpa, and its eager attention traces as
  matmul + softmax. A flash kernel runs a causal mask, a sliding window (Mistral, Gemma-2)
  and a soft-cap (FlashAttention-2 has one) in-kernel, which is what the planner's attention
  cost assumes.
* modules HF writes out op by op: RMSNorm (pow, mean, rsqrt, mul) becomes `F.rms_norm`, one
  norm op as the zoo's `nn.RMSNorm` (Gemma's `x * (1 + w)` costs the same as `x * w`); the
  tanh GELUs become `F.gelu(approximate="tanh")`; GPT-2's `Conv1D` (addmm on flattened
  tokens) becomes `F.linear` on the transposed weight.
* MoE experts (transformers 5.x `ExpertsInterface`): GShard's dispatch / expert / combine
  einsums of graphs/zoo/moe.py, with the batch as GShard's group dim, in place of the
  `grouped_mm` path (sort, histc, index_put: data-dependent, and opaque to the planner).
  Transformers' experts are dropless; the einsum form runs each expert on a capacity of
  ceil(top_k·s/E) tokens per group (capacity factor 1), which is the load of a balanced
  router, so the expert FLOPs are exactly top_k dense MLPs per token.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from ..errors import GraphsError, SpecError
from .moe import expert_capacity, gshard_combine

KERNELS = "autopar"                 # the name the swapped kernels are registered under
MOE_CAPACITY_FACTOR = 1.0


def _transformers():
    try:
        import transformers
    except ImportError:
        raise GraphsError("hf: models need the transformers package: "
                          "pip install 'autopar[hf]' (or pip install transformers)") from None
    return transformers


def load_config(path: str):
    transformers = _transformers()
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise SpecError(f"hf: config {path!r} does not exist; give the path of a "
                        "config.json or of a folder holding one")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise SpecError(f"hf: {path} is not valid JSON: {e}") from None
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise SpecError(f"hf: {path} has no 'model_type' (e.g. \"gpt2\", \"llama\")")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as e:
        raise SpecError(f"hf: cannot build a {model_type!r} config from {path}: {e}") from None


def _first(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def config_meta(config) -> dict:
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    return {
        "family": f"hf:{config.model_type}",
        "hidden": hidden,
        "layers": _first(config, "num_hidden_layers", "n_layer"),
        "heads": heads,
        "kv_heads": _first(config, "num_key_value_heads", default=heads),
        "ffn": _first(config, "intermediate_size", "n_inner", default=4 * hidden if hidden else None),
        "vocab": _first(config, "vocab_size"),
        "seq": _first(config, "max_position_embeddings", "n_positions", "n_ctx"),
        "experts": _first(config, "num_local_experts", "num_experts", default=0),
    }


def build(path: str, batch: int = 1):
    """(module on meta, config) for an hf: model traced at `batch` sequences (the MoE group
    count of the einsum experts)."""
    transformers = _transformers()
    config = load_config(path)
    config.use_cache = False
    config.autopar_moe_groups = batch
    kwargs = {}
    if _register_kernels(transformers):
        kwargs["attn_implementation"] = KERNELS
        if _first(config, "num_local_experts", "num_experts", default=0):
            kwargs["experts_implementation"] = KERNELS
    try:
        with torch.device("meta"):
            try:
                model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
            except ValueError:    # a model that cannot take a custom kernel keeps its own
                model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise SpecError(f"hf: {config.model_type!r} has no causal-LM class in transformers "
                        f"{transformers.__version__}: {e}") from None
    for module in model.modules():
        forward = _planning_forward(module)
        if forward is not None:
            module.forward = forward.__get__(module)
    return model, config


# --- the swapped kernels -------------------------------------------------------------------

def _register_kernels(transformers) -> bool:
    """Register KERNELS with transformers' attention, mask and experts interfaces; False on
    a transformers without them (4.x before the interfaces: its own kernels are traced)."""
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    attention = getattr(transformers, "AttentionInterface", None)
    if attention is None:
        return False
    attention.register(KERNELS, _causal_attention)
    AttentionMaskInterface.register(KERNELS, _no_mask)
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return True
    ExpertsInterface.register(KERNELS, _einsum_experts)
    return True


def _no_mask(*args, **kwargs):
    # no padding in a training batch: the causal (or windowed) mask is the kernel's own
    return None


def _causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      **kwargs):
    """transformers' attention signature: q [b, hq, s, d], k/v [b, hkv, s, d] ->
    ([b, s, hq, d], None)."""
    default_scale = query.shape[-1] ** -0.5
    scale = None if scaling is None or abs(scaling - default_scale) < 1e-6 * default_scale \
        else scaling
    gqa = query.shape[1] != key.shape[1]
    extra = {"enable_gqa": True} if gqa else {}
    y = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout if module.training else 0.0,
        is_causal=bool(getattr(module, "is_causal", True)) and query.shape[2] > 1,
        scale=scale, **extra)
    # not made contiguous here: the caller's reshape copies, as the zoo's does, so the IR
    # (and what the memory model stashes) is the zoo's
    return y.transpose(1, 2), None


def _einsum_experts(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts signature: x [T, m], top-k expert ids and weights [T, k] ->
    [T, m], as graphs/zoo/moe.py's GShard einsums over groups of one sequence."""
    if getattr(self, "has_bias", False) or getattr(self, "has_post_expert_norm", False):
        raise GraphsError(f"hf: {type(self).__name__} has expert biases or a post-expert "
                          "norm, which autopar's einsum experts do not model yet")
    tokens, m = hidden_states.shape
    n_exp, k = self.num_experts, top_k_index.shape[-1]
    groups = getattr(self.config, "autopar_moe_groups", 1)
    if tokens % groups:
        groups = 1
    b, s = groups, tokens // groups
    cap = expert_capacity(s, n_exp, k, MOE_CAPACITY_FACTOR)
    combine = gshard_combine(top_k_weights.view(b, s, k).to(hidden_states.dtype),
                             top_k_index.view(b, s, k), n_exp, cap, (b, s, k),
                             hidden_states.dtype)                          # [b, s, E, C]
    x = hidden_states.view(b, s, m)
    dispatch = (combine > 0).to(x.dtype)
    xe = torch.einsum("bsec,bsm->ebcm", dispatch, x)
    transposed = getattr(self, "is_transposed", False)
    if getattr(self, "has_gate", True):
        up = torch.einsum("ebcm,emf->ebcf" if transposed else "ebcm,efm->ebcf", xe,
                          self.gate_up_proj)
        if getattr(self, "is_concatenated", True):
            gate, up = up.chunk(2, dim=-1)
        else:
            gate, up = up[..., 0::2], up[..., 1::2]
        hidden = self.act_fn(gate) * up
    else:
        hidden = self.act_fn(torch.einsum("ebcm,emf->ebcf" if transposed else "ebcm,efm->ebcf",
                                          xe, self.up_proj))
    ye = torch.einsum("ebcf,efm->ebcm" if transposed else "ebcf,emf->ebcm", hidden,
                      self.down_proj)
    return torch.einsum("bsec,ebcm->bsm", combine, ye).reshape(tokens, m)


def _planning_forward(module):
    """The one-op forward that stands for a module HF writes out op by op, or None."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if name.endswith("RMSNorm"):
        eps = _first(module, "variance_epsilon", "eps")
        if isinstance(weight, torch.nn.Parameter) and weight.dim() == 1 and isinstance(eps, float):
            return _rms_norm_forward
    elif name in TANH_GELUS:
        return _tanh_gelu_forward
    elif name == "Conv1D" and isinstance(weight, torch.nn.Parameter) and weight.dim() == 2:
        return _conv1d_forward
    return None


# transformers' tanh-approximated GELUs written out as pow, mul, add, tanh
TANH_GELUS = ("NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation", "GELUTanh")


def _rms_norm_forward(self, hidden_states):
    eps = _first(self, "variance_epsilon", "eps")
    return F.rms_norm(hidden_states, (self.weight.shape[0],), self.weight, eps)


def _tanh_gelu_forward(self, x):
    return F.gelu(x, approximate="tanh")


def _conv1d_forward(self, x):
    # GPT-2's Conv1D is a Linear with its weight stored [in, out]: addmm on the flattened
    # tokens hides the batch and sequence dims the planner splits
    return F.linear(x, self.weight.t(), self.bias)
