"""The zoo's GPT and Llama attention forwards read the input's sizes by index (`shape = x.shape;
b, s, h = shape[0], shape[1], shape[2]`) instead of unpacking `x.shape`: fx's symbolic trace
unpacks a traced size by disassembling the caller's bytecode at each call (48 times in
gpt-39b's first trace, serial before the planner's workers fork). Oracle: each forward as it
was (the unpacking line put back into its source), traced into the same graph, to the byte.
(MoE's forward is left as it was: the same change there traces a different graph.)"""

from __future__ import annotations

import importlib
import inspect
import pickle
import textwrap

import pytest

from graphs.zoo import gpt, llama

LOAD = importlib.import_module("graphs.load")    # the module (graphs.load is also its function)
MODELS = [("gpt:hidden=256,layers=4,heads=4,seq=128,vocab=1024", gpt.Attention),
          ("llama:hidden=256,layers=3,heads=4,kv_heads=2,seq=128,vocab=1024", llama.Attention)]


def _old_forward(cls):
    """cls.forward with `x.shape` unpacked, as before."""
    src = textwrap.dedent(inspect.getsource(cls.forward))
    lines = src.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.strip() == "shape = x.shape")
    names = lines[at + 1].split("=")[0].strip()
    assert lines[at + 1].strip() == f"{names} = shape[0], shape[1], shape[2]"
    while at > 0 and lines[at - 1].lstrip().startswith("#"):
        at -= 1                                       # the comment that explains it
    end = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{names} = shape[0]"))
    indent = lines[end][: len(lines[end]) - len(lines[end].lstrip())]
    old = "".join(lines[:at]) + f"{indent}{names} = x.shape\n" + "".join(lines[end + 1:])
    scope = dict(vars(inspect.getmodule(cls)))
    exec(compile(old, f"<old {cls.__name__}.forward>", "exec"), scope)
    return scope["forward"]


def _trace(spec: str, batch: int) -> bytes:
    LOAD._ZOO_PREPARED.clear()
    LOAD._ZOO_FX_CACHE.clear()
    return pickle.dumps(LOAD.load(spec, batch=batch, dtype="fp16"))


@pytest.mark.parametrize("spec,cls", MODELS)
def test_same_graph_as_unpacking(spec, cls, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE", "0")
    for batch in (1, 3):
        new = _trace(spec, batch)
        with monkeypatch.context() as m:
            m.setattr(cls, "forward", _old_forward(cls))
            old = _trace(spec, batch)
        assert new == old
