"""Lowering: a shape-propagated torch.fx graph -> the OpGraph IR (graphs/ir.py).

Works on both graphs the tracer produces: torch-level graphs from `torch.fx.symbolic_trace`
(call_module leaves such as nn.Linear, torch/F functions, tensor methods) and aten-level
graphs from `torch.export` (params as placeholders). Every fx op is first mapped to a
canonical name (`_canonical`), then one table (`_lower`) turns it into (op, kind, operands,
attrs) whichever graph it came from.

fx nodes fall in four classes:
  act   - depends on a user input: becomes an IR node;
  param - a parameter, or a view of one that keeps its numel (folded into consumers as a
          param operand);
  const - buffers, constants and anything computed only from them (RoPE tables, masks made
          with arange): folded into consumers as operands with source=None, param=None;
  py    - python values (sizes, dtypes, devices): folded into consumers' attrs.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import annotate
from .ir import (
    ATTENTION,
    ELEMENTWISE,
    EMBEDDING,
    INPUT,
    LOSS,
    MATMUL,
    NORM,
    OUTPUT,
    REDUCTION,
    SOFTMAX,
    UNKNOWN,
    VIEW,
    Operand,
    OpGraph,
    OpNode,
)

TORCH_DTYPE_NAMES = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16",
    torch.float16: "fp16", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
    torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
    torch.complex64: "fp64", torch.complex128: "fp64",   # no complex in the IR: same bytes
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        TORCH_DTYPE_NAMES[getattr(torch, _name)] = "fp8"


@dataclass
class TracedProgram:
    """An fx graph whose every node has a value (meta/fake tensor, tuple, python value)."""

    graph: fx.Graph
    values: dict[fx.Node, Any]
    params: dict[fx.Node, str]                 # node that IS a parameter -> canonical name
    consts: set[fx.Node]                       # buffers and lifted constants
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    param_names: dict[int, str] = field(default_factory=dict)   # id(Parameter) -> name
    model_dtype: torch.dtype = torch.float32
    method: str = "symbolic_trace"


# ---------------------------------------------------------------------------------------
# op tables

ALIASES = {
    "truediv": "div", "true_divide": "div", "divide": "div", "floordiv": "floor_divide",
    "multiply": "mul", "subtract": "sub", "rsub": "sub", "iadd": "add", "imul": "mul",
    "_softmax": "softmax", "_log_softmax": "log_softmax", "_unsafe_view": "view",
    "_to_copy": "to", "float": "to", "half": "to", "bfloat16": "to", "double": "to",
    "type_as": "to", "type": "to", "scaled_dot_product_attention": "sdpa",
    "concat": "cat", "concatenate": "cat", "swapaxes": "transpose", "swapdims": "transpose",
    "cross_entropy_loss": "cross_entropy", "mm": "matmul", "dropout_": "dropout",
    "feature_dropout": "dropout", "alpha_dropout": "dropout", "amax": "amax",
    "lift_fresh_copy": "alias", "detach": "alias", "lift_fresh": "alias", "identity": "alias",
    "view_as": "view", "reshape_as": "reshape", "expand_as": "expand", "broadcast_to": "expand",
    "square": "pow", "gelu_": "gelu", "silu_": "silu", "relu_": "relu",
    "split_with_sizes": "split", "tensor_split": "split", "sigmoid_": "sigmoid",
    "scalar_tensor": "full", "long": "to", "int": "to", "bool": "to", "short": "to",
}

MODULE_OPS = {
    "Linear": "linear", "Embedding": "embedding", "LayerNorm": "layer_norm",
    "RMSNorm": "rms_norm", "Dropout": "dropout", "GELU": "gelu", "SiLU": "silu",
    "ReLU": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Softmax": "softmax",
    "LogSoftmax": "log_softmax", "CrossEntropyLoss": "cross_entropy", "Identity": "alias",
    "Flatten": "flatten", "Unflatten": "unflatten",
}

ELEMENTWISE_OPS = {
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "log1p", "expm1",
    "cos", "sin", "tanh", "sigmoid", "gelu", "silu", "relu", "leaky_relu", "elu", "softplus",
    "mish", "erf", "dropout", "to", "masked_fill", "where", "abs", "clamp", "clip", "minimum",
    "maximum", "reciprocal", "floor_divide", "remainder", "fmod", "floor", "ceil", "round",
    "sign", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
    "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "and_", "or_",
    "invert", "triu", "tril", "zeros_like", "ones_like", "full_like", "empty_like",
    "new_zeros", "new_ones", "new_full", "new_empty", "fill", "copy", "lerp", "addcmul",
    "addcdiv", "hardtanh", "hardswish", "hardsigmoid", "relu6", "glu", "isnan", "isinf",
    "nan_to_num", "clamp_min", "clamp_max", "mod", "native_dropout", "gelu_tanh", "sgn",
}
# ops whose output never carries a gradient
NON_DIFFERENTIABLE = {
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
    "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "and_", "or_",
    "invert", "floor", "ceil", "round", "sign", "sgn", "zeros_like", "ones_like",
    "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "argmax",
    "argmin", "isnan", "isinf", "floor_divide", "remainder", "fmod", "mod",
}
REDUCTION_OPS = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod",
                 "topk", "cumsum", "cumprod", "logsumexp", "var", "std", "norm", "all", "any",
                 "count_nonzero", "var_mean", "std_mean"}
SCAN_OPS = {"cumsum", "cumprod"}
RESHAPE_OPS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze"}
PERMUTE_OPS = {"permute", "transpose", "t", "contiguous", "clone", "numpy_T", "adjoint"}
SPLIT_OPS = {"split", "chunk", "unbind"}
# views of a parameter that keep its numel: folded into the consumer as a param operand
PARAM_FOLDABLE = {"view", "reshape", "t", "transpose", "permute", "unsqueeze", "squeeze",
                  "contiguous", "to", "alias", "clone", "flatten", "unflatten"}
CONST_CREATORS = {"arange", "zeros", "ones", "full", "empty", "tensor", "rand", "randn",
                  "randint", "linspace", "eye", "triu_indices", "tril_indices"}

LEADING_LETTERS = "acdefghijlmopqrtuvwxyz"   # b, s, k, n are reserved for linear


# ---------------------------------------------------------------------------------------
# small helpers

def dtype_name(dt: torch.dtype) -> str:
    try:
        return TORCH_DTYPE_NAMES[dt]
    except KeyError:
        raise ValueError(f"dtype {dt} has no IR name; known: "
                         f"{sorted(str(d) for d in TORCH_DTYPE_NAMES)}") from None


def _tensors(v) -> list[torch.Tensor] | None:
    """The tensor(s) a node produced, or None when it produced a python value."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return list(v)
    return None


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _nonneg(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def reshape_dim_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[list[list[int]]]:
    """[[in_dims, out_dims], ...] for a reshape: which input dims become which output dims.

    Size-1 dims stand alone ([[i], []] or [[], [j]]) unless both sides have one in step.
    """
    if 0 in src or 0 in dst:
        return [[list(range(len(src))), list(range(len(dst)))]]
    groups: list[list[list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and j < len(dst) and src[i] == 1 and dst[j] == 1:
            groups.append([[i], [j]]); i += 1; j += 1
            continue
        if i < len(src) and src[i] == 1:
            groups.append([[i], []]); i += 1
            continue
        if j < len(dst) and dst[j] == 1:
            groups.append([[], [j]]); j += 1
            continue
        gi, gj, pa, pb = [i], [j], src[i], dst[j]
        i += 1; j += 1
        while pa != pb:
            if pa < pb:
                gi.append(i); pa *= src[i]; i += 1
            else:
                gj.append(j); pb *= dst[j]; j += 1
        groups.append([gi, gj])
    return groups


def expand_dim_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[list[list[int]]]:
    off = len(dst) - len(src)
    return [[[], [j]] for j in range(off)] + [[[i], [i + off]] for i in range(len(src))]


def linear_equation(x_ndim: int) -> str:
    lead = x_ndim - 1
    if lead <= 0:
        letters = ""
    elif lead == 1:
        letters = "b"
    else:
        letters = "b" + LEADING_LETTERS[:lead - 2] + "s"
    return f"{letters}k,nk->{letters}n"


def matmul_equation(a_ndim: int, b_ndim: int) -> str:
    """torch.matmul semantics (1-D operands, broadcast batch dims) as an einsum equation."""
    batch_letters = "bhacdefgijlopqrtuvwxyz"
    if a_ndim == 1 and b_ndim == 1:
        return "k,k->"
    if a_ndim == 1:
        nb = b_ndim - 2
        bl = batch_letters[:nb]
        return f"k,{bl}kn->{bl}n"
    if b_ndim == 1:
        nb = a_ndim - 2
        bl = batch_letters[:nb]
        return f"{bl}mk,k->{bl}m"
    nb = max(a_ndim, b_ndim) - 2
    bl = batch_letters[:nb]
    la, lb = bl[nb - (a_ndim - 2):], bl[nb - (b_ndim - 2):]
    return f"{la}mk,{lb}kn->{bl}mn"


def canonical_einsum(equation: str, ndims: list[int]) -> str:
    """Lowercase letters only, no spaces, no ellipsis, explicit output."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    specs = lhs.split(",")
    used = set(c.lower() for c in eq if c.isalpha())
    letter_map: dict[str, str] = {}
    free = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in used]

    def remap(c: str) -> str:
        if c not in letter_map:
            if c.islower():
                letter_map[c] = c
            elif c.lower() not in letter_map.values() and c.lower() not in eq:
                letter_map[c] = c.lower()
            else:
                letter_map[c] = free.pop(0)
        return letter_map[c]

    n_ell = max((nd - len(s.replace("...", "")) for s, nd in zip(specs, ndims) if "..." in s),
                default=0)
    ell = "".join(free.pop(0) for _ in range(n_ell))
    new_specs = []
    for s, nd in zip(specs, ndims):
        if "..." in s:
            k = nd - len(s.replace("...", ""))
            s = s.replace("...", ell[n_ell - k:] if k else "")
        new_specs.append("".join(remap(c) if c.isalpha() else c for c in s))
    if arrow:
        out = rhs.replace("...", ell)
        out = "".join(remap(c) if c.isalpha() else c for c in out)
    else:   # implicit output: ellipsis dims, then letters seen once, alphabetically
        counts: dict[str, int] = {}
        for s in new_specs:
            for c in s:
                counts[c] = counts.get(c, 0) + 1
        out = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    return ",".join(new_specs) + "->" + out


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple, torch.Size)):
        return [_jsonable(x) for x in v]
    if isinstance(v, slice):
        return f"slice({v.start},{v.stop},{v.step})"
    if v is Ellipsis:
        return "..."
    if isinstance(v, torch.dtype):
        return TORCH_DTYPE_NAMES.get(v, str(v))
    return str(v)


# ---------------------------------------------------------------------------------------

class _Lowerer:
    def __init__(self, prog: TracedProgram, graph: OpGraph, dtype: str | None):
        self.p = prog
        self.g = graph
        self.dtype = dtype
        self.cls: dict[fx.Node, str] = {}
        self.param_of: dict[fx.Node, str] = dict(prog.params)
        self.owned: set[str] = set()
        self.requires_grad: dict[str, list[bool]] = {}   # IR node -> per output
        self.key: dict[fx.Node, str] = {}

    # --- values ---------------------------------------------------------------------------
    def val(self, a):
        if isinstance(a, fx.Node):
            return self.p.values.get(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self.val(x) for x in a)
        if isinstance(a, dict):
            return {k: self.val(x) for k, x in a.items()}
        if isinstance(a, slice):
            return slice(self.val(a.start), self.val(a.stop), self.val(a.step))
        return a

    def arg(self, n: fx.Node, i: int, name: str, default=None):
        if len(n.args) > i:
            return self.val(n.args[i])
        return self.val(n.kwargs.get(name, default))

    def ir_dtype(self, dt: torch.dtype) -> str:
        # the model's own float dtype stands for the training dtype; other floats (explicit
        # upcasts in a bf16 model, say) keep theirs
        if self.dtype is not None and dt == self.p.model_dtype:
            return self.dtype
        return dtype_name(dt)

    # --- classification ---------------------------------------------------------------------
    def canonical(self, n: fx.Node) -> str:
        if n.op == "call_module":
            name = type(self.p.modules[n.target]).__name__
            return MODULE_OPS.get(name, name)
        if n.op == "call_method":
            name = n.target
        elif n.op == "call_function":
            t = n.target
            if isinstance(t, torch._ops.OpOverload):
                name = t._overloadpacket.__name__
            else:
                name = getattr(t, "__name__", None) or str(t)
            if t is getattr and len(n.args) > 1 and n.args[1] in ("T", "mT", "mH", "H"):
                name = {"T": "numpy_T"}.get(n.args[1], "t_last2")
        else:
            return n.op
        if name.endswith("_") and not name.endswith("__") and name not in ("and_", "or_"):
            name = name[:-1]
        return ALIASES.get(name, name)

    def classify(self, n: fx.Node, key: str) -> str:
        if n in self.p.params:
            return "param"
        if n in self.p.consts:
            return "const"
        if n.op == "placeholder":
            return "act" if _tensors(self.p.values.get(n)) is not None else "py"
        if n.op == "get_attr":
            return "const" if _tensors(self.p.values.get(n)) is not None else "py"
        if n.op == "output":
            return "act"
        if _tensors(self.p.values.get(n)) is None:
            return "py"
        inputs = [a for a in n.all_input_nodes]
        classes = [self.cls.get(a, "py") for a in inputs]
        if n.op == "call_module" and any(True for _ in self.p.modules[n.target].parameters()):
            classes.append("param")   # a leaf module's weights are not fx inputs
        tensor_inputs = [a for a, c in zip(inputs, classes) if c != "py"]
        if "act" in classes:
            # `w.to(x.dtype)`/`w.type_as(x)` only reads x's dtype
            if (key == "to" and tensor_inputs and self.cls[tensor_inputs[0]] == "param"
                    and self._numel_kept(n, tensor_inputs[0])):
                self.param_of[n] = self.param_of[tensor_inputs[0]]
                return "param"
            return "act"
        if "param" in classes:
            first = tensor_inputs[0]
            if (key in PARAM_FOLDABLE and len(tensor_inputs) == 1
                    and self.cls[first] == "param" and self._numel_kept(n, first)):
                self.param_of[n] = self.param_of[first]
                return "param"
            return "act"
        return "const"

    def _numel_kept(self, n: fx.Node, src: fx.Node) -> bool:
        out, inp = _tensors(self.p.values[n]), _tensors(self.p.values[src])
        return (out is not None and inp is not None and len(out) == 1
                and out[0].numel() == inp[0].numel())

    # --- operands ---------------------------------------------------------------------------
    def operand(self, a: fx.Node, index: int | None = None) -> list[tuple[Operand, bool]]:
        """Operand(s) for fx node `a`, each with whether it needs a gradient."""
        c = self.cls[a]
        ts = _tensors(self.p.values[a])
        if c == "param":
            name = self.param_of[a]
            t = ts[0]
            return [(self._param_operand(name, t), t.is_floating_point())]
        if c == "const":
            return [(Operand(shape=_shape(t), dtype=self.ir_dtype(t.dtype)), False)
                    for t in ts]
        # act: a multi-output producer used whole expands to one operand per output
        rg = self.requires_grad.get(a.name, [False] * len(ts))
        idx = range(len(ts)) if index is None else [index]
        return [(Operand(shape=_shape(ts[i]), dtype=self.ir_dtype(ts[i].dtype), source=a.name,
                         source_index=i if len(ts) > 1 else 0), rg[i]) for i in idx]

    def _param_operand(self, name: str, t: torch.Tensor) -> Operand:
        owns = name not in self.owned
        self.owned.add(name)
        return Operand(shape=_shape(t), dtype=self.ir_dtype(t.dtype), param=name,
                       owns_param=owns)

    def module_param(self, mod: torch.nn.Module, attr: str) -> tuple[Operand, bool] | None:
        t = getattr(mod, attr, None)
        if t is None:
            return None
        name = self.p.param_names.get(id(t))
        if name is None:       # a buffer, or a plain tensor attribute
            return Operand(shape=_shape(t), dtype=self.ir_dtype(t.dtype)), False
        return self._param_operand(name, t), t.is_floating_point()

    def tensor_args(self, n: fx.Node) -> list[fx.Node]:
        out: list[fx.Node] = []

        def visit(a):
            if isinstance(a, fx.Node):
                if self.cls.get(a, "py") != "py":
                    out.append(a)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)
        visit(n.args)
        visit(n.kwargs)
        return out

    # --- main -------------------------------------------------------------------------------
    def run(self) -> OpGraph:
        for n in self.p.graph.nodes:
            key = self.canonical(n)
            self.key[n] = key
            self.cls[n] = self.classify(n, key)
            if self.cls[n] != "act":
                continue
            node, grads = self.lower(n, key)
            self.g.add(node)
            if node.kind == UNKNOWN:
                self.g.unsupported.append(node.name)
        return self.g

    def lower(self, n: fx.Node, key: str) -> tuple[OpNode, list[bool]]:
        outs = _tensors(self.p.values.get(n)) or []
        out_shapes = [_shape(t) for t in outs]
        out_dtype = self.ir_dtype(outs[0].dtype) if outs else "fp32"
        module_path = _module_path(n)
        if n.op == "placeholder":
            node = OpNode(n.name, "placeholder", INPUT, [], out_shapes, out_dtype,
                          {"input": n.target}, module_path, target=str(n.target))
            self.requires_grad[n.name] = [False]
            return node, []
        if n.op == "output":
            ops = [o for a in self.tensor_args(n) for o in self.operand(a)]
            node = OpNode(n.name, "output", OUTPUT, [o for o, _ in ops], [], out_dtype,
                          {}, module_path, target="output")
            return node, [g for _, g in ops]

        try:
            op, kind, ops, attrs = self.rule(n, key)
        except Exception as e:  # noqa: BLE001 - an odd call pattern must not lose the op
            warnings.warn(f"no IR rule could read {_target_str(n, self.p.modules)} at node "
                          f"{n.name} ({type(e).__name__}: {e}); kept as unknown", stacklevel=2)
            op, kind, attrs = key, UNKNOWN, {"lowering_error": f"{type(e).__name__}: {e}"}
            ops = [o for a in self.tensor_args(n) for o in self.operand(a)]
        node = OpNode(n.name, op, kind, [o for o, _ in ops], out_shapes, out_dtype, attrs,
                      module_path, target=_target_str(n, self.p.modules))
        grads = [g for _, g in ops]
        differentiable = (op not in NON_DIFFERENTIABLE and kind not in (INPUT, OUTPUT))
        self.requires_grad[n.name] = [
            differentiable and any(grads) and t.is_floating_point() for t in outs]
        node.attrs["requires_grad"] = any(self.requires_grad[n.name])
        annotate.annotate(node, grads if node.attrs["requires_grad"] else [False] * len(grads))
        return node, grads

    # --- the rules --------------------------------------------------------------------------
    def rule(self, n: fx.Node, key: str):
        """-> (op, kind, [(Operand, needs_grad)], attrs)"""
        tensor_args = self.tensor_args(n)
        args_ops = lambda nodes: [o for a in nodes for o in self.operand(a)]  # noqa: E731
        vals = [self.p.values[a] for a in tensor_args]
        out = self.p.values[n]
        outs = _tensors(out) or []

        # matmul family ----------------------------------------------------------------------
        if key == "linear":
            if n.op == "call_module":
                mod = self.p.modules[n.target]
                ops = self.operand(tensor_args[0])
                ops += [p for p in (self.module_param(mod, "weight"),
                                    self.module_param(mod, "bias")) if p is not None]
            else:
                ops = args_ops(tensor_args)
            return "linear", MATMUL, ops, {
                "equation": linear_equation(len(ops[0][0].shape)), "bias": len(ops) > 2}
        if key == "matmul" and len(tensor_args) == 2:
            a, b = vals
            return "matmul", MATMUL, args_ops(tensor_args), {
                "equation": matmul_equation(a.dim(), b.dim())}
        if key == "bmm":
            return "bmm", MATMUL, args_ops(tensor_args), {"equation": "bmk,bkn->bmn"}
        if key in ("addmm", "baddbmm"):
            bias, a, b = tensor_args[:3]
            ops = args_ops([a, b, bias])
            eq = "mk,kn->mn" if key == "addmm" else "bmk,bkn->bmn"
            return key, MATMUL, ops, {"equation": eq, "bias": True}
        if key == "einsum":
            eq = n.args[0] if isinstance(n.args[0], str) else n.kwargs.get("equation")
            return "einsum", MATMUL, args_ops(tensor_args), {
                "equation": canonical_einsum(eq, [v.dim() for v in vals])}

        # attention --------------------------------------------------------------------------
        if key == "sdpa":
            q, k = vals[0], vals[1]
            hq = q.shape[-3] if q.dim() >= 3 else 1
            hkv = k.shape[-3] if k.dim() >= 3 else 1
            attrs = {"is_causal": bool(self.arg(n, 5, "is_causal", False)),
                     "dropout_p": float(self.arg(n, 4, "dropout_p", 0.0) or 0.0),
                     "scale": self.arg(n, 6, "scale", None),
                     "has_mask": len(tensor_args) > 3}
            if hq != hkv:
                attrs["gqa"] = int(hq // hkv)
            return "sdpa", ATTENTION, args_ops(tensor_args), attrs

        # embedding / norms / softmax / loss --------------------------------------------------
        if key == "embedding":
            if n.op == "call_module":
                mod = self.p.modules[n.target]
                ops = self.operand(tensor_args[0]) + [self.module_param(mod, "weight")]
            else:
                ops = args_ops(tensor_args)
                # F.embedding(ids, weight) vs aten.embedding(weight, ids): ids are integers
                if ops and ops[0][0].dtype not in ("int64", "int32", "int16", "int8", "uint8"):
                    ops = ops[::-1]
            return "embedding", EMBEDDING, ops[:2], {}
        if key in ("layer_norm", "rms_norm", "group_norm"):
            if n.op == "call_module":
                mod = self.p.modules[n.target]
                ops = self.operand(tensor_args[0])
                ops += [p for p in (self.module_param(mod, "weight"),
                                    self.module_param(mod, "bias")) if p is not None]
                shape = tuple(getattr(mod, "normalized_shape", (outs[0].shape[-1],)))
                eps = getattr(mod, "eps", None)
            else:
                ops = args_ops(tensor_args)
                shape = self.arg(n, 1, "normalized_shape")
                shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
                eps = self.arg(n, 4 if key == "layer_norm" else 3, "eps")
            return key, NORM, ops, {"normalized_ndim": len(shape), "eps": _jsonable(eps)}
        if key in ("softmax", "log_softmax"):
            if n.op == "call_module":
                dim = self.p.modules[n.target].dim
            else:
                dim = self.arg(n, 1, "dim")
            nd = outs[0].dim()
            dim = -1 if dim is None else dim
            return key, SOFTMAX, args_ops(tensor_args[:1]), {"dim": _nonneg(dim, nd)}
        if key in ("cross_entropy", "nll_loss"):
            if n.op == "call_module":
                mod = self.p.modules[n.target]
                reduction, ignore = mod.reduction, mod.ignore_index
            else:
                aten = isinstance(n.target, torch._ops.OpOverload)
                reduction = self.arg(n, 3 if aten else 6, "reduction", "mean")
                ignore = self.arg(n, 4, "ignore_index", -100)
                if isinstance(reduction, int):   # aten enum: 0 none, 1 mean, 2 sum
                    reduction = {0: "none", 1: "mean", 2: "sum"}[reduction]
            return key, LOSS, args_ops(tensor_args[:2]), {
                "reduction": _jsonable(reduction), "ignore_index": _jsonable(ignore)}

        # reductions ------------------------------------------------------------------------
        if key in ("max", "min") and len(tensor_args) == 2:    # torch.max(a, b): pointwise
            return {"max": "maximum", "min": "minimum"}[key], ELEMENTWISE, \
                args_ops(tensor_args), {"scalars": []}
        if key in REDUCTION_OPS:
            x = vals[0]
            nd = x.dim()
            attrs: dict[str, Any] = {}
            if key == "norm":     # norm(x, p, dim, keepdim)
                dim = self.arg(n, 2, "dim", None)
                dims = list(range(nd)) if dim is None else [
                    _nonneg(d, nd) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
                keepdim = bool(self.arg(n, 3, "keepdim", False))
                attrs["p"] = _jsonable(self.arg(n, 1, "p", 2))
            elif key == "topk":
                k = self.arg(n, 1, "k")
                dim = self.arg(n, 2, "dim", -1)
                dims, keepdim = [_nonneg(dim, nd)], True
                attrs["k"] = int(k)
            elif key in SCAN_OPS:
                dims, keepdim = [_nonneg(self.arg(n, 1, "dim"), nd)], True
                attrs["scan"] = True
            else:
                dim = self.arg(n, 1, "dim", None)
                if dim is None:
                    dim = n.kwargs.get("axis")
                if isinstance(dim, torch.dtype):   # x.sum(dtype=...) written positionally
                    dim = None
                if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
                    dims = list(range(nd))
                else:
                    dims = [_nonneg(d, nd) for d in (dim if isinstance(dim, (list, tuple))
                                                     else [dim])]
                keepdim = bool(self.arg(n, 2, "keepdim", False))
            attrs.update({"dims": sorted(dims), "keepdim": keepdim})
            return key, REDUCTION, args_ops(tensor_args[:1]), attrs

        # views ------------------------------------------------------------------------------
        if key in RESHAPE_OPS or key in ("expand", "alias"):
            src = vals[0]
            dst = outs[0]
            if key == "expand":
                groups = expand_dim_groups(_shape(src), _shape(dst))
                copy = False
            else:
                groups = reshape_dim_groups(_shape(src), _shape(dst))
                copy = key in ("reshape", "flatten") and not src.is_contiguous()
            return key, VIEW, args_ops(tensor_args[:1]), {"dim_groups": groups, "copy": copy}
        if key in PERMUTE_OPS or key == "t_last2":
            src = vals[0]
            nd = src.dim()
            perm = list(range(nd))
            if key == "permute":
                dims = [self.val(a) for a in n.args[1:]] or self.val(n.kwargs.get("dims"))
                if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                    dims = dims[0]
                perm = [_nonneg(d, nd) for d in dims]
            elif key == "transpose":
                d0 = _nonneg(self.arg(n, 1, "dim0"), nd)
                d1 = _nonneg(self.arg(n, 2, "dim1"), nd)
                perm[d0], perm[d1] = perm[d1], perm[d0]
            elif key in ("t", "t_last2", "adjoint") and nd >= 2:
                perm[-1], perm[-2] = perm[-2], perm[-1]
            elif key == "numpy_T":
                perm = perm[::-1]
            copy = key == "clone" or (key == "contiguous" and not src.is_contiguous())
            op = "transpose" if key in ("t", "t_last2", "numpy_T", "adjoint") else key
            return op, VIEW, args_ops(tensor_args[:1]), {"perm": perm, "copy": copy}
        if key in SPLIT_OPS:
            src = vals[0]
            nd = src.dim()
            dim = self.arg(n, 1, "dim", 0) if key == "unbind" else self.arg(n, 2, "dim", 0)
            dim = _nonneg(dim, nd)
            sizes = [int(t.shape[dim]) if key != "unbind" else 1 for t in outs]
            return key, VIEW, args_ops(tensor_args[:1]), {"dim": dim, "sizes": sizes,
                                                          "copy": False}
        if key == "getitem":
            src_val = self.p.values[n.args[0]]
            if isinstance(src_val, (tuple, list)):
                i = int(self.val(n.args[1]))
                return "getitem", VIEW, self.operand(n.args[0], index=i), {"index": i,
                                                                           "copy": False}
            return self._tensor_index(n, tensor_args, src_val)
        if key in ("slice", "narrow", "select"):
            src = vals[0]
            nd = src.dim()
            dim = _nonneg(self.arg(n, 1, "dim", 0), nd)
            groups = [[[i], [i]] for i in range(nd)]
            if key == "select":
                groups = ([[[i], [i]] for i in range(dim)] + [[[dim], []]]
                          + [[[i], [i - 1]] for i in range(dim + 1, nd)])
            return key, VIEW, args_ops(tensor_args[:1]), {
                "dim": dim, "dim_groups": groups, "copy": False,
                "index": _jsonable([self.val(a) for a in n.args[2:]])}
        if key in ("cat", "stack"):
            nd = outs[0].dim()
            dim = _nonneg(self.arg(n, 1, "dim", 0), nd)
            return key, VIEW, args_ops(tensor_args), {"dim": dim, "copy": True}

        # elementwise ----------------------------------------------------------------------
        if key in ELEMENTWISE_OPS or (n.op == "call_module" and key == "dropout"):
            scalars = [_jsonable(self.val(a)) for a in n.args
                       if not (isinstance(a, fx.Node) and self.cls.get(a) != "py")]
            attrs = {"scalars": [s for s in scalars if isinstance(s, (int, float, bool))]}
            if key == "to":
                attrs["dtype"] = self.ir_dtype(outs[0].dtype)
                # `x.to(y)` / `x.type_as(y)` read only y's dtype
                return "to", ELEMENTWISE, args_ops(tensor_args[:1]), attrs
            if key == "dropout" and n.op == "call_module":
                attrs["p"] = float(self.p.modules[n.target].p)
            elif key == "dropout":
                attrs["p"] = float(self.arg(n, 1, "p", 0.5))
            if n.op == "call_module":
                return key, ELEMENTWISE, args_ops(tensor_args[:1]), attrs
            return key, ELEMENTWISE, args_ops(tensor_args), attrs

        # anything else: kept, costed as elementwise on its output, listed as unsupported
        ops = args_ops(tensor_args)
        if n.op == "call_module":   # keep the leaf module's weights (Conv, MultiheadAttention)
            for _, t in self.p.modules[n.target].named_parameters():
                name = self.p.param_names.get(id(t))
                if name is not None:
                    ops.append((self._param_operand(name, t), t.is_floating_point()))
        return key, UNKNOWN, ops, {}

    def _tensor_index(self, n: fx.Node, tensor_args: list[fx.Node], src: torch.Tensor):
        idx = self.val(n.args[1])
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(isinstance(x, (torch.Tensor, list)) for x in items):
            # advanced indexing is a gather: no rule yet
            return "index", UNKNOWN, [o for a in tensor_args for o in self.operand(a)], {
                "index": _jsonable([None if isinstance(x, torch.Tensor) else x
                                    for x in items])}
        nd = src.dim()
        n_real = sum(1 for x in items if x is not None and x is not Ellipsis)
        expanded: list[Any] = []
        for x in items:
            if x is Ellipsis:
                expanded.extend([slice(None)] * (nd - n_real))
            else:
                expanded.append(x)
        groups: list[list[list[int]]] = []
        i = j = 0
        for x in expanded:
            if x is None:
                groups.append([[], [j]]); j += 1
            elif isinstance(x, int):
                groups.append([[i], []]); i += 1
            else:
                groups.append([[i], [j]]); i += 1; j += 1
        while i < nd:
            groups.append([[i], [j]]); i += 1; j += 1
        return "getitem", VIEW, self.operand(tensor_args[0]), {
            "index": _jsonable(items), "dim_groups": groups, "copy": False}


def _module_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if n.op == "call_module":
        return str(n.target)
    if stack:
        path = list(stack.values())[-1][0]
        return re.sub(r"^L__self__\.?", "", str(path))
    return ""


def _target_str(n: fx.Node, modules: dict) -> str:
    if n.op == "call_module":
        return f"{type(modules[n.target]).__name__}({n.target})"
    t = n.target
    if isinstance(t, str):
        return f"Tensor.{t}"
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def lower(prog: TracedProgram, graph: OpGraph, dtype: str | None = "bf16") -> OpGraph:
    """Fill `graph` with the IR of `prog`; returns it."""
    return _Lowerer(prog, graph, dtype).run()
