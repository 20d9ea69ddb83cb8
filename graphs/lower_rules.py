"""Lowering rules: one small function per canonical op name, registered in `RULES`.

The driver (graphs/lower.py) classifies every fx node, gives each op its canonical name
(`aten.mm`, `torch.mm` and `Tensor.mm` are all "matmul"), builds a `Call` for it and runs
`RULES.get(key, unknown)`. A rule returns `(op, kind, operands, attrs)`, where each operand
comes with whether it needs a gradient; the driver then builds the OpNode and annotates
FLOPs and bytes. A rule that raises is not fatal: the driver keeps the op as UNKNOWN and
records the error.

The helpers below the rules state the IR conventions that graphs/ir.py describes: the
einsum equation of every matmul-like op and the dim groups of every view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx as fx

from .ir import (
    ATTENTION,
    ELEMENTWISE,
    EMBEDDING,
    LOSS,
    MATMUL,
    NORM,
    REDUCTION,
    SOFTMAX,
    UNKNOWN,
    VIEW,
    Operand,
)

if TYPE_CHECKING:
    from .lower import Lowerer

TORCH_DTYPE_NAMES = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16",
    torch.float16: "fp16", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
    torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
    torch.complex64: "fp64", torch.complex128: "fp64",   # no complex in the IR: same bytes
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        TORCH_DTYPE_NAMES[getattr(torch, _name)] = "fp8"

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
REDUCTION_OPS = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod",
                 "topk", "cumsum", "cumprod", "logsumexp", "var", "std", "norm", "all", "any",
                 "count_nonzero", "var_mean", "std_mean"}
SCAN_OPS = {"cumsum", "cumprod"}
RESHAPE_OPS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze"}
PERMUTE_OPS = {"permute", "transpose", "t", "contiguous", "clone", "numpy_T", "adjoint"}
SPLIT_OPS = {"split", "chunk", "unbind"}

LEADING_LETTERS = "acdefghijlmopqrtuvwxyz"   # b, s, k, n are reserved for linear

OperandGrad = tuple[Operand, bool]                          # an operand, and whether it needs a gradient
Lowered = tuple[str, str, list[OperandGrad], dict[str, Any]]  # (op, kind, operands, attrs)


@dataclass
class Call:
    """One fx node that becomes an IR node, as the rules see it."""

    lw: Lowerer                  # operands and argument values come from the driver
    n: fx.Node
    key: str                     # canonical op name
    args: list[fx.Node]          # tensor arguments (activations, params, constants) in order
    vals: list[Any]              # their traced values
    outs: list[torch.Tensor]     # the node's output tensor(s)

    @property
    def is_module(self) -> bool:
        return self.n.op == "call_module"

    @property
    def module(self) -> torch.nn.Module:
        """The leaf module a call_module node runs."""
        return self.lw.p.modules[str(self.n.target)]

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        return self.lw.arg(self.n, i, name, default)

    def operands(self, nodes: Iterable[fx.Node]) -> list[OperandGrad]:
        return [o for a in nodes for o in self.lw.operand(a)]

    def module_params(self, *attrs: str) -> list[OperandGrad]:
        """The leaf module's tensors named `attrs` (weight, bias) that it has."""
        ops = [self.lw.module_param(self.module, a) for a in attrs]
        return [o for o in ops if o is not None]


Rule = Callable[[Call], Lowered]
RULES: dict[str, Rule] = {}


