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
          method: str = "auto", fx_cache: dict | None = None) -> OpGraph:
    """Trace `module` on `example_inputs` (tensors of any device: only shapes and dtypes are
    used) into an annotated, layered OpGraph.

    module: nn.Module, torch.fx.GraphModule, or torch.export.ExportedProgram.
    dtype: the training dtype every tensor of the model's own float dtype is costed in
        (None keeps the traced dtypes).
    method: "auto" (symbolic_trace, then torch.export), "symbolic" or "export".
    n_layers: number of op clusters for graphs without transformer blocks (default 8).
    fx_cache: a dict kept by the caller across calls on the SAME module with inputs that
        differ only in shape (graphs/load.py keeps one per zoo model): the symbolic trace is
        stored there and later calls only re-run shape propagation and lowering on it.
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
        prog = _trace_module(module, args, kwargs, method, label, fx_cache)
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

def _trace_module(module, args, kwargs, method, label, fx_cache=None) -> TracedProgram:
    symbolic_error: str | None = None
    if method in ("auto", "symbolic"):
        # symbolic_trace records the program with proxies, never the inputs' sizes, so its
        # graph is the same whatever the inputs' shapes: reuse it, re-propagating shapes only.
        # If propagation fails at these shapes, fall through to the full path below (which
        # fails the same way and tries export), so the result is what a fresh trace gives.
        # which forward arguments are given decides symbolic_trace's concrete_args: part of the key
        key = ("symbolic", len(args), tuple(sorted(kwargs)))
        cached = fx_cache.get(key) if fx_cache is not None else None
        if cached is not None:
            try:
                return symbolic(module, args, kwargs, graph=cached)
            except _Failure:
                pass
        try:
            prog = symbolic(module, args, kwargs)
            if fx_cache is not None:
                fx_cache[key] = prog.graph
            return prog
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


def symbolic(module: torch.nn.Module, args: tuple, kwargs: dict,
             graph: fx.Graph | None = None, stack_traces: bool = False) -> TracedProgram:
    """symbolic_trace (unless already a GraphModule, or `graph` is this module's earlier
    symbolic trace with the same concrete args) + meta shape propagation.

    The nodes' stack traces only name the user's source line when shape propagation fails,
    and recording them (a Python traceback symbolised per node) is a third of gpt-39b's first
    trace, 0.2 s before a plan's workers start. So the trace records none, and a failed
    propagation traces again with them (`stack_traces`) for its message."""
    values_in, concrete = _bind(module, args, kwargs)
    traced_here = graph is None and not isinstance(module, fx.GraphModule)
    if graph is not None:
        pass
    elif isinstance(module, fx.GraphModule):
        graph = module.graph
    else:
        tracer = fx.Tracer()
        tracer.record_stack_traces = stack_traces
        try:
            graph = tracer.trace(module, concrete_args=concrete or None)
        except Exception as e:  # noqa: BLE001
            raise _Failure(f"torch.fx.symbolic_trace stopped {_where_exc(e)}") from e
    prop = _MetaProp(module, graph)
    try:
        prop.run(*[to_meta(v) for v in values_in])
    except _NodeFailed as e:
        if traced_here and not stack_traces:
            return symbolic(module, args, kwargs, stack_traces=True)
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
        self._memo_specs: dict[Any, Any] = {}

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

    # --- memo --------------------------------------------------------------------------
    # A transformer repeats one block: the same op on operands of the same shapes, strides
    # and dtypes runs once per layer, and on meta tensors its result's metadata is a pure
    # function of those (there is no data). So each distinct (op, operand metadata, python
    # args) is propagated once and later nodes get fresh meta tensors of the same shape,
    # stride and dtype. Ops that mutate or return an input, outputs at a storage offset
    # (which a fresh tensor cannot stand for) and anything not fully described by the key
    # are always run.
    def call_function(self, target, args, kwargs):
        def run():
            return super(_MetaProp, self).call_function(target, args, kwargs)
        # torch's and python's own functions only: a user's fx.wrap'ed function may keep state
        if not _library_function(target):
            return run()
        return self._memo(("f", target), target, args, kwargs, run)

    def call_method(self, target, args, kwargs):
        def run():
            return super(_MetaProp, self).call_method(target, args, kwargs)
        if not (args and type(args[0]) in (torch.Tensor, torch.nn.Parameter)):
            return run()
        return self._memo(("m", target), target, args, kwargs, run)

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        head = _module_key(mod)
        if head is None:
            return self._call_module(mod, target, args, kwargs)
        return self._memo(head, None, args, kwargs,
                          lambda: self._call_module(mod, target, args, kwargs))

    def _memo(self, head, target, args, kwargs, run):
        if not MEMO or _mutates(target, kwargs):
            return run()
        key_args = _meta_key((args, kwargs))
        if key_args is _NO_KEY:
            return run()
        key = (head, key_args)
        try:
            spec = self._memo_specs.get(key, _NO_KEY)
        except TypeError:      # an unhashable python value in the args
            return run()
        if spec is not _NO_KEY:
            return _from_spec(spec)
        v = run()
        spec = _to_spec(v, args, kwargs)
        if spec is not _NO_KEY:
            self._memo_specs[key] = spec
        return v

    def _call_module(self, mod, target, args, kwargs):
        if self._on_meta:
            return mod(*args, **kwargs)
        if target not in self._meta_state:
            self._meta_state[target] = {k: to_meta(t) for k, t in
                                        list(mod.named_parameters()) + list(mod.named_buffers())}
        return torch.func.functional_call(mod, self._meta_state[target], args, kwargs)


# Off only to check that the memo changes nothing (tests/unit/test_trace_reuse.py).
MEMO = True
_NO_KEY = object()
_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand",
                      "ior", "ixor", "ilshift", "irshift", "imatmul", "setitem", "delitem"}
# leaf modules whose output metadata follows from their type, extra_repr, mode and the
# metadata of their own parameters and buffers
_MEMO_MODULES = {"Linear", "Embedding", "LayerNorm", "RMSNorm", "Dropout", "GELU", "SiLU",
                 "ReLU", "Tanh", "Sigmoid", "Identity", "Softmax", "LogSoftmax"}


def _library_function(target) -> bool:
    module = getattr(target, "__module__", None) or ""
    return (module in ("_operator", "operator", "builtins", "math")
            or module == "torch" or module.startswith("torch."))


def _mutates(target, kwargs) -> bool:
    if target is None:
        return False
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return ("out" in kwargs or name in _INPLACE_OPERATORS
            or name.strip("_") in _INPLACE_OPERATORS
            or (name.endswith("_") and not name.endswith("__")))


def _tensor_key(t: torch.Tensor):
    return ("T", type(t) is torch.nn.Parameter, tuple(t.shape), tuple(t.stride()),
            t.storage_offset(), t.dtype, t.device.type, t.requires_grad, t.layout)


def _meta_key(v):
    """A hashable description of `v` that fixes every op's output metadata, or _NO_KEY."""
    if isinstance(v, torch.Tensor):
        if type(v) not in (torch.Tensor, torch.nn.Parameter):
            return _NO_KEY
        return _tensor_key(v)
    if type(v) is float:     # -0.0 == 0.0, but an op may return python values made from it
        return (float, v.hex())
    if v is None or type(v) in (int, bool, str, torch.dtype, torch.device,
                                torch.memory_format, torch.layout):
        return (type(v), v)
    if type(v) is torch.Size:
        return ("S", tuple(v))
    if isinstance(v, (tuple, list)):     # fx passes its immutable_list / immutable_dict too
        items = tuple(_meta_key(x) for x in v)
        return _NO_KEY if any(x is _NO_KEY for x in items) else (type(v), items)
    if isinstance(v, dict):
        items = tuple((k, _meta_key(x)) for k, x in v.items())
        return _NO_KEY if any(x is _NO_KEY for _, x in items) else ("D", items)
    if type(v) is slice:
        return _meta_key(("slice", v.start, v.stop, v.step))
    if v is Ellipsis:
        return ("...",)
    return _NO_KEY


