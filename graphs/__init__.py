"""graphs: tracing models into the annotated op-graph IR, layer detection, and the model zoo.

    import graphs
    g = graphs.load("llama2-7b", batch=1, seq=4096)      # or a spec, hf:, file.py:factory
    g = graphs.trace(my_module, (ids,))                  # nn.Module / GraphModule / export
    graphs.summarize(g)
"""

from . import zoo
from .errors import GraphsError, SpecError, TraceError, UnknownModelError
from .ir import (
                 ATTENTION,
                 ELEMENTWISE,
                 EMBEDDING,
                 INPUT,
                 KINDS,
                 LOSS,
                 MATMUL,
                 NORM,
                 OUTPUT,
                 REDUCTION,
                 SOFTMAX,
                 UNKNOWN,
                 VIEW,
                 Layer,
                 Operand,
                 OpGraph,
                 OpNode,
                 dtype_bytes,
                 numel,
)
from .layers import assign_layers, structural_hash
from .load import load
from .summary import summarize
from .trace import trace

__all__ = [
    "load", "trace", "summarize", "assign_layers", "structural_hash", "zoo",
    "GraphsError", "SpecError", "TraceError", "UnknownModelError",
    "OpGraph", "OpNode", "Operand", "Layer", "dtype_bytes", "numel", "KINDS",
    "MATMUL", "ATTENTION", "EMBEDDING", "NORM", "ELEMENTWISE", "SOFTMAX", "REDUCTION", "VIEW",
    "LOSS", "INPUT", "OUTPUT", "UNKNOWN",
]
