"""The on-disk trace cache: a hit returns the graph that was traced, and the key moves with
everything that shapes the graph (model, shapes, dtype, graphs/ code, torch and, for HF models,
transformers)."""

from __future__ import annotations

import sys
import types

from autopar import model as M


def test_a_second_source_reads_the_graph_the_first_traced(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path))
    g1 = M.model_source("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1000").graph(2)
    files = sorted((tmp_path / "graphs").glob("*.pkl"))
    assert files
    # a fresh source: only the disk holds the graph, and reading it writes nothing new
    g2 = M.model_source("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1000").graph(2)
    assert g2 is not g1
    assert [(n.name, n.op, n.out_shapes, n.fwd_flops) for n in g2.nodes()] == \
        [(n.name, n.op, n.out_shapes, n.fwd_flops) for n in g1.nodes()]
    assert sorted((tmp_path / "graphs").glob("*.pkl")) == files
    M.model_source("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1000").graph(4)   # another batch: a new entry
    assert len(list((tmp_path / "graphs").glob("*.pkl"))) == len(files) + 1


def test_the_key_moves_with_the_transformers_version_for_hf_models_only(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path))
    fake = types.ModuleType("transformers")
    fake.__version__ = "5.0.0"                                # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", fake)
    hf_a, zoo_a = M._cache_path("hf:llama3-8b", 1, 512, "bf16"), M._cache_path("gpt-350m", 1, 512, "bf16")
    fake.__version__ = "5.1.0"                                # type: ignore[attr-defined]
    hf_b, zoo_b = M._cache_path("hf:llama3-8b", 1, 512, "bf16"), M._cache_path("gpt-350m", 1, 512, "bf16")
    assert hf_a != hf_b and zoo_a == zoo_b


def test_the_key_moves_with_torch_and_is_off_on_request(tmp_path, monkeypatch):
    import torch
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path))
    a = M._cache_path("gpt-350m", 1, 512, "bf16")
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert M._cache_path("gpt-350m", 1, 512, "bf16") != a
    monkeypatch.setenv("AUTOPAR_CACHE", "0")
    assert M._cache_path("gpt-350m", 1, 512, "bf16") is None
