"""Lowering: a shape-propagated torch.fx graph -> the OpGraph IR (graphs/ir.py).

Works on both graphs the tracer produces: torch-level graphs from `torch.fx.symbolic_trace`
(call_module leaves such as nn.Linear, torch/F functions, tensor methods) and aten-level
graphs from `torch.export` (params as placeholders). Every fx op is first mapped to a
canonical name (`Lowerer.canonical`), then the rule registered for that name in
graphs/lower_rules.py turns it into (op, kind, operands, attrs) whichever graph it came from.

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
from .ir import INPUT, OUTPUT, UNKNOWN, Operand, OpGraph, OpNode
from .lower_rules import RULES, TORCH_DTYPE_NAMES, Call, Lowered, OperandGrad, shape_of, unknown


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
# canonical op names (the keys of lower_rules.RULES), and the driver's own op tables

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

# ops whose output never carries a gradient
NON_DIFFERENTIABLE = {
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
    "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "and_", "or_",
    "invert", "floor", "ceil", "round", "sign", "sgn", "zeros_like", "ones_like",
    "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "argmax",
    "argmin", "isnan", "isinf", "floor_divide", "remainder", "fmod", "mod",
}
# views of a parameter that keep its numel: folded into the consumer as a param operand
PARAM_FOLDABLE = {"view", "reshape", "t", "transpose", "permute", "unsqueeze", "squeeze",
                  "contiguous", "to", "alias", "clone", "flatten", "unflatten"}


def dtype_name(dt: torch.dtype) -> str:
    try:
        return TORCH_DTYPE_NAMES[dt]
    except KeyError:
        raise ValueError(f"dtype {dt} has no IR name; known: "
                         f"{sorted(str(d) for d in TORCH_DTYPE_NAMES)}") from None


def _tensors(v: Any) -> list[torch.Tensor] | None:
    """The tensor(s) a node produced, or None when it produced a python value."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return list(v)
    return None