def _module_key(mod: torch.nn.Module):
    if type(mod).__name__ not in _MEMO_MODULES or not type(mod).__module__.startswith("torch.nn."):
        return None
    state = tuple((k, _tensor_key(t)) for k, t in
                  list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)))
    return ("M", type(mod), mod.extra_repr(), mod.training, state)


def _inputs(v, out: list) -> list:
    if isinstance(v, torch.Tensor):
        out.append(v)
    elif isinstance(v, (tuple, list)):
        for x in v:
            _inputs(x, out)
    elif isinstance(v, dict):
        for x in v.values():
            _inputs(x, out)
    return out


def _to_spec(v, args, kwargs):
    """How to make a fresh stand-in for the result `v`, or _NO_KEY when none can be."""
    if isinstance(v, torch.Tensor):
        # a fresh tensor has exactly the storage its shape and strides need: a result at an
        # offset into, or a view of part of, a larger storage cannot be stood in for
        if (type(v) is not torch.Tensor or v.device.type != "meta" or v.storage_offset() != 0
                or v.untyped_storage().nbytes() != _storage_bytes(v)
                or any(v is t for t in _inputs((args, kwargs), []))):
            return _NO_KEY
        return ("T", tuple(v.shape), tuple(v.stride()), v.dtype, v.requires_grad)
    if type(v) in (tuple, list):
        items = [_to_spec(x, args, kwargs) for x in v]
        if any(x is _NO_KEY for x in items) or not all(x[0] == "T" for x in items):
            return _NO_KEY     # python containers of python values may be mutated later
        return (type(v), items)
    if v is None or type(v) in (int, float, bool, str, torch.dtype, torch.device, torch.Size):
        return ("V", v)        # immutable
    return _NO_KEY


def _storage_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


def _from_spec(spec):
    if spec[0] == "T":
        _, shape, stride, dtype, requires_grad = spec
        t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        return t.requires_grad_(True) if requires_grad else t
    if spec[0] == "V":
        return spec[1]
    return spec[0](_from_spec(x) for x in spec[1])


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
