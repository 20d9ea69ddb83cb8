"""graphs: tracing models into the annotated op-graph IR, layer detection, and the model zoo.

    import graphs
    g = graphs.load("llama2-7b", batch=1, seq=4096)      # or a spec, hf:, file.py:factory
    g = graphs.trace(my_module, (ids,))                  # nn.Module / GraphModule / export
    graphs.summarize(g)
"""

from .errors import GraphsError, SpecError, TraceError, UnknownModelError
from .ir import (ATTENTION, ELEMENTWISE, EMBEDDING, INPUT, KINDS, LOSS, MATMUL, NORM, OUTPUT,
                 REDUCTION, SOFTMAX, UNKNOWN, VIEW, Layer, OpGraph, OpNode, Operand,
                 dtype_bytes, numel)

# Tracing needs torch (a second to import); reading a graph does not. The tracing half loads on
# first use, so tools that only read cached graphs start fast.
_LAZY = {"load": ("load", "load"), "trace": ("trace", "trace"), "summarize": ("summary", "summarize"),
         "assign_layers": ("layers", "assign_layers"), "structural_hash": ("layers", "structural_hash"),
         "zoo": ("zoo", None)}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod_name, attr = _LAZY[name]
        mod = importlib.import_module(f".{mod_name}", __name__)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'graphs' has no attribute {name!r}")


__all__ = [
    "load", "trace", "summarize", "assign_layers", "structural_hash", "zoo",
    "GraphsError", "SpecError", "TraceError", "UnknownModelError",
    "OpGraph", "OpNode", "Operand", "Layer", "dtype_bytes", "numel", "KINDS",
    "MATMUL", "ATTENTION", "EMBEDDING", "NORM", "ELEMENTWISE", "SOFTMAX", "REDUCTION", "VIEW",
    "LOSS", "INPUT", "OUTPUT", "UNKNOWN",
]
