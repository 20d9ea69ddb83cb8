"""Real HuggingFace architectures, traced from configs built here (no hub downloads), at two
layers: parameters and forward FLOPs against closed forms, every op with a rule, MoE experts
as GShard's einsums, causal attention, a plan on 8 GPUs, and the tensor-parallel layer the
ILP picks against Megatron's (column-parallel q/k/v/gate/up, row-parallel o/down)."""

from __future__ import annotations

import functools
import json
import math
import pathlib

import pytest

transformers = pytest.importorskip("transformers")

import graphs  # noqa: E402
from autopar import plan  # noqa: E402
from autopar.costmodel.compute import ComputeModel  # noqa: E402
from autopar.evaluation.baselines import megatron_names  # noqa: E402
from autopar.hardware.mesh import Mesh, Submesh  # noqa: E402
from autopar.hardware.presets import load_cluster  # noqa: E402
from autopar.search.solve_stage import solve_stage  # noqa: E402
from autopar.sharding.stage_problem import Settings, StageProblem  # noqa: E402
from graphs.ir import ATTENTION, MATMUL  # noqa: E402

BATCH, SEQ = 2, 32
H, HEADS, KV, D, FFN, VOCAB, LAYERS, POS = 64, 4, 2, 16, 128, 128, 2, 64
EXPERTS, TOP_K = 4, 2
IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}

# published architectures at two layers and small widths; "closed" names the closed form
CONFIGS = {
    "llama3": {"model_type": "llama", "hidden_size": H, "num_attention_heads": HEADS,
               "num_key_value_heads": KV, "intermediate_size": FFN, "tie_word_embeddings": False,
               "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    "mistral": {"model_type": "mistral", "hidden_size": H, "num_attention_heads": HEADS,
                "num_key_value_heads": KV, "intermediate_size": FFN, "sliding_window": 16},
    "qwen2": {"model_type": "qwen2", "hidden_size": H, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "intermediate_size": FFN, "tie_word_embeddings": False},
    "mixtral": {"model_type": "mixtral", "hidden_size": H, "num_attention_heads": HEADS,
                "num_key_value_heads": KV, "intermediate_size": FFN,
                "num_local_experts": EXPERTS, "num_experts_per_tok": TOP_K},
    "gpt2": {"model_type": "gpt2", "n_embd": H, "n_head": HEADS, "n_positions": POS},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": H, "num_attention_heads": HEADS,
                 "intermediate_size": FFN, "rotary_pct": 0.25, "tie_word_embeddings": False},
    "gemma": {"model_type": "gemma", "hidden_size": H, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "head_dim": D, "intermediate_size": FFN},
    "gemma2": {"model_type": "gemma2", "hidden_size": H, "num_attention_heads": HEADS,
               "num_key_value_heads": KV, "head_dim": D, "intermediate_size": FFN,
               "query_pre_attn_scalar": D, "sliding_window": 16},
    "phi3": {"model_type": "phi3", "hidden_size": H, "num_attention_heads": HEADS,
             "num_key_value_heads": KV, "intermediate_size": FFN, "tie_word_embeddings": False},
}
FUSED = {"gpt2", "gpt_neox", "phi3"}        # fused q/k/v (and gate/up) projections


def config(name: str, **changes) -> dict:
    layers_key = "n_layer" if name == "gpt2" else "num_hidden_layers"
    positions_key = "n_positions" if name == "gpt2" else "max_position_embeddings"
    return {layers_key: LAYERS, positions_key: POS, "vocab_size": VOCAB, **IDS,
            **CONFIGS[name], **changes}


def write_config(directory, name: str, **changes) -> str:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config(name, **changes)))
    return str(path)


@functools.cache
def traced(name: str, tmp_root: str) -> graphs.OpGraph:
    """Each model is traced once per session (the tests only read the graph)."""
    return graphs.load(f"hf:{write_config(pathlib.Path(tmp_root), name)}", batch=BATCH, seq=SEQ)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_configs"))


# --- closed forms ---------------------------------------------------------------------------

def linear_weights_per_layer(name: str) -> int:
    """Weights of the matmuls in one block (no biases, no norms)."""
    if name in ("gpt2", "gpt_neox"):
        ffn = 4 * H if name == "gpt2" else FFN
        return 4 * H * H + 2 * H * ffn
    attention = H * HEADS * D + 2 * H * KV * D + HEADS * D * H
    return attention + 3 * H * FFN


