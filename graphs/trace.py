"""trace(): an nn.Module / fx.GraphModule / ExportedProgram -> OpGraph.

Tracing never touches real weights: `torch.fx.symbolic_trace` records the program, then every
node is run once on meta tensors (shape propagation; a model built on the meta device runs as
is, a model with real weights runs through `torch.func.functional_call` with meta copies of
its state). Where symbolic tracing or shape propagation fails (HuggingFace models, shape-
dependent python control flow) `torch.export.export(strict=False)` is tried on meta inputs,
and its aten graph goes through the same lowering (graphs/lower.py).
"""

from __future__ import annotations

import inspect
import os
import traceback
from typing import Any

import torch
import torch.fx as fx

from .errors import TraceError
from .ir import OpGraph
from .lower import TracedProgram, dtype_name, lower
from .query import mark_fused_projections

_TORCH_DIR = os.path.dirname(torch.__file__)
_GRAPHS_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP_DIRS = (_TORCH_DIR, os.path.dirname(inspect.__file__))
_ZOO_DIR = os.path.join(_GRAPHS_DIR, "zoo")


def _user_frame(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(_SKIP_DIRS) or "<eval_with_key>" in filename:
        return False
    return not path.startswith(_GRAPHS_DIR) or path.startswith(_ZOO_DIR)


def trace(module, example_inputs: Any = (), name: str | None = None, dtype: str | None = "bf16",
          *, kwargs: dict | None = None, batch: int | None = None, seq: int | None = None,
          meta: dict | None = None, n_layers: int | None = None,
          method: str = "auto") -> OpGraph:
    """Trace `module` on `example_inputs` (tensors of any device: only shapes and dtypes are
    used) into an annotated, layered OpGraph.

    module: nn.Module, torch.fx.GraphModule, or torch.export.ExportedProgram.
    dtype: the training dtype every tensor of the model's own float dtype is costed in
        (None keeps the traced dtypes).
    method: "auto" (symbolic_trace, then torch.export), "symbolic" or "export".
    n_layers: number of op clusters for graphs without transformer blocks (default 8).
    """
    if method not in ("auto", "symbolic", "export"):
        raise TraceError(f"method must be 'auto', 'symbolic' or 'export', got {method!r}")
    if dtype is not None:
        from .ir import dtype_bytes
        dtype_bytes(dtype)   # validates the name
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else ())
    kwargs = dict(kwargs or {})
    if isinstance(example_inputs, dict):
        kwargs.update(example_inputs)

    if isinstance(module, torch.export.ExportedProgram):
        prog = from_export(module)
        label = type(module.module()).__name__
    elif isinstance(module, torch.nn.Module):
        label = type(module).__name__
        prog = _trace_module(module, args, kwargs, method, label)
    else:
        raise TraceError(f"cannot trace a {type(module).__name__}: pass an nn.Module, a "
                         "torch.fx.GraphModule or a torch.export.ExportedProgram")

    b, s = _batch_seq(prog)
    graph = OpGraph(name or label, batch=batch if batch is not None else b,
                    seq=seq if seq is not None else s, meta=meta)
    graph.meta.setdefault("dtype", dtype or dtype_name(prog.model_dtype))
    graph.meta.setdefault("trace_method", prog.method)
    lower(prog, graph, dtype)
    mark_fused_projections(graph)

    from .layers import assign_layers
    assign_layers(graph, n_layers=n_layers)
    return graph


# ---------------------------------------------------------------------------------------

def _trace_module(module, args, kwargs, method, label) -> TracedProgram:
    symbolic_error: str | None = None
    if method in ("auto", "symbolic"):
        try:
            return symbolic(module, args, kwargs)
        except _Failure as e:
            symbolic_error = str(e)
            if method == "symbolic":
                raise TraceError(f"cannot trace {label}: {symbolic_error}. Try "
                                 "method='export' (torch.export.export, strict=False).") from e
    try:
        return export(module, args, kwargs)
    except Exception as e:  # noqa: BLE001 - any export failure becomes one clear message
        export_error = f"torch.export.export(strict=False) stopped {_where_exc(e)}"
        parts = [f"cannot trace {label}"]
        if symbolic_error:
            parts.append(symbolic_error)
        parts.append(export_error)
        raise TraceError(
            "; ".join(parts) + ". Make that code traceable (no python control flow on tensor "
            "values: use torch.where / torch.cond; keep shapes static), or export the model "
            "yourself with torch.export.export(model, example_inputs, strict=False) and pass "
            "the ExportedProgram to trace().") from e


