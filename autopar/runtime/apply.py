"""apply(plan, model): the plan's stages, meshes and shardings on torch.distributed.

Ranks run in stage order: rank r is the r-th device of the stages' concatenated device_ids (for
the usual plans, whose stages take increasing device ids, rank == device id). Every rank builds
every stage's device mesh and pipeline group (creating process groups is collective), and only
its own stages' parameters: one stage, or under an interleaved schedule the chunks k, k + pp, ...
of its device group, each a StageModule on that group's mesh, driven by torch's
ScheduleInterleaved1F1B, or where the device groups differ in size by runtime.pipeline.P2PPipeline.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn

from autopar.plan import Plan, PlanError
from autopar.sharding.spec import parse_spec, used_mask
from graphs import zoo
from graphs.ir import INPUT, OpGraph
from graphs.query import main_boundary
from graphs.trace import symbolic, to_meta, trace

from .layout import is_dtensor, local_shape, placements, spec_of
from .optim import make_optimizer
from .pipeline import BoundaryLayout, P2PPipeline, sum_tied_grad
from .program import (
    NotAppliableError,
    StageModule,
    default_program_compile,
    param_sources,
    partition,
    recompute_bound,
)

if TYPE_CHECKING:
    pass

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def rank_layout(plan: Plan) -> list[tuple[int, int, int]]:
    """(stage index, index in the stage's mesh, device id) per rank. Ranks follow the stages'
    device groups in stage order; under an interleaved schedule a rank runs several stages (the
    chunks k, k + pp, ... on one device group) and is listed with its first."""
    out: list[tuple[int, int, int]] = []
    seen: set[tuple[int, ...]] = set()
    for s in sorted(plan.stages, key=lambda s: s.index):
        group = tuple(s.device_ids)
        if group in seen:
            continue                      # a later chunk of a device group that already has its ranks
        seen.add(group)
        out.extend((s.index, j, d) for j, d in enumerate(s.device_ids))
    ids = [d for _, _, d in out]
    if len(set(ids)) != len(ids):
        raise NotAppliableError("the plan's stages share some devices but not all (device groups "
                                + ", ".join(str(list(g)) for g in sorted(seen)) + "); autopar.runtime needs each "
                                "stage on one whole device group")
    return out


def trace_model(model: nn.Module, example_inputs: tuple, dtype: str = "bf16"):
    """(fx program, IR) of `model` as the planner sees it: the same tracer, so the same node names."""
    meta_inputs = tuple(to_meta(x) for x in example_inputs)
    prog = symbolic(model, meta_inputs, {})
    ir = trace(model, meta_inputs, dtype=dtype)
    return prog, ir


def check_plan_matches(plan: Plan, ir: OpGraph) -> None:
    """Raise PlanError when the plan was made for another model (layers or op names differ)."""
    n_layers = plan.model.n_layers
    if n_layers != len(ir.layers):
        raise PlanError(f"plan does not match the model: the plan has {n_layers} layers, the model "
                        f"{ir.name!r} has {len(ir.layers)}")
    last = max(s.layers[1] for s in plan.stages)
    if last != len(ir.layers):
        raise PlanError(f"plan does not match the model: its stages cover layers [0, {last}), the model "
                        f"has {len(ir.layers)}")
    for s in plan.stages:
        if not s.ops:
            raise PlanError(f"plan stage {s.index} lists no ops; evaluate the plan first (autopar.evaluate) so "
                            "every op carries its sharding specs")
        want = [n for li in range(*s.layers) for n in ir.layers[li].nodes]
        have = {o["name"]: o for o in s.ops}
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in ir]
        if missing or extra:
            raise PlanError(f"plan does not match the model: stage {s.index} (layers {list(s.layers)}) names "
                            f"{len(extra)} ops the model lacks {extra[:5]} and lacks {len(missing)} of the "
                            f"model's {missing[:5]}; was the plan made for {ir.name!r}?")
        for n in want:
            node, o = ir.node(n), have[n]
            if o.get("op") not in (None, node.op) or (node.kind not in (INPUT,) and
                                                       len(o.get("in_specs") or []) != len(node.operands)):
                raise PlanError(f"plan does not match the model: op {n} is {o.get('op')} with "
                                f"{len(o.get('in_specs') or [])} operands in the plan, {node.op} with "
                                f"{len(node.operands)} in the model")


@dataclass
class Chunk:
    """One stage this rank runs (under an interleaved schedule a rank runs several): its plan
    stage, mesh (None on one device), module and parameters."""
    index: int
    stage: Any
    mesh: Any
    module: StageModule
    params: dict[str, nn.Parameter]
    partial_masks: dict[str, int]
    boundary_in: dict[str, str]
    boundary_out: dict[str, str]
    data_names: list[str]


def pipeline_groups(plan: Plan) -> list[int]:
    """The device group (index in order of first use) of each stage, stages in index order.
    Stage k runs on group k mod pp, as torch.distributed.pipelining's interleaved schedules place
    chunks; NotAppliableError otherwise."""
    stages = sorted(plan.stages, key=lambda s: s.index)
    groups: list[tuple[int, ...]] = []
    for s in stages:
        if tuple(s.device_ids) not in groups:
            groups.append(tuple(s.device_ids))
    pp = len(groups)
    for k, s in enumerate(stages):
        if tuple(s.device_ids) != groups[k % pp]:
            raise NotAppliableError(f"stage {s.index} runs on devices {s.device_ids}, not on the device group "
                                    f"{list(groups[k % pp])} of rank {k % pp} (chunks round-robin)")
    if plan.training.schedule == "interleaved" and len(stages) % pp:
        raise NotAppliableError(f"{len(stages)} interleaved stages do not fill {pp} ranks evenly")
    if plan.training.schedule != "interleaved" and pp != len(stages):
        raise NotAppliableError(f"schedule {plan.training.schedule!r} runs one stage per device group, but the "
                                f"plan's {len(stages)} stages share {pp} groups; use schedule 'interleaved'")
    return [k % pp for k in range(len(stages))]


class ParallelModel:
    """One rank's share of a plan: its stages' modules and parameters (several chunks under an
    interleaved schedule), the pipeline schedule, and the optimizer. step(batch) trains on one
    global batch."""

    def __init__(self, plan: Plan, model: nn.Module, example_inputs: tuple, device: torch.device,
                 optimizer: str = "adam", lr: float = 1e-3, autocast_dtype: torch.dtype | None = None,
                 compile: bool | None = None):
        self.plan = plan
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        layout = rank_layout(plan)
        group_of = pipeline_groups(plan)
        self.world = len(layout)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed and dist.get_world_size() != self.world:
            raise PlanError(f"the plan runs on {self.world} devices, the process group has "
                            f"{dist.get_world_size()} ranks")
        if not distributed and self.world > 1:
            raise PlanError(f"the plan runs on {self.world} devices: call apply() on every rank of an "
                            "initialised torch.distributed process group (autopar run does that)")
        self.rank = dist.get_rank() if distributed else 0
        self.stage_index, self.local_index, self.device_id = layout[self.rank]
        stages = sorted(plan.stages, key=lambda s: s.index)
        self.stages = stages
        self.n_stages = len(stages)
        self.pp = max(group_of) + 1
        self.stage_ids = [k for k in range(self.n_stages) if group_of[k] == group_of[self.stage_index]]
        tr = plan.training
        self.n_microbatches = tr.n_microbatches
        self.microbatch_size = tr.microbatch_size
        self.schedule_name = tr.schedule
        self.zero = tr.zero
        if self.n_stages > 1 and self.schedule_name not in SCHEDULES:
            raise NotAppliableError(f"schedule {self.schedule_name!r} is not supported; use one of {SCHEDULES}")
        if self.schedule_name == "interleaved" and self.pp < 2:
            raise NotAppliableError(f"an interleaved schedule needs two or more device groups; the plan's "
                                    f"{self.n_stages} stages all run on devices {stages[0].device_ids}")

        prog, ir = trace_model(model, example_inputs, plan.training.dtype)
        check_plan_matches(plan, ir)
        self.ir = ir
        programs = partition(prog.graph, ir, [(s.layers[0], s.layers[1]) for s in stages])
        self.programs = programs
        canon = {id(p): name for name, p in model.named_parameters()}
        param_of = param_sources(prog.graph, model, canon)
        stage_params = [_params_of(p, model, canon, param_of) for p in programs]

        # Collective setup: same calls in the same order on every rank. Ranks follow the device
        # groups (rank_layout); stage k runs on the ranks of its group.
        group_ranks: list[list[int]] = []
        for k, s in enumerate(stages):
            if group_of[k] == len(group_ranks):
                start = group_ranks[-1][-1] + 1 if group_ranks else 0
                group_ranks.append(list(range(start, start + len(s.device_ids))))
        ranks_of = [group_ranks[g] for g in group_of]
        meshes: dict[tuple, Any] = {}        # chunks on one group and mesh shape share one mesh
        self.meshes = []
        for s, r in zip(stages, ranks_of):
            key = (tuple(r), tuple(s.logical_mesh))
            if key not in meshes:
                meshes[key] = self._mesh(s, r)
            self.meshes.append(meshes[key])
        self.pp_group = None
        self.group_offsets = [r[0] for r in ranks_of]
        # device groups of different sizes: boundaries replicated over each stage's mesh and
        # routed between the ranks by runtime.pipeline.P2PPipeline (interleaved too: a group's
        # chunks k, k + pp, ... share its ranks)
        self.mixed = len({len(r) for r in group_ranks}) > 1
        if self.mixed and self.schedule_name == "interleaved" and self.n_microbatches % self.pp:
            raise NotAppliableError(f"interleaved 1F1B over device groups of different sizes runs "
                                    f"{self.n_microbatches} microbatches in rounds of {self.pp} (one per group); "
                                    f"use a multiple of {self.pp}")
        if self.n_stages > 1 and not self.mixed:
            for j in range(len(group_ranks[0])):
                g = dist.new_group([r[j] for r in group_ranks])
                if j == self.local_index:
                    self.pp_group = g
        # A parameter several stages use (a tied embedding/head) has one copy per stage; their
        # gradients are summed across those stages, pair by pair of mesh positions.
        self.tied: list[tuple[str, Any]] = []
        for name in sorted(set().union(*stage_params)):
            users = [k for k, ps in enumerate(stage_params) if name in ps]
            if len(users) < 2:
                continue
            mine = [k for k in users if k in self.stage_ids]
            if len({group_of[k] for k in users}) < len(users):
                raise NotAppliableError(f"stages {users} share parameter {name} and some of them run on one "
                                        "device group: one rank would hold two copies")
            if self.mixed:
                # every rank of the stages sums its full gradient / its stage's size (sum_tied_grad)
                g = dist.new_group(sorted({r for k in users for r in ranks_of[k]}))
                if mine:
                    self.tied.append((name, g))
                continue
            for j in range(len(ranks_of[users[0]])):
                g = dist.new_group([ranks_of[k][j] for k in users])
                if mine and j == self.local_index:
                    self.tied.append((name, g))

        # This rank's stages (chunks).
        if compile is None:
            compile = default_program_compile(self.meshes[self.stage_index], self.device)
        # (StageModule compiles a stage's program on a mesh only)
        self.compiled = bool(compile) and self.meshes[self.stage_index] is not None
        self.chunks = [self._chunk(k, model, prog, ir, param_of, canon, stage_params[k], compile)
                       for k in self.stage_ids]
        first_chunk = self.chunks[0]
        self.stage, self.mesh, self.module = first_chunk.stage, first_chunk.mesh, first_chunk.module
        self.params: dict[str, nn.Parameter] = {}
        for c in self.chunks:
            self.params.update(c.params)
        self._partial_masks = {n: m for c in self.chunks for n, m in c.partial_masks.items()}
        self.loss_axis = next((c.module.loss_axis for c in self.chunks if c.module.loss_axis is not None), None)
        self._setup_optimizer(optimizer, lr)
        self.schedule: Any = None
        if self.mixed:
            self.schedule = self._p2p_pipeline(prog)
        elif self.n_stages > 1:
            self.schedule = self._pipeline(prog)
        self.data_names = first_chunk.data_names
        # the graph inputs every later chunk of this rank reads (by name; torch's schedules pass
        # keyword arguments to each chunk of the rank)
        self.kwarg_names = sorted({n for c in self.chunks if c.index > 0 for n in c.data_names})

    # -- setup ----------------------------------------------------------------------------------
    def _chunk(self, k: int, model, prog, ir, param_of, canon, names: set[str], compile: bool) -> Chunk:
        stage, mesh, my = self.stages[k], self.meshes[k], self.programs[k]
        ops = {o["name"]: o for o in stage.ops}
        params = {name: self._distribute(name, model, ops, ir, my, param_of, stage, mesh) for name in sorted(names)}
        if mesh is None:
            _move_state(model, my, self.device)
        boundary_in = self._boundary_specs(k - 1, prog) if k > 0 else {}
        boundary_out = self._boundary_specs(k, prog) if k < self.n_stages - 1 else {}
        bdtype = {n.name: prog.values[n].dtype for n in my.outputs if isinstance(prog.values.get(n), torch.Tensor)}
        module = StageModule(my, model, ir, ops, params, canon, param_of, prog.values, mesh, boundary_in,
                             boundary_out, stage.recompute, bdtype, device=self.device,
                             recompute_below_layer=recompute_bound(stage), compile=compile)
        masks = {name: _grad_partial_mask(name, my, ops, ir, p.dim()) for name, p in params.items()}
        return Chunk(k, stage, mesh, module, params, masks, boundary_in, boundary_out,
                     [str(n.target) for n in my.data])

    def _mesh(self, s, ranks):
        if len(ranks) == 1:
            return None
        from torch.distributed.device_mesh import DeviceMesh
        return DeviceMesh(self.device.type, torch.tensor(ranks).view(*s.logical_mesh))

    def _distribute(self, name, model, ops, ir, prog, param_of, stage, mesh) -> nn.Parameter:
        if mesh is None:
            # One device: the stage runs the model's own modules, so it trains the model's own
            # parameters (moved to the device if they are elsewhere).
            p = dict(model.named_parameters())[name]
            if p.device != self.device:
                p.data = p.data.to(self.device)
            return p
        full = dict(model.named_parameters())[name].detach().to(self.device)
        from torch.distributed.tensor import DTensor
        spec = _storage_spec(name, prog, ops, ir, full.dim())
        pl = placements(spec, full.dim())
        if self.zero >= 3:
            pl = _shard_replicated(pl, full.shape, tuple(stage.logical_mesh),
                                   _grad_partial_mask(name, prog, ops, ir, full.dim()))
        d = DTensor.from_local(full, mesh, placements(None, full.dim()), run_check=False).redistribute(mesh, pl)
        # a copy of the shard, so the full tensor is not kept alive through a view
        d = DTensor.from_local(d.to_local().clone(), mesh, pl, run_check=False, shape=d.shape,
                               stride=d.stride())
        return nn.Parameter(d)

    def _boundary_specs(self, k: int, prog) -> dict[str, str]:
        """Layout of each tensor stage k sends to stage k+1: the receiver's input_spec for the main
        boundary when both meshes have the same shape (local shards pair up by mesh position),
        else replicated."""
        a, b = self.stages[k], self.stages[k + 1]
        nxt = [n for li in range(*b.layers) for n in self.ir.layers[li].nodes]
        main = main_boundary(self.ir, nxt)
        same = tuple(a.logical_mesh) == tuple(b.logical_mesh)
        out = {}
        for n in self.programs[k].outputs:
            nd = prog.values[n].dim()
            out[n.name] = b.input_spec if (same and n.name == main and b.input_spec) else "R" * nd
        return out

    def _setup_optimizer(self, kind: str, lr: float):
        self.masters: dict[str, nn.Parameter] = {}
        from torch.distributed.tensor import DTensor
        for name, p in self.params.items():
            if not is_dtensor(p) or self.zero not in (1, 2):
                continue
            # ZeRO-1/2: the optimizer owns a shard of each parameter over the mesh axes its
            # gradient is a partial sum over (see _grad_partial_mask); after its step the shards
            # are gathered back.
            d = cast(DTensor, p)
            mesh = d.device_mesh
            pl = _shard_replicated(tuple(d.placements), d.shape, tuple(mesh.shape), self._partial_masks[name])
            if pl != tuple(d.placements):
                m = cast(DTensor, d.detach()).redistribute(mesh, pl)
                m = DTensor.from_local(m.to_local().clone(), mesh, pl, run_check=False, shape=m.shape,
                                       stride=m.stride())
                self.masters[name] = nn.Parameter(m)
        opt_params = [self.masters.get(n, p) for n, p in self.params.items()]
        # the engines' optimizer: fused Adam over DTensor and ZeRO master shards as over plain ones
        self.optimizer: torch.optim.Optimizer = make_optimizer(opt_params, kind, lr, self.device)

    def _p2p_pipeline(self, prog) -> P2PPipeline:
        """Stages of different sizes: each stage's ranks hold its boundary tensor whole
        (replicated), so the receivers take it from the senders one to one (or one to many)."""
        for k in range(self.n_stages - 1):
            outs = self.programs[k].outputs
            if len(outs) != 1:
                raise NotAppliableError(f"stage {k} of a pipeline of stages of different sizes sends {len(outs)} "
                                        f"tensors ({', '.join(n.name for n in outs)}); the DTensor program sends "
                                        "one between such stages")
        v = prog.values[self.programs[0].outputs[0]]
        sizes = [len(s.device_ids) for s in self.stages]
        return P2PPipeline(self.stage_ids, [BoundaryLayout(1, n) for n in sizes], [(1, n) for n in sizes],
                           self.group_offsets,
                           self.rank, 0, self.n_microbatches, self.schedule_name, tuple(v.shape), v.dtype,
                           self.device)

    def _pipeline(self, prog):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
        mb = self.microbatch_size

        def example(n, spec, grad, stage):
            v = prog.values[n]
            shape = (mb,) + tuple(v.shape[1:]) if n.op == "placeholder" else local_shape(
                tuple(v.shape), spec, tuple(stage.logical_mesh), _coord(self.local_index, tuple(stage.logical_mesh)))
            return torch.empty(shape, dtype=v.dtype, device=self.device).requires_grad_(grad and v.is_floating_point())

        pipe = []
        for c in self.chunks:
            my = self.programs[c.index]
            if c.index == 0:
                ins = tuple(example(n, None, False, c.stage) for n in my.data)
            else:
                ins = tuple(example(n, c.boundary_in[n.name], True, c.stage) for n in my.inputs)
            if c.index == self.n_stages - 1:
                outs: tuple = (torch.empty(1, device=self.device),)
            else:
                outs = tuple(example(n, c.boundary_out[n.name], True, c.stage) for n in my.outputs)
            pipe.append(PipelineStage(c.module, c.index, self.n_stages, self.device, input_args=ins,
                                      output_args=outs, group=self.pp_group))
        # The last stage's forward already returns the loss; scale_grads averages the microbatches.
        if self.schedule_name == "interleaved":
            return ScheduleInterleaved1F1B(pipe, n_microbatches=self.n_microbatches, loss_fn=_loss_is_output,
                                           scale_grads=True)
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[self.schedule_name]
        if self.n_microbatches < self.n_stages:
            # torch's 1F1B refuses fewer microbatches than stages; with so few, 1F1B's order is
            # GPipe's (all forwards fit in the warm-up).
            cls = ScheduleGPipe
        return cls(pipe[0], n_microbatches=self.n_microbatches, loss_fn=_loss_is_output, scale_grads=True)

    # -- training -------------------------------------------------------------------------------
    def _autocast(self):
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.loss_axis is not None:
            # Megatron's vocab-parallel cross-entropy, as the plan prices it: each row's max, sum of
            # exponentials and target logit all-reduced, the logits never gathered (forward and
            # backward both need the context)
            from torch.distributed.tensor.parallel import loss_parallel
            stack.enter_context(loss_parallel())
        return stack

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Forward and backward over the global batch (all microbatches); the mean loss on the last
        stage's ranks, None elsewhere. Gradients are left reduced and in place."""
        B, mb = self.n_microbatches, self.microbatch_size
        first, last = 0 in self.stage_ids, self.n_stages - 1 in self.stage_ids
        for t in batch.values():
            if t.shape[0] != B * mb:
                raise ValueError(f"batch of {t.shape[0]} rows; the plan's global batch is {B} x {mb}")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss = None
        with self._autocast():
            if self.schedule is None:
                total: torch.Tensor | float = 0.0
                for i in range(B):
                    args = [batch[n][i * mb:(i + 1) * mb] for n in self.data_names]
                    out = self.module(*args)
                    (out / B).sum().backward()
                    total = total + out.detach()
                loss = torch.as_tensor(total / B).reshape(())
            elif self.mixed:
                chunk_of = {c.index: c for c in self.chunks}

                def run(x: torch.Tensor | None, i: int, k: int) -> torch.Tensor:
                    chunk = chunk_of[k]
                    rows = {n: batch[n][i * mb:(i + 1) * mb] for n in chunk.data_names}
                    if k == 0:
                        return chunk.module(*rows.values())
                    return chunk.module(x, **rows)
                mb_losses = self.schedule.step(run)
                if last:
                    loss = torch.stack([x.detach().reshape(()) for x in mb_losses]).mean()
            else:
                args = [batch[n] for n in self.data_names] if first else []
                kwargs = {n: batch[n] for n in self.kwarg_names}
                losses: list[torch.Tensor] = []
                if last:
                    any_t = next(iter(batch.values()))
                    self.schedule.step(*args, target=torch.zeros(any_t.shape[0], device=self.device),
                                       losses=losses, **kwargs)
                    loss = torch.stack([x.detach().reshape(()) for x in losses]).mean()
                else:
                    self.schedule.step(*args, **kwargs)
        self._reduce_grads()
        return loss

    def _reduce_grads(self):
        for name, group in self.tied:
            p = self.params[name]
            if self.mixed:
                sum_tied_grad(p, group, len(self.stage.device_ids))
                continue
            g = p.grad
            full = g.full_tensor() if is_dtensor(g) else g.clone()
            dist.all_reduce(full, group=group)
            p.grad = self._like(full, p)
        for p in self.params.values():
            if is_dtensor(p) and p.grad is not None and tuple(p.grad.placements) != tuple(p.placements):
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)

    def _like(self, full: torch.Tensor, p):
        if not is_dtensor(p):
            return full
        from torch.distributed.tensor import DTensor
        d = DTensor.from_local(full, p.device_mesh, placements(None, full.dim()), run_check=False)
        d = d.redistribute(p.device_mesh, p.placements)
        return DTensor.from_local(d.to_local().clone(), p.device_mesh, p.placements, run_check=False,
                                  shape=d.shape, stride=d.stride())

    def optimizer_step(self):
        for name, m in self.masters.items():
            g = self.params[name].grad
            m.grad = None if g is None else g.redistribute(m.device_mesh, m.placements)
        self.optimizer.step()
        with torch.no_grad():
            for name, m in self.masters.items():
                self.params[name].copy_(m.redistribute(m.device_mesh, self.params[name].placements))
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params.values():
            p.grad = None

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        loss = self.forward_backward(batch)
        self.optimizer_step()
        return loss

    # -- inspection (collective over the stage's mesh) ------------------------------------------
    def full_grads(self) -> dict[str, torch.Tensor]:
        return {n: _full(p.grad) for n, p in self.params.items() if p.grad is not None}

    def full_params(self) -> dict[str, torch.Tensor]:
        return {n: _full(p.detach()) for n, p in self.params.items()}

    def param_specs(self) -> dict[str, str]:
        """How each of this stage's parameters is stored, as a plan spec ("S1R", ...)."""
        return {n: spec_of(cast(Any, p).placements, p.dim()) if is_dtensor(p) else "R" * p.dim()
                for n, p in self.params.items()}

    @property
    def shard_local_ops(self) -> list[str]:
        """Ops run shard-locally because DTensor has no rule for them (see StageModule)."""
        return sorted(set().union(*(c.module._fallbacks for c in self.chunks)))


