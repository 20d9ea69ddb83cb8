"""Pipelines whose stages run on meshes of different sizes (or layouts): the boundary tensor of
each microbatch travels as row slices between the stages' ranks, by point-to-point ops batched
per schedule step, in Megatron's 1F1B order (GPipe: every forward first); under the
interleaved schedule a rank runs several stages (chunks k, k + pp, ...) in the order the
simulator prices (evaluation.pipeline.device_order), its device groups of any sizes.

torch.distributed.pipelining pairs one rank per stage in a process group, so it cannot send a
tensor from one rank to two or gather rows from two ranks to one. Both the engines
(runtime.engines, stages split over the batch by dp and replicated over tp) and the DTensor
program (runtime.apply, boundaries replicated over the stage's mesh) drive their mixed-size
pipelines with P2PPipeline, each describing its stages' rows as a BoundaryLayout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class BoundaryLayout:
    """How a stage holds a boundary tensor: the microbatch's rows split into dp parts over mesh
    axis dp_axis, replicated over the other axis (tp ranks)."""
    dp: int
    tp: int
    dp_axis: int = 0


@dataclass(frozen=True)
class Route:
    """One message of a microbatch's boundary tensor: rows [lo, hi) of the microbatch, from rank
    src to rank dst (global ranks)."""
    src: int
    dst: int
    lo: int
    hi: int


def stage_coords(layout, mesh_shape: tuple[int, int], j: int) -> tuple[int, int]:
    """(dp index, tp index) of the j-th device of a stage's row-major logical mesh."""
    a, b = divmod(j, mesh_shape[1])
    return (a, b) if layout.dp_axis == 0 else (b, a)


def boundary_routes(a, a_mesh: tuple[int, int], a_offset: int, b, b_mesh: tuple[int, int], b_offset: int,
                    mb: int) -> tuple[list[Route], list[Route]]:
    """The forward and backward messages of one microbatch's boundary tensor from a stage on
    ranks a_offset.. to the next on ranks b_offset.. (a, b: their BoundaryLayouts, or anything
    with dp, tp and dp_axis): each stage holds the rows of its dp index (mb / dp of them),
    replicated over tp. In the forward each receiver gets its rows from the senders whose dp
    rows overlap them, at tp index (its tp index mod the sender's tp); in the backward each
    sender gets the gradient of its rows the same way from the receivers."""
    def ranks(x, mesh: tuple[int, int], offset: int) -> dict[tuple[int, int], int]:
        return {stage_coords(x, mesh, j): offset + j for j in range(mesh[0] * mesh[1])}

    def routes(src, src_ranks: dict, dst, dst_ranks: dict) -> list[Route]:
        out = []
        rows_src, rows_dst = mb // src.dp, mb // dst.dp
        for (i_dst, t_dst), r_dst in sorted(dst_ranks.items()):
            lo_dst = i_dst * rows_dst
            for i_src in range(src.dp):
                lo, hi = max(lo_dst, i_src * rows_src), min(lo_dst + rows_dst, (i_src + 1) * rows_src)
                if lo < hi:
                    out.append(Route(src_ranks[(i_src, t_dst % src.tp)], r_dst, lo, hi))
        return out
    ra, rb = ranks(a, a_mesh, a_offset), ranks(b, b_mesh, b_offset)
    return routes(a, ra, b, rb), routes(b, rb, a, ra)


