"""The intra-op optimum of one given stage (`autopar shard`), composed from layer solutions."""

from __future__ import annotations

import math
from dataclasses import dataclass

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh
from autopar.search.layer_solver import LayerSolver, SearchStats, StartLayout, boundary_specs
from autopar.sharding.spec import Spec
from autopar.sharding.stage_problem import Settings
from graphs.ir import OpGraph

__all__ = ["StageSolution", "solve_stage"]


@dataclass
class StageSolution:
    strategies: dict[str, str]         # decision op -> strategy name
    input_spec: Spec | None            # layout the stage's input arrives in (None: the stage starts the model)
    objective_s: float                 # ILP objective summed over layers (per microbatch, sync amortised)
    stats: SearchStats


def solve_stage(graph: OpGraph, layers: tuple[int, int], mesh: Mesh, cm: ComputeModel, settings: Settings,
                input_spec: Spec | None = None, time_limit_s: float = 30.0, backend: str = "highs") -> StageSolution:
    """The intra-op optimum of one stage, solving each distinct (layer, layout) once and
    composing along the chain of layers. With `input_spec` None the best entry layout is chosen
    (for a stage starting at the embedding: the best layout to restrict its output to)."""
    i, j = layers
    stats = SearchStats()
    solver = LayerSolver(graph, cm, settings, stats, time_limit_s, backend)
    first_in = solver.inputs[max(i, 1)] if len(graph.layers) > 1 else None
    shape = graph.node(first_in).out_shape if first_in else ()
    if i == 0:
        starts = [StartLayout(q, at_embedding=True) for q in boundary_specs(shape, mesh)]
    else:
        starts = [StartLayout(q) for q in ([input_spec] if input_spec is not None else boundary_specs(shape, mesh))]
    best: tuple[float, StartLayout, dict[str, str]] | None = None
    for start in starts:
        total, names = 0.0, {}
        for li, sol in solver.walk(layers, mesh, start):
            if not math.isfinite(sol.objective):
                total = math.inf
                break
            total += sol.objective
            nodes = graph.layers[li].nodes
            names.update({nodes[p]: n for p, n in sol.names.items()})
        if best is None or total < best[0]:
            best = (total, start, names)
    assert best is not None     # boundary_specs always offers the replicated layout
    total, start, names = best
    return StageSolution(names, None if i == 0 else start.spec, total, stats)