class _Failure(Exception):
    pass


def symbolic(module: torch.nn.Module, args: tuple, kwargs: dict) -> TracedProgram:
    """symbolic_trace (unless already a GraphModule) + meta shape propagation."""
    values_in, concrete = _bind(module, args, kwargs)
    if isinstance(module, fx.GraphModule):
        graph = module.graph
    else:
        tracer = fx.Tracer()
        tracer.record_stack_traces = True
        try:
            graph = tracer.trace(module, concrete_args=concrete or None)
        except Exception as e:  # noqa: BLE001
            raise _Failure(f"torch.fx.symbolic_trace stopped {_where_exc(e)}") from e
    prop = _MetaProp(module, graph)
    try:
        prop.run(*[to_meta(v) for v in values_in])
    except _NodeFailed as e:
        raise _Failure(f"shape propagation on meta tensors stopped {e.description}") \
            from e.__cause__
    names = _param_names(module)
    params: dict[fx.Node, str] = {}
    consts: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "get_attr":
            obj = _fetch(module, n.target)
            if isinstance(obj, torch.nn.Parameter):
                params[n] = names.get(id(obj), str(n.target))
            elif isinstance(obj, torch.Tensor):
                consts.add(n)
    return TracedProgram(graph, prop.values, params, consts, dict(module.named_modules()),
                         names, _model_dtype(module),
                         "graph_module" if isinstance(module, fx.GraphModule) else
                         "symbolic_trace")


def export(module: torch.nn.Module, args: tuple, kwargs: dict) -> TracedProgram:
    # export fakes inputs and weights itself; inputs only have to sit on the weights' device
    device = next(iter(_state(module)), torch.empty(0, device="meta")).device
    move = (lambda v: to_meta(v)) if device.type == "meta" else (lambda v: _to_device(v, device))
    ep = torch.export.export(module, tuple(move(a) for a in args),
                             kwargs={k: move(v) for k, v in kwargs.items()}, strict=False)
    return from_export(ep)


def from_export(ep: torch.export.ExportedProgram) -> TracedProgram:
    sig = ep.graph_signature
    to_param = dict(sig.inputs_to_parameters)
    const_names = set(sig.inputs_to_buffers) | set(sig.inputs_to_lifted_tensor_constants)
    params: dict[fx.Node, str] = {}
    consts: set[fx.Node] = set()
    values: dict[fx.Node, Any] = {}
    for n in ep.graph.nodes:
        values[n] = n.meta.get("val")
        if n.op == "placeholder":
            if n.name in to_param:
                params[n] = to_param[n.name]
            elif n.name in const_names:
                consts.add(n)
        elif n.op == "get_attr":
            obj = _fetch(ep.graph_module, n.target)
            values[n] = obj
            if isinstance(obj, torch.Tensor):
                consts.add(n)
    for n in ep.graph.nodes:
        ts = values[n] if isinstance(values[n], (tuple, list)) else [values[n]]
        if any(isinstance(t, torch.Tensor) and not all(isinstance(d, int) for d in t.shape)
               for t in ts):
            raise TraceError(f"op {n.target} (node {n.name}) has a data-dependent output shape"
                             f"{_stack_line(n.meta.get('stack_trace'))}; the planner needs "
                             "static shapes: replace it (e.g. nonzero/masked_select by masks)")
    model_dtype = torch.float32
    for n in params:
        if isinstance(values[n], torch.Tensor) and values[n].is_floating_point():
            model_dtype = values[n].dtype
            break
    return TracedProgram(ep.graph, values, params, consts, {}, {}, model_dtype, "export")


# ---------------------------------------------------------------------------------------

class _NodeFailed(Exception):
    def __init__(self, description: str):
        super().__init__(description)
        self.description = description   # fx's Interpreter appends its own notes to args


