"""Tracing once per model: a zoo model's module and symbolic trace are reused across batch
sizes, and shape propagation memoises repeated (op, operand metadata). Oracle: the graph a
reused trace gives at batch b equals, node for node, the one traced from scratch at b with
both off (fresh module, fresh symbolic trace, every node propagated)."""

from __future__ import annotations

import importlib
import json
import pathlib
from typing import Any

import pytest
import torch
from torch import nn

import graphs
from autopar import model as M

# the modules, not the functions the package re-exports under the same names
LOAD: Any = importlib.import_module("graphs.load")
TRACE: Any = importlib.import_module("graphs.trace")

ZOO = {
    "gpt": "gpt:hidden=64,layers=3,heads=4,seq=32,vocab=128",
    "llama_gqa": "llama:hidden=64,layers=3,heads=4,kv_heads=2,ffn=160,seq=32,vocab=128",
    "moe": "moe:hidden=64,layers=4,heads=4,experts=4,ffn=128,seq=32,vocab=128",
}
BATCHES = (1, 3, 2, 8)


def canon(g: graphs.OpGraph):
    """Everything an OpGraph holds, in comparable form."""
    return {"name": g.name, "batch": g.batch, "seq": g.seq, "meta": g.meta,
            "nodes": [n.to_dict() for n in g.nodes()],
            "edges": sorted((u, v, tuple(d["operand_indices"])) for u, v, d in g.g.edges(data=True)),
            "layers": g.layers, "unsupported": g.unsupported}


def scratch(model, batch: int, **kw) -> graphs.OpGraph:
    """The graph as traced before any reuse: nothing kept, nothing memoised."""
    LOAD.clear_reuse()
    TRACE.MEMO = False
    try:
        return graphs.load(model, batch=batch, **kw)
    finally:
        TRACE.MEMO = True
        LOAD.clear_reuse()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_a_zoo_graph_derived_from_one_trace_equals_a_fresh_trace(name, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE", "0")
    spec = ZOO[name]
    expected = {b: canon(scratch(spec, b)) for b in BATCHES}
    LOAD.clear_reuse()
    source = M.model_source(spec)         # traces batch 1, then derives the others
    for b in BATCHES:
        assert canon(source.graph(b)) == expected[b], (name, b)
    # the module was built and symbolically traced once for all the batches
    fx = [c for c in LOAD._ZOO_FX_CACHE.values() if c]
    assert len(fx) == 1 and len(fx[0]) == 1
    assert len({id(v) for v in LOAD._ZOO_PREPARED.values()}) == 1


def test_the_reused_trace_does_not_leak_between_dtypes_or_seqs():
    spec = ZOO["llama_gqa"]
    LOAD.clear_reuse()
    for kw in ({"dtype": "fp32"}, {"seq": 16}, {"dtype": "bf16", "seq": 32}):
        assert canon(graphs.load(spec, batch=2, **kw)) == canon(scratch(spec, 2, **kw)), kw
        graphs.load(spec, batch=2, **kw)          # warm the reuse for the next setting


def test_an_hf_model_through_the_source_equals_a_fresh_trace(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("AUTOPAR_CACHE", "0")
    from tests.integration.test_hf_models import config
    path = tmp_path / "llama3.json"
    path.write_text(json.dumps(config("llama3")))
    spec = f"hf:{pathlib.Path(path)}"
    source = M.model_source(spec, seq=32)
    for b in (1, 2, 4):
        assert canon(source.graph(b)) == canon(scratch(spec, b, seq=32)), b


class _Block(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.up = nn.Linear(h, 4 * h)
        self.down = nn.Linear(4 * h, h)

    def forward(self, x):
        y = self.down(torch.relu(self.up(self.norm(x))))
        return x + y.view(x.size(0), -1, x.size(-1))


class _UserModel(nn.Module):
    """Real (non-meta) weights: propagation goes through functional_call with meta copies."""

    def __init__(self, h: int = 16, n: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(h) for _ in range(n))
        self.head = nn.Linear(h, 8)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x).sum()


@pytest.mark.parametrize("batch", (1, 4))
def test_a_user_module_with_real_weights_is_unchanged_by_the_memo(batch):
    model, x = _UserModel(), torch.randn(batch, 5, 16)
    TRACE.MEMO = False
    try:
        expected = canon(graphs.trace(model, (x,)))
    finally:
        TRACE.MEMO = True
    assert canon(graphs.trace(model, (x,))) == expected


def test_a_factory_is_still_called_per_batch(tmp_path, monkeypatch):
    """A factory may build a different module per batch: it keeps the per-batch path."""
    monkeypatch.setenv("AUTOPAR_CACHE", "0")
    f = tmp_path / "fac.py"
    f.write_text("import torch\nfrom torch import nn\n"
                 "def make(batch, seq=8):\n"
                 "    m = nn.Sequential(*[nn.Linear(16, 16) for _ in range(batch)])\n"
                 "    return m, (torch.empty(batch, seq, 16, device='meta'),)\n")
    source = M.model_source(f"{f}:make")
    assert len(source.graph(1)) < len(source.graph(3))
    assert canon(source.graph(3)) == canon(scratch(f"{f}:make", 3))


def test_the_memo_skips_in_place_ops_and_aliases():
    class M_(nn.Module):
        def forward(self, x):
            a = x.view(x.size(0), -1)
            a.mul_(2)
            b = x.view(x.size(0), -1)
            return (a + b).unsqueeze(0).squeeze(0).sum()

    x = torch.empty(3, 4, 5, device="meta")
    TRACE.MEMO = False
    try:
        expected = canon(graphs.trace(M_(), (x,)))
    finally:
        TRACE.MEMO = True
    assert canon(graphs.trace(M_(), (x,))) == expected


def test_the_memo_key_tells_apart_what_python_equality_does_not():
    key = TRACE._meta_key
    assert key(-0.0) != key(0.0) and key(1) != key(True) != key(1.0)
    a = torch.empty(2, 3, device="meta")
    assert key(a) != key(a.t()) and key(a) != key(a.to(torch.bfloat16))
    assert key(a) != key(torch.nn.Parameter(a))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_a_trace_without_stack_traces_equals_one_with_them(name, monkeypatch):
    """symbolic() records no stack traces (a third of a first trace, for error messages only).
    Oracle: the graph traced with them, as before, node for node."""
    monkeypatch.setenv("AUTOPAR_CACHE", "0")
    plain = TRACE.symbolic

    def with_stacks(module, args, kwargs, graph=None, stack_traces=False):
        return plain(module, args, kwargs, graph, stack_traces=True)

    expected = {}
    monkeypatch.setattr(TRACE, "symbolic", with_stacks)
    for b in (1, 3):
        expected[b] = canon(scratch(ZOO[name], b))
    monkeypatch.setattr(TRACE, "symbolic", plain)
    for b in (1, 3):
        assert canon(scratch(ZOO[name], b)) == expected[b], (name, b)


class _BadMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(5, 7))

    def forward(self, x):
        return x @ self.w        # x is [2, 4]: the shapes do not chain


def test_a_failed_shape_propagation_still_names_the_users_line():
    """The trace records no stack traces; a propagation that fails traces again with them, so
    the message names the model's own line as before."""
    with pytest.raises(graphs.TraceError) as info:
        graphs.trace(_BadMatmul(), (torch.empty(2, 4, device="meta"),), method="symbolic")
    msg = str(info.value)
    assert "shape propagation on meta tensors stopped" in msg
    assert "test_trace_reuse.py" in msg and "return x @ self.w" in msg
