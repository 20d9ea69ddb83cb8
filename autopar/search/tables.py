"""The stage DP's tables: per cell (first layer i, end layer j, submesh m, stages s from this one
to the end) the best way to run layers [i, j) as one stage on submesh m, over every logical mesh,
start layout and recompute option, and the arrays solvers.stage_dp reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from autopar.costmodel.memory import inflight
from autopar.hardware.mesh import Submesh
from autopar.hardware.specs import Cluster
from autopar.search.layer_solver import StartLayout
from autopar.search.range_table import RECOMPUTE_OPTIONS, RangeTable
from graphs.ir import OpGraph

__all__ = ["CELL", "SearchSpace", "StageChoice", "StageTables", "boundary_p2p_s"]


@dataclass(frozen=True)
class SearchSpace:
    """The pipeline being searched for one microbatch size."""

    n_layers: int
    max_stages: int
    n_microbatches: int
    n_gpus: int
    schedule: str                # "1f1b" or "gpipe"
    memory_cap_bytes: float      # per GPU


@dataclass(frozen=True)
class StageChoice:
    """What a stage runs with, besides its layers and submesh."""

    logical_mesh: tuple[int, int]
    start: StartLayout
    recompute: str               # one of RECOMPUTE_OPTIONS


# One record per cell. key_s ranks the options of a cell: a stage's share of the step, its
# microbatches plus the pipeline's fill and drain (B + s - 1 slots for a stage s from the end,
# as in (p - 1 + m) of 1F1B), plus its gradient sync. t_s is what the DP sums (per microbatch);
# mesh indexes StageTables.meshes, start that mesh's start layouts, recompute RECOMPUTE_OPTIONS.
CELL = np.dtype([("key_s", "f8"), ("t_s", "f8"), ("sync_s", "f8"), ("mesh", "i8"), ("start", "i8"),
                 ("recompute", "i8")])


class StageTables:
    """Filled one logical mesh at a time (`add`); `choice` reads a cell back as a StageChoice
    and `dp_inputs` gives stage_dp its cost and extra arrays."""

    def __init__(self, space: SearchSpace, n_submeshes: int):
        self.space = space
        L, S = space.n_layers, space.max_stages
        self.cells = np.empty((L, L + 1, n_submeshes, S + 1), CELL)
        self.cells["key_s"] = np.inf
        self.cells["t_s"] = np.inf
        self.cells["sync_s"] = 0.0
        self.cells["mesh"] = -1
        self.cells["start"] = 0
        self.cells["recompute"] = 0
        self.meshes: list[tuple[tuple[int, int], list[StartLayout]]] = []
        self.least_memory_bytes = math.inf     # over every cell and option, fitting or not

    def add(self, submesh_index: int, logical_mesh: tuple[int, int], rt: RangeTable) -> None:
        """Offer every cell of one logical mesh on submesh `submesh_index`; a cell keeps the
        option with the least key_s (the first one on ties)."""
        sp = self.space
        B = sp.n_microbatches
        self.meshes.append((logical_mesh, rt.starts))
        mesh_id = len(self.meshes) - 1
        for rci, rc in enumerate(RECOMPUTE_OPTIONS):
            t = rt.time_s(rc)
            for s in range(1, sp.max_stages + 1):
                mem = rt.memory_bytes(rc, inflight(sp.schedule, 0, s, B))
                finite = mem[np.isfinite(mem)]
                if finite.size:
                    self.least_memory_bytes = min(self.least_memory_bytes, float(finite.min()))
                tt = np.where(mem <= sp.memory_cap_bytes, t, np.inf)
                key = (B + s - 1) * tt + rt.sync
                pbest = key.argmin(axis=2)[..., None]
                kbest = np.take_along_axis(key, pbest, axis=2)[..., 0]
                cells = self.cells[:, :, submesh_index, s]
                better = kbest < cells["key_s"]
                if better.any():
                    np.copyto(cells["key_s"], kbest, where=better)
                    np.copyto(cells["t_s"], np.take_along_axis(tt, pbest, axis=2)[..., 0], where=better)
                    np.copyto(cells["sync_s"], np.take_along_axis(rt.sync, pbest, axis=2)[..., 0], where=better)
                    np.copyto(cells["mesh"], mesh_id, where=better)
                    np.copyto(cells["start"], pbest[..., 0], where=better)
                    np.copyto(cells["recompute"], rci, where=better)

    def choice(self, i: int, j: int, submesh_index: int, stages_to_end: int) -> StageChoice:
        cell = self.cells[i, j, submesh_index, stages_to_end]
        logical_mesh, starts = self.meshes[int(cell["mesh"])]
        return StageChoice(logical_mesh, starts[int(cell["start"])], RECOMPUTE_OPTIONS[int(cell["recompute"])])

    def dp_inputs(self, p2p_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """stage_dp's stage_cost [L, L+1, M, S+1] and stage_extra [L, L+1, M].

        Point-to-point (p2p_s[m, j]: one transfer out of a stage ending at j on submesh m): a
        stage ending before the last layer sends its output forward and receives its gradient
        back, every microbatch. The transfers do not occupy the stage, but they lengthen the
        pipeline's fill and drain (counted once in extra, like the sync) and the round trip
        that 1F1B's s microbatches in flight must cover (a share 2*p2p/s of each steady-state
        period, in cost).

        Gradient sync runs after a stage's last backward. Whether the earlier stages' remaining
        backwards hide it depends on the whole pipeline, which the DP does not see: extra
        charges every stage's sync once (an upper bound) and the simulator ranks candidates.
        extra has no depth index, so each range takes its sync at its deepest feasible depth
        (the largest, so still an upper bound)."""
        sp = self.space
        cost = self.cells["t_s"].copy()
        extra = np.zeros(cost.shape[:3])
        # s = 0 is no stage (cost inf there); 1 keeps the division finite
        in_flight = np.array([1.0] + [inflight(sp.schedule, 0, s, sp.n_microbatches)
                                      for s in range(1, sp.max_stages + 1)])
        for mi, p2p in enumerate(p2p_s):
            extra[:, :, mi] += 2 * p2p[None, :]
            cost[:, :, mi, :] += 2 * p2p[None, :, None] / in_flight[None, None, :]
        extra += np.where(np.isfinite(cost), self.cells["sync_s"], 0.0).max(axis=3)
        return cost, extra


def boundary_p2p_s(cluster: Cluster, graph: OpGraph, layer_inputs: list[str | None],
                   subs: list[Submesh]) -> np.ndarray:
    """[M, L+1]: one point-to-point transfer of the activation leaving a stage that ends before
    layer j (0 at j = L and where no tensor crosses), sent by submesh m. The neighbour's
    placement is not known yet: across nodes if the cluster has several, each GPU of the
    sender's submesh sending its share over its slice of the node's link."""
    if cluster.n_nodes > 1:
        link_bw = cluster.inter_link.bandwidth_bytes_per_s / cluster.gpus_per_node
        link_lat = cluster.inter_link.latency_s
    else:
        link_bw, link_lat = cluster.intra_link.bandwidth_bytes_per_s, cluster.intra_link.latency_s
    out_bytes = np.array([graph.node(src).out_bytes if src else 0.0 for src in layer_inputs] + [0.0])
    return np.array([np.where(out_bytes > 0, link_lat + out_bytes / (link_bw * sub.n_devices), 0.0)
                     for sub in subs])