class Lowerer:
    """Walks the fx graph once: classifies each node, lowers each activation node through
    its rule, and owns what the rules share (operand construction, parameter ownership,
    which outputs need gradients)."""

    def __init__(self, prog: TracedProgram, graph: OpGraph, dtype: str | None):
        self.p = prog
        self.g = graph
        self.dtype = dtype
        self.cls: dict[fx.Node, str] = {}
        self.param_of: dict[fx.Node, str] = dict(prog.params)
        self.owned: set[str] = set()
        self.requires_grad: dict[str, list[bool]] = {}   # IR node -> per output
        self.key: dict[fx.Node, str] = {}
        self.identity_of: dict[fx.Node, fx.Node] = {}   # a no-op node -> the node it passes on

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
            name = type(self.p.modules[str(n.target)]).__name__
            return MODULE_OPS.get(name, name)
        if n.op == "call_method":
            name = str(n.target)
        elif n.op == "call_function":
            t = n.target
            if isinstance(t, torch._ops.OpOverload):
                name = t._overloadpacket.__name__
            else:
                name = getattr(t, "__name__", None) or str(t)
            if t is getattr and len(n.args) > 1 and n.args[1] in ("T", "mT", "mH", "H"):
                name = {"T": "numpy_T"}.get(str(n.args[1]), "t_last2")
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
        if n.op == "call_module" and any(True for _ in self.p.modules[str(n.target)].parameters()):
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
    def operand(self, a: fx.Node, index: int | None = None) -> list[OperandGrad]:
        """Operand(s) for fx node `a`, each with whether it needs a gradient."""
        a = self.identity_of.get(a, a)
        c = self.cls[a]
        ts = _tensors(self.p.values[a])
        if ts is None:    # classify() makes only tensor-valued nodes act, param or const
            raise TypeError(f"{a.name} ({c}) has no tensor value")
        if c == "param":
            name = self.param_of[a]
            t = ts[0]
            return [(self.param_operand(name, t), t.is_floating_point())]
        if c == "const":
            return [(Operand(shape=shape_of(t), dtype=self.ir_dtype(t.dtype)), False)
                    for t in ts]
        # act: a multi-output producer used whole expands to one operand per output
        rg = self.requires_grad.get(a.name, [False] * len(ts))
        idx = range(len(ts)) if index is None else [index]
        return [(Operand(shape=shape_of(ts[i]), dtype=self.ir_dtype(ts[i].dtype), source=a.name,
                         source_index=i if len(ts) > 1 else 0), rg[i]) for i in idx]

    def param_operand(self, name: str, t: torch.Tensor) -> Operand:
        owns = name not in self.owned
        self.owned.add(name)
        return Operand(shape=shape_of(t), dtype=self.ir_dtype(t.dtype), param=name,
                       owns_param=owns)

    def module_param(self, mod: torch.nn.Module, attr: str) -> OperandGrad | None:
        t = getattr(mod, attr, None)
        if t is None:
            return None
        name = self.p.param_names.get(id(t))
        if name is None:       # a buffer, or a plain tensor attribute
            return Operand(shape=shape_of(t), dtype=self.ir_dtype(t.dtype)), False
        return self.param_operand(name, t), t.is_floating_point()

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
            if self.is_identity(n, key):
                self.identity_of[n] = self.identity_of.get(n.all_input_nodes[0], n.all_input_nodes[0])
                continue
            node, grads = self.lower(n, key)
            self.g.add(node)
            if node.kind == UNKNOWN:
                self.g.unsupported.append(node.name)
        return self.g

    def is_identity(self, n: fx.Node, key: str) -> bool:
        """An aten dropout of p=0 (HF configs that switch dropout off) passes its input on:
        no op. (Graphs of torch-level calls, which the runtime executes node by node, keep it
        as a free view.)"""
        if (key != "dropout" or not isinstance(n.target, torch._ops.OpOverload)
                or not n.all_input_nodes):
            return False
        p = self.arg(n, 1, "p", 0.5)
        return isinstance(p, (int, float)) and float(p) == 0.0 \
            and self.cls.get(n.all_input_nodes[0]) == "act"

    def lower(self, n: fx.Node, key: str) -> tuple[OpNode, list[bool]]:
        outs = _tensors(self.p.values.get(n)) or []
        out_shapes = [shape_of(t) for t in outs]
        out_dtype = self.ir_dtype(outs[0].dtype) if outs else "fp32"
        module_path = _module_path(n)
        if n.op == "placeholder":
            node = OpNode(n.name, "placeholder", INPUT, [], out_shapes, out_dtype,
                          {"input": n.target}, module_path, target=str(n.target))
            self.requires_grad[n.name] = [False]
            return node, []
        if n.op == "output":
            ops = [o for a in self.tensor_args(n) for o in self.operand(a)]
            # A training step keeps only the loss: the scalar backward starts from. What a
            # model returns beside it (HF's logits) is never gathered or kept.
            losses: list[OperandGrad] = [(o, g) for o, g in ops if o.shape == () and g]
            if losses:
                ops = losses
            node = OpNode(n.name, "output", OUTPUT, [o for o, _ in ops], [], out_dtype,
                          {}, module_path, target="output")
            return node, [g for _, g in ops]

        try:
            op, kind, ops, attrs = self.apply_rule(n, key)
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

    def apply_rule(self, n: fx.Node, key: str) -> Lowered:
        """The rule registered for `key` (graphs/lower_rules.py), or `unknown`."""
        args = self.tensor_args(n)
        call = Call(self, n, key, args, [self.p.values[a] for a in args],
                    _tensors(self.p.values[n]) or [])
        return RULES.get(key, unknown)(call)


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
        return f"{type(modules[str(n.target)]).__name__}({n.target})"
    t = n.target
    if isinstance(t, str):
        return f"Tensor.{t}"
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def lower(prog: TracedProgram, graph: OpGraph, dtype: str | None = "bf16") -> OpGraph:
    """Fill `graph` with the IR of `prog`; returns it."""
    return Lowerer(prog, graph, dtype).run()
