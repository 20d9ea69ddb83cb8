"""A model the planner can trace at any microbatch size, with the traces cached."""

from __future__ import annotations

from typing import Any

from graphs.ir import OpGraph


class ModelSource:
    """What the user gave (zoo name, spec string, hf:/file: path, nn.Module, GraphModule or
    OpGraph) and how to get its graph for a given batch size."""

    def __init__(self, model: Any, seq: int | None = None, dtype: str = "bf16", example_inputs=None):
        self.model = model
        self.dtype = dtype
        self.example_inputs = example_inputs
        self._graphs: dict[int, OpGraph] = {}
        if isinstance(model, OpGraph):
            self._graphs[model.batch] = model
            self.name = model.name
            self.seq = model.seq
            self.fixed_batch = model.batch
        elif isinstance(model, str):
            self.name = model
            self.seq = seq
            self.fixed_batch = None
        else:
            self.name = getattr(model, "name", None) or type(model).__name__
            self.seq = seq
            self.fixed_batch = None if example_inputs is None else _batch_of(example_inputs)
        if self.seq is None:
            self.seq = self.graph(self.fixed_batch or 1).seq

    @property
    def loadable(self) -> bool:
        """True if the model can be rebuilt from its name alone (so a plan file can be re-run)."""
        return isinstance(self.model, str)

    def graph(self, batch: int) -> OpGraph:
        if self.fixed_batch is not None and batch != self.fixed_batch:
            raise ValueError(f"model {self.name!r} was given as a traced graph / example inputs of batch "
                             f"{self.fixed_batch}; it cannot be re-traced at batch {batch}. Pass a zoo name or "
                             f"a factory so autopar can trace other microbatch sizes, or set the microbatch "
                             f"size to {self.fixed_batch}.")
        if batch not in self._graphs:
            import graphs
            self._graphs[batch] = graphs.load(self.model, batch=batch, seq=self.seq, dtype=self.dtype,
                                              example_inputs=self.example_inputs)
        return self._graphs[batch]

    def summary(self, batch: int = 1) -> dict[str, Any]:
        g = self.graph(self.fixed_batch or batch)
        return {"name": self.name, "params": g.param_count, "seq": g.seq, "n_layers": len(g.layers),
                "family": g.meta.get("family", "")}


def _batch_of(example_inputs) -> int | None:
    for t in example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,):
        shape = getattr(t, "shape", None)
        if shape is not None and len(shape) >= 1:
            return int(shape[0])
    return None