def param_count(name: str) -> int:
    """Published layouts: embeddings, per-block weights, biases and norm gains."""
    tied = CONFIGS[name].get("tie_word_embeddings", name in ("gpt2", "gemma", "gemma2"))
    embed = VOCAB * H * (1 if tied else 2)
    if name == "gpt2":    # learned positions; LayerNorms with biases; every linear has a bias
        return embed + POS * H + LAYERS * (12 * H * H + 13 * H) + 2 * H
    if name == "gpt_neox":
        return embed + LAYERS * (4 * H * H + 2 * H * FFN + 4 * H + FFN + H + 4 * H) + 2 * H
    block = linear_weights_per_layer(name) + 2 * H
    if name == "qwen2":
        block += HEADS * D + 2 * KV * D             # q, k, v biases
    if name == "gemma2":
        block += 2 * H                              # pre/post feed-forward norms
    if name == "mixtral":
        block += (EXPERTS - 1) * 3 * H * FFN + EXPERTS * H      # experts and router
    return embed + LAYERS * block + H


def capacity(tokens: int) -> int:
    return math.ceil(TOP_K * tokens / EXPERTS)


def matmul_attention_flops(name: str) -> float:
    """Forward FLOPs of the matmuls and attention: 2 per multiply-add; attention 4·b·h·s²·d
    (graphs/annotate.py: the mask does not halve it); the head 2·T·h·V."""
    tokens = BATCH * SEQ
    per_layer = 2.0 * tokens * linear_weights_per_layer(name) + 4.0 * BATCH * HEADS * SEQ**2 * D
    if name == "mixtral":
        # GShard form: E experts x C slots per group of one sequence; C·E = top_k·s here
        c = capacity(SEQ)
        slots = BATCH * EXPERTS * c
        per_layer += (2.0 * slots * 3 * H * FFN - 2.0 * tokens * 3 * H * FFN   # experts, not 1 MLP
                      + 2.0 * tokens * H * EXPERTS                             # router
                      + 2 * 2.0 * BATCH * SEQ * EXPERTS * c * H                # dispatch, combine
                      + 2.0 * BATCH * TOP_K * SEQ * EXPERTS * c)               # combine weights
    return LAYERS * per_layer + 2.0 * tokens * H * VOCAB


# --- per model ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_params_and_flops_match_closed_forms(name, root):
    g = traced(name, root)
    assert g.param_count == param_count(name)
    flops = sum(n.fwd_flops for n in g.nodes() if n.kind in (MATMUL, ATTENTION))
    assert flops == matmul_attention_flops(name)
    assert [L.name for L in g.layers] == ["embed", "block.0", "block.1", "head"]
    assert g.layers[1].structural_hash == g.layers[2].structural_hash


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_op_has_a_rule_and_attention_is_causal_flash(name, root):
    g = traced(name, root)
    assert g.unsupported == []
    attention = [n for n in g.nodes() if n.kind == ATTENTION]
    assert len(attention) == LAYERS
    # no materialised mask (a flash kernel's causal mask), q/k/v only; GQA as sdpa's enable_gqa
    assert all(n.attrs["is_causal"] and len(n.operands) == 3 for n in attention)
    kv = CONFIGS[name].get("num_key_value_heads", HEADS)
    assert all(n.operands[1].shape[1] == kv for n in attention)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_only_the_loss_leaves_the_model(name, root):
    g = traced(name, root)
    out = next(n for n in g.nodes() if n.op == "output")
    assert [o.shape for o in out.operands] == [()]
    assert g.node(out.operands[0].source).op == "cross_entropy"


def test_mixtral_experts_are_gshard_einsums(root):
    g = traced("mixtral", root)
    equations = [n.attrs["equation"] for n in g.nodes() if n.op == "einsum"]
    for eq in ("bsec,bsm->ebcm", "ebcm,efm->ebcf", "ebcf,emf->ebcm", "bsec,ebcm->bsm"):
        assert equations.count(eq) == LAYERS
    experts = {o.param for n in g.nodes() if n.op == "einsum" for o in n.operands if o.param}
    assert experts == {f"model.layers.{i}.mlp.experts.{w}" for i in range(LAYERS)
                       for w in ("gate_up_proj", "down_proj")}
    # top-2 of 4 experts: more forward FLOPs than the dense model of the same sizes
    assert g.fwd_flops > traced("mistral", root).fwd_flops


def test_gpt2_conv1d_and_gelu_are_one_op_each(root):
    g = traced("gpt2", root)
    ops = [n.op for n in g.layer_nodes(1)]
    assert ops.count("linear") == 4 and ops.count("gelu") == 1 and "addmm" not in ops
    assert "tanh" not in ops and "pow" not in ops