def apply(plan: Plan, model: nn.Module | None = None, *, example_inputs: tuple | None = None,
          device: str | torch.device = "cpu", optimizer: str = "adam", lr: float = 1e-3, seed: int = 0,
          autocast_dtype: torch.dtype | None = None, compile: bool | None = None) -> ParallelModel:
    """Apply `plan` on this rank. Call on every rank of an initialised process group whose size is
    the plan's device count (one process is fine for a one-device plan). With model None the plan's
    model is built from its name (zoo name or spec) with real fp32 weights, seeded by `seed`, so all
    ranks hold the same weights. example_inputs (the forward's arguments at the plan's microbatch
    size; meta tensors are fine) default to the zoo's (ids, targets). compile: torch.compile the
    stage's program per transformer block (StageModule); None: default_program_compile."""
    if model is None:
        model = build_model(plan, device="cpu", seed=seed)
    if example_inputs is None:
        example_inputs = zoo_inputs(plan)
    return ParallelModel(plan, model, example_inputs, torch.device(device), optimizer, lr, autocast_dtype, compile)


def build_model(plan: Plan, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    if not plan.model.loadable:
        raise PlanError(f"the plan's model {plan.model.name!r} cannot be rebuilt from its name; pass the "
                        "model to autopar.runtime.apply(plan, model)")
    cfg = zoo.get_config(plan.model.name)
    torch.manual_seed(seed)
    return zoo.build_module(cfg, device=device, dtype=torch.float32)


def zoo_inputs(plan: Plan, batch: int | None = None) -> tuple:
    cfg = zoo.get_config(plan.model.name)
    return zoo.example_inputs(cfg, batch or plan.training.microbatch_size, plan.model.seq,
                              device="meta")


def make_batch(plan: Plan, step: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The global batch of training step `step`: random token ids and targets, the same on
    every process."""
    cfg = zoo.get_config(plan.model.name)
    seq = plan.model.seq
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    n = plan.training.global_batch
    return {"ids": torch.randint(0, cfg.vocab, (n, seq), generator=g),
            "targets": torch.randint(0, cfg.vocab, (n, seq), generator=g)}


# ---------------------------------------------------------------------------------------------

def _params_of(prog, model, canon, param_of) -> set[str]:
    names = set()
    for n in prog.nodes:
        if n in param_of and n.op == "get_attr":
            names.add(param_of[n])
        elif n.op == "call_module":
            mod = model.get_submodule(n.target)
            names.update(canon[id(p)] for p in mod.parameters())
    return names


def _move_state(model: nn.Module, prog, device: torch.device) -> None:
    """Buffers and constant attributes the stage reads, on its device (parameters are moved by
    _distribute)."""
    for n in prog.nodes:
        if n.op == "call_module":
            for mod in model.get_submodule(n.target).modules():
                for key, b in mod.named_buffers(recurse=False):
                    if b is not None and b.device != device:
                        setattr(mod, key, b.to(device))
        elif n.op == "get_attr":
            owner, _, attr = n.target.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            v = getattr(mod, attr)
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.device != device:
                setattr(mod, attr, v.to(device))


def _storage_spec(name: str, prog, ops: dict, ir: OpGraph, ndim: int) -> str:
    """The layout a parameter is stored in: the spec of its first direct use in the stage (later
    uses redistribute from it)."""
    for n in prog.nodes:
        op = ops.get(n.name)
        if op is None or n.name not in ir:
            continue
        for o, spec in zip(ir.node(n.name).operands, op.get("in_specs") or []):
            if o.param == name and spec is not None and len(o.shape) == ndim and _ndim_ok(spec, ndim):
                return spec
    return "R" * ndim


def _ndim_ok(spec: str, ndim: int) -> bool:
    return len(parse_spec(spec)) == ndim


def _grad_partial_mask(name: str, prog, ops: dict, ir: OpGraph, ndim: int) -> int:
    """The mesh axes (bit k for axis k) the gradient of parameter `name` is a partial sum over
    at the op that stores it (_storage_spec's): the axes that op's other operands or its output
    are split over and the weight is not (the batch under data parallelism). ZeRO shards a
    parameter over exactly these axes, as the cost model prices it (sharding.rules.common.
    param_terms): a weight whose gradient is whole on every rank (GPT's position table, looked
    up by positions that no axis splits) stays replicated."""
    for n in prog.nodes:
        op = ops.get(n.name)
        if op is None or n.name not in ir:
            continue
        specs = op.get("in_specs") or []
        for i, (o, spec) in enumerate(zip(ir.node(n.name).operands, specs)):
            if o.param == name and spec is not None and len(o.shape) == ndim and _ndim_ok(spec, ndim):
                others = [s for j, s in enumerate(specs) if j != i and s is not None] + [op.get("out_spec")]
                used = 0
                for s in others:
                    if s and s != "scalar":
                        used |= used_mask(parse_spec(s))
                return used & ~used_mask(parse_spec(spec))
    return 0


def _shard_replicated(pl: tuple, shape, mesh_shape: tuple[int, ...], axes_mask: int = -1) -> tuple:
    """`pl` with each replicated mesh axis (of more than one device, and in `axes_mask`: bit k
    for axis k) sharding a tensor dim that no other axis splits and that it divides evenly; axes
    with no such dim stay replicated."""
    from torch.distributed.tensor import Shard
    out = list(pl)
    for k, n in enumerate(mesh_shape):
        if n == 1 or out[k].is_shard() or not axes_mask >> k & 1:
            continue
        used = {p.dim for p in out if p.is_shard()}
        for d, size in enumerate(shape):
            if d not in used and size % n == 0 and size >= n:
                out[k] = Shard(d)
                break
    return tuple(out)


def _coord(j: int, mesh_shape: tuple[int, int]) -> tuple[int, int]:
    return (j // mesh_shape[1], j % mesh_shape[1])


def _loss_is_output(output, target):
    return output.sum()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (cast(Any, t).full_tensor() if is_dtensor(t) else t).detach().float().cpu()

