"""evaluate_stage poses one StageProblem per stage structure (evaluator._posed): a stage whose
ops have the structure of a stage posed before (stage_shape_key), on the same mesh, compute
model and Settings, under the same strategies by position, takes that problem renamed
(StageProblem.renamed) and its evaluation with the op records renamed. The previous code, a
problem posed and evaluated per stage (evaluator.SHARE_STAGES = False, a fresh stage cache), is
the reference: for every candidate the planner proposes (at one microbatch size, ZeRO 1 and 3,
the eager recipe, and each candidate again with selective, full and partial recomputation), the
plan the planner's simulate makes and every stage's StageResult are equal to the reference's
to the bit (their reprs: floats round-trip), and the shared path is taken."""

from __future__ import annotations

import dataclasses

import pytest

import autopar.evaluation.evaluator as ev_mod
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.evaluator import evaluate_stage
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.search.layer_solver import SearchStats
from autopar.search.planner import SearchJob
from autopar.sharding.rules import leader_operand
from autopar.sharding.stage_problem import (
    _PURE_VIEWS,
    _SAVES_INPUTS,
    StageProblem,
    saved_tensors,
    stage_layers_key,
    stage_shape_key,
)
from graphs.ir import ATTENTION, ELEMENTWISE, INPUT, LOSS, MATMUL, NORM, SOFTMAX, VIEW, dtype_bytes
from graphs.query import main_boundary, stage_nodes

MODEL = "gpt:hidden=256,layers=8,heads=4,seq=128,vocab=1024"
MODELS = [MODEL, "llama3-70b:hidden=256,layers=6,heads=8,ffn=512,seq=128,vocab=1024",
          "gpt:hidden=256,layers=4,heads=4,seq=128,vocab=1024,attn=unfused,attn_dropout=0.1"]


def previous_saved_tensors(graph, names):
    """saved_tensors as it was before its marks moved to _marked (stage_layers_key reads
    them per op), verbatim."""
    order = list(dict.fromkeys(names))
    names = set(order)
    saved: dict[str, float] = {}
    masks: dict[str, float] = {}
    outside: dict[str, float] = {}

    def mark(src, w: float = 1.0):
        seen = 0
        while src is not None and src in graph and seen < 64:
            n = graph.node(src)
            if n.kind == VIEW and n.op in _PURE_VIEWS:
                li = leader_operand(n)
                if li is None or n.operands[li].source is None:
                    break
                src = n.operands[li].source
                seen += 1
                continue
            break
        if src is None:
            return
        if src in names:
            saved[src] = max(saved.get(src, 0.0), w)
        elif src in graph and graph.node(src).kind != INPUT:
            outside[src] = max(outside.get(src, 0.0), w)

    for name in order:
        v = graph.node(name)
        k = v.kind
        acts = [o for o in v.operands if o.source is not None]
        if k in (MATMUL, ATTENTION, NORM, LOSS):
            for o in acts:
                if not (o.dtype.startswith("int") or o.dtype == "bool"):
                    mark(o.source)
            if k == ATTENTION:
                mark(name)
        elif k == SOFTMAX:
            mark(name)
        elif k == ELEMENTWISE:
            if v.op in ("mul", "div"):
                needs = [o.source is not None or o.is_param for o in v.operands]
                for j, o in enumerate(v.operands):
                    if o.source is None:
                        continue
                    if v.op == "mul":
                        keep = any(needs[i] for i in range(len(v.operands)) if i != j)
                    else:
                        keep = len(needs) > 1 and needs[1]
                    if keep:
                        mark(o.source)
            elif v.op in _SAVES_INPUTS:
                for o in acts:
                    mark(o.source)
            if v.op == "dropout" and float(v.attrs.get("p", 0.0)) > 0:
                masks[name] = masks.get(name, 0.0) + 0.5 * 2 / max(1, dtype_bytes(v.out_dtype))
    for name, w in masks.items():
        saved[name] = saved.get(name, 0.0) + w
    return saved, outside


@pytest.mark.parametrize("model", MODELS)
def test_saved_tensors_and_the_layer_keys_against_the_previous_and_the_plain_key(model):
    """On every range of layers, entered in two layouts: saved_tensors equals the previous
    code's (its dicts, their order included), and two ranges with equal stage_layers_keys have
    equal stage_shape_keys (the plain key, read off the ops themselves); blocks alike share keys."""
    g = ModelSource(model).graph(2)
    L = len(g.layers)
    by_fast: dict = {}
    n_shared = 0
    for i in range(L):
        for j in range(i + 1, L + 1):
            names = stage_nodes(g, (i, j))
            new, old = saved_tensors(g, names), previous_saved_tensors(g, names)
            assert new == old and [list(d) for d in new] == [list(d) for d in old]
            b = main_boundary(g, names)
            for spec in ((0, 0, 0), (1, 0, 2)):
                boundary = {b: spec} if b is not None else {}
                plain = stage_shape_key(g, names, boundary)
                fast = stage_layers_key(g, (i, j), boundary)
                if fast in by_fast:
                    n_shared += 1
                    assert by_fast[fast] == plain
                by_fast.setdefault(fast, plain)
    assert n_shared >= L


