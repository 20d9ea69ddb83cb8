"""The model zoo: presets, spec strings, real forward passes, HF configs, user factories."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import textwrap

import pytest
import torch

import graphs
from graphs import zoo

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def test_presets_are_the_published_configs():
    assert set(zoo.list_models()) == {
        "gpt-350m", "gpt-760m", "gpt-1.3b", "gpt-2.6b", "gpt-6.7b", "gpt-15b", "gpt-39b",
        "gpt3-175b", "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b",
        "moe-380m", "moe-1.3b", "moe-2.4b", "moe-10b", "moe-27b", "moe-70b"}
    got = {n: (c.hidden, c.layers, c.heads) for n, c in zoo.PRESETS.items()}
    assert got["gpt-39b"] == (8192, 48, 64) and got["gpt-2.6b"] == (2560, 32, 32)
    c = zoo.get_config("gpt3-175b")
    assert (c.hidden, c.layers, c.heads, c.seq, c.vocab, c.tied) == (12288, 96, 96, 2048,
                                                                      51200, True)
    c = zoo.get_config("llama2-70b")
    assert (c.kv_heads, c.ffn, c.vocab, c.seq) == (8, 28672, 32000, 4096)
    c = zoo.get_config("llama3-8b")
    assert (c.hidden, c.layers, c.kv_heads, c.ffn, c.vocab, c.seq) == (4096, 32, 8, 14336,
                                                                       128256, 8192)
    assert zoo.get_config("llama2-13b").ffn == 13824
    c = zoo.get_config("moe-27b")
    assert (c.hidden, c.layers, c.heads, c.experts, c.vocab, c.seq) == (2048, 16, 16, 48,
                                                                        32000, 1024)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden = 1


def test_spec_strings():
    c = zoo.get_config("gpt:hidden=8192,layers=48,heads=64,seq=2048,vocab=51200")
    assert (c.family, c.hidden, c.layers, c.heads, c.seq, c.vocab, c.ffn) == (
        "gpt", 8192, 48, 64, 2048, 51200, 4 * 8192)
    c = zoo.get_config("llama:hidden=8192,layers=80,heads=64,kv_heads=8,ffn=28672")
    assert (c.kv_heads, c.ffn) == (8, 28672)
    c = zoo.get_config("moe:hidden=1024,layers=4,heads=16,experts=64")
    assert c.experts == 64
    c = zoo.get_config("gpt-1.3b:layers=4,tied=false")
    assert (c.hidden, c.layers, c.tied) == (2048, 4, False)


@pytest.mark.parametrize("spec, match", [
    ("gpt:hidden=64,layrs=2,heads=4", "unknown key 'layrs'.*valid keys: hidden, layers"),
    ("gpt:hidden=64,layers,heads=4", "'layers' is not key=value"),
    ("gpt:hidden=sixty,layers=2,heads=4", "bad value 'sixty' for 'hidden'"),
    ("gpt:hidden=64,heads=4", "missing layers"),
    ("gpt:hidden=64,layers=2,heads=5", "not divisible by heads=5"),
    ("llama:hidden=64,layers=2,heads=4,kv_heads=3", "not a multiple of kv_heads=3"),
    ("moe:hidden=64,layers=2,heads=4,experts=1", "experts"),
    ("bert:hidden=64", "unknown model family 'bert'"),
])
def test_malformed_specs_say_what_is_wrong(spec, match):
    with pytest.raises(graphs.GraphsError, match=match):
        graphs.load(spec)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(graphs.UnknownModelError) as info:
        graphs.load("gpt-7b")
    msg = str(info.value)
    assert "'gpt-7b'" in msg and "gpt-350m" in msg and "llama3-70b" in msg and "moe-70b" in msg
    assert "hf:" in msg and "file.py:factory" in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("spec", [
    "gpt:hidden=64,layers=2,heads=4,seq=32,vocab=100",
    "gpt:hidden=64,layers=2,heads=4,seq=32,vocab=100,tied=false",
    "llama:hidden=64,layers=2,heads=4,kv_heads=2,seq=32,vocab=100,ffn=96",
    "moe:hidden=64,layers=2,heads=4,seq=32,vocab=100,experts=4",
])
def test_forward_on_small_real_tensors(spec):
    cfg = zoo.get_config(spec)
    torch.manual_seed(0)
    module = zoo.build_module(cfg, device="cpu", dtype=torch.float32)
    ids, targets = zoo.example_inputs(cfg, batch=2, seq=16, device="cpu")
    logits = module(ids)
    assert logits.shape == (2, 16, cfg.vocab)
    loss = module(ids, targets)
    assert loss.shape == () and math.isfinite(loss.item())
    # near-uniform predictions at init: the loss is about ln(vocab)
    assert abs(loss.item() - math.log(cfg.vocab)) < 1.5
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())
    n_params = sum(p.numel() for p in module.parameters())
    assert graphs.trace(module, (ids, targets)).param_count == n_params


def test_blocks_take_and_return_one_tensor():
    for spec in ("gpt:hidden=64,layers=2,heads=4,seq=16,vocab=50",
                 "llama:hidden=64,layers=2,heads=4,seq=16,vocab=50,ffn=96",
                 "moe:hidden=64,layers=2,heads=4,seq=16,vocab=50,experts=4"):
        module = zoo.build_module(spec, device="cpu")
        x = torch.randn(2, 16, 64)
        for block in module.blocks:
            y = block(x)
            assert isinstance(y, torch.Tensor) and y.shape == x.shape


def test_meta_build_allocates_nothing_and_inputs_have_the_right_shape():
    module = zoo.build_module("llama2-70b")
    assert all(p.device.type == "meta" for p in module.parameters())
    ids, targets = zoo.example_inputs("llama2-70b", batch=2, seq=128)
    assert ids.shape == targets.shape == (2, 128) and ids.dtype == torch.long
    assert ids.device.type == "meta"
    names = {n for n, _ in module.named_parameters()}
    assert {"tok_emb.weight", "blocks.0.attn.wq.weight", "blocks.0.mlp.w1.weight",
            "blocks.0.mlp.w3.weight", "blocks.0.mlp.w2.weight", "blocks.79.mlp_norm.weight",
            "norm.weight", "head.weight"} <= names
    gpt = {n for n, _ in zoo.build_module("gpt-350m").named_parameters()}
    assert {"wte.weight", "wpe.weight", "blocks.0.ln1.weight", "blocks.0.attn.q.bias",
            "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "ln_f.bias"} <= gpt
    assert "head.weight" not in gpt     # Alpa's GPT ties the head to wte
    moe = {n for n, _ in zoo.build_module("moe-380m").named_parameters()}
    assert {"blocks.1.moe.gate.weight", "blocks.1.moe.w1", "blocks.1.moe.w2",
            "blocks.0.mlp.fc1.weight"} <= moe


def test_seq_beyond_learned_positions_is_an_error_but_llama_extends():
    with pytest.raises(graphs.SpecError, match="seq=4096"):
        graphs.load("gpt-350m", seq=4096)
    g = graphs.load("llama:hidden=64,layers=1,heads=4,seq=16,vocab=50,ffn=96", seq=64)
    assert g.seq == 64


def test_summary_fields():
    g = graphs.load("moe:hidden=64,layers=2,heads=4,seq=32,vocab=100,experts=4")
    s = graphs.summarize(g)
    for key in ("params", "forward_flops", "layers", "nodes", "distinct_layer_kinds",
                "op_kind_histogram", "unsupported"):
        assert key in s
    assert s["params"] == g.param_count and s["layers"] == 4 and s["distinct_layer_kinds"] == 4
    assert s["meta"]["experts"] == 4 and s["meta"]["family"] == "moe"
    assert sum(s["op_kind_histogram"].values()) == s["nodes"] == len(g)
    json.dumps(s)   # plain data, ready for a CLI


# --- user factories ------------------------------------------------------------------------

def test_file_factory(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent("""
        import torch, torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 4)

            def forward(self, x):
                return self.fc(x).sum()

        def factory():
            return Net(), (torch.randn(3, 8),)

        def broken():
            return Net()
    """))
    g = graphs.load(f"{path}:factory")
    assert g.param_count == 8 * 4 + 4
    assert [n.op for n in g.nodes()] == ["placeholder", "linear", "sum", "output"]
    with pytest.raises(graphs.SpecError, match="no function 'nope'.*factory"):
        graphs.load(f"{path}:nope")
    with pytest.raises(graphs.SpecError, match=r"must return \(module, example_inputs\)"):
        graphs.load(f"{path}:broken")
    with pytest.raises(graphs.SpecError, match="does not exist"):
        graphs.load(f"{tmp_path}/missing.py:factory")


# --- HuggingFace ----------------------------------------------------------------------------

HF_CONFIGS = {
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100,
             "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0},
    "llama": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "vocab_size": 100, "max_position_embeddings": 32, "bos_token_id": 0,
              "eos_token_id": 0},
}


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (autopar[hf])")
@pytest.mark.parametrize("kind", sorted(HF_CONFIGS))
def test_hf_config(tmp_path, kind):
    import transformers
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_CONFIGS[kind]))
    g = graphs.load(f"hf:{path}", batch=2, seq=16)
    assert g.meta["trace_method"] == "export"
    assert g.meta["hidden"] == 64 and g.meta["layers"] == 2 and g.meta["vocab"] == 100
    assert (g.batch, g.seq) == (2, 16)
    config = transformers.AutoConfig.for_model(**HF_CONFIGS[kind])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert g.param_count == sum(p.numel() for p in model.parameters())
    assert [L.name for L in g.layers] == ["embed", "block.0", "block.1", "head"]
    assert g.layers[1].structural_hash == g.layers[2].structural_hash
    assert g.layers[0].structural_hash != g.layers[1].structural_hash
    ops = {n.op for n in g.nodes()}
    assert {"sdpa", "embedding", "cross_entropy"} <= ops
    sdpa = [n for n in g.nodes() if n.op == "sdpa"]
    assert len(sdpa) == 2 and all(n.fwd_flops == 4 * 2 * 16 * 16 * 64 for n in sdpa)
    if kind == "llama":
        assert sdpa[0].operands[1].shape[1] in (2, 4)   # k heads: 2, or repeated to 4


def test_hf_errors(tmp_path):
    if not HAS_TRANSFORMERS:
        with pytest.raises(graphs.GraphsError, match="pip install"):
            graphs.load(f"hf:{tmp_path}/config.json")
        return
    with pytest.raises(graphs.SpecError, match="does not exist"):
        graphs.load(f"hf:{tmp_path}/nothing.json")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(graphs.SpecError, match="model_type"):
        graphs.load(f"hf:{bad}")