def test_rms_norm_is_one_norm_op(root):
    g = traced("llama3", root)
    norms = [n for n in g.nodes() if n.op == "rms_norm"]
    assert len(norms) == 2 * LAYERS + 1
    assert not [n for n in g.nodes() if n.op in ("rsqrt", "pow")]


def plan_on_8_gpus(root: str, name: str):
    path = write_config(pathlib.Path(root), name)
    return plan(f"hf:{path}", "dgx-h100", nodes=1, global_batch=8, microbatches=1,
                seq=SEQ, workers=1)


@pytest.mark.parametrize("name", ["llama3", "mixtral"])
def test_plan_on_8_gpus(name, root):
    p = plan_on_8_gpus(root, name)
    assert sorted(d for s in p.stages for d in s.device_ids) == list(range(8))
    assert p.stages[0].layers[0] == 0 and p.stages[-1].layers[1] == 4
    assert p.predicted.step_time_s > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(CONFIGS) - {"llama3", "mixtral"}))
def test_plan_on_8_gpus_slow(name, root):
    p = plan_on_8_gpus(root, name)
    assert sorted(d for s in p.stages for d in s.device_ids) == list(range(8))


# --- the tensor-parallel layer --------------------------------------------------------------

# Llama-3-8B's block widths, where tensor parallelism over 8 GPUs is the optimum at 2,048
# tokens (Gemma-7B's for Gemma); a small vocabulary keeps the head cheap
WIDE = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 1024, "max_position_embeddings": 4096}
WIDE_NAMES = {
    "gpt2": {"n_embd": 4096, "n_head": 32, "vocab_size": 1024, "n_positions": 4096},
    "gpt_neox": {k: v for k, v in WIDE.items() if k != "num_key_value_heads"},
    "gemma": {"hidden_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 16,
              "head_dim": 256, "intermediate_size": 24576, "vocab_size": 1024,
              "max_position_embeddings": 4096},
}


def tensor_parallel_layer(tmp_path, name: str):
    """(ILP strategies, Megatron's strategies, their costs) of block 0 on a 1x8 mesh."""
    path = write_config(tmp_path, name, **WIDE_NAMES.get(name, WIDE))
    g = graphs.load(f"hf:{path}", batch=1, seq=2048)
    cl = load_cluster("dgx-h100", 1)
    mesh = Mesh(cl, Submesh(1, 8), (1, 8))
    cm = ComputeModel(cl.gpu, "bf16")
    replicated = (0, 0, 0)
    sol = solve_stage(g, (1, 2), mesh, cm, Settings(), input_spec=replicated)
    names = list(g.layers[1].nodes)
    megatron = {k: v[0] for k, v in megatron_names(g, names, 1, 8).items()}
    prob = StageProblem(g, names, mesh, cm, boundary={g.layers[0].nodes[-1]: replicated})
    cost = {label: prob.evaluate(prob.choice_from_names(choice), Settings()).per_microbatch_s
            for label, choice in (("ilp", sol.strategies), ("megatron", megatron))}
    decisions = [n for n in names if g.node(n).kind in (MATMUL, ATTENTION)]
    return ({n: sol.strategies[n] for n in decisions}, {n: megatron[n] for n in decisions}, cost)


def _check_megatron(tmp_path, name):
    ilp, megatron, cost = tensor_parallel_layer(tmp_path, name)
    assert set(megatron.values()) >= {"n@1", "k@1"}       # column- and row-parallel matmuls
    assert ilp == megatron
    assert cost["ilp"] == pytest.approx(cost["megatron"], rel=1e-9)


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2", "gemma"])
def test_tensor_parallel_layer_is_megatrons(tmp_path, name):
    _check_megatron(tmp_path, name)


@pytest.mark.parametrize("name", sorted(FUSED))
def test_tensor_parallel_layer_is_megatrons_fused(tmp_path, name):
    """A fused q|k|v (gate|up) projection is column-split per part, as Megatron splits it.
    Where two row-parallel outputs are summed before the block's end (GPT-NeoX's parallel
    residual), reduce-scattering both and gathering the sum once is cheaper than two
    all-reduces, so the ILP may take Megatron's sequence-parallel variant of a row split."""
    ilp, megatron, cost = tensor_parallel_layer(tmp_path, name)
    assert set(megatron.values()) & {"n@1", "n@1:parts"} and "k@1" in megatron.values()
    for n, s in ilp.items():
        assert s in (megatron[n], megatron[n] + "+rs:s@1"), (n, s, megatron[n])
    assert cost["ilp"] <= cost["megatron"] * (1 + 1e-9)
