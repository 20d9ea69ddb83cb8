"""costmodel.remat.min_saved_bytes against a brute force over every saved set of small random
regions, and the two blocks measured on an H200 (bench/results/saved_activations_h200_2026-12-01.jsonl),
in units of tokens x hidden x bytes."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from autopar.costmodel.remat import min_saved_bytes


def _brute(bytes_of, edges, fixed, needed):
    preds: dict[str, list[str]] = {v: [] for v in bytes_of}
    for u, v in edges:
        preds[v].append(u)
    order = list(bytes_of)               # generated in topological order
    best = float("inf")
    for r in range(len(order) + 1):
        for saved in itertools.combinations(order, r):
            s = set(saved)
            avail: dict[str, bool] = {}
            for v in order:
                avail[v] = v in s or (v not in fixed and all(avail[u] for u in preds[v]))
            if all(avail[v] for v in needed):
                best = min(best, sum(bytes_of[v] for v in s))
    return best


@pytest.mark.parametrize("seed", range(60))
def test_min_cut_is_the_least_saved_set(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    names = [f"t{i}" for i in range(n)]
    bytes_of = {v: float(rng.choice([1, 2, 3, 4, 8])) for v in names}
    edges = [(names[i], names[j]) for j in range(n) for i in range(j) if rng.random() < 0.35]
    fixed = {v for v in names if rng.random() < 0.4} | {names[0]}
    needed = {v for v in names if rng.random() < 0.5}
    assert min_saved_bytes(bytes_of, edges, fixed, needed) == _brute(bytes_of, edges, fixed, needed)


def test_gpt_block_as_measured():
    # a GPT block (units: tokens x hidden x 1 B): the fp32 residual x (4) feeds ln1 and the
    # residual add; ln1's output (2, read by q/k/v's weight gradients: fixed), q, k, v, the
    # attention output; x2 = x + proj is read by ln2's backward and rebuilt from x and proj (2)
    # rather than kept (4); ln2 out (2), fc1 out (8), GELU out (8, read by fc2's weight gradient)
    b = {"x": 4, "ln1": 2, "q": 2, "k": 2, "v": 2, "attn": 2, "proj": 2, "x2": 4, "ln2": 2,
         "fc1": 8, "gelu": 8, "fc2": 2, "out": 4}
    e = [("x", "ln1"), ("ln1", "q"), ("ln1", "k"), ("ln1", "v"), ("q", "attn"), ("k", "attn"), ("v", "attn"),
         ("attn", "proj"), ("x", "x2"), ("proj", "x2"), ("x2", "ln2"), ("ln2", "fc1"), ("fc1", "gelu"),
         ("gelu", "fc2"), ("x2", "out"), ("fc2", "out")]
    fixed = {"x", "ln1", "q", "k", "v", "attn", "proj", "ln2", "fc1", "gelu", "fc2"}
    needed = {"x", "ln1", "q", "k", "v", "attn", "x2", "ln2", "fc1", "gelu"}
    # eager keeps all of `needed`: 36 (the measured 40 less autocast's two extra copies of ln1)
    assert sum(b[v] for v in needed) == 36
    assert min_saved_bytes(b, e, fixed, needed) == 34      # measured: 272 MiB = 34 x 4096 x 2048 B


@pytest.mark.parametrize("spec,tokens,delta_mib", [
    # measured on one H200: 320 -> 272 MiB (less autocast's copies, 288 -> 272) and 720 -> 504 MiB
    # (624 -> 504): bench/results/saved_activations_h200_2026-12-01.jsonl
    ("gpt:hidden=2048,layers=2,heads=32,seq=1024,vocab=51200", (4, 1024), -16),
    ("llama:hidden=2048,layers=2,heads=16,kv_heads=4,seq=2048,vocab=32000", (4, 2048), -120),
])
def test_compiled_block_keeps_what_was_measured(spec, tokens, delta_mib):
    import math

    from autopar.costmodel import eager
    from autopar.evaluation.evaluator import compiled_block_stash_delta_bytes
    from autopar.model import ModelSource
    graph = ModelSource(spec).graph(tokens[0])
    assert graph.node(graph.layers[1].nodes[0]).out_shape[:2] == tokens

    def local(v):
        return graph.node(v).out_bytes

    def extra(v):
        node = graph.node(v)
        return eager.fp32_residual_extra_bytes(node.out_bytes, node.out_bytes / math.prod(node.out_shape))
    delta = compiled_block_stash_delta_bytes(graph, 1, local, lambda op: eager.norm_runs_fp32(op, False), extra)
    assert delta == delta_mib * 2**20


def test_compiled_pipeline_stage_keeps_weight_copies_per_microbatch():
    """A compiled block casts its linears' weights inside its region and keeps the bf16 copies
    per microbatch in flight; autocast's one-per-step cache no longer holds them. A stage of a
    2-stage 1F1B pipeline with 4 microbatches: the cache is less by 2 B per block linear
    parameter, the stash per microbatch more by as much, and the rest of the stash's change is
    the blocks' cuts."""
    from autopar.costmodel.compute import ComputeModel
    from autopar.evaluation.baselines import Config3D, build_3d
    from autopar.evaluation.evaluator import compiled_block_stash_delta_bytes, evaluate_stage
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource
    cl = load_cluster("dgx-h200", 1, 2)
    src = ModelSource("gpt:hidden=256,layers=4,heads=4,seq=128,vocab=1024")
    plan = build_3d(src, cl, 4, Config3D(1, 1, 2, 1))
    graph = src.graph(1)
    assert plan.training.n_microbatches == 4
    cm = ComputeModel(cl.gpu, plan.training.dtype)
    st = plan.stages[0]
    e = evaluate_stage(graph, cl, st, plan.training, cm, eager=True, compiled=False)
    c = evaluate_stage(graph, cl, st, plan.training, cm, eager=True, compiled=True)
    blocks = [li for li in range(*st.layers) if 0 < li < len(graph.layers) - 1]
    linear_params = sum(math.prod(o.shape) for li in blocks for n in graph.layers[li].nodes
                        for o in graph.node(n).operands
                        if graph.node(n).kind == "matmul" and o.is_param and o.owns_param)
    assert linear_params == len(blocks) * (12 * 256 * 256 + 9 * 256)      # weights and biases
    assert e.autocast_cache_bytes - c.autocast_cache_bytes == 2 * linear_params
    from autopar.costmodel import eager

    def extra(v):
        node = graph.node(v)
        return eager.fp32_residual_extra_bytes(node.out_bytes, node.out_bytes / math.prod(node.out_shape))
    cuts = sum(compiled_block_stash_delta_bytes(graph, li, lambda v: graph.node(v).out_bytes,
                                                lambda op: eager.norm_runs_fp32(op, False), extra) for li in blocks)
    assert cuts < 0
    # compiled, the autocast copies of the norms' outputs are merged too (eager.autocast_input_copies_bytes)
    copies = sum(eager.autocast_input_copies_bytes(graph.node(n).out_bytes / 2, 3 if n.endswith("ln1") else 1)
                 for li in blocks for n in graph.layers[li].nodes if graph.node(n).kind == "norm")
    assert c.stash_bytes - e.stash_bytes == pytest.approx(
        2 * linear_params + cuts - copies)
