"""A plan's stages as programs over the model's torch.fx graph, and the interpreter that runs
one stage with the plan's shardings.

The planner's op names are the fx node names of `graphs.trace.symbolic` (the IR keeps them), so
the plan's per-op specs attach to fx nodes one to one. fx nodes the IR folds away (sizes,
devices, parameter views, constants such as `arange`) run wherever they are needed, possibly
in several stages: they are cheap and hold no state.

Interpreter rule (what makes every strategy the ILP can choose runnable, with the collectives
its cost record lists, sharding/strategy.py): before an op runs, each operand is redistributed to
the op's `in_specs` entry; the op runs on the local shards (matmuls shard by shard as the
strategy reads, norms over a split hidden dim with one all-reduce of row statistics, the rest by
DTensor); its result is redistributed to its `out_spec` (a split contracted dim comes out
partial: that is the all-reduce or reduce-scatter charged). In backward, each result's gradient,
summed over its readers, is brought back to the `out_spec` layout before the op's own backward:
a partial gradient is all-reduced there, once, as charged. Weights gathered for an op (ZeRO-3)
are gathered again in backward instead of kept.

Compiled (StageModule(compile=True); `autopar run --compile`, by default on CUDA): each layer's
nodes run as one torch.compile'd region (CompiledBlock). Dynamo traces this same interpreter, so
the redistribution decisions are made at trace time and land in the graph as functional
collectives, and the backend (Inductor) compiles the joint forward+backward; the numbers are the
interpreter's (the gloo tests compare them with one process, on the "aot_eager" backend). The
interpreter reads plain records of the fx nodes (_Op) and plain dicts of the IR for that reason:
dynamo does not trace torch.fx or networkx. What differs compiled: a block's first call runs op by
op (it finds the ops DTensor has no rule for, which a trace cannot try); ZeRO-3's gathered weights
are left to the backend's partitioner instead of regathered in backward; a layer recomputed whole
is checkpointed around its compiled code, and a layer recomputing only some ops runs op by op. A
block that fails to compile runs op by op, with a warning naming the block and the op traced.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from autopar.sharding.spec import parse_spec, used_mask
from graphs.ir import ATTENTION, ELEMENTWISE, EMBEDDING, INPUT, LOSS, MATMUL, NORM, OUTPUT, VIEW, OpGraph
from graphs.lower import PARAM_FOLDABLE  # numel-keeping views of a weight the IR folds into its use

from . import layout
from .layout import is_dtensor


class NotAppliableError(NotImplementedError):
    """Part of a plan that this runtime cannot execute; the message names the op and strategy."""


@dataclass
class StageProgram:
    index: int
    nodes: list[fx.Node]                    # fx nodes this stage runs, in graph order
    inputs: list[fx.Node]                   # activations received from the previous stage
    data: list[fx.Node]                     # graph placeholders (token ids, targets) it reads
    outputs: list[fx.Node]                  # activations sent on (the loss for the last stage)
    layer_of: dict[str, int] = field(default_factory=dict)   # IR node -> layer, for recompute

    @property
    def is_last(self) -> bool:
        return bool(self.outputs) and self.outputs[0].op == "output"


def partition(graph: fx.Graph, ir: OpGraph, stage_layers: list[tuple[int, int]]) -> list[StageProgram]:
    """Split the fx graph at the plan's layer boundaries.

    A stage runs the IR nodes of its layers plus the fx helpers they need; an activation made
    in stage i and read in stage j > i+1 is relayed through the stages between (the pipeline
    only sends to the next stage)."""
    by_name = {n.name: n for n in graph.nodes}
    layer_of = {name: li for li, layer in enumerate(ir.layers) for name in layer.nodes}
    stage_of_layer = {li: k for k, (a, b) in enumerate(stage_layers) for li in range(a, b)}
    missing = [li for li in range(len(ir.layers)) if li not in stage_of_layer]
    if missing:
        raise ValueError(f"layers {missing} are in no stage of the plan")
    stage_of: dict[str, int] = {}
    for name, li in layer_of.items():
        if ir.node(name).kind != INPUT:
            stage_of[name] = stage_of_layer[li]
    output = next(n for n in graph.nodes if n.op == "output")
    stage_of[output.name] = len(stage_layers) - 1

    S = len(stage_layers)
    needs: list[dict[fx.Node, None]] = [{} for _ in range(S)]     # acts from earlier stages
    data: list[dict[fx.Node, None]] = [{} for _ in range(S)]
    helpers: list[set[fx.Node]] = [set() for _ in range(S)]
    for n in graph.nodes:
        if n.name not in stage_of:
            continue
        k = stage_of[n.name]
        todo = list(n.all_input_nodes)
        while todo:
            a = todo.pop()
            if a.op == "placeholder":
                data[k][a] = None
            elif a.name in stage_of:
                if stage_of[a.name] > k:
                    raise ValueError(f"node {n.name} (stage {k}) reads {a.name} from the later stage "
                                     f"{stage_of[a.name]}")
                if stage_of[a.name] < k:
                    needs[k][a] = None
            elif a not in helpers[k]:
                helpers[k].add(a)
                todo.extend(a.all_input_nodes)
    order = {n: i for i, n in enumerate(graph.nodes)}
    programs = []
    for k in range(S):
        produced_before = {by_name[x] for x, s in stage_of.items() if s < k}
        inputs = {a for j in range(k, S) for a in needs[j] if a in produced_before}
        programs.append(StageProgram(
            index=k,
            nodes=[n for n in graph.nodes if stage_of.get(n.name) == k or n in helpers[k]],
            inputs=sorted(inputs, key=order.__getitem__),
            data=sorted(data[k], key=order.__getitem__),
            outputs=[], layer_of=layer_of))
    for k in range(S - 1):
        programs[k].outputs = programs[k + 1].inputs
    programs[-1].outputs = [output]
    for k in range(S - 1):
        if not programs[k].outputs:
            raise ValueError(f"stage {k + 1} reads nothing from stage {k}: the plan's layer split "
                             "leaves a stage disconnected")
    return programs


def param_sources(graph: fx.Graph, root: nn.Module, canon: dict[int, str]) -> dict[fx.Node, str]:
    """fx nodes that are a parameter, or a numel-keeping view of one, -> the parameter's name."""
    out: dict[fx.Node, str] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            obj = _fetch(root, n.target)
            if isinstance(obj, nn.Parameter) and id(obj) in canon:
                out[n] = canon[id(obj)]
        elif n.op in ("call_method", "call_function"):
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
            ins = [a for a in n.all_input_nodes if a in out]
            if ins and len(n.all_input_nodes) == 1 and name.rstrip("_") in PARAM_FOLDABLE:
                out[n] = out[ins[0]]
    return out


def _fetch(root: Any, target: str):
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def recompute_bound(stage: Any) -> int | None:
    """StageModule's recompute_below_layer for a plan stage: its first layer plus the layers it
    recomputes (StagePlan.recompute_layers), or None where it recomputes all of them."""
    k = getattr(stage, "recompute_layers", None)
    return None if k is None else stage.layers[0] + k