class _MetaProp(fx.Interpreter):
    """Runs the graph once on meta tensors, keeping every node's value."""

    def __init__(self, module: torch.nn.Module, graph: fx.Graph):
        super().__init__(module, garbage_collect_values=False, graph=graph)
        self.values: dict[fx.Node, Any] = {}
        self._on_meta = all(t.device.type == "meta" for t in _state(module))
        self._meta_state: dict[str, dict[str, torch.Tensor]] = {}
        self._meta_cache: dict[int, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        try:
            v = super().run_node(n)
        except _NodeFailed:
            raise
        except Exception as e:  # noqa: BLE001
            raise _NodeFailed(_describe_node(n, e)) from e
        self.values[n] = v
        return v

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            if id(v) not in self._meta_cache:
                self._meta_cache[id(v)] = to_meta(v)
            return self._meta_cache[id(v)]
        return v

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if self._on_meta:
            return mod(*args, **kwargs)
        if target not in self._meta_state:
            self._meta_state[target] = {k: to_meta(t) for k, t in
                                        list(mod.named_parameters()) + list(mod.named_buffers())}
        return torch.func.functional_call(mod, self._meta_state[target], args, kwargs)


def _stack_line(stack_trace: str | None) -> str:
    """' (File "x.py", line 3, in forward: `code`)' from an fx stack trace, or ''."""
    if not stack_trace:
        return ""
    frames = [ln.strip() for ln in stack_trace.strip().splitlines()]
    files = [i for i, ln in enumerate(frames) if ln.startswith("File ")
             and _user_frame(ln.split('"')[1] if '"' in ln else ln)]
    if not files:
        return ""
    i = files[-1]
    code = frames[i + 1] if i + 1 < len(frames) else ""
    return f" ({frames[i]}: `{code}`)"


def _describe_node(n: fx.Node, e: Exception) -> str:
    what = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.target)
    where = _stack_line(n.stack_trace)
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"at op {what!s} (node {n.name}){where}: {type(e).__name__}: {msg}"


def _where_exc(e: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if _user_frame(f.filename)]
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > 300:
        msg = msg[:300] + "..."
    loc = ""
    if frames:
        f = frames[-1]
        loc = f"at {f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}` "
    return f"{loc}({type(e).__name__}: {msg})"


def _bind(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[list, dict]:
    """Values for the forward's parameters in order, and concrete_args for the unbound."""
    sig = inspect.signature(module.forward)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as e:
        raise TraceError(f"example_inputs do not match {type(module).__name__}.forward"
                         f"{sig}: {e}") from None
    values, concrete = [], {}
    for pname, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if pname in bound.arguments:
                raise TraceError(f"{type(module).__name__}.forward takes *{pname}; pass named "
                                 "example inputs or wrap the module")
            continue
        if pname in bound.arguments:
            values.append(bound.arguments[pname])
        elif p.default is not p.empty:
            values.append(p.default)
            concrete[pname] = p.default
        else:
            raise TraceError(f"no example input for {type(module).__name__}.forward's "
                             f"argument {pname!r}")
    return values, concrete


def to_meta(v):
    """`v` with every tensor in it replaced by a meta tensor of the same shape, stride and dtype."""
    if isinstance(v, torch.Tensor):
        if v.device.type == "meta":
            return v
        return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype,
                                   device="meta")
    if isinstance(v, (tuple, list)):
        return type(v)(to_meta(x) for x in v)
    if isinstance(v, dict):
        return {k: to_meta(x) for k, x in v.items()}
    return v


def _to_device(v, device: torch.device):
    if isinstance(v, torch.Tensor):
        if v.device == device:
            return v
        return torch.zeros(tuple(v.shape), dtype=v.dtype, device=device)
    if isinstance(v, (tuple, list)):
        return type(v)(_to_device(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _to_device(x, device) for k, x in v.items()}
    return v


def _state(module: torch.nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def _param_names(module: torch.nn.Module) -> dict[int, str]:
    # named_parameters dedups shared tensors, so a tied weight gets its first name
    return {id(p): name for name, p in module.named_parameters()}


def _model_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _fetch(root: torch.nn.Module, target: str):
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _batch_seq(prog: TracedProgram) -> tuple[int, int]:
    """(batch, seq) from the first user input: token ids [b, s], else [b, ...]."""
    first = None
    for n in prog.graph.nodes:
        if n.op != "placeholder" or n in prog.params or n in prog.consts:
            continue
        v = prog.values.get(n)
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            if v.dim() == 2 and not v.is_floating_point():
                return int(v.shape[0]), int(v.shape[1])
            first = first or v
    if first is not None:
        return int(first.shape[0]), int(first.shape[1]) if first.dim() >= 3 else 0
    return 1, 0
