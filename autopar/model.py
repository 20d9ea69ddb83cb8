"""A model the planner can trace at any microbatch size, with the traces cached."""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from autopar.validation import MAX_SEQ, check_int
from graphs.ir import OpGraph


class ModelSource:
    """What the user gave (zoo name, spec string, hf:/file: path, nn.Module, GraphModule or
    OpGraph) and how to get its graph for a given batch size."""

    def __init__(self, model: Any, seq: int | None = None, dtype: str = "bf16", example_inputs=None):
        self.model = model
        self.dtype = dtype
        self.example_inputs = example_inputs
        self._graphs: dict[int, OpGraph] = {}
        self.seq: int | None
        self.fixed_batch: int | None
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
            try:
                self.seq = self.graph(self.fixed_batch or 1).seq
            except ValueError:
                if self.fixed_batch is None:       # not a fixed-batch mismatch: a real error
                    raise
                self.seq = self.graph(self.fixed_batch).seq

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
            path = _cache_path(self.model, batch, self.seq, self.dtype) if isinstance(self.model, str) else None
            g = _read_cache(path)
            if g is None:
                # a zoo model is built and symbolically traced once per process; other batch
                # sizes re-run only shape propagation and lowering (graphs/load.py)
                import graphs
                g = graphs.load(self.model, batch=batch, seq=self.seq, dtype=self.dtype,
                                example_inputs=self.example_inputs)
                _write_cache(path, g)
            if g.batch != batch:
                # a factory that builds its own inputs: its batch is the only microbatch
                self.fixed_batch = g.batch
                self._graphs[g.batch] = g
                return self.graph(batch)
            self._graphs[batch] = g
        return self._graphs[batch]

    def summary(self, batch: int = 1) -> dict[str, Any]:
        g = self.graph(self.fixed_batch or batch)
        return {"name": self.name, "params": g.param_count, "seq": g.seq, "n_layers": len(g.layers),
                "family": g.meta.get("family", "")}


def model_source(model: Any, *, seq: int | None = None, dtype: str = "bf16",
                 example_inputs=None) -> ModelSource:
    """The ModelSource that plan() and compare() search over; warns when the model (a traced
    graph with its example inputs, or an OpGraph) pins the microbatch size, since then only
    that one size is searched."""
    if isinstance(model, ModelSource):
        return model
    if seq is not None:
        check_int("seq", seq, 1, MAX_SEQ)
    source = ModelSource(model, seq=seq, dtype=dtype, example_inputs=example_inputs)
    if source.fixed_batch is not None:
        # stacklevel 3: the user's call of autopar.plan / autopar.compare
        warnings.warn(f"model {source.name!r} is traced at batch {source.fixed_batch}, which pins the microbatch "
                      f"size to {source.fixed_batch}: no other microbatch size is searched. Pass a factory "
                      f"that takes `batch` (and `seq`) to let autopar trace other sizes.",
                      UserWarning, stacklevel=3)
    return source


def _batch_of(example_inputs) -> int | None:
    for t in example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,):
        shape = getattr(t, "shape", None)
        if shape is not None and len(shape) >= 1:
            return int(shape[0])
    return None


# ---- trace cache -----------------------------------------------------------------------------
# Tracing a 100-layer model takes seconds; its graph depends only on the model string, the
# shapes, the dtype and the tracer's code, so it is kept on disk keyed by all of them.
# AUTOPAR_CACHE=0 turns it off; AUTOPAR_CACHE_DIR moves it (default ~/.cache/autopar).

@lru_cache(maxsize=1)
def _graphs_code_hash() -> str:
    import graphs
    root = Path(graphs.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _tracer_versions(model: str) -> str:
    """The versions of the libraries whose code shapes the traced graph: torch's export always,
    and transformers' model code for HF models (a new release can change their modules)."""
    import torch
    versions = f"torch={torch.__version__}"
    if model.startswith("hf:"):
        try:
            import transformers
            versions += f",transformers={transformers.__version__}"
        except ImportError:      # the trace itself reports the missing extra
            pass
    return versions


def _cache_path(model: str, batch: int, seq: int | None, dtype: str) -> Path | None:
    if os.environ.get("AUTOPAR_CACHE", "1") == "0":
        return None
    h = hashlib.sha256(f"{model}|{batch}|{seq}|{dtype}|{_graphs_code_hash()}|{_tracer_versions(model)}".encode())
    # Models read from files (hf:config.json, file.py:factory) also depend on the file's content.
    for part in (model[3:] if model.startswith("hf:") else model.rsplit(":", 1)[0],):
        p = Path(part)
        if p.suffix in (".json", ".py") and p.is_file():
            h.update(p.read_bytes())
    root = Path(os.environ.get("AUTOPAR_CACHE_DIR", Path.home() / ".cache" / "autopar"))
    return root / "graphs" / f"{h.hexdigest()[:24]}.pkl"


def _read_cache(path: Path | None) -> OpGraph | None:
    if path is None or not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            g = pickle.load(f)
        return g if isinstance(g, OpGraph) else None
    except Exception:   # a stale or truncated entry is just a miss
        return None


def _write_cache(path: Path | None, g: OpGraph) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(g, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError:     # a read-only home is not an error, just no cache
        pass