class StageModule(nn.Module):
    """Runs one stage's fx nodes. With a device mesh (more than one device) values are DTensors
    laid out as the plan says; on one device everything is a plain tensor.

    forward(*positional, **data): the first stage takes the graph inputs it reads positionally
    (in graph order); later stages take the boundary tensors (local shards) positionally and
    the graph inputs they read (e.g. targets) by name. Returns the boundary tensors for the next
    stage (local shards) or, for the last stage, the loss (a tensor of shape [1])."""

    def __init__(self, prog: StageProgram, root: nn.Module, ir: OpGraph, ops: dict[str, dict],
                 params: dict[str, nn.Parameter], canon: dict[int, str], param_of: dict[fx.Node, str],
                 values: dict[fx.Node, Any], mesh=None, boundary_in: dict[str, str] | None = None,
                 boundary_out: dict[str, str] | None = None, recompute: str = "none",
                 boundary_dtype: dict[str, torch.dtype] | None = None, device: torch.device | None = None,
                 recompute_below_layer: int | None = None, compile: bool = False):
        """`recompute_below_layer`: under recompute "full", only the ops of IR layers below it
        are recomputed (a stage recomputing its first k layers: its first layer + k,
        `recompute_bound`); None: every layer. `compile` (on a mesh): each layer's ops run as one
        torch.compile'd region (CompiledBlock) instead of op by op."""
        super().__init__()
        self.device = device
        self.prog = prog
        self.__dict__["root"] = root                 # not a submodule: its weights are not ours
        self.ir = ir
        self.ops = ops
        self.mesh = mesh
        self.canon = canon
        self.param_of = param_of
        self.values = values
        self.boundary_in = boundary_in or {}
        self.boundary_out = boundary_out or {}
        self.boundary_dtype = boundary_dtype or {}
        self.recompute = recompute
        self.recompute_below_layer = recompute_below_layer
        self.stored = nn.ParameterDict({_key(k): v for k, v in params.items()})
        self.param_by_name = params
        self._operand_specs = {name: _operand_specs(ir, name, op) for name, op in ops.items()
                               if name in ir and ir.node(name).kind not in (INPUT, OUTPUT)}
        # the interpreter reads plain records of the fx nodes (dynamo does not trace torch.fx)
        self._op_of = {n: _Op(n) for n in prog.nodes}
        self._shape = {n.name: v.shape for n, v in values.items() if isinstance(v, torch.Tensor)}
        self._param_name = {n.name: name for n, name in param_of.items()}
        # IR nodes of what the stage runs, receives and reads (ir is a networkx graph: not traced)
        self._ir_node = {n.name: ir.node(n.name) for n in prog.nodes + prog.inputs + prog.data if n.name in ir}
        self._segments = [(kind, [self._op_of[n] for n in nodes]) for kind, nodes in self._plan_segments()]
        self._fallbacks: set[str] = set()
        self.loss_axis = vocab_split_loss_axis(list(ops.values()), ir) if mesh is not None else None
        if self.loss_axis is not None:       # (made here: a compiled region cannot create a mesh)
            from torch.distributed.device_mesh import DeviceMesh
            self._loss_mesh = DeviceMesh.from_group(mesh.get_group(self.loss_axis), mesh.device_type)
        # attention op -> mesh axes its sequence is split over (context parallelism)
        self._cp = context_parallel_axes(ops, ir) if mesh is not None else {}
        # Storage of each gathered weight -> (the stored weight, the gathered placements, the
        # gathered weight): autograd saves a handle instead and gathers again in backward.
        self._gathered: dict[int, tuple] = {}
        # Drop each value after its last use in the stage, as eager PyTorch does: holding every
        # intermediate to the end of the forward (logits, casts) raised a 1-GPU gpt-1.3b peak by GiBs.
        keep = set(prog.outputs)
        pos = {n: i for i, n in enumerate(prog.nodes)}
        self._free_after: dict[int, list[str]] = {}
        last: dict[fx.Node, int] = {}
        for n in prog.nodes:
            for a in n.all_input_nodes:
                last[a] = pos[n]
        for a, i in last.items():
            if a not in keep:
                self._free_after.setdefault(i, []).append(a.name)
        # On one device with nothing to recompute the stage is plain PyTorch: run it as fx's
        # generated code instead of interpreting node by node (the interpreter's Python cost
        # showed at small batches on an H100).
        self._compiled = _compile(prog, root) if mesh is None and recompute == "none" else None
        # On a mesh, torch.compile per layer: the interpreter below is traced once per layer by
        # dynamo into one graph of aten ops and functional collectives (the redistributions the
        # plan asks for, decided at trace time), which the backend compiles with its backward.
        self._blocks = self._plan_blocks() if compile and mesh is not None else []

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        prog = self.prog
        if self._compiled is not None:
            data = args if prog.index == 0 else [kwargs[n.target] for n in prog.data]
            out = self._compiled(*(args if prog.index else ()), *data)
            if prog.is_last:
                return self._loss(out)
            outs = tuple(self._send(n, v) for n, v in zip(prog.outputs, out))
            return outs[0] if len(outs) == 1 else outs
        env: dict[str, Any] = {}             # fx node name -> value
        if prog.index == 0:
            if len(args) != len(prog.data):
                raise TypeError(f"stage 0 takes {[n.name for n in prog.data]}, got {len(args)} tensors")
            feed = dict(zip(prog.data, args))
        else:
            if len(args) != len(prog.inputs):
                raise TypeError(f"stage {prog.index} takes {[n.name for n in prog.inputs]} from stage "
                                f"{prog.index - 1}, got {len(args)} tensors")
            for node, t in zip(prog.inputs, args):
                env[node.name] = self._receive(node, t)
            feed = {n: kwargs[n.target] for n in prog.data}
        for n, t in feed.items():
            env[n.name] = self._data(n, t)
        if self._blocks:
            self._run_blocks(env)
        else:
            try:
                with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                    self._run_segments(env)
            finally:
                self._gathered.clear()            # saved handles keep what they need
        if prog.is_last:
            return self._loss(env[prog.outputs[0].name])
        outs = tuple(self._send(n, env[n.name]) for n in prog.outputs)
        return outs[0] if len(outs) == 1 else outs

    def _run_segments(self, env) -> None:
        i = 0
        for kind, nodes in self._segments:
            if kind == "ckpt":
                self._run_checkpointed(nodes, env)
            else:
                for n in nodes:
                    env[n.name] = self._run(n, env)
                    self._free(i, env)
                    i += 1
                continue
            for _ in nodes:
                self._free(i, env)
                i += 1

    # -- compiled blocks -------------------------------------------------------------------------
    def _plan_blocks(self) -> list[CompiledBlock]:
        """The stage's nodes cut at IR layer boundaries (fx helpers go with the layer they
        follow), each with the recompute segments inside it."""
        groups: list[list[fx.Node]] = []
        cur_layer: int | None = None
        for n in self.prog.nodes:
            li = self.prog.layer_of.get(n.name, cur_layer)
            if not groups or (li != cur_layer and groups[-1]):
                groups.append([])
            cur_layer = li
            groups[-1].append(n)
        where = {n.name: k for k, g in enumerate(groups) for n in g}
        seg_of = {n.name: (j, kind) for j, (kind, nodes) in enumerate(self._segments) for n in nodes}
        outs = {n.name for n in self.prog.outputs}
        blocks = []
        for k, g in enumerate(groups):
            inside = {n.name for n in g}
            ins = list(dict.fromkeys(a.name for n in g for a in n.all_input_nodes if a.name not in inside))
            later = [n.name for n in g if n.name in outs or any(where.get(u.name, k) != k for u in n.users)]
            segs: list[tuple[str, list[_Op]]] = []
            for n in g:
                j, kind = seg_of[n.name]
                if segs and seg_of[segs[-1][1][-1].name][0] == j:
                    segs[-1][1].append(self._op_of[n])
                else:
                    segs.append((kind, [self._op_of[n]]))
            layer = next((self.prog.layer_of[n.name] for n in g if n.name in self.prog.layer_of), None)
            blocks.append(CompiledBlock(self, k, layer, [n.name for n in g], ins, later, segs))
        # values to drop after each block: those no later block reads
        last_block: dict[str, int] = {}
        for b in blocks:
            for a in b.inputs:
                last_block[a] = b.index
        for a, k in last_block.items():
            if a not in outs:
                blocks[k].free_after.append(a)
        return blocks

    def _run_blocks(self, env) -> None:
        for b in self._blocks:
            outs = b(*(env[a] for a in b.inputs))
            env.update(zip(b.outputs, outs))
            for a in b.free_after:
                env.pop(a, None)

    def _run_nodes(self, segs, env) -> None:
        """The interpreter over one block's segments (what CompiledBlock compiles)."""
        for kind, nodes in segs:
            if kind == "ckpt":
                _trace_mark(f"{nodes[0].name} .. {nodes[-1].name} (checkpointed)")
                self._run_checkpointed(nodes, env)
            else:
                for n in nodes:
                    _trace_mark(n.name)
                    env[n.name] = self._run(n, env)

    def _free(self, i: int, env) -> None:
        for a in self._free_after.get(i, ()):
            env.pop(a, None)

    def _loss(self, loss):
        if self.mesh is not None and is_dtensor(loss):
            loss = _redistribute(loss, self.mesh, placements("scalar", 0)).to_local()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise NotAppliableError("the model's forward must return a scalar loss (zoo models do when "
                                    "given targets)")
        return loss.reshape(1)

    # -- boundaries ---------------------------------------------------------------------------
    def _data(self, n: fx.Node, t: torch.Tensor):
        if self.mesh is None:
            return t
        from torch.distributed.tensor import DTensor
        d = DTensor.from_local(t, self.mesh, placements(None, t.dim()), run_check=False)
        op = self.ops.get(n.name)
        return _redistribute(d, self.mesh, placements(op["out_spec"], t.dim())) if op else d

    def _receive(self, n: fx.Node, t: torch.Tensor):
        if self.mesh is None:
            return t
        from torch.distributed.tensor import DTensor
        v = self.values[n]
        return DTensor.from_local(t, self.mesh, placements(self.boundary_in[n.name], v.dim()), run_check=False,
                                  shape=v.shape, stride=_contiguous_stride(v.shape))

    def _send(self, n: fx.Node, v):
        if is_dtensor(v):
            v = _redistribute(v, self.mesh, placements(self.boundary_out[n.name], v.dim())).to_local()
        dt = self.boundary_dtype.get(n.name)
        if dt is not None and v.dtype != dt:        # autocast may change it; the pipeline's buffers do not
            v = v.to(dt)
        return v.contiguous()

    # -- one node -----------------------------------------------------------------------------
    def _run(self, n: _Op, env):
        if n.op == "output":
            return _deref(n.args[0], env.__getitem__)
        if n.op == "get_attr":
            name = self._param_name.get(n.name)
            if name is not None:
                return self.param_by_name[name]
            v = _fetch(self.root, str(n.target))
            return v.to(self.device) if isinstance(v, torch.Tensor) and self.device is not None else v
        op = self.ops.get(n.name) if self.mesh is not None else None
        if op is None or n.name not in self._operand_specs:
            args = _deref(n.args, env.__getitem__)
            kwargs = _deref(n.kwargs, env.__getitem__)
            if n.op == "call_module":
                return self._call_module(n, args, kwargs, {})
            return self._call(n, args, kwargs)
        act_specs, param_specs = self._operand_specs[n.name]
        args = _deref(n.args, lambda a: self._operand(a, env, act_specs, param_specs))
        kwargs = _deref(n.kwargs, lambda a: self._operand(a, env, act_specs, param_specs))
        ir_node = self._ir_node[n.name]
        if ir_node.kind == NORM and n.op == "call_module" and self._split_norm(n, args) is not None:
            return self._to_spec(self._sharded_norm(n, args[0], param_specs), op["out_spec"])
        if ir_node.kind == NORM:
            # A norm over a split dim that is not a LayerNorm/RMSNorm module: gather that dim
            # (DTensor's rms_norm cannot run on it, its decomposition adds eps in place to a
            # partial mean).
            k = int(ir_node.attrs.get("normalized_ndim", 1))
            args, kwargs = _map(args, lambda x: _gather_trailing(x, k, self.mesh)), \
                _map(kwargs, lambda x: _gather_trailing(x, k, self.mesh))
            param_specs = {o.param: "R" * len(o.shape) for o in ir_node.operands if o.param}
        elif ir_node.kind == VIEW and op.get("in_specs") and op["in_specs"][0]:
            # A reshape that cannot keep a split (the plan's out_spec drops that mesh axis): gather
            # over that axis first, as the cost model charges. DTensor's own view rule gets some of
            # these wrong (e.g. [b, s, 32] split 4 ways viewed as [b, s, 2, 16]).
            dropped = used_mask(_parse_spec(op["in_specs"][0])) & ~used_mask(_parse_spec(op["out_spec"]))
            if dropped:
                args = _map(args, lambda x: _replicate_axes(x, dropped, self.mesh))
        if ir_node.kind == LOSS and self.loss_axis is not None and n.op == "call_function":
            return self._to_spec(self._vocab_parallel_loss(n, args, kwargs), op["out_spec"])
        if n.name in self._cp:
            return self._to_spec(self._context_parallel_attention(n, args, kwargs, self._cp[n.name]),
                                 op["out_spec"])
        out = self._local_matmul(n, ir_node, args, kwargs, param_specs) if ir_node.kind == MATMUL else None
        if out is None and ir_node.kind == EMBEDDING and self._vocab_split(n, param_specs):
            out = self._vocab_parallel_embedding(n, args, kwargs, param_specs)
        if out is None and n.name in self._fallbacks and torch.compiler.is_compiling():
            # known to have no DTensor rule (a trace cannot try it); eager keeps trying, so that a
            # checkpoint's recomputation takes the forward's path
            out = self._local_fallback(n, args, kwargs, op, None)
        if out is None:
            try:
                out = (self._call_module(n, args, kwargs, param_specs) if n.op == "call_module"
                       else self._call(n, args, kwargs))
            except NotImplementedError as e:
                if "sharding strategy" not in str(e) and "sharding propagation" not in str(e):
                    raise
                out = self._local_fallback(n, args, kwargs, op, e)
        strided = _strided_axes(out)
        if strided and ir_node.kind == VIEW:
            # DTensor keeps a split of an inner dim through a merge as a "strided" shard, whose
            # backward view it then cannot undo: gather those axes and view again.
            out = self._call(n, _map(args, lambda x: _replicate_axes(x, strided, self.mesh)), kwargs)
        return self._to_spec(out, op["out_spec"])

    def _call(self, n, args, kwargs):
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_module":
            return _fetch(self.root, n.target)(*args, **kwargs)
        raise NotAppliableError(f"cannot run fx node {n.name} ({n.op})")

    def _call_module(self, n, args, kwargs, param_specs):
        """A leaf module with this stage's weights (DTensors on a mesh) in place of its own."""
        from torch.distributed.tensor import DTensor
        mod = _fetch(self.root, n.target)
        state = {}
        for pname, p in mod.named_parameters(remove_duplicate=False):
            name = self.canon[id(p)]
            v = self.param_by_name[name]
            spec = param_specs.get(name)
            state[pname] = self._weight(v, spec)
        for bname, b in mod.named_buffers(remove_duplicate=False):
            b = b.to(self.device) if self.device is not None else b
            state[bname] = b if self.mesh is None else DTensor.from_local(b, self.mesh, placements(None, b.dim()),
                                                                          run_check=False)
        return torch.func.functional_call(mod, state, args, kwargs)

    def _operand(self, a: str, env, act_specs, param_specs):
        from torch.distributed.tensor import DTensor
        v = env[a]
        if a in self._ir_node:
            if isinstance(v, (tuple, list)):
                return type(v)(self._layout(x, act_specs.get((a, i))) for i, x in enumerate(v))
            return self._layout(v, act_specs.get((a, 0)))
        name = self._param_name.get(a)
        if name is not None:
            return self._weight(v, param_specs.get(name))
        if isinstance(v, torch.Tensor) and not isinstance(v, DTensor):   # a constant: replicated
            return DTensor.from_local(v, self.mesh, placements(None, v.dim()), run_check=False)
        return v

    def _weight(self, v, spec):
        """A weight in its op's layout. Gathering it (ZeRO-3 stores weights sharded) is redone in
        backward rather than the gathered copy kept: ZeRO-3's memory saving, and the second
        all-gather the cost model charges. (Compiled blocks leave what to keep to the backend's
        partitioner.)"""
        if not spec or not is_dtensor(v):
            return v
        pl = placements(spec, v.dim())
        w = _redistribute(v, self.mesh, pl)
        if (not self._blocks and w is not v and v.requires_grad
                and any(p.is_shard() and q != p for p, q in zip(v.placements, pl))):
            self._gathered[_storage(w)] = (v, pl, w)
        return w

    def _pack(self, t):
        hit = self._gathered.get(_storage(t))
        if hit is None:
            return t
        local = t._local_tensor if is_dtensor(t) else t
        layout = (t.placements, t.shape, t.stride()) if is_dtensor(t) else None
        return _Regather(hit[0], hit[1], local.size(), local.stride(), local.storage_offset(), layout)

    def _unpack(self, saved):
        if not isinstance(saved, _Regather):
            return saved
        from torch.distributed.tensor import DTensor
        with torch.no_grad():
            full = _redistribute(saved.weight.detach(), self.mesh, saved.placements).to_local()
        local = full.as_strided(saved.size, saved.stride, saved.offset)
        if saved.dtensor is None:
            return local
        pl, shape, stride = saved.dtensor
        return DTensor.from_local(local, self.mesh, pl, run_check=False, shape=shape, stride=stride)

    def _layout(self, v, spec):
        if spec is None or not is_dtensor(v):
            return v
        return _redistribute(v, self.mesh, placements(spec, v.dim()))

    def _to_spec(self, out, spec):
        """The op's result in its out_spec; in backward, its gradient (summed over all readers)
        is brought back to that layout before the op's own backward runs: a partial sum is
        reduced there, once, as the cost model prices it (not wherever DTensor would)."""
        if is_dtensor(out):
            if spec == "scalar" and out.dim() != 0:
                return out
            pl = placements(spec, out.dim())
            y = _redistribute(out, self.mesh, pl)
            if not y.requires_grad:
                return y
            if self._blocks:
                # the same as _GradInLayout, in DTensor's own autograd functions (which compile):
                # from_local's backward redistributes the gradient to `pl`
                from torch.distributed.tensor import DTensor
                return DTensor.from_local(y.to_local(grad_placements=pl), self.mesh, pl, run_check=False,
                                          shape=y.shape, stride=y.stride())
            return _GradInLayout.apply(y, self.mesh, pl)
        if isinstance(out, (tuple, list)):
            return type(out)(self._to_spec(x, spec) if is_dtensor(x) and (spec == "scalar") == (x.dim() == 0)
                             and (spec == "scalar" or _ndim(spec) == x.dim()) else x for x in out)
        return out

    # -- norms over a split hidden dim ----------------------------------------------------------
    def _split_norm(self, n, args) -> int | None:
        """The mesh axis splitting a LayerNorm/RMSNorm module's normalised dim, when exactly one
        does (None otherwise)."""
        mod = _fetch(self.root, str(n.target))
        x: Any = args[0] if args else None
        if not isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) or not is_dtensor(x) or len(mod.normalized_shape) != 1:
            return None
        axes = [k for k, p in enumerate(x.placements) if p.is_shard() and p.dim == x.dim() - 1]
        return axes[0] if len(axes) == 1 and not any(p.is_partial() for p in x.placements) else None

    def _sharded_norm(self, n, x, param_specs):
        """LayerNorm / RMSNorm with the hidden dim split over one mesh axis, as the cost model
        prices it: each device sums its part of every row, and one all-reduce of the row
        statistics (sum and sum of squares, fp32) gives mean and variance; the backward does the
        same with its two row sums."""
        from torch.distributed.tensor import DTensor, Partial
        mod = _fetch(self.root, str(n.target))
        axis = self._split_norm(n, [x])
        weights = []
        for t in (mod.weight, getattr(mod, "bias", None)):
            if t is None:
                weights.append(None)
                continue
            name = self.canon[id(t)]
            weights.append(self._weight(self.param_by_name[name], param_specs.get(name)))

        def local(v):
            # a weight's gradient is a partial sum over the axes splitting the rows
            g = [Partial() if p.is_shard() and p.dim < x.dim() - 1 else q for p, q in zip(x.placements, v.placements)]
            return v.to_local(grad_placements=g)

        lw, lb = (local(w) if w is not None else None for w in weights)
        y = _NormStatsAllReduce.apply(x.to_local(grad_placements=x.placements), lw, lb, self.mesh, axis,
                                      mod.normalized_shape[0], mod.eps if mod.eps is not None else
                                      torch.finfo(x.dtype).eps, isinstance(mod, nn.LayerNorm))
        return DTensor.from_local(y, self.mesh, x.placements, run_check=False, shape=x.shape,
                                  stride=_contiguous_stride(x.shape))

    # -- matmuls as the strategy says ------------------------------------------------------------
    def _local_matmul(self, n, ir_node, args, kwargs, param_specs):
        """A matmul-like op computed shard by shard, exactly as its strategy reads: mesh axis k
        splits one index letter in every operand that has it; each device multiplies its shards;
        the result is split where the letter is an output letter and a partial sum where it is
        contracted. (DTensor's own einsum reshapes through "strided" shards whose backward it
        cannot run, e.g. an MoE combine with the experts split over both axes.) None when the op
        is not one of linear / matmul / bmm / einsum in a form read here."""
        import torch.nn.functional as F
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
        eq = ir_node.attrs.get("equation")
        kind = ir_node.op
        bias = None
        if not eq or kind not in ("linear", "matmul", "bmm", "einsum"):
            return None
        if kind == "linear":
            if n.op == "call_module":
                mod = _fetch(self.root, n.target)
                ws = []
                for t in (mod.weight, mod.bias):
                    if t is None:
                        ws.append(None)
                        continue
                    name = self.canon[id(t)]
                    v, spec = self.param_by_name[name], param_specs.get(name)
                    ws.append(self._weight(v, spec))
                operands, bias = [args[0], ws[0]], ws[1]
            else:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                operands = [args[0], args[1] if len(args) > 1 else kwargs.get("weight")]
        elif kind == "einsum":
            rest = args[1:]
            operands = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        else:
            operands = list(args[:2])
        if not all(isinstance(x, DTensor) for x in operands) or (bias is not None and not isinstance(bias, DTensor)):
            return None
        ins, out = eq.split("->")
        terms = ins.split(",")
        if len(terms) != len(operands) or any(len(t) != x.dim() for t, x in zip(terms, operands)):
            return None
        axis_letter: dict[int, str] = {}
        for t, x in zip(terms, operands):
            for k, p in enumerate(x.placements):
                if p.is_shard():
                    if axis_letter.setdefault(k, t[p.dim]) != t[p.dim]:
                        return None
                elif not p.is_replicate():
                    return None
        for t, x in zip(terms, operands):             # a split letter must be split in every operand
            for k, c in axis_letter.items():
                if c in t and not (x.placements[k].is_shard() and t[x.placements[k].dim] == c):
                    return None
        out_pl, partial_axes = [], []
        for k in range(self.mesh.ndim):
            c = axis_letter.get(k)
            if c is None:
                out_pl.append(Replicate())
            elif c in out:
                out_pl.append(Shard(out.index(c)))
            else:
                out_pl.append(Partial())
                partial_axes.append(k)
        if bias is not None and any(not p.is_replicate() and not (p.is_shard() and out[-1] == axis_letter.get(k))
                                    for k, p in enumerate(bias.placements)):
            return None

        def local(x):
            # each device's part of this operand's gradient: a partial sum over the axes that
            # split letters it does not have
            g = [p if p.is_shard() else (Partial() if k in axis_letter else Replicate())
                 for k, p in enumerate(x.placements)]
            return x.to_local(grad_placements=g)

        ls = [local(x) for x in operands]
        if kind == "linear":
            y = F.linear(ls[0], ls[1])
        elif kind == "einsum":
            y = torch.einsum(args[0], *ls)
        elif kind == "bmm":
            y = torch.bmm(ls[0], ls[1])
        else:
            y = torch.matmul(ls[0], ls[1])
        out_spec = placements(self.ops[n.name]["out_spec"], len(out))
        # With the output all-reduced over the partial axes (not reduce-scattered), the bias is
        # added after the reduction: its gradient is then whole on every device, as priced.
        bias_after = bias is not None and partial_axes and all(out_spec[k].is_replicate() for k in partial_axes)
        if bias is not None and not bias_after:
            lb = local(bias)
            if partial_axes:              # add the bias once across the partial-sum axes
                coord = self.mesh.get_coordinate()
                lb = lb * float(all(coord[k] == 0 for k in partial_axes))
            y = y + lb
        shape = self._shape[n.name]
        result = DTensor.from_local(y, self.mesh, out_pl, run_check=False, shape=shape,
                                    stride=_contiguous_stride(shape))
        if bias_after:
            result = _redistribute(result, self.mesh, out_spec) + bias
        return result

    # -- embedding with the vocabulary split ----------------------------------------------------
    def _embedding_operands(self, n, args, kwargs, param_specs):
        """(ids, weight) of an embedding node, the weight laid out as the op's spec says."""
        if n.op == "call_module":
            mod = _fetch(self.root, n.target)
            if (getattr(mod, "padding_idx", None) is not None or getattr(mod, "max_norm", None) is not None
                    or getattr(mod, "sparse", False) or getattr(mod, "scale_grad_by_freq", False)):
                raise NotAppliableError(f"op {n.name}: a vocab-split embedding with padding_idx/max_norm/sparse/"
                                        "scale_grad_by_freq is not supported")
            name = self.canon[id(mod.weight)]
            w = self.param_by_name[name]
            spec = param_specs.get(name)
            return args[0], self._weight(w, spec)
        extra = list(args[2:]) + [v for k, v in kwargs.items() if k not in ("input", "weight")]
        if any(v not in (None, False, 2.0) for v in extra):
            raise NotAppliableError(f"op {n.name}: a vocab-split embedding with padding_idx/max_norm/sparse "
                                    "is not supported")
        ids = args[0] if args else kwargs["input"]
        w = args[1] if len(args) > 1 else kwargs["weight"]
        if w.is_floating_point() is False:          # aten.embedding(weight, ids) order
            ids, w = w, ids
        return ids, w

    def _vocab_split(self, n, param_specs) -> bool:
        operands = self._ir_node[n.name].operands
        w = operands[1] if len(operands) > 1 else None
        spec = param_specs.get(w.param) if w is not None and w.param else None
        return spec is not None and bool(spec) and _parse_spec(spec)[0] != 0

    def _vocab_parallel_embedding(self, n, args, kwargs, param_specs):
        """Megatron's vocab-parallel lookup: each device looks up the ids that fall in its rows and
        zeros the rest; the output is a partial sum over the vocab-split mesh axes. (DTensor's
        own rule tracks a mask buffer that breaks when both mesh axes split the vocabulary.)"""
        import torch.nn.functional as F
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
        ids, w = self._embedding_operands(n, args, kwargs, param_specs)
        coord = self.mesh.get_coordinate()
        start, size = 0, w.shape[0]
        out_pl = []
        for k, (pi, pw) in enumerate(zip(ids.placements, w.placements)):
            if pi.is_shard() and pw.is_shard():
                raise NotAppliableError(f"op {n.name}: mesh axis {k} splits both the ids and the table")
            if pw.is_shard(0):
                chunk = -(-size // self.mesh.size(k))
                lo = min(size, coord[k] * chunk)
                start, size = start + lo, min(size, lo + chunk) - lo
                out_pl.append(Partial())
            elif pw.is_shard(1):
                out_pl.append(Shard(ids.dim()))
            else:
                out_pl.append(pi if pi.is_shard() else Replicate())
        # Where the ids are split, each device's table gradient covers only its ids: a partial sum.
        grad_pl = [Partial() if pi.is_shard() else pw for pi, pw in zip(ids.placements, w.placements)]
        li, lw = ids.to_local(), w.to_local(grad_placements=grad_pl)
        miss = (li < start) | (li >= start + lw.shape[0])
        out = F.embedding((li - start).masked_fill(miss, 0), lw).masked_fill(miss.unsqueeze(-1), 0.0)
        shape = tuple(ids.shape) + (w.shape[1],)
        return DTensor.from_local(out, self.mesh, out_pl, run_check=False, shape=torch.Size(shape),
                                  stride=_contiguous_stride(shape))

    def _vocab_parallel_loss(self, n, args, kwargs):
        """The cross-entropy of logits split over the vocabulary on one mesh axis, on that axis's
        1-D mesh under loss_parallel (entered by ParallelModel for forward and backward; its mean
        needs a 1-D mesh): rows are replicated over the other axes, so every rank's loss is the
        whole loss."""
        from torch.distributed.tensor import DTensor, Replicate, Shard
        assert self.mesh is not None and self.loss_axis is not None
        sub = self._loss_mesh
        x, t = args[0], args[1]
        xd = DTensor.from_local(x.to_local(), sub, [Shard(x.dim() - 1)], run_check=False, shape=x.shape,
                                stride=x.stride())
        td = DTensor.from_local(t.to_local() if is_dtensor(t) else t, sub, [Replicate()], run_check=False)
        loss = n.target(xd, td, *args[2:], **kwargs)
        return DTensor.from_local(loss.to_local(), self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)

    def _local_fallback(self, n, args, kwargs, op, err):
        """An op DTensor has no rule for (sdpa on CPU): run it on the local shards, which is exact
        when every split is along dims the op treats independently (batch and heads of
        attention; identical layouts of an elementwise op's operands)."""
        from torch.distributed.tensor import DTensor
        ir_node = self._ir_node[n.name]
        dts = [x for x in _flat(args) + _flat(kwargs) if isinstance(x, DTensor)]
        specs = {tuple(x.placements) for x in dts}
        ok = False
        if ir_node.kind == ATTENTION:
            # q, k, v split alike over batch and heads; with grouped-query attention k/v have fewer
            # heads, and splitting both head dims into the same number of blocks keeps each query
            # head's k/v head on its device.
            ok = all(x.dim() == 4 and all(not p.is_shard() or p.dim in (0, 1) for p in x.placements)
                     for x in dts) and len(specs) == 1 and len({x.shape[0] for x in dts}) == 1
        elif ir_node.kind == ELEMENTWISE:
            ok = len(specs) == 1 and len({tuple(x.shape) for x in dts}) == 1
        if not ok:
            assert err is not None          # (an op that ran here once is run here again)
            raise NotAppliableError(
                f"op {n.name} ({ir_node.op}, strategy {op.get('strategy')!r}, in_specs {op.get('in_specs')}): "
                f"DTensor has no sharding rule for it ({str(err).splitlines()[0]}) and its layout is not "
                "one this runtime can run shard-locally") from err
        if not torch.compiler.is_compiling():      # (a checkpoint's trace takes no side effects)
            self._fallbacks.add(n.name)
        local = lambda x: x.to_local() if isinstance(x, DTensor) else x     # noqa: E731
        out = self._call(n, _map(args, local), _map(kwargs, local))
        shape = self._shape[n.name]
        return DTensor.from_local(out, self.mesh, dts[0].placements, run_check=False, shape=shape,
                                  stride=_contiguous_stride(shape))

    # -- context parallelism ---------------------------------------------------------------------
    def _context_parallel_attention(self, n, args, kwargs, s_mask: int):
        """Attention of this rank's chunk of queries against every key: K and V are all-gathered
        over the sequence axes (`s_mask`), the causal mask is built from the chunk's global
        positions, and the gradients of K and V, partial sums over those axes (each rank's
        queries contribute), are reduce-scattered back to their chunks. The same numbers as one
        device. Chunks are contiguous (DTensor's Shard), not the load-balanced order the
        engines would use, and the exchange is the all-gather one whatever the strategy names
        (a ring passes the same blocks in n-1 steps): the op-by-op program is the runtime's
        reference path, not its fast one."""
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
        op = self.ops[n.name]
        q, k, v = args[:3]
        extra = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), args[3:]))
        extra.update(kwargs)
        if not all(isinstance(x, DTensor) for x in (q, k, v)):
            raise NotAppliableError(f"op {n.name}: context-parallel attention needs q, k, v on the mesh")
        if extra.get("attn_mask") is not None or extra.get("dropout_p", 0.0):
            raise NotAppliableError(f"op {n.name} (strategy {op.get('strategy')!r}): context-parallel attention "
                                    "with an explicit attn_mask or dropout is not run by this runtime")
        axes = [a for a in range(self.mesh.ndim) if s_mask >> a & 1]
        if any(q.placements[a] != Shard(2) for a in axes):
            raise NotAppliableError(f"op {n.name} (strategy {op.get('strategy')!r}, in_specs {op.get('in_specs')}): "
                                    "the queries are not split over the sequence on the strategy's axes")
        whole = tuple(Replicate() if a in axes else p for a, p in enumerate(k.placements))
        partial = tuple(Partial() if a in axes else p for a, p in enumerate(k.placements))
        kl = _redistribute(k, self.mesh, whole).to_local(grad_placements=partial)
        vl = _redistribute(v, self.mesh, tuple(Replicate() if a in axes else p for a, p in enumerate(v.placements)))
        vl = vl.to_local(grad_placements=tuple(Partial() if a in axes else p for a, p in enumerate(v.placements)))
        ql = q.to_local()
        seq, chunk = k.shape[2], ql.shape[2]
        coord = self.mesh.get_coordinate()
        index = 0
        for a in axes:                         # DTensor splits a dim over its axes in mesh order
            index = index * self.mesh.size(a) + coord[a]
        causal = bool(extra.pop("is_causal", False))
        extra.pop("attn_mask", None)
        if causal:
            qpos = torch.arange(index * chunk, (index + 1) * chunk, device=ql.device)
            extra["attn_mask"] = qpos[:, None] >= torch.arange(seq, device=ql.device)[None, :]
        out = torch.nn.functional.scaled_dot_product_attention(ql, kl, vl, **extra)
        shape = self._shape[n.name]
        return DTensor.from_local(out, self.mesh, q.placements, run_check=False, shape=shape,
                                  stride=_contiguous_stride(shape))

    # -- activation recomputation ---------------------------------------------------------------
    def _plan_segments(self):
        """[("run", nodes) | ("ckpt", nodes)]: full recomputation checkpoints each layer (or
        each below recompute_below_layer, the rest running as they are); selective checkpoints
        each op that makes [.., s, s] attention scores."""
        nodes = self.prog.nodes
        if self.recompute == "none":
            return [("run", nodes)]
        segs: list[tuple[str, list]] = []
        if self.recompute == "full":
            below = self.recompute_below_layer

            def kind(li: int | None) -> str:
                # fx helpers before the stage's first IR node belong to its first layer
                return "ckpt" if below is None or li is None or li < below else "run"

            cur, cur_layer = [], None
            for n in nodes:
                li = self.prog.layer_of.get(n.name, cur_layer)
                if cur and li != cur_layer:
                    segs.append((kind(cur_layer), cur))
                    cur = []
                cur_layer = li
                cur.append(n)
            if cur:
                segs.append((kind(cur_layer), cur))
            return segs
        seq = self.ir.seq
        for n in nodes:
            shape = getattr(self.values.get(n), "shape", ())
            core = n.name in self.ir and len(shape) >= 3 and seq > 1 and shape[-1] == seq and shape[-2] == seq
            if core and self.ir.node(n.name).kind != INPUT:
                segs.append(("ckpt", [n]))
            elif segs and segs[-1][0] == "run":
                segs[-1][1].append(n)
            else:
                segs.append(("run", [n]))
        return segs

    def _run_checkpointed(self, nodes, env):
        from torch.utils.checkpoint import checkpoint
        inside = {n.name for n in nodes}
        outs = {n.name for n in self.prog.outputs}
        later = [n.name for n in nodes if n.name in outs or any(u not in inside for u in n.users)]

        # what the segment reads, taken now: the recomputation runs after env has dropped it
        inputs = {a: env[a] for n in nodes for a in n.inputs if a not in inside}

        def seg():
            local = dict(inputs)
            for n in nodes:
                local[n.name] = self._run(n, local)
            return tuple(local[n] for n in later)

        outs = checkpoint(seg, use_reentrant=False)
        for n, v in zip(later, outs):
            env[n] = v


