"""load(): any way of naming a model -> OpGraph."""

from __future__ import annotations

import importlib.util
import os
import re
import traceback

import torch

from . import zoo
from .errors import GraphsError, SpecError, UnknownModelError
from .ir import OpGraph
from .trace import trace
from .zoo.config import LIMITS

# Token ids of [batch, seq] beyond these make traced shapes whose element counts overflow int64
# further down (attention scores are batch x heads x seq x seq).
MAX_BATCH = 1 << 20

_FACTORY_RE = re.compile(r"^(?P<path>.+\.py):(?P<func>[A-Za-z_][A-Za-z0-9_]*)$")


def load(model, batch: int = 1, seq: int | None = None, example_inputs=None,
         dtype: str | None = "bf16", *, n_layers: int | None = None,
         name: str | None = None) -> OpGraph:
    """Trace a model into an OpGraph.

    model: a zoo name ("gpt-1.3b"), a spec ("llama:hidden=4096,layers=32,heads=32,ffn=11008"),
        "hf:path/to/config.json", "path/to/file.py:factory" (factory() returns
        (module, example_inputs); it is passed `batch` and `seq` if it takes them), an nn.Module, an fx.GraphModule or an ExportedProgram
        (the last three need example_inputs).
    batch, seq: shape of the token ids for zoo and hf models (seq defaults to the model's).
    """
    for key, value, hi in (("batch", batch, MAX_BATCH), ("seq", seq, LIMITS["seq"][1])):
        if value is None and key == "seq":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
            raise SpecError(f"{key} must be a whole number from 1 to {hi:,} (got {value!r})")
    if isinstance(model, str):
        return _load_named(model, batch, seq, example_inputs, dtype, n_layers, name)
    if isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        if example_inputs is None and not isinstance(model, torch.export.ExportedProgram):
            raise GraphsError(f"load({type(model).__name__}) needs example_inputs: a tuple of "
                              "tensors (meta tensors are fine) for its forward")
        return trace(model, example_inputs if example_inputs is not None else (), name=name,
                     dtype=dtype, n_layers=n_layers)
    raise UnknownModelError(f"cannot load a {type(model).__name__}: pass a model name, spec, "
                            "'hf:config.json', 'file.py:factory', or an nn.Module")


def _load_named(model, batch, seq, example_inputs, dtype, n_layers, name) -> OpGraph:
    text = model.strip()
    if text.startswith("hf:"):
        return _load_hf(text[3:], batch, seq, dtype, n_layers, name or text)
    m = _FACTORY_RE.match(text)
    if m or text.endswith(".py"):
        return _load_factory(text, m, dtype, n_layers, name, batch, seq)
    if example_inputs is not None:
        cfg, seq, module, meta = _build_zoo(text, seq)
        return trace(module, example_inputs, name=name or cfg.name or text, dtype=dtype,
                     meta=dict(meta), n_layers=n_layers)
    cfg, seq, module, meta = _zoo_prepared(text, seq)
    return trace(module, zoo.example_inputs(cfg, batch, seq, device="meta"),
                 name=name or cfg.name or text, dtype=dtype, meta=dict(meta), n_layers=n_layers,
                 fx_cache=_ZOO_FX_CACHE.setdefault((text, seq), {}))


def _build_zoo(text: str, seq: int | None):
    """(config, seq, module on meta, graph meta) of a zoo name or spec at `seq`."""
    cfg = zoo.get_config(text)
    seq = seq or cfg.seq
    if seq > cfg.seq:
        if cfg.family == "llama":
            cfg = cfg.replace(seq=seq)       # RoPE tables are buffers: no parameters change
        else:
            raise SpecError(f"seq={seq} exceeds the {cfg.seq} learned positions of "
                            f"{cfg.name or cfg.family}; use a spec with seq={seq}, e.g. "
                            f"'{cfg.name or cfg.family}:seq={seq}'")
    module = zoo.build_module(cfg, device="meta")
    meta = {"family": cfg.family, "hidden": cfg.hidden, "layers": cfg.layers,
            "heads": cfg.heads, "kv_heads": cfg.kv_heads, "ffn": cfg.ffn, "vocab": cfg.vocab,
            "seq": seq, "experts": cfg.experts, "tied": cfg.tied}
    return cfg, seq, module, meta


