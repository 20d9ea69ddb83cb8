"""Per-op sharded parameter storage on a memory-tight data-parallel plan: a ZeRO-1 plan that does
not fit, the ILP choosing which parameter groups to store sharded (ZeRO-3) so that it fits at
least cost (StageProblem.solve_storage), against the uniform ZeRO-2 and ZeRO-3 plans.

    python bench/sharded_storage.py [model] [nodes] [dp] [microbatch] [global batch]

The stage's strategies are the data-parallel plan's; only the storage is chosen. The ILP's
memory is the parameters' state and the stashes (StageProblem.ilp_arrays); the evaluator's peak
adds terms that do not depend on the storage, so the ILP's budget is the ZeRO-1 plan's ILP
memory less what its peak exceeds the GPU's limit by."""

from __future__ import annotations

import dataclasses
import sys

from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import evaluate
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.sharding.spec import parse_spec
from autopar.sharding.stage_problem import Settings, StageProblem
from graphs.query import main_boundary, stage_nodes


def main(model: str = "gpt-1.3b", nodes: int = 1, dp: int = 8, microbatch: int = 4, global_batch: int = 32) -> None:
    cl = load_cluster("p3.16xlarge", nodes)
    src = ModelSource(model)
    plans = {z: build_3d(src, cl, global_batch, Config3D(dp, 1, 1, microbatch, zero=z)) for z in (1, 2, 3)}
    for z, p in plans.items():
        pr = p.prediction
        print(f"ZeRO-{z}: step {pr.step_time_s:.4f} s, peak {pr.peak_memory_bytes / 2**30:.2f} GiB "
              f"of {pr.memory_limit_bytes / 2**30:.2f}, fits {pr.fits}")
    base = plans[1]
    st = base.stages[0]
    graph = src.graph(base.training.microbatch_size)
    names = stage_nodes(graph, st.layers)
    mesh = Mesh(cl, Submesh(*st.submesh), st.logical_mesh)
    bsrc = main_boundary(graph, names)
    boundary = {bsrc: parse_spec(st.input_spec)} if bsrc is not None and st.input_spec else None
    prob = StageProblem(graph, names, mesh, ComputeModel(cl.gpu, base.training.dtype), boundary=boundary,
                        allowed={k: {v} for k, v in st.strategies.items()})
    inflight = st.memory.inflight_microbatches
    settings = Settings(n_microbatches=base.training.n_microbatches, zero=1, inflight=int(inflight))
    ev = prob.evaluate(prob.choice_from_names(st.strategies), settings)
    ilp_mem = ev.param_state_bytes(1) + inflight * ev.stash_bytes
    pr = base.prediction
    budget = ilp_mem - max(0.0, pr.peak_memory_bytes - pr.memory_limit_bytes)
    res, roots = prob.solve_storage(settings, mem_budget_bytes=budget)
    print(f"ILP ({res.status}, {res.solve_time_s:.2f} s): {len(roots)} of {len(prob.storage_groups(settings))} "
          f"parameter groups stored sharded")
    mixed = dataclasses.replace(base, stages=[dataclasses.replace(st, sharded_storage=sorted(roots))])
    mp = evaluate(mixed, graph, cl).prediction
    print(f"ZeRO-1 + sharded groups: step {mp.step_time_s:.4f} s, peak {mp.peak_memory_bytes / 2**30:.2f} GiB, "
          f"fits {mp.fits}")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(*(a[:1] + [int(x) for x in a[1:]]))