class CompiledBlock:
    """One layer's nodes of a StageModule as one torch.compile'd region: dynamo traces the
    interpreter (StageModule._run) over the block, so the graph holds the block's local ops and
    the functional collectives of the redistributions the plan asks for, and the backend
    (Inductor; AUTOPAR_COMPILE_BACKEND overrides it) compiles it with its backward. The numbers
    are the interpreter's. A block that cannot be compiled runs op by op, with a warning that
    names the block and the op being traced when it failed."""

    def __init__(self, stage: StageModule, index: int, layer: int | None, nodes: list[str],
                 inputs: list[str], outputs: list[str], segs: list[tuple[str, list[_Op]]]):
        self.stage = stage
        self.index, self.layer, self.nodes = index, layer, nodes
        self.inputs, self.outputs, self.segs = inputs, outputs, segs
        # A layer recomputed whole (recompute "full") is checkpointed around its compiled code.
        self.recomputed = all(kind == "ckpt" for kind, _ in segs)
        self.traced_segs = [("run", [n for _, ns in segs for n in ns])] if self.recomputed else segs
        self.free_after: list[str] = []
        self.compiled: Any = None
        self.eager = False              # compiling failed: run op by op
        self.checked = False            # the second call compiled it
        self.warm = False               # the first call ran op by op: it finds the ops DTensor has no
        #                                 rule for (StageModule._fallbacks), which tracing cannot try

    def run(self, *vals):
        env = dict(zip(self.inputs, vals))
        self.stage._run_nodes(self.segs, env)
        return tuple(env[n] for n in self.outputs)

    def traced(self, *vals):
        env = dict(zip(self.inputs, vals))
        self.stage._run_nodes(self.traced_segs, env)
        return tuple(env[n] for n in self.outputs)

    def _compiled_call(self, *vals):
        if not self.recomputed:
            return self.compiled(*vals)
        from torch.utils.checkpoint import checkpoint
        return checkpoint(self.compiled, *vals, use_reentrant=False)

    def __call__(self, *vals):
        if self.eager:
            return self.run(*vals)
        if self.checked:
            from torch._dynamo.exc import TorchDynamoException
            try:
                return self._compiled_call(*vals)
            except TorchDynamoException as e:    # a later call that must recompile and cannot
                self.eager = True
                warnings.warn(self.failure(e), stacklevel=2)
                return self.run(*vals)
        if not self.warm:
            self.warm = True
            if not self.recomputed and any(kind == "ckpt" for kind, _ in self.segs):
                # a checkpoint inside the traced region failed in its backward (torch 2.13, DTensor)
                self.eager = True
                warnings.warn(f"autopar.runtime: {self.what()} recomputes some of its ops (selective recomputation), "
                              "which compiled blocks do not do; this block runs op by op on DTensors (slow)",
                              stacklevel=2)
            return self.run(*vals)
        _allow_recompiles_for_another_block()
        self.compiled = torch.compile(_own_code(self.traced, f"autopar_block_{self.index}"), backend=compile_backend(),
                                      fullgraph=True, dynamic=False)
        from torch._dynamo.exc import TorchDynamoException
        _TRACING[0] = None
        try:
            with _backward_compiled_now():
                out = self._compiled_call(*vals)
        except TorchDynamoException as e:
            self.eager = True
            warnings.warn(self.failure(e), stacklevel=2)
            return self.run(*vals)
        self.checked = True
        return out

    def what(self) -> str:
        return f"block {self.index} (layer {self.layer}, ops {self.nodes[0]} .. {self.nodes[-1]})"

    def failure(self, err: BaseException) -> str:
        from torch._dynamo.exc import BackendCompilerFailed
        what = self.what()
        first = next((x for x in str(err).splitlines() if x.strip()), type(err).__name__)
        if isinstance(err, BackendCompilerFailed):
            where = f"the {compile_backend()} backend failed on it"
        else:
            where = f"tracing op {_TRACING[0]} failed"
        return (f"autopar.runtime: torch.compile of {what}: {where} ({type(err).__name__}: {first[:300]}); "
                "this block runs op by op on DTensors (slow)")