def _variants(plan):
    """The plan as proposed, then with every stage recomputing selectively, fully, and (where
    it has two layers or more) its first layer only."""
    yield plan
    for rc in ("selective", "full"):
        yield dataclasses.replace(plan, stages=[dataclasses.replace(s, recompute=rc, recompute_layers=None)
                                                for s in plan.stages])
    yield dataclasses.replace(plan, stages=[dataclasses.replace(s, recompute="full", recompute_layers=1)
                                            if s.layers[1] - s.layers[0] > 1 else s for s in plan.stages])


def _all_results(job, props, cl, eager, share, monkeypatch) -> list[str]:
    monkeypatch.setattr(ev_mod, "SHARE_STAGES", share)
    ev_mod._STAGE_CACHE.clear()
    out = []
    for prop in props:
        for cand in prop.candidates:
            plan = job.simulate(prop, cand)
            cm = ComputeModel(cl.gpu, plan.training.dtype)
            for variant in _variants(plan):
                res = [evaluate_stage(prop.graph, cl, s, variant.training, cm, eager=eager) for s in variant.stages]
                out.append(repr(res))
            out.append(plan.to_json())
    return out


@pytest.mark.parametrize("zero,eager", [(1, False), (3, False), (1, True)])
def test_shared_stage_problems_evaluate_as_problems_posed_per_stage(zero, eager, monkeypatch):
    cl = load_cluster("p3.16xlarge", 2, 4)
    job = SearchJob(ModelSource(MODEL), cl, 32, "1f1b", None, cl.gpu.training_dtype(None), zero, 10.0, "highs", "ilp",
                    eager=eager)
    props = [job.propose(mb, SearchStats()) for mb in (2,)]
    renamed = StageProblem.renamed
    calls = {"n": 0}

    def counted(self, *a):
        calls["n"] += 1
        return renamed(self, *a)
    monkeypatch.setattr(StageProblem, "renamed", counted)
    new = _all_results(job, props, cl, eager, True, monkeypatch)
    shared = calls["n"]
    old = _all_results(job, props, cl, eager, False, monkeypatch)
    assert calls["n"] == shared > 20           # the reference renames nothing; the new way often
    assert len(new) == len(old) > 20
    for a, b in zip(new, old):
        assert a == b


def test_stage_shape_key_tells_apart_what_the_problem_reads():
    """Equal keys for blocks of one structure at other depths; other keys where the entry
    layout, the set's extent (the embedding, the head) or the layout of the received tensor
    differ; and a renamed problem equals one posed afresh, ILP arrays included."""
    cl = load_cluster("p3.16xlarge", 1, 4)
    g = ModelSource(MODEL).graph(2)
    L = len(g.layers)
    mesh = Mesh(cl, Submesh(1, 4), (2, 2))
    cm = ComputeModel(cl.gpu, cl.gpu.training_dtype(None))

    def key(layers, spec=(1, 0, 0)):
        names = stage_nodes(g, layers)
        b = main_boundary(g, names)
        return stage_shape_key(g, names, {b: spec} if b is not None else {})
    assert key((1, 3)) == key((3, 5)) == key((5, 7))
    assert key((1, 3)) != key((1, 3), (2, 0, 0))
    assert key((1, 3)) != key((1, 4))
    assert key((0, 2)) != key((1, 3)) and key((L - 3, L)) != key((L - 4, L - 1))
    a, b = stage_nodes(g, (1, 3)), stage_nodes(g, (4, 6))
    ba, bb = {main_boundary(g, a): (1, 0, 0)}, {main_boundary(g, b): (1, 0, 0)}
    posed = StageProblem(g, b, mesh, cm, boundary=bb)
    copy = StageProblem(g, a, mesh, cm, boundary=ba).renamed(b, bb)
    assert [(x.root, x.members, x.strategies) for x in copy.groups] == [(x.root, x.members, x.strategies)
                                                                        for x in posed.groups]
    assert copy.group_of == posed.group_of and copy.saved_outside == posed.saved_outside
    for settings in (ev_mod.Settings(n_microbatches=4, zero=1),):
        ca, ea, ma = copy.ilp_arrays(settings)
        cb, eb, mb = posed.ilp_arrays(settings)
        assert all(x.tobytes() == y.tobytes() for x, y in zip(ca + ma, cb + mb))
        assert [(u, v, r.tobytes()) for u, v, r in ea] == [(u, v, r.tobytes()) for u, v, r in eb]
        choice = posed.solve(settings).choice
        assert repr(copy.evaluate(choice, settings, with_ops=True)) == repr(posed.evaluate(choice, settings,
                                                                                            with_ops=True))
