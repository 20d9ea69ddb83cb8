"""Full recomputation as torch's non-reentrant checkpoint runs it: it stops rerunning a block once
the last tensor its backward needs is saved again (stage_problem.block_rerun), and nothing
outside the blocks is checkpointed (stage_problem.checkpoint_roles). The oracle is torch itself
on the CPU: the zoo's modules, each block wrapped in torch.utils.checkpoint, their backward's
aten calls counted against the same backward without checkpointing."""

from __future__ import annotations

import functools
import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import graphs.zoo
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.sharding.stage_problem import NOT_CHECKPOINTED, NOT_RERUN, RERUN, block_rerun, checkpoint_roles
from graphs.ir import MATMUL, NORM

SPECS = ["gpt:hidden=64,layers=3,heads=4,seq=32,vocab=128",
         "llama:hidden=64,layers=3,heads=4,kv_heads=2,ffn=128,seq=32,vocab=128",
         "gpt:hidden=64,layers=3,heads=4,seq=32,vocab=128,attn=unfused,attn_dropout=0.1",
         "moe:hidden=64,layers=2,heads=4,seq=32,vocab=128,experts=4"]
LINEAR_CALLS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
NORM_CALLS = ("aten::native_layer_norm", "aten::_fused_rms_norm", "aten::rsqrt")


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[f"aten::{func._overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


@functools.cache
def _backward_calls(spec: str, checkpointed: bool, early_stop: bool = True) -> Counter[str]:
    torch.manual_seed(0)
    model = graphs.zoo.build_module(spec, device="cpu")
    if checkpointed:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = _Ckpt(block)
    ids = torch.randint(0, 128, (2, 32))
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        loss = model(ids, ids)
        count = _Count()
        with count:
            loss.backward()
    return count.calls


class _Ckpt(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def _rerun_calls(spec: str, names: tuple[str, ...], early_stop: bool = True) -> int:
    """Calls of `names` that checkpointing adds to the backward: the recomputation's."""
    plain = _backward_calls(spec, False)
    ckpt = _backward_calls(spec, True, early_stop)
    return sum(ckpt[n] - plain[n] for n in names)


@pytest.mark.parametrize("spec", SPECS)
def test_the_blocks_linears_rerun_are_those_torch_reruns(spec):
    try:
        graph = ModelSource(spec).graph(2)
    except Exception as e:          # a zoo without this family's option
        pytest.skip(f"{spec}: {e}")
    roles = checkpoint_roles(graph)
    blocks = graph.layers[1:-1]
    assert blocks and all(roles[n] == NOT_CHECKPOINTED for li in (0, -1) for n in graph.layers[li].nodes)

    def gemms(names) -> int:
        """GEMM calls of these ops: one per matmul, two per unfused attention (QK^T and PV)."""
        return sum(1 if graph.node(n).kind == MATMUL else 2 if graph.node(n).op == "unfused_attention" else 0
                   for n in names)

    rerun = sum(gemms(block_rerun(graph, b.nodes)) for b in blocks)
    every = sum(gemms(b.nodes) for b in blocks)
    assert rerun == gemms(n for b in blocks for n in b.nodes if roles[n] == RERUN)
    assert rerun < every        # each of these blocks ends in a linear that keeps only its input
    # torch reruns exactly those GEMMs, and every one of them without early stop
    assert _rerun_calls(spec, LINEAR_CALLS) == rerun
    assert _rerun_calls(spec, LINEAR_CALLS, early_stop=False) == every


def test_a_block_ending_in_an_op_that_keeps_its_own_output_reruns_it():
    """A norm keeps its statistics, made by its kernel: packed after it runs, so it is rerun;
    a linear packs its input before its kernel, so the recomputation stops there."""
    graph = ModelSource(SPECS[0]).graph(2)
    names = list(graph.layers[1].nodes)
    ln2 = next(n for n in names if graph.node(n).kind == NORM and n.endswith("ln2"))
    upto = names[:names.index(ln2) + 1]
    assert block_rerun(graph, upto) == upto
    fc2 = next(n for n in names if n.endswith("fc2"))
    assert block_rerun(graph, names) == names[:names.index(fc2)]
    assert all(checkpoint_roles(graph)[n] == NOT_RERUN for n in names[names.index(fc2):])


def test_recompute_prices_the_rerun_ops_with_or_without_early_stop():
    cl = load_cluster("dgx-h200", 1, 1)
    src = ModelSource("gpt:hidden=1024,layers=4,heads=16,seq=1024,vocab=51200")
    steps = {(rc, early): build_3d(src, cl, 8, Config3D(1, 1, 1, 8, recompute=rc), checkpoint_early_stop=early)
             for rc in ("none", "full") for early in (True, False)}
    graph = src.graph(8)
    assert steps["none", True].predicted.step_time_s == steps["none", False].predicted.step_time_s
    early = steps["full", True].predicted.step_time_s - steps["none", True].predicted.step_time_s
    whole = steps["full", False].predicted.step_time_s - steps["none", False].predicted.step_time_s
    # the ops' own figures: the blocks' forward, and of it the tail early stop leaves out
    roles = checkpoint_roles(graph)
    assert 0 < early < whole
    # the hardware FLOPs count only what is rerun
    mf = steps["none", True].predicted.hardware_flops_per_step
    rerun_flops = sum(graph.node(n).fwd_flops for n, r in roles.items() if r == RERUN)
    tail_flops = sum(graph.node(n).fwd_flops for n, r in roles.items() if r == NOT_RERUN)
    assert math.isclose(steps["full", True].predicted.hardware_flops_per_step - mf, rerun_flops, rel_tol=1e-9)
    assert math.isclose(steps["full", False].predicted.hardware_flops_per_step - mf, rerun_flops + tail_flops,
                        rel_tol=1e-9)