def _backward_compiled_now():
    """Inductor lowers the backward graph at the first backward unless told to now: a failure
    there would stop the run in its backward instead of falling back here. (A setting of recent
    torch: a no-op where it is missing.)"""
    import contextlib

    import torch._functorch.config as aot_config
    if hasattr(aot_config, "force_non_lazy_backward_lowering"):
        return aot_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def compile_backend() -> str:
    """torch.compile's backend for compiled blocks: Inductor, or AUTOPAR_COMPILE_BACKEND (e.g.
    "aot_eager": the same traced joint graph run by eager kernels, which the CPU tests use to
    check its numbers without a C++ build per block)."""
    return os.environ.get("AUTOPAR_COMPILE_BACKEND", "inductor")


def default_program_compile(mesh, device: torch.device) -> bool:
    """Compile a sharded stage program by default on CUDA, where eager DTensor dispatch is
    host-bound (as engines.default_compile); on CPU the gloo checks run it op by op."""
    return mesh is not None and device.type == "cuda"


# the op being traced, set at trace time (a constant-result call runs while dynamo traces)
_TRACING: list[str | None] = [None]


@torch.compiler.assume_constant_result
def _trace_mark(name: str) -> int:
    _TRACING[0] = name
    return 0


_BLOCKS_COMPILED = [0]