# The planner asks for one model at many microbatch sizes. A zoo module and its symbolic
# trace do not depend on the batch (nothing in them reads an input's size; see trace()'s
# fx_cache), so both are made once per (name, seq) per process and only shape propagation
# and lowering run again per batch. Zoo forwards keep no state, so sharing the module is safe.
# Bounded: a long session that plans many models keeps only the last few.
_ZOO_PREPARED_MAX = 8     # keys: (name, None) and (name, seq) alias one entry
_ZOO_PREPARED: dict[tuple[str, int | None], tuple] = {}
_ZOO_FX_CACHE: dict[tuple[str, int | None], dict] = {}


def _zoo_prepared(text: str, seq: int | None):
    key = (text, seq)
    if key not in _ZOO_PREPARED:
        built = _build_zoo(text, seq)
        resolved = (text, built[1])   # seq=None and seq=the default are the same model
        if resolved not in _ZOO_PREPARED:
            while len(_ZOO_PREPARED) >= _ZOO_PREPARED_MAX:
                old = next(iter(_ZOO_PREPARED))
                del _ZOO_PREPARED[old]
                _ZOO_FX_CACHE.pop(old, None)
            _ZOO_PREPARED[resolved] = built
        _ZOO_PREPARED[key] = _ZOO_PREPARED[resolved]
    return _ZOO_PREPARED[key]


def clear_reuse() -> None:
    """Forget the built zoo modules and their traces (the next load() traces from scratch)."""
    _ZOO_PREPARED.clear()
    _ZOO_FX_CACHE.clear()


def _load_hf(path, batch, seq, dtype, n_layers, name) -> OpGraph:
    from .zoo import hf
    module, config = hf.build(path, batch=batch)
    meta = hf.config_meta(config)
    seq = seq or meta["seq"] or 1024
    meta["seq"] = seq
    ids = torch.empty(batch, seq, dtype=torch.long, device="meta")
    return trace(module, (), kwargs={"input_ids": ids, "labels": ids.clone()}, name=name,
                 dtype=dtype, meta=meta, n_layers=n_layers, method="export")


def _load_factory(text, m, dtype, n_layers, name, batch=None, seq=None) -> OpGraph:
    if m is None:
        raise SpecError(f"{text!r}: name the factory function too, as 'path/to/file.py:factory'")
    path, func = m.group("path"), m.group("func")
    if not os.path.isfile(path):
        raise SpecError(f"{path!r} does not exist (from {text!r})")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(f"_autopar_factory_{stem}", path)
    if spec is None or spec.loader is None:
        raise SpecError(f"{path} cannot be imported as a Python file (from {text!r})")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except (Exception, SystemExit) as e:      # the user's code: show their error, not autopar's traceback
        raise SpecError(f"{path} failed to import: {_user_error(e, path)}") from None
    factory = getattr(mod, func, None)
    if not callable(factory):
        public = [k for k, v in vars(mod).items() if callable(v) and not k.startswith("_")]
        raise SpecError(f"{path} has no function {func!r}; callables there: {public}")
    # A factory that takes `batch` / `seq` lets the planner trace other microbatch sizes;
    # one that takes neither fixes the microbatch at its example inputs' batch.
    import inspect
    params = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("batch", batch), ("seq", seq)) if k in params and v is not None}
    try:
        result = factory(**kwargs)
    except (Exception, SystemExit) as e:      # the user's code: show their error, not autopar's traceback
        raise SpecError(f"{path}:{func}() raised {_user_error(e, path)}") from None
    if not (isinstance(result, tuple) and len(result) == 2
            and isinstance(result[0], torch.nn.Module)):
        raise SpecError(f"{text}: factory() must return (module, example_inputs), "
                        f"got {type(result).__name__}")
    module, inputs = result
    return trace(module, inputs, name=name or f"{os.path.basename(path)}:{func}", dtype=dtype,
                 n_layers=n_layers)


def _user_error(e: BaseException, path: str) -> str:
    """`Type: message (file:line)`, at the innermost frame in the user's file."""
    where = ""
    if isinstance(e, SyntaxError):
        where = f" ({e.filename or path}:{e.lineno})"
    else:
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if os.path.abspath(f.filename) == os.path.abspath(path)]
        if frames:
            where = f" ({path}:{frames[-1].lineno})"
    text = " ".join(str(e.msg if isinstance(e, SyntaxError) else e).split())
    return f"{type(e).__name__}: {text}{where}"
