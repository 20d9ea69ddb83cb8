"""The eager recipe's compiled blocks (autopar/costmodel/eager.py "compiled blocks"): where
`autopar run` compiles a stage's blocks (one rule for the runtime and the model), and what a
compiled block changes, in closed form on a tiny GPT under Megatron's tp2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from autopar.costmodel import eager
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import evaluate
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from graphs.ir import ELEMENTWISE, NORM

ROOT = Path(__file__).resolve().parents[2]
TINY = "gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1024"
# per GPT block (zoo/gpt.py): q, k, v, proj, fc1, fc2; ln1, attention, two residual adds, ln2, gelu
BLOCK_LINEARS, BLOCK_OTHER_OPS = 6, 6


def test_the_runtime_compiles_where_the_model_says_it_does():
    """Oracle: the measured decision per engine (eager.COMPILED_BY_ENGINE's comment), written out
    by layout: on CUDA, tensor-parallel stages and the plain module (one device) compile; DDP
    (dp x cp replicas without ZeRO: slower compiled where the host bounds it), FSDP2 (ZeRO over
    several replicas) and context parallelism do not."""
    torch = pytest.importorskip("torch")
    from autopar.runtime.engines import StageLayout, default_compile, stage_zero
    for dp, tp, cp in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 4, 1), (1, 1, 2), (2, 1, 2)]:
        for zero in (0, 1, 2, 3):
            replicas = dp * cp > 1
            expected = tp > 1 or (not replicas and cp == 1)
            for device in ("cuda", "cpu"):
                layout = StageLayout(dp, tp, 0, cp=cp)
                assert default_compile(layout, torch.device(device), zero) == \
                    eager.compiled_per_block(tp, device == "cuda", dp * tp * cp, stage_zero(layout, zero) > 0,
                                             cp > 1) == (device == "cuda" and expected), (dp, tp, cp, zero, device)


def _priced_compiled(plan, graph, cl) -> bool:
    """Whether the evaluator's default prices `plan` as its compiled or its eager run, told
    apart by evaluating it both ways (they differ on these plans)."""
    default = evaluate(plan, graph, cl, eager=True).prediction
    compiled = evaluate(plan, graph, cl, eager=True, compiled=True).prediction
    eager_run = evaluate(plan, graph, cl, eager=True, compiled=False).prediction
    assert compiled != eager_run
    assert default in (compiled, eager_run)
    return default == compiled


def test_the_evaluator_prices_each_engine_as_the_runtime_runs_it():
    """Oracle: the runtime's rule (default_compile) for the stage's layout: one stage on one GPU,
    a pipeline's one-GPU stages are priced compiled, DDP and FSDP2 ZeRO-1 and -3 eager."""
    src = ModelSource(TINY)
    graph = src.graph(2)
    cl = load_cluster("dgx-h200", 1, 1)
    assert _priced_compiled(build_3d(src, cl, 4, Config3D(1, 1, 1, 2)), graph, cl)
    cl2 = load_cluster("dgx-h200", 1, 2)
    assert _priced_compiled(build_3d(src, cl2, 4, Config3D(1, 1, 2, 2)), graph, cl2)            # 1F1B
    for zero in (0, 1, 3):                                                                    # DDP, FSDP2
        assert not _priced_compiled(build_3d(src, cl2, 4, Config3D(2, 1, 1, 1, zero=zero)), graph, cl2)
    assert _priced_compiled(build_3d(src, cl2, 4, Config3D(1, 2, 1, 2)), graph, cl2)            # tp2


def test_compiled_terms_closed_form():
    cm = ComputeModel(load_cluster("dgx-h200", 1, 1).gpu)
    bw = cm.stream_bytes_per_s * eager.ADAMW_STREAM_SHARE
    # fused into the norm's kernel: 6 B per element whatever reads it, backward twice that
    fwd, bwd = eager.compiled_norm_fp32_s(1e9, cm)
    assert (fwd, bwd) == (pytest.approx(6e9 / bw), pytest.approx(12e9 / bw))
    # the linears' casts of one tensor merged into the copy the graph saves
    assert eager.autocast_input_copies_bytes(100.0, 3, compiled=True) == 0.0
    # the ops outside the blocks per op, each block one region
    fwd, bwd = eager.host_s(1, 3, 4, tp=True, fsdp=False, cm=cm, compiled=True)
    assert fwd + bwd == pytest.approx(eager.HOST_S_PER_LINEAR + 3 * 2 * cm.launch_s
                                      + 4 * eager.HOST_COMPILED_S_PER_BLOCK)
    fwd, bwd = eager.host_s(0, 0, 4, tp=True, fsdp=True, cm=cm, ddp=True, compiled=True)
    assert fwd + bwd == pytest.approx(4 * (eager.HOST_COMPILED_S_PER_BLOCK + eager.HOST_FSDP_S_PER_BLOCK
                                           + eager.HOST_FSDP_STEP_S_PER_BLOCK + eager.HOST_DDP_S_PER_BLOCK))
    # blocks whose weights are not split: a plain region (no DTensors to wrap), its own constant
    fwd, bwd = eager.host_s(1, 3, 4, tp=False, fsdp=False, cm=cm, compiled=True)
    assert fwd + bwd == pytest.approx(eager.HOST_S_PER_LINEAR + 3 * 2 * cm.launch_s
                                      + 4 * eager.HOST_COMPILED_PLAIN_S_PER_BLOCK)
    # a split head alone (tp) does not make the blocks DTensor ones
    fwd, bwd = eager.host_s(0, 0, 4, tp=True, fsdp=False, cm=cm, compiled=True, split_blocks=False)
    assert fwd + bwd == pytest.approx(4 * eager.HOST_COMPILED_PLAIN_S_PER_BLOCK)
    assert eager.HOST_COMPILED_PLAIN_S_PER_BLOCK < eager.HOST_COMPILED_S_PER_BLOCK


def _tiny(dp: int, tp: int):
    cl = load_cluster("dgx-h200", 1, 2)
    src = ModelSource(TINY)
    plan = build_3d(src, cl, 4, Config3D(dp, tp, 1, 2 // dp))
    return plan, src.graph(2), cl


def test_a_compiled_tp_stage_against_its_eager_self():
    """tp2, 2 blocks, 2 microbatches of 2 x 128 tokens: ln1's output (replicated over tp, 2 x 128
    x 256 elements) feeds q, k and v, ln2's fc1. Compiled, per block and microbatch: the host
    launches one region instead of 6 linears, 6 other ops and DTensor's per-block work; the
    device moves 6 B per norm element instead of 8 + 6 per linear reading it (forward; backward
    twice; eager, the kernels autocast adds, priced by kind); the stash keeps one bf16 copy of
    ln1's output instead of three."""
    plan, graph, cl = _tiny(1, 2)
    blocks, b, elems = 2, plan.training.n_microbatches, 2 * 128 * 256
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    eager_plan = evaluate(plan, graph, cl, eager=True, compiled=False)
    compiled = evaluate(plan, graph, cl, eager=True, compiled=True)
    assert eager_plan.prediction.host_s - compiled.prediction.host_s == pytest.approx(
        b * blocks * (BLOCK_LINEARS * eager.HOST_S_PER_LINEAR + BLOCK_OTHER_OPS * 2 * cm.launch_s
                      + eager.HOST_TP_S_PER_BLOCK - eager.HOST_COMPILED_S_PER_BLOCK))
    # eager, autocast's kernels in place of the graph's bf16 ops: each norm in fp32 with its casts
    # (eager.autocast_norm_s; ln1 feeds q, k, v, ln2 fc1), each residual add into the fp32 stream
    # that a norm reads (eager.fp32_residual_add_s: the stream read 4 B, the projection's output
    # 2 B; the last one's output feeds ln_f alone), and each bias gradient summed by torch's
    # reduction (token_sum, eager.bias_grad_sum_s). Compiled, autocast's casts fused into the
    # norms (6 B per element forward, backward twice), the residual add before the MLP and ln2
    # (replicated over tp) one kernel: it reads the residual and the projection's output, ln2's
    # weight and bias, and writes the sum and ln2's output (eager.fused_pointwise_s); the bias
    # gradients Inductor's reduction at the streaming rate.
    e, c = eager_plan.stages[0], compiled.stages[0]
    graph_s = {o["name"]: o["compute_s"] for o in e.ops}
    t, ln_params = 2 * elems, 2 * 256 * 2
    # local outputs of q, k, v (column-parallel), proj, fc1 (column-parallel), fc2, bf16
    bias_bytes = [2 * 128 * 128 * 2] * 3 + [t] + [2 * 128 * 512 * 2] + [t]
    expected = 0.0
    for ln1, ln2, adds in (("blocks_0_ln1", "blocks_0_ln2", [("add_1", True), ("add_2", True)]),
                           ("blocks_1_ln1", "blocks_1_ln2", [("add_3", True), ("add_4", False)])):
        eager_s = (sum(eager.autocast_norm_s(elems, 3, cm)) + sum(eager.autocast_norm_s(elems, 1, cm))
                   + sum(sum(eager.fp32_residual_add_s(elems, 6, shared, cm)) for _, shared in adds)
                   - sum(graph_s[n] for n in [ln1, ln2] + [a for a, _ in adds])
                   + sum(eager.bias_grad_sum_s(b, cm) for b in bias_bytes))
        compiled_s = (sum(eager.compiled_norm_fp32_s(elems, cm))
                      + sum(eager.compiled_norm_fp32_s(elems, cm))
                      + cm.memory_bound_s(4 * t + ln_params) + cm.memory_bound_s(2 * t + 2 * 2 * t + 2 * ln_params)
                      - graph_s[adds[0][0]] - graph_s[ln2]
                      + sum(eager.bias_grad_sum_s(b, cm, fused=True) for b in bias_bytes))
        expected += eager_s - compiled_s
    assert (e.fwd_s + e.bwd_s) - (c.fwd_s + c.bwd_s) == pytest.approx(expected, rel=1e-9)
    assert e.memory.stash_per_microbatch_bytes - c.memory.stash_per_microbatch_bytes == \
        pytest.approx(blocks * 2 * elems * (3 - 1))
    # without a say, the stage is priced as the runtime runs it: compiled
    assert evaluate(plan, graph, cl, eager=True).prediction == compiled.prediction


TINY_LLAMA = "llama:hidden=256,layers=2,heads=4,kv_heads=2,seq=128,vocab=1024,ffn=512"


def test_a_fused_chain_of_one_op_costs_its_eager_op():
    """The fused kernel's bytes (eager.fused_pointwise_s) are the graph's own count for a single
    elementwise op or norm: forward inputs + outputs, backward outputs + 2 x inputs, weights
    read and their gradients written; so fusing changes only what a chain of several ops pays."""
    cm = ComputeModel(load_cluster("dgx-h200", 1, 1).gpu)
    graph = ModelSource(TINY_LLAMA).graph(2)
    checked = 0
    for name in graph.layers[1].nodes:
        node = graph.node(name)
        if node.kind not in (ELEMENTWISE, NORM):
            continue
        inputs = sum(o.nbytes for o in node.operands if o.source is not None)
        params = sum(o.nbytes for o in node.operands if o.source is None and o.is_param)
        consts = sum(o.nbytes for o in node.operands if o.source is None and not o.is_param)
        assert eager.fused_pointwise_s(inputs, node.out_bytes, consts, params, cm) == (
            cm.memory_bound_s(node.fwd_bytes), cm.memory_bound_s(node.bwd_bytes)), name
        checked += 1
    assert checked == 14   # rotary's neg, mul, mul, add for q and k; two residual adds, silu, mul; two norms


def _priced(stage) -> dict[str, float]:
    """The graph's price of each op of an evaluated stage, forward + backward."""
    return {o["name"]: o["compute_s"] for o in stage.ops}


def test_a_compiled_llama_block_fuses_its_pointwise_chains():
    """One device, a tiny Llama (2 blocks, 2 x 128 tokens of 256 hidden, 2 kv heads of 64, SwiGLU
    of 512). Eager, autocast's kernels replace the graph's bf16 ops: rotary's kernels one by one
    (eager.rotary_s), each norm in fp32 with its casts (eager.autocast_norm_s) and each residual
    add into the fp32 stream that a norm reads (eager.fp32_residual_add_s). Compiled, each
    block's four chains of pointwise ops are one kernel each way, priced by the bytes they read
    and write once at the streaming bandwidth (cm.memory_bound_s), and autocast's casts are fused
    into the norms (eager.compiled_norm_fp32_s). Closed form, bytes and op names by hand."""
    cl = load_cluster("dgx-h200", 1, 1)
    src = ModelSource(TINY_LLAMA)
    plan = build_3d(src, cl, 4, Config3D(1, 1, 1, 2))
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    e = evaluate(plan, src.graph(2), cl, eager=True, compiled=False).stages[0]
    c = evaluate(plan, src.graph(2), cl, eager=True, compiled=True).stages[0]
    graph_s = _priced(e)
    elems = 2 * 128 * 256
    t, k, f = 2 * elems, 2 * 128 * 128 * 2, 2 * 128 * 512 * 2   # bf16 q / residual, k, SwiGLU's hidden
    rotary = 2 * 128 * 64 * 2                                    # cos and sin tables, bf16
    norm_weight = 256 * 2
    blocks = [  # rotary of q and of k, the two norms, the residual adds a norm reads, (silu, mul)
        (["neg", "cat", "mul", "mul_1", "add"], ["neg_1", "cat_1", "mul_2", "mul_3", "add_1"],
         "blocks_0_attn_norm", "blocks_0_mlp_norm", [("add_2", True), ("add_3", True)], ["silu", "mul_4"]),
        (["neg_2", "cat_2", "mul_5", "mul_6", "add_4"], ["neg_3", "cat_3", "mul_7", "mul_8", "add_5"],
         "blocks_1_attn_norm", "blocks_1_mlp_norm", [("add_6", True), ("add_7", False)], ["silu_1", "mul_9"]),
    ]
    expected = 0.0
    for i, (rope_q, rope_k, attn_norm, mlp_norm, adds, swiglu) in enumerate(blocks):
        eager_s = (sum(eager.rotary_s(elems, cm)) + sum(eager.rotary_s(elems // 2, cm))
                   # attn_norm feeds wq, wk, wv; block 0's reads the embedding, which the residual
                   # path reads too; mlp_norm feeds w1, w3
                   + sum(eager.autocast_norm_s(elems, 3, cm, input_accumulate=i == 0))
                   + sum(eager.autocast_norm_s(elems, 2, cm))
                   # the fp32 stream read 4 B, the projection's output 2 B
                   + sum(sum(eager.fp32_residual_add_s(elems, 6, shared, cm)) for _, shared in adds))
        eager_graph = sum(graph_s[n] for n in rope_q + rope_k + [attn_norm, mlp_norm] + [a for a, _ in adds])
        chains = [(rope_q, t + rotary + t, t + 2 * t + rotary), (rope_k, k + rotary + k, k + 2 * k + rotary),
                  ([adds[0][0], mlp_norm], 2 * t + norm_weight + 2 * t, 2 * t + 4 * t + 2 * norm_weight),
                  (swiglu, 2 * f + f, f + 4 * f)]
        fused = sum(cm.memory_bound_s(fw) + cm.memory_bound_s(bw) - sum(graph_s[n] for n in ops)
                    for ops, fw, bw in chains)
        compiled_norms = (sum(eager.compiled_norm_fp32_s(elems, cm))
                          + sum(eager.compiled_norm_fp32_s(elems, cm)))
        expected += (eager_s - eager_graph) - (compiled_norms + fused)
    assert expected > 0
    assert (e.fwd_s + e.bwd_s) - (c.fwd_s + c.bwd_s) == pytest.approx(expected, rel=1e-9)


def test_a_data_parallel_stage_compiles_by_the_rule():
    """dp2 (DDP) runs its blocks eager by default (compiled, DDP was slower where the host bounds
    the step; `autopar run --compile` compiles them); compiled, its blocks cost the host a plain
    region (fitted on one GPU's plain blocks) in place of their ops (DDP's hooks stay): more
    than its eager ops on this tiny model's few ops."""
    plan, graph, cl = _tiny(2, 1)
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    eager_plan = evaluate(plan, graph, cl, eager=True, compiled=False)
    compiled = evaluate(plan, graph, cl, eager=True, compiled=True)
    assert evaluate(plan, graph, cl, eager=True).prediction == eager_plan.prediction
    assert compiled.prediction.host_s - eager_plan.prediction.host_s == pytest.approx(
        plan.training.n_microbatches * 2 * (eager.HOST_COMPILED_PLAIN_S_PER_BLOCK
                                            - BLOCK_LINEARS * eager.HOST_S_PER_LINEAR
                                            - BLOCK_OTHER_OPS * 2 * cm.launch_s))


@pytest.mark.parametrize("kind, results, n_gpus", [
    ("split", "runtime_vs_native_h200.json", 2), ("plain", "runtime_vs_native_h200_1gpu.json", 1)])
def test_host_per_compiled_block_is_its_fit(kind, results, n_gpus):
    """HOST_COMPILED_S_PER_BLOCK (split: DTensor blocks) and HOST_COMPILED_PLAIN_S_PER_BLOCK are
    what bench/truth/predict_runs.py --fit gives on their fit rows (the compiled GPT rows at
    microbatch 1: tp2 on 2 H200s, one H200's plain module), which the host bounds: their
    predicted device time is below the measured step, so they identify the constant."""
    spec = importlib.util.spec_from_file_location("predict_runs", ROOT / "bench/truth/predict_runs.py")
    assert spec is not None and spec.loader is not None
    pr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pr)
    doc = json.loads((ROOT / "bench/results" / results).read_text())
    rows = [pr.predict(r, n_gpus) for r in doc["rows"] if "autopar" in r and r["autopar"].get("engines")
            and pr.compiled_fit_row(r) == kind]
    assert len(rows) == 2
    value, lines = pr.fit(rows, kind)
    assert value == pytest.approx(getattr(eager, pr.CONSTANTS[kind]), rel=2e-3)
    assert all(x["device_s"] < x["measured_step_s"] for x in lines)


def test_host_per_block_follows_the_engines_that_wrap_the_blocks():
    """The stored llama-1b-gqa auto mb1 row (2 H200s) runs ZeRO-1 on FSDP2 over dp2, its head split
    over the vocabulary on the dp axis (a dp-vocab head, outside the blocks): its blocks are FSDP2
    units and no DTensors, and no DDP reducer runs. So its host per microbatch is the zero3 row's
    (the same model, ops and FSDP2 units per block) but for FSDP2's once-per-step part, which the
    zero3 row spreads over its two microbatches; the model had priced DTensor's and DDP's hooks
    on every block there (233 ms against 129 measured)."""
    spec = importlib.util.spec_from_file_location("predict_runs", ROOT / "bench/truth/predict_runs.py")
    assert spec is not None and spec.loader is not None
    pr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pr)
    doc = json.loads((ROOT / "bench/results/runtime_vs_native_h200.json").read_text())
    rows = {r["strategy"]: pr.predict(r, 2) for r in doc["rows"] if "autopar" in r and r["autopar"].get("engines")
            and r["model"] == "llama-1b-gqa" and r["microbatch"] == 1 and r["strategy"] in ("auto", "zero3")
            and not r.get("compile")}
    auto, zero3 = rows["auto"], rows["zero3"]
    assert "dp_vocab_head=True" in auto["row"]["autopar"]["layout"] and auto["row"]["zero"] == 1
    assert (auto["n_microbatches"], zero3["n_microbatches"]) == (1, 2)
    assert auto["predicted_host_s"] - zero3["predicted_host_s"] / 2 == pytest.approx(
        auto["n_blocks"] * eager.HOST_FSDP_STEP_S_PER_BLOCK / 2)
    assert abs(auto["step_error"]) < 0.2