def _allow_recompiles_for_another_block() -> None:
    """Raise dynamo's per-code recompile limit to the number of blocks compiled so far (plus its
    default). torch 2.11 compiles every block in one wrapper frame (external_utils.inner, guarded
    on the block's code object), so each block counts as a recompile of that frame: with its
    default limit of 8, the ninth block failed (gpt-1.3b, 2 H200s). Each block is a graph of its
    own, not a recompile caused by changing inputs."""
    import torch._dynamo.config as dynamo_config
    _BLOCKS_COMPILED[0] += 1
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), _BLOCKS_COMPILED[0] + 8))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                        _BLOCKS_COMPILED[0] + 256)


def _own_code(fn, name: str):
    """A function calling fn with a code object of its own: dynamo keys its cache by code object,
    so every block keeps its compiled graph (one shared code would recompile per block and hit
    the recompile limit)."""
    ns: dict[str, Any] = {"fn": fn}
    exec(f"def {name}(*vals):\n    return fn(*vals)\n", ns)      # noqa: S102 - a fixed one-line trampoline
    return ns[name]


@torch.compiler.assume_constant_result
def _mesh_dims(spec: str | None, ndim: int) -> tuple:
    return tuple(p.dim if p.is_shard() else None for p in layout.placements(spec, ndim))