def rule(*keys: str) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of each canonical op name in `keys`."""
    def register(fn: Rule) -> Rule:
        for key in keys:
            if key in RULES:
                raise ValueError(f"two lowering rules for {key!r}: {RULES[key].__name__}, "
                                 f"{fn.__name__}")
            RULES[key] = fn
        return fn
    return register


# --- matmul family -----------------------------------------------------------------------

@rule("linear")
def linear(c: Call) -> Lowered:
    if c.is_module:
        ops = c.lw.operand(c.args[0]) + c.module_params("weight", "bias")
    else:
        ops = c.operands(c.args)
    return "linear", MATMUL, ops, {
        "equation": linear_equation(len(ops[0][0].shape)), "bias": len(ops) > 2}


@rule("matmul")
def matmul(c: Call) -> Lowered:
    if len(c.args) != 2:
        return unknown(c)
    a, b = c.vals
    return "matmul", MATMUL, c.operands(c.args), {"equation": matmul_equation(a.dim(), b.dim())}


@rule("bmm")
def bmm(c: Call) -> Lowered:
    return "bmm", MATMUL, c.operands(c.args), {"equation": "bmk,bkn->bmn"}


@rule("addmm", "baddbmm")
def addmm(c: Call) -> Lowered:
    bias, a, b = c.args[:3]
    eq = "mk,kn->mn" if c.key == "addmm" else "bmk,bkn->bmn"
    return c.key, MATMUL, c.operands([a, b, bias]), {"equation": eq, "bias": True}


@rule("einsum")
def einsum(c: Call) -> Lowered:
    eq = c.n.args[0] if isinstance(c.n.args[0], str) else c.n.kwargs.get("equation")
    return "einsum", MATMUL, c.operands(c.args), {
        "equation": canonical_einsum(cast(str, eq), [v.dim() for v in c.vals])}


# --- attention, embedding, norms, softmax, loss ------------------------------------------

@rule("sdpa")
def sdpa(c: Call) -> Lowered:
    q, k = c.vals[0], c.vals[1]
    hq = q.shape[-3] if q.dim() >= 3 else 1
    hkv = k.shape[-3] if k.dim() >= 3 else 1
    attrs = {"is_causal": bool(c.arg(5, "is_causal", False)),
             "dropout_p": float(c.arg(4, "dropout_p", 0.0) or 0.0),
             "scale": c.arg(6, "scale", None),
             "has_mask": len(c.args) > 3}
    if hq != hkv:
        attrs["gqa"] = int(hq // hkv)
    return "sdpa", ATTENTION, c.operands(c.args), attrs


@rule("triton_flash_attention")
def triton_sdpa(c: Call) -> Lowered:
    """graphs/zoo/attention.py's Triton-kernel flash attention: sdpa's operands, FLOPs and
    memory, attrs["impl"] == "triton" for its kernel's speed (ComputeModel.attention_s)."""
    q, k = c.vals[0], c.vals[1]
    attrs = {"is_causal": bool(c.arg(3, "is_causal", True)), "dropout_p": 0.0,
             "scale": None, "has_mask": False, "impl": "triton"}
    if q.shape[-3] != k.shape[-3]:
        attrs["gqa"] = int(q.shape[-3] // k.shape[-3])
    return "triton_flash_attention", ATTENTION, c.operands(c.args[:3]), attrs


@rule("unfused_attention")
def unfused_sdpa(c: Call) -> Lowered:
    """graphs/zoo/attention.py's materialised-scores attention: the same operands and layout as
    sdpa, priced by its own closed form (annotate.unfused_score_passes)."""
    q, k = c.vals[0], c.vals[1]
    attrs = {"is_causal": bool(c.arg(3, "is_causal", True)),
             "dropout_p": float(c.arg(4, "dropout_p", 0.0) or 0.0),
             "scale": None, "has_mask": False, "impl": "unfused"}
    if q.shape[-3] != k.shape[-3]:
        attrs["gqa"] = int(q.shape[-3] // k.shape[-3])
    return "unfused_attention", ATTENTION, c.operands(c.args[:3]), attrs


@rule("embedding")
def embedding(c: Call) -> Lowered:
    if c.is_module:
        ops = c.lw.operand(c.args[0]) + c.module_params("weight")
    else:
        ops = c.operands(c.args)
        # F.embedding(ids, weight) vs aten.embedding(weight, ids): ids are integers
        if ops and ops[0][0].dtype not in ("int64", "int32", "int16", "int8", "uint8"):
            ops = ops[::-1]
    return "embedding", EMBEDDING, ops[:2], {}


@rule("layer_norm", "rms_norm", "group_norm")
def norm(c: Call) -> Lowered:
    if c.is_module:
        ops = c.lw.operand(c.args[0]) + c.module_params("weight", "bias")
        shape = tuple(getattr(c.module, "normalized_shape", (c.outs[0].shape[-1],)))
        eps = getattr(c.module, "eps", None)
    else:
        ops = c.operands(c.args)
        given = c.arg(1, "normalized_shape")
        shape = (given,) if isinstance(given, int) else tuple(given or ())
        eps = c.arg(4 if c.key == "layer_norm" else 3, "eps")
    return c.key, NORM, ops, {"normalized_ndim": len(shape), "eps": jsonable(eps)}


@rule("softmax", "log_softmax")
def softmax(c: Call) -> Lowered:
    dim: Any = c.module.dim if c.is_module else c.arg(1, "dim")
    nd = c.outs[0].dim()
    return c.key, SOFTMAX, c.operands(c.args[:1]), {"dim": nonneg(-1 if dim is None else dim, nd)}


@rule("cross_entropy", "nll_loss")
def loss(c: Call) -> Lowered:
    reduction: Any
    ignore: Any
    if c.is_module:
        reduction, ignore = c.module.reduction, c.module.ignore_index
    else:
        aten = isinstance(c.n.target, torch._ops.OpOverload)
        reduction = c.arg(3 if aten else 6, "reduction", "mean")
        ignore = c.arg(4, "ignore_index", -100)
        if isinstance(reduction, int):   # aten enum: 0 none, 1 mean, 2 sum
            reduction = {0: "none", 1: "mean", 2: "sum"}[reduction]
    return c.key, LOSS, c.operands(c.args[:2]), {
        "reduction": jsonable(reduction), "ignore_index": jsonable(ignore)}


# --- reductions --------------------------------------------------------------------------

@rule("max", "min")
def max_min(c: Call) -> Lowered:
    if len(c.args) == 2:    # torch.max(a, b): pointwise
        return {"max": "maximum", "min": "minimum"}[c.key], ELEMENTWISE, \
            c.operands(c.args), {"scalars": []}
    return reduction(c)


@rule(*(REDUCTION_OPS - {"max", "min"}))
def reduction(c: Call) -> Lowered:
    nd = c.vals[0].dim()
    attrs: dict[str, Any] = {}
    dims: list[int]
    if c.key == "norm":     # norm(x, p, dim, keepdim)
        dim = c.arg(2, "dim", None)
        dims = list(range(nd)) if dim is None else [
            nonneg(d, nd) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        keepdim = bool(c.arg(3, "keepdim", False))
        attrs["p"] = jsonable(c.arg(1, "p", 2))
    elif c.key == "topk":
        k = c.arg(1, "k")
        dims, keepdim = [nonneg(c.arg(2, "dim", -1), nd)], True
        attrs["k"] = int(k)
    elif c.key in SCAN_OPS:
        dims, keepdim = [nonneg(c.arg(1, "dim"), nd)], True
        attrs["scan"] = True
    else:
        dim = c.arg(1, "dim", None)
        if dim is None:
            dim = c.n.kwargs.get("axis")
        if isinstance(dim, torch.dtype):   # x.sum(dtype=...) written positionally
            dim = None
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            dims = list(range(nd))
        else:
            dims = [nonneg(d, nd) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        keepdim = bool(c.arg(2, "keepdim", False))
    attrs.update({"dims": sorted(dims), "keepdim": keepdim})
    return c.key, REDUCTION, c.operands(c.args[:1]), attrs


# --- views -------------------------------------------------------------------------------

@rule(*RESHAPE_OPS, "expand", "alias")
def reshape(c: Call) -> Lowered:
    src, dst = c.vals[0], c.outs[0]
    if c.key == "expand":
        groups = expand_dim_groups(shape_of(src), shape_of(dst))
        copy = False
    else:
        groups = reshape_dim_groups(shape_of(src), shape_of(dst))
        copy = c.key in ("reshape", "flatten") and not src.is_contiguous()
    return c.key, VIEW, c.operands(c.args[:1]), {"dim_groups": groups, "copy": copy}


@rule(*PERMUTE_OPS, "t_last2")
def permute(c: Call) -> Lowered:
    src = c.vals[0]
    nd = src.dim()
    perm = list(range(nd))
    if c.key == "permute":
        dims: Any = [c.lw.val(a) for a in c.n.args[1:]] or c.lw.val(c.n.kwargs.get("dims"))
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        perm = [nonneg(d, nd) for d in dims]
    elif c.key == "transpose":
        d0 = nonneg(c.arg(1, "dim0"), nd)
        d1 = nonneg(c.arg(2, "dim1"), nd)
        perm[d0], perm[d1] = perm[d1], perm[d0]
    elif c.key in ("t", "t_last2", "adjoint") and nd >= 2:
        perm[-1], perm[-2] = perm[-2], perm[-1]
    elif c.key == "numpy_T":
        perm = perm[::-1]
    copy = c.key == "clone" or (c.key == "contiguous" and not src.is_contiguous())
    op = "transpose" if c.key in ("t", "t_last2", "numpy_T", "adjoint") else c.key
    return op, VIEW, c.operands(c.args[:1]), {"perm": perm, "copy": copy}


@rule(*SPLIT_OPS)
def split(c: Call) -> Lowered:
    nd = c.vals[0].dim()
    dim = nonneg(c.arg(1, "dim", 0) if c.key == "unbind" else c.arg(2, "dim", 0), nd)
    sizes = [int(t.shape[dim]) if c.key != "unbind" else 1 for t in c.outs]
    return c.key, VIEW, c.operands(c.args[:1]), {"dim": dim, "sizes": sizes, "copy": False}


@rule("getitem")
def getitem(c: Call) -> Lowered:
    producer = cast(fx.Node, c.n.args[0])    # fx records getitem on the producing node
    src = c.lw.p.values[producer]
    if isinstance(src, (tuple, list)):
        i = int(c.lw.val(c.n.args[1]))
        return "getitem", VIEW, c.lw.operand(producer, index=i), {"index": i, "copy": False}
    return tensor_index(c, src)


def tensor_index(c: Call, src: torch.Tensor) -> Lowered:
    """x[idx] on one tensor: basic indexing is a view; advanced indexing (a gather) has no
    rule yet and stays UNKNOWN."""
    idx = c.lw.val(c.n.args[1])
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(x, (torch.Tensor, list)) for x in items):
        return "index", UNKNOWN, c.operands(c.args), {
            "index": jsonable([None if isinstance(x, torch.Tensor) else x for x in items])}
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
    return "getitem", VIEW, c.lw.operand(c.args[0]), {
        "index": jsonable(items), "dim_groups": groups, "copy": False}


@rule("slice", "narrow", "select")
def slice_(c: Call) -> Lowered:
    nd = c.vals[0].dim()
    dim = nonneg(c.arg(1, "dim", 0), nd)
    groups = [[[i], [i]] for i in range(nd)]
    if c.key == "select":
        groups = ([[[i], [i]] for i in range(dim)] + [[[dim], []]]
                  + [[[i], [i - 1]] for i in range(dim + 1, nd)])
    return c.key, VIEW, c.operands(c.args[:1]), {
        "dim": dim, "dim_groups": groups, "copy": False,
        "index": jsonable([c.lw.val(a) for a in c.n.args[2:]])}


@rule("cat", "stack")
def cat(c: Call) -> Lowered:
    dim = nonneg(c.arg(1, "dim", 0), c.outs[0].dim())
    return c.key, VIEW, c.operands(c.args), {"dim": dim, "copy": True}


@rule("pad", "constant_pad_nd")
def pad(c: Call) -> Lowered:
    """F.pad: a copy whose unpadded dims map one to one. A padded dim is not the input dim
    (its edges are new), so it is written as the input dim consumed and the output dim new:
    a split there is gathered first, a split elsewhere is kept."""
    nd = c.vals[0].dim()
    widths = [int(w) for w in c.arg(1, "pad", ())]
    padded = {nd - 1 - i // 2 for i, w in enumerate(widths) if w}
    groups = [[[d], []] if d in padded else [[d], [d]] for d in range(nd)] + [[[], [d]] for d in sorted(padded)]
    return "pad", VIEW, c.operands(c.args[:1]), {"pad": widths, "dim_groups": groups, "copy": True}


# --- elementwise -------------------------------------------------------------------------

@rule(*ELEMENTWISE_OPS)
def elementwise(c: Call) -> Lowered:
    scalars = [jsonable(c.lw.val(a)) for a in c.n.args
               if not (isinstance(a, fx.Node) and c.lw.cls.get(a) != "py")]
    attrs: dict[str, Any] = {"scalars": [s for s in scalars if isinstance(s, (int, float, bool))]}
    if c.key == "to":
        attrs["dtype"] = c.lw.ir_dtype(c.outs[0].dtype)
        # `x.to(y)` / `x.type_as(y)` read only y's dtype
        return "to", ELEMENTWISE, c.operands(c.args[:1]), attrs
    if c.key == "dropout":
        p: Any = c.module.p if c.is_module else c.arg(1, "p", 0.5)
        attrs["p"] = float(p)
        if attrs["p"] == 0.0:    # the identity (nn.Dropout(0.0) of a symbolic trace)
            nd = len(c.outs[0].shape)
            return "alias", VIEW, c.operands(c.args[:1]), {
                "dim_groups": [[[d], [d]] for d in range(nd)], "copy": False}
    if c.is_module:
        return c.key, ELEMENTWISE, c.operands(c.args[:1]), attrs
    return c.key, ELEMENTWISE, c.operands(c.args), attrs


def unknown(c: Call) -> Lowered:
    """No rule: the op is kept (costed as elementwise on its output) and listed as
    unsupported. A leaf module keeps its weights (Conv, MultiheadAttention)."""
    ops = c.operands(c.args)
    if c.is_module:
        for _, t in c.module.named_parameters():
            name = c.lw.p.param_names.get(id(t))
            if name is not None:
                ops.append((c.lw.param_operand(name, t), t.is_floating_point()))
    return c.key, UNKNOWN, ops, {}


# --- IR conventions: einsum equations and view dim groups -------------------------------

def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def nonneg(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def jsonable(v: Any) -> Any:
    """An attribute value as JSON: python scalars as they are, slices and dtypes as text."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple, torch.Size)):
        return [jsonable(x) for x in v]
    if isinstance(v, slice):
        return f"slice({v.start},{v.stop},{v.step})"
    if v is Ellipsis:
        return "..."
    if isinstance(v, torch.dtype):
        return TORCH_DTYPE_NAMES.get(v, str(v))
    return str(v)


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
