"""HuggingFace models from a config.json, built on the meta device (extra: autopar[hf])."""

from __future__ import annotations

import json
import os

import torch

from ..errors import GraphsError, SpecError


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


def build(path: str):
    """(module on meta, config) for an hf: model."""
    transformers = _transformers()
    config = load_config(path)
    config.use_cache = False
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise SpecError(f"hf: {config.model_type!r} has no causal-LM class in transformers "
                        f"{transformers.__version__}: {e}") from None
    return model, config