def placements(spec: str | None, ndim: int):
    """layout.placements, computed outside dynamo's trace (it parses the spec with a regex)."""
    from torch.distributed.tensor import Replicate, Shard
    return tuple(Replicate() if d is None else Shard(d) for d in _mesh_dims(spec, ndim))


@torch.compiler.assume_constant_result
def _parse_spec(spec: str) -> tuple:
    return parse_spec(spec)


class _Ref:
    """An fx node read by an op, by name."""

    def __init__(self, name: str):
        self.name = name


class _Op:
    """What the interpreter reads of an fx node, in plain Python (dynamo does not trace torch.fx):
    its arguments with each node read replaced by a _Ref."""

    def __init__(self, n: fx.Node):
        self.name, self.op, self.target = n.name, n.op, n.target
        self.args, self.kwargs = _refs(n.args), _refs(n.kwargs)
        self.inputs = tuple(a.name for a in n.all_input_nodes)
        self.users = tuple(u.name for u in n.users)


def _refs(x):
    if isinstance(x, fx.Node):
        return _Ref(x.name)
    if isinstance(x, (tuple, list)):
        return (tuple if isinstance(x, tuple) else list)(_refs(v) for v in x)
    if isinstance(x, dict):
        return {k: _refs(v) for k, v in x.items()}
    if isinstance(x, slice):
        return slice(_refs(x.start), _refs(x.stop), _refs(x.step))
    return x