class P2PPipeline:
    """One rank's schedule of a pipeline of stages on different meshes (module docstring).

    Stage k of n_stages; its ranks start at offsets[k] and hold the rows of `layouts[k]` on the
    mesh `meshes[k]`. `shape` is the whole boundary tensor of one microbatch (rows first).
    step(run) calls run(x, i, k) for the forward of microbatch i on stage k (x: this rank's
    rows of the received boundary tensor, None on the first stage), which returns the
    boundary tensor (this rank's rows) or on the last stage the microbatch's loss.

    Gradients: every stage's ranks compute with their own rows' mean loss (the last stage's
    dp ranks each average over mb / dp rows, and the stage's data-parallel reduction averages
    over dp), so a boundary gradient is rescaled by dp(sender) / dp(receiver) on its way back."""

    def __init__(self, k: int | list[int], layouts: list, meshes: list[tuple[int, int]], offsets: list[int],
                 rank: int, dp_index: int, n_microbatches: int, schedule: str, shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device) -> None:
        """k: this rank's stage, or under the interleaved schedule its stages (chunks k, k + pp,
        ...; offsets[k] is then the first rank of stage k's device group)."""
        chunks = [k] if isinstance(k, int) else sorted(k)
        self.chunks = chunks
        self.k = chunks[0]
        self.n_stages = len(layouts)
        self.n_microbatches = n_microbatches
        self.schedule = schedule
        self.device = device
        self.dtype = dtype
        if schedule != "interleaved" and len(chunks) > 1:
            raise ValueError(f"schedule {schedule!r} runs one stage per rank, not {chunks}")
        mb = shape[0]
        # per chunk: its messages (Route lists), the gradient rescale, its first row and local shape
        self.routes: dict[int, dict[str, list[Route]]] = {}
        self.scales: dict[int, float] = {}
        self.rows: dict[int, tuple[int, tuple[int, ...]]] = {}
        for c in chunks:
            mine: dict[str, list[Route]] = {"recv_fwd": [], "send_fwd": [], "recv_bwd": [], "send_bwd": []}
            self.scales[c] = 1.0
            for j in (c - 1, c):
                if not 0 <= j < self.n_stages - 1:
                    continue
                fwd, bwd = boundary_routes(layouts[j], meshes[j], offsets[j], layouts[j + 1], meshes[j + 1],
                                           offsets[j + 1], mb)
                if j == c - 1:
                    mine["recv_fwd"] = [r for r in fwd if r.dst == rank]
                    mine["send_bwd"] = [r for r in bwd if r.src == rank]
                else:
                    mine["send_fwd"] = [r for r in fwd if r.src == rank]
                    mine["recv_bwd"] = [r for r in bwd if r.dst == rank]
                    self.scales[c] = layouts[j].dp / layouts[j + 1].dp
            self.routes[c] = mine
            dp = layouts[c].dp
            self.rows[c] = (dp_index * (mb // dp), (mb // dp, *shape[1:]))   # first row held, local shape
        r0 = self.routes[self.k]
        self.recv_fwd, self.send_fwd = r0["recv_fwd"], r0["send_fwd"]
        self.recv_bwd, self.send_bwd = r0["recv_bwd"], r0["send_bwd"]
        self.grad_scale = self.scales[self.k]
        self.row0, self.shape = self.rows[self.k]

    # -- point to point -------------------------------------------------------------------------
    def _ops(self, sends: list[tuple[Route, torch.Tensor]], recvs: list[Route]) -> tuple[list, list[torch.Tensor]]:
        # (one stage per rank: its rows and local shape are self.row0 and self.shape)
        ops, bufs = [], []
        for route, t in sends:
            piece = t[route.lo - self.row0:route.hi - self.row0].detach().float().contiguous()
            ops.append(dist.P2POp(dist.isend, piece, route.dst))
        for route in recvs:
            buf = torch.empty((route.hi - route.lo, *self.shape[1:]), dtype=torch.float32, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buf, route.src))
            bufs.append(buf)
        return ops, bufs

    def _exchange(self, send_fwd: torch.Tensor | None = None, send_bwd: torch.Tensor | None = None,
                  recv_fwd: bool = False, recv_bwd: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One batched step of point-to-point ops: sends of an output / input gradient, receives
        of an input / output gradient (each a whole local tensor, assembled from its rows)."""
        sends = ([(r, send_fwd) for r in self.send_fwd] if send_fwd is not None else []) + \
                ([(r, send_bwd) for r in self.send_bwd] if send_bwd is not None else [])
        want = (self.recv_fwd if recv_fwd else []) + (self.recv_bwd if recv_bwd else [])
        ops, bufs = self._ops(sends, want)
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        n_fwd = len(self.recv_fwd) if recv_fwd else 0
        x = torch.cat(bufs[:n_fwd]) if recv_fwd else None
        g = torch.cat(bufs[n_fwd:]) if recv_bwd else None
        return x, g

    # -- the schedule ---------------------------------------------------------------------------
    def step(self, run: Callable[[torch.Tensor | None, int, int], torch.Tensor],
             before_backward: Callable[[bool], None] | None = None) -> list[torch.Tensor]:
        """Forward and backward of every microbatch; the last stage's per-microbatch losses.
        before_backward(last) runs before each microbatch's backward, last True for the step's
        final one (FSDP2's gradient accumulation, EngineModel._fsdp_accumulation)."""
        if self.schedule == "interleaved":
            return self._step_interleaved(run, before_backward)
        B = self.n_microbatches
        first, last = self.k == 0, self.k == self.n_stages - 1
        warmup = B if self.schedule == "gpipe" else min(self.n_stages - self.k - 1, B)
        inflight: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        losses: list[torch.Tensor] = []
        n_fwd = 0

        def forward(x: torch.Tensor | None) -> torch.Tensor:
            nonlocal n_fwd
            inp = None if first else cast_input(x)
            out = run(inp, n_fwd, self.k)
            n_fwd += 1
            if last:
                losses.append(out)
            inflight.append((inp, out))
            return out

        def cast_input(x: torch.Tensor | None) -> torch.Tensor:
            assert x is not None
            return x.to(self.dtype).requires_grad_(True)

        def backward(grad: torch.Tensor | None) -> torch.Tensor | None:
            x, out = inflight.pop(0)
            if before_backward is not None:
                before_backward(not inflight and n_fwd == B)
            if last:
                (out.sum() / B).backward()
            else:
                assert grad is not None
                out.backward((grad * self.grad_scale).to(out.dtype))
            return None if x is None else x.grad

        x = None
        for _ in range(warmup):
            x, _g = self._exchange(recv_fwd=not first)
            y = forward(x)
            self._exchange(send_fwd=None if last else y)
        remaining = B - warmup
        if remaining:
            x, _g = self._exchange(recv_fwd=not first)
        for i in range(remaining):
            y = forward(x)
            _x, g = self._exchange(send_fwd=None if last else y, recv_bwd=not last)
            gin = backward(g)
            if i == remaining - 1:
                self._exchange(send_bwd=gin)
            else:
                x, _g = self._exchange(send_bwd=gin, recv_fwd=not first)
        for _ in range(warmup):
            _x, g = self._exchange(recv_bwd=not last)
            self._exchange(send_bwd=backward(g))
        return losses

    def _step_interleaved(self, run: Callable[[torch.Tensor | None, int, int], torch.Tensor],
                          before_backward: Callable[[bool], None] | None) -> list[torch.Tensor]:
        """Interleaved 1F1B over this rank's chunks, in the order evaluation.pipeline simulates.
        A send is posted when its op ends and waited only at the end of the step; a receive
        blocks just before the op that reads it, each message tagged with its boundary,
        direction and microbatch, so that it meets its receive whatever order the two ranks'
        orders post them in (two groups exchange forwards and gradients both ways). So a rank waits only for an op's inputs, as the simulator's ops do,
        and the order runs to the end whenever the simulator finds no deadlock in it."""
        from autopar.evaluation.pipeline import device_order
        B, n, v = self.n_microbatches, self.n_stages, len(self.chunks)
        pp = n // v
        order = device_order("interleaved", self.k, pp, B, v)
        inflight: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        losses: list[torch.Tensor] = []
        pending: list = []

        def tag(boundary: int, backward: bool, i: int) -> int:
            return (2 * boundary + backward) * B + i

        def send(routes: list[Route], t: torch.Tensor, g: int, boundary: int, backward: bool, i: int) -> None:
            row0 = self.rows[g][0]
            for r in routes:
                piece = t[r.lo - row0:r.hi - row0].detach().float().contiguous()
                pending.append((dist.isend(piece, r.dst, tag=tag(boundary, backward, i)), piece))

        def recv(routes: list[Route], g: int, boundary: int, backward: bool, i: int) -> torch.Tensor:
            local = self.rows[g][1]
            works, bufs = [], []
            for r in routes:
                buf = torch.empty((r.hi - r.lo, *local[1:]), dtype=torch.float32, device=self.device)
                works.append(dist.irecv(buf, r.src, tag=tag(boundary, backward, i)))
                bufs.append(buf)
            for w in works:
                assert w is not None
                w.wait()
            return torch.cat(bufs)

        n_bwd = sum(kind == "B" for kind, _, _ in order)
        for kind, chunk, i in order:
            g = self.chunks[chunk]
            routes = self.routes[g]
            if kind == "F":
                inp = None if g == 0 else \
                    recv(routes["recv_fwd"], g, g - 1, False, i).to(self.dtype).requires_grad_(True)
                out = run(inp, i, g)
                if g == n - 1:
                    losses.append(out)
                else:
                    send(routes["send_fwd"], out, g, g, False, i)
                inflight[(g, i)] = (inp, out)
                continue
            x, out = inflight.pop((g, i))
            n_bwd -= 1
            if before_backward is not None:
                before_backward(n_bwd == 0)
            if g == n - 1:
                (out.sum() / B).backward()
            else:
                grad = recv(routes["recv_bwd"], g, g, True, i)
                out.backward((grad * self.scales[g]).to(out.dtype))
            if x is not None:
                assert x.grad is not None
                send(routes["send_bwd"], x.grad, g, g - 1, True, i)
        for w, _piece in pending:       # (the pieces stay alive until their sends complete)
            if w is not None:
                w.wait()
        return losses


def sum_tied_grad(w, group, stage_size: int) -> None:
    """Sum a tied weight's gradient over its copies in stages of different layouts (the first
    and last stage's embedding): every rank of those stages adds its full gradient / its stage's
    size (the ranks of a stage hold the same full gradient)."""
    from torch.distributed.tensor import DTensor, Replicate
    is_d = isinstance(w, DTensor)
    full = (w.grad.full_tensor() if isinstance(w.grad, DTensor) else w.grad) if w.grad is not None else \
        torch.zeros(w.shape, dtype=w.dtype, device=(w.to_local() if is_d else w).device)
    full = full / stage_size
    dist.all_reduce(full, group=group)
    if is_d:
        rep = DTensor.from_local(full, w.device_mesh, [Replicate()] * w.device_mesh.ndim, run_check=False)
        w.grad = rep.redistribute(w.device_mesh, w.placements)
    else:
        w.grad = full
