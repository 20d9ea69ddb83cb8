"""Megatron-Core's `--tp-comm-overlap` (evaluate's tp_comm_overlap): the blocks' tensor-parallel
collectives run beside their linears' GEMMs. The oracle is Megatron's own pairing, written out
by the zoo GPT's op names: the attention input's gather with the fused QKV GEMM (q, k, v), the
out-projection's reduce-scatter with its GEMM, FC1's gather with FC1, FC2's reduce-scatter with
FC2; per pair min(collectives, GEMMs) is hidden, and the step shrinks by what the hidden part
no longer costs beyond the compute's slowdown beside it (collectives.comm_overlap_s)."""

from __future__ import annotations

import pytest

from autopar.costmodel.collectives import COMM_OVERLAP_SLOWDOWN
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import tp_overlap_hidden_s
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import PlanError

PAIRS = (("attn_q", "attn_k", "attn_v"), ("attn_proj",), ("mlp_fc1",), ("mlp_fc2",))


def _megatron_hidden_s(ops: list[dict], n_layers: int) -> float:
    by = {o["name"]: o for o in ops}
    hidden = 0.0
    for li in range(1, n_layers - 1):                  # the blocks: not the embedding, not the head
        for pair in PAIRS:
            names = [f"blocks_{li - 1}_{p}" for p in pair]
            hidden += min(sum(by[n]["comm_s"] for n in names), sum(by[n]["compute_s"] for n in names))
    return hidden


@pytest.mark.parametrize("hidden_size,sp", [(4096, True), (4096, False), (512, True)])
def test_hidden_is_megatrons_pairing_and_the_step_drops_by_it(hidden_size, sp):
    cl = load_cluster("dgx-h100", 1, 8)
    src = ModelSource(f"gpt:hidden={hidden_size},layers=3,heads=32,seq=2048,vocab=32000")
    cfg = Config3D(1, 8, 1, 2, sequence_parallel=sp)
    exposed = build_3d(src, cl, 4, cfg)
    overlapped = build_3d(src, cl, 4, cfg, tp_comm_overlap=True)
    graph = src.graph(2)
    st = overlapped.stages[0]
    hidden = tp_overlap_hidden_s(graph, tuple(st.layers), st.ops)
    assert hidden == pytest.approx(_megatron_hidden_s(st.ops, len(graph.layers)), rel=1e-12)
    block_comm = sum(o["comm_s"] for o in st.ops if o["name"].startswith("blocks_"))
    assert 0 < hidden <= block_comm
    if hidden_size == 512:
        # narrow GEMMs do not cover their collectives: part stays exposed
        assert hidden < block_comm
    # one stage, no data parallelism: the step is the microbatches' forward + backward and the
    # optimizer, so it drops by exactly what overlapping saves per microbatch
    n_mb = overlapped.training.n_microbatches
    saved = n_mb * (1 - COMM_OVERLAP_SLOWDOWN) * hidden
    assert exposed.prediction.step_time_s - overlapped.prediction.step_time_s == pytest.approx(saved, rel=1e-9)
    # the breakdown moves it from exposed communication to the overlap slowdown
    b0, b1 = exposed.prediction.breakdown_s, overlapped.prediction.breakdown_s
    assert b0["exposed_comm"] - b1["exposed_comm"] == pytest.approx(n_mb * hidden, rel=1e-9)
    assert b1["comm_overlap"] - b0["comm_overlap"] == pytest.approx(n_mb * COMM_OVERLAP_SLOWDOWN * hidden, rel=1e-9)


def test_no_tensor_parallelism_nothing_to_hide():
    cl = load_cluster("dgx-h100", 1, 8)
    src = ModelSource("gpt:hidden=1024,layers=3,heads=16,seq=1024,vocab=32000")
    a = build_3d(src, cl, 16, Config3D(8, 1, 1, 2))
    b = build_3d(src, cl, 16, Config3D(8, 1, 1, 2), tp_comm_overlap=True)
    assert a.prediction.step_time_s == b.prediction.step_time_s


@pytest.mark.parametrize("kw,what", [({"eager": True}, "eager"), ({"zero": 3}, "ZeRO-3")])
def test_refused_where_not_modelled(kw, what):
    cl = load_cluster("dgx-h100", 1, 8)
    src = ModelSource("gpt:hidden=512,layers=3,heads=8,seq=512,vocab=32000")
    eager = kw.pop("eager", False)
    with pytest.raises(PlanError, match=what):
        build_3d(src, cl, 8, Config3D(2, 4, 1, 2, **kw), eager=eager, tp_comm_overlap=True)