def _deref(x, f):
    """x with each _Ref replaced by f(its name)."""
    if isinstance(x, _Ref):
        return f(x.name)
    if isinstance(x, (tuple, list)):
        return (tuple if isinstance(x, tuple) else list)(_deref(v, f) for v in x)
    if isinstance(x, dict):
        return {k: _deref(v, f) for k, v in x.items()}
    if isinstance(x, slice):
        return slice(_deref(x.start, f), _deref(x.stop, f), _deref(x.step, f))
    return x


@dataclass(frozen=True)
class _Regather:
    """What autograd keeps of a gathered weight: the stored (sharded) weight, and the view of
    the gathered one that was saved."""

    weight: Any
    placements: tuple
    size: tuple
    stride: tuple
    offset: int
    dtensor: tuple | None            # (placements, shape, stride) when a DTensor was saved


def context_parallel_axes(ops: dict[str, dict], ir: OpGraph) -> dict[str, int]:
    """Attention op -> the mesh axes (bit k for axis k) its strategy splits the sequence over
    ("+cp:ring" / "+cp:allgather", sharding.rules.attention.cp_of); NotAppliableError for a
    strategy name that splits the sequence without a known exchange."""
    from autopar.sharding.rules.attention import cp_of
    out = {}
    for name, op in ops.items():
        if name not in ir or ir.node(name).kind != ATTENTION:
            continue
        strategy = op.get("strategy") or ""
        try:
            found = cp_of(strategy)
        except ValueError as e:
            raise NotAppliableError(f"op {name}: {e}") from None
        if found is None and any(t.strip().startswith("s@") for t in strategy.split("+")[0].split(",")):
            raise NotAppliableError(f"op {name}: attention strategy {strategy!r} splits the sequence but names no "
                                    "K/V exchange (+cp:ring or +cp:allgather)")
        if found is not None:
            out[name] = found[0]
    return out


