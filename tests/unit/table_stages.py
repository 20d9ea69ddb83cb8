"""The stages a range table prices, as plans the evaluator can score: the oracle tests that hold
the planner's tables to `evaluate_stage` (test_zero_units, test_layer_recompute) walk them."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

from autopar.hardware.mesh import Mesh, Submesh
from autopar.plan import StagePlan
from autopar.search.layer_solver import LayerSolver, StartLayout
from autopar.search.range_table import RangeTable
from autopar.sharding.spec import spec_str


def table_stages(solver: LayerSolver, rt: RangeTable, mesh: Mesh, sub: Submesh, shape: tuple[int, int],
                 ranges: Sequence[tuple[int, int]], specs: Sequence) -> Iterator[tuple[int, int, int, StagePlan]]:
    """(i, j, p, stage) for each layer range [i, j) and entry layout in `specs` whose table cell is
    finite: p is the cell's start-layout index, stage the plan of the strategies the table chose
    there (no recomputation)."""
    g = solver.graph
    for (i, j), spec in itertools.product(ranges, specs):
        start = StartLayout(spec, at_embedding=i == 0)
        p = rt.starts.index(start)
        if not math.isfinite(rt.t[i, j, p]):
            continue
        strategies: dict[str, str] = {}
        for li, sol in solver.walk((i, j), mesh, start):
            for pos, name in sol.names.items():
                strategies[g.layers[li].nodes[pos]] = name
        yield i, j, p, StagePlan(index=0, layers=(i, j), layer_names=[g.layers[x].name for x in range(i, j)],
                                 submesh=(sub.n_nodes, sub.gpus_per_node), device_ids=list(range(sub.n_devices)),
                                 logical_mesh=shape, strategies=strategies,
                                 input_spec="" if i == 0 or not spec else spec_str(spec))
