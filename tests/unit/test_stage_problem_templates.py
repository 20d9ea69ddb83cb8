"""StageProblem's per (graph, ops, mesh, filters) template (stage_problem._Template): a problem
built from a template another entry layout made has the groups a fresh build gives (the same
strategy objects, in the same order) and ILP arrays equal to the bit to the op-by-op reference
(test_stage_problem_memo.reference_arrays), whichever entry layout made the template; with
entry restrictions and allowed strategy sets."""

from __future__ import annotations

import numpy as np
import pytest
from builders import megatron_gpt
from test_stage_problem_memo import CM, P3, assert_same, reference_arrays

from autopar.hardware.mesh import Mesh, Submesh
from autopar.search.layer_solver import boundary_specs
from autopar.sharding import stage_problem as sp
from autopar.sharding.stage_problem import Settings, StageProblem, decision_names
from graphs.query import main_boundary


def _fresh(*args, **kwargs) -> StageProblem:
    """A problem built without any template (its groups made op by op)."""
    sp._TEMPLATE_MEMO.clear()
    prob = StageProblem(*args, **kwargs)
    sp._TEMPLATE_MEMO.clear()
    return prob


def _same_groups(a: StageProblem, b: StageProblem) -> None:
    assert a.group_of == b.group_of
    assert [(g.root, g.members) for g in a.groups] == [(g.root, g.members) for g in b.groups]
    for ga, gb in zip(a.groups, b.groups):
        assert ga.strategies.keys() == gb.strategies.keys()
        for m in ga.members:
            assert [id(s) for s in ga.strategies[m]] == [id(s) for s in gb.strategies[m]]
    for fa, fb in zip(a.forbidden, b.forbidden):
        np.testing.assert_array_equal(fa, fb)


# the 2x2 mesh (4 s per fusion setting on a busy 2-core machine) is covered by the other two: `-m slow`
@pytest.mark.parametrize("shape,nodes", [pytest.param((2, 2), 1, marks=pytest.mark.slow), ((1, 8), 1), ((2, 8), 2)])
@pytest.mark.parametrize("fused", [False, True])
def test_template_problems_equal_fresh_ones(shape, nodes, fused):
    g = megatron_gpt(64, 4, 32, 16, layers=3, fused_qkv=fused)
    mesh = Mesh(P3, Submesh(nodes, 8 if nodes > 1 else shape[0] * shape[1]), shape)
    names = list(g.layers[1].nodes)
    src = main_boundary(g, names)
    out = main_boundary(g, list(g.layers[2].nodes))
    specs = boundary_specs(g.node(src).out_shape, mesh)
    assert len(specs) > 3
    allowed = {n: set(opts[:2]) for n, opts in decision_names(g, names, mesh, CM).items() if len(opts) > 2}
    assert allowed
    settings = [Settings(n_microbatches=4, zero=1), Settings(n_microbatches=8, zero=2)]
    # each entry layout makes the template once (first), then every other one uses it
    for first in (specs[0], specs[-1], specs[len(specs) // 2]):
        for kwargs in ({}, {"allowed": allowed}, {"restrict_out": {out: first}}):
            sp._TEMPLATE_MEMO.clear()
            StageProblem(g, names, mesh, CM, boundary={src: first}, **kwargs)
            for q in specs:
                extra = dict(kwargs)
                if "restrict_out" in kwargs:
                    extra["restrict_out"] = {out: q}       # the restriction is per problem
                prob = StageProblem(g, names, mesh, CM, boundary={src: q}, **extra)
                assert sp._TEMPLATE_MEMO, "the template was not kept"
                assert prob._template.entry_groups      # some groups follow the received tensor
                fresh = _fresh(g, names, mesh, CM, boundary={src: q}, **extra)
                _same_groups(prob, fresh)
                for st in settings:
                    assert_same(prob.ilp_arrays(st), reference_arrays(prob, st))
                    assert_same(prob.ilp_arrays(st), fresh.ilp_arrays(st))
                    res = prob.solve(st)
                    if res.choice is not None:
                        assert prob.evaluate(res.choice, st) == fresh.evaluate(res.choice, st)


def test_template_is_per_graph_object_and_filters():
    """Graphs with the same names, and other strategy filters, never share a template."""
    a = megatron_gpt(64, 4, 32, 16, layers=2)
    b = megatron_gpt(64, 4, 32, 8, layers=2)
    names = list(a.layers[1].nodes)
    assert names == list(b.layers[1].nodes)
    mesh = Mesh(P3, Submesh(1, 4), (2, 2))
    sp._TEMPLATE_MEMO.clear()
    pa = StageProblem(a, names, mesh, CM)
    pb = StageProblem(b, names, mesh, CM)
    only = StageProblem(a, names, mesh, CM, only_names=frozenset({"R"}))
    assert len({id(pa._template), id(pb._template), id(only._template)}) == 3
    st = Settings(n_microbatches=2)
    for prob in (pa, pb, only):
        assert_same(prob.ilp_arrays(st), reference_arrays(prob, st))


def test_template_is_rebuilt_after_the_strategy_caches_are_cleared():
    """Swapping the rules clears the strategy caches (test_context_parallel does); a template
    made before must not hand out the old strategy objects."""
    g = megatron_gpt(64, 4, 32, 16, layers=2)
    names = list(g.layers[1].nodes)
    src = main_boundary(g, names)
    mesh = Mesh(P3, Submesh(1, 4), (2, 2))
    sp._TEMPLATE_MEMO.clear()
    old = StageProblem(g, names, mesh, CM, boundary={src: (0, 0, 0)})
    for f in (sp._decision_cached, sp._decision_by_id, sp._follow_by_id, sp._follow_all):
        f.cache_clear()
    new = StageProblem(g, names, mesh, CM, boundary={src: (0, 0, 0)})
    assert new._template is not old._template
    root = next(grp.root for grp in new.groups if len(grp.strategies[grp.root]) > 1)
    gi = new.group_of[root]
    assert all(a is not b for a, b in zip(new.groups[gi].strategies[root], old.groups[gi].strategies[root]))
    _same_groups(new, _fresh(g, names, mesh, CM, boundary={src: (0, 0, 0)}))