def vocab_split_loss_axis(ops: list[dict], ir: OpGraph) -> int | None:
    """The mesh axis that splits the class dim (the last) of the stage's cross-entropy logits,
    when it is one axis and no axis splits another dim: the layout torch's loss_parallel
    computes without gathering the logits (Megatron's vocab-parallel loss); else None."""
    for o in ops:
        if o["name"] in ir and ir.node(o["name"]).kind == LOSS and o.get("in_specs") and o["in_specs"][0]:
            masks = parse_spec(o["in_specs"][0])
            if masks[-1] in (1, 2) and not any(masks[:-1]):
                return masks[-1].bit_length() - 1
    return None


def _storage(t) -> int:
    local = t._local_tensor if is_dtensor(t) else t
    return local.untyped_storage().data_ptr() if isinstance(local, torch.Tensor) else -1


def _strided_axes(out) -> int:
    """Mask of the mesh axes on which a DTensor result (or any in a tuple) is a strided shard."""
    mask = 0
    for x in _flat(out) if isinstance(out, (tuple, list)) else [out]:
        if is_dtensor(x):
            for k, p in enumerate(x.placements):
                if type(p).__name__ == "_StridedShard":
                    mask |= 1 << k
    return mask


def _replicate_axes(x, mask: int, mesh):
    """x replicated over the mesh axes in `mask` (bit k: axis k)."""
    if not is_dtensor(x):
        return x
    pl = tuple(placements(None, 0)[0] if mask & (1 << k) and p.is_shard() else p for k, p in enumerate(x.placements))
    return _redistribute(x, mesh, pl)


def _gather_trailing(x, k: int, mesh):
    """x with its last k dims whole (other splits kept)."""
    if not is_dtensor(x) or x.dim() == 0:
        return x
    pl = tuple(placements(None, 0)[0] if p.is_shard() and p.dim >= x.dim() - k else p for p in x.placements)
    return _redistribute(x, mesh, pl)


def _redistribute(v, mesh, pl):
    """DTensor redistribute, with contiguous tensors on both sides of it. torch 2.13's
    redistribute of a transposed DTensor can hand back gradients whose local strides disagree
    with their global ones, and a `view` backward upstream then fails ("view size is not
    compatible with input tensor's size and stride")."""
    if tuple(v.placements) == tuple(pl):
        return v
    if torch.compiler.is_compiling():
        # (traced, _ContiguousGrad's DTensor gradient came out doubled: gpt tp2, compiled blocks)
        return v.redistribute(mesh, pl)
    return _ContiguousGrad.apply(v.contiguous()).redistribute(mesh, pl)


class _NormStatsAllReduce(torch.autograd.Function):
    """y = (x - mean) * rstd * w + b over a last dim split across `axis` of the mesh (RMSNorm:
    no mean, no b): one all-reduce of two fp32 row statistics forward, one of two row sums
    backward."""

    @staticmethod
    def forward(ctx, x, w, b, mesh, axis, n, eps, center):
        from torch.distributed._functional_collectives import all_reduce
        xf = x.float()
        stats = torch.stack([xf.sum(-1), (xf * xf).sum(-1)], -1)
        stats = all_reduce(stats, "sum", (mesh, axis)).wait()
        mean = stats[..., 0:1] / n if center else torch.zeros_like(stats[..., 0:1])
        var = stats[..., 1:2] / n - mean * mean
        rstd = torch.rsqrt(var + eps)
        xhat = (xf - mean) * rstd
        ctx.save_for_backward(xhat, rstd, w)
        ctx.mesh, ctx.axis, ctx.n, ctx.center, ctx.has_b = mesh, axis, n, center, b is not None
        y = xhat * w if w is not None else xhat
        return (y + b if b is not None else y).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        from torch.distributed._functional_collectives import all_reduce
        xhat, rstd, w = ctx.saved_tensors
        gf = gy.float()
        g = gf * w if w is not None else gf
        sums = torch.stack([g.sum(-1), (g * xhat).sum(-1)], -1)
        sums = all_reduce(sums, "sum", (ctx.mesh, ctx.axis)).wait()
        mean_g = sums[..., 0:1] / ctx.n if ctx.center else 0.0
        dx = rstd * (g - mean_g - xhat * sums[..., 1:2] / ctx.n)
        rows = tuple(range(gy.dim() - 1))
        dw = (gf * xhat).sum(rows).to(w.dtype) if w is not None else None
        db = gf.sum(rows).to(gy.dtype) if ctx.has_b else None
        return dx.to(gy.dtype), dw, db, None, None, None, None, None


class _GradInLayout(torch.autograd.Function):
    """Identity; its backward redistributes the gradient to the forward value's placements."""

    @staticmethod
    def forward(ctx, x, mesh, pl):
        ctx.mesh, ctx.pl = mesh, pl
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if is_dtensor(g) and tuple(g.placements) != tuple(ctx.pl):
            g = _redistribute(g, ctx.mesh, ctx.pl)
        return g, None, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity; its backward makes the gradient contiguous, locally and globally alike."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        from torch.distributed.tensor import DTensor
        if isinstance(g, DTensor):
            return DTensor.from_local(g.to_local().contiguous(), g.device_mesh, g.placements, run_check=False,
                                      shape=g.shape, stride=_contiguous_stride(g.shape))
        return g.contiguous()


def _compile(prog: StageProgram, root: nn.Module) -> fx.GraphModule:
    """The stage as a GraphModule over `root`'s own modules and weights: positional inputs are the
    received tensors, then the graph inputs the stage reads; it returns the tuple of tensors to
    send, or the loss."""
    g = fx.Graph()
    remap: dict[fx.Node, Any] = {}
    for n in list(prog.inputs) + list(prog.data):
        remap[n] = g.placeholder(n.name)
    for n in prog.nodes:
        if n.op == "output":
            remap[n] = fx.node.map_arg(n.args[0], remap.__getitem__)
            continue
        remap[n] = g.node_copy(n, remap.__getitem__)
    outs = prog.outputs
    g.output(remap[outs[0]] if outs[0].op == "output" else tuple(remap[n] for n in outs))
    return fx.GraphModule(root, g)


def _operand_specs(ir: OpGraph, name: str, op: dict):
    node = ir.node(name)
    specs = op.get("in_specs") or []
    acts: dict[tuple[str, int], str] = {}
    params: dict[str, str] = {}
    for o, spec in zip(node.operands, specs):
        if spec is None:
            continue
        if o.source is not None:
            acts.setdefault((o.source, o.source_index), spec)
        elif o.param is not None:
            params.setdefault(o.param, spec)
    return acts, params


def _key(name: str) -> str:
    return name.replace(".", "__")


def _ndim(spec: str) -> int:
    return len(_parse_spec(spec))


def _flat(x) -> list:
    if isinstance(x, (tuple, list)):
        return [y for v in x for y in _flat(v)]
    if isinstance(x, dict):
        return [y for v in x.values() for y in _flat(v)]
    return [x]


def _map(x, f):
    if isinstance(x, (tuple, list)):
        return type(x)(_map(v, f) for v in x)
    if isinstance(x, dict):
        return {k: _map(v, f) for k, v in x.items()}
    return f(x)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(tuple(shape)):
        stride.append(acc)
        acc *= int(d)
    return tuple(reversed(stride))
