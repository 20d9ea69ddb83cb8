"""Models as a user hands them over: a sequence length other than the config's (`--seq`), a
traced fx.GraphModule with example inputs through the Python API, and ops HF models use that
the zoo does not (F.pad)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
import graphs
from autopar.cli import main
from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.sharding.rules import follow
from graphs.ir import UNKNOWN, VIEW

SPEC = "gpt:hidden=64,layers=2,heads=4,seq=32,vocab=128"
TWO_H100 = ["--cluster", "dgx-h100", "--nodes", "1", "--gpus-per-node", "2", "--global-batch", "8"]


# ---- --seq on plan, compare and evaluate -------------------------------------------------------

def test_plan_evaluate_compare_take_seq(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", SPEC, "--seq", "16", *TWO_H100, "-o", str(out)]) == 0
    assert autopar.Plan.from_json(out).model.seq == 16
    capsys.readouterr()
    assert main(["evaluate", SPEC, "--seq", "16", *TWO_H100, "--dp", "2", "--tp", "1", "--pp", "1",
                 "--microbatch", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["seq"] == 16
    js = tmp_path / "c.json"
    assert main(["compare", SPEC, "--seq", "16", *TWO_H100, "--strategies", "dp", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["plans"]["dp"]["model"]["seq"] == 16
    capsys.readouterr()
    # without --seq the spec's own sequence length
    assert main(["evaluate", SPEC, *TWO_H100, "--dp", "2", "--tp", "1", "--pp", "1", "--microbatch", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["seq"] == 32


@pytest.mark.parametrize("cmd", ["plan", "compare", "evaluate"])
@pytest.mark.parametrize("bad", ["0", "-3", "x", "2.5", str(2**20 + 1)])
def test_bad_seq_is_a_one_line_exit_2(cmd, bad, capsys):
    assert main([cmd, SPEC, "--seq", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seq" in err


def test_python_api_checks_seq():
    with pytest.raises(ValueError, match="seq"):
        autopar.plan(SPEC, "dgx-h100", nodes=1, gpus_per_node=2, seq=0)


# ---- a traced GraphModule with example inputs --------------------------------------------------

class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 128, d: int = 32, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids, targets):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def test_plan_and_compare_take_a_traced_graph_and_warn_that_it_pins_the_microbatch():
    gm = torch.fx.symbolic_trace(TinyLM())
    ids = torch.zeros(4, 16, dtype=torch.long)
    with pytest.warns(UserWarning, match="pins the microbatch size to 4.*factory that takes `batch`"):
        p = autopar.plan(gm, "dgx-h100", nodes=1, gpus_per_node=2, global_batch=16, example_inputs=(ids, ids),
                         workers=1)
    assert p.training.microbatch_size == 4 and p.model.seq == 16 and not p.model.loadable
    assert p.model.params == sum(t.numel() for t in TinyLM().parameters())
    with pytest.warns(UserWarning, match="pins the microbatch size to 4"):
        rows = autopar.compare(gm, "dgx-h100", nodes=1, gpus_per_node=2, global_batch=16,
                               example_inputs=(ids, ids), strategies=["dp"])
    assert rows[0].plan is not None and rows[0].plan.training.microbatch_size == 4


def test_a_model_autopar_can_retrace_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autopar.compare(SPEC, "dgx-h100", nodes=1, gpus_per_node=2, global_batch=8, strategies=["dp"])


# ---- pad --------------------------------------------------------------------------------------

class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return F.pad(self.proj(x), (1, 2)).sum()


def test_pad_keeps_splits_of_unpadded_dims_and_gathers_a_split_padded_dim():
    g = graphs.load(torch.fx.symbolic_trace(Padded()), example_inputs=(torch.randn(4, 3, 8),))
    assert not [n for n in g.nodes() if n.kind == UNKNOWN]
    pad = next(n for n in g.nodes() if n.op == "pad")
    assert pad.kind == VIEW and pad.out_shape == (4, 3, 11) and pad.attrs["pad"] == [1, 2]
    cl = load_cluster("dgx-h100", 1, 2)
    mesh = Mesh(cl, Submesh(1, 2), (2, 1))
    cm = ComputeModel(cl.gpu, "bf16")
    batch_split = follow(pad, (1, 0, 0), mesh, cm)
    assert batch_split.out_spec == (1, 0, 0) and not batch_split.collectives
    # the padded dim cannot stay split: its [4, 3, 8] bf16 input is gathered, in forward and in backward
    last_split = follow(pad, (0, 0, 1), mesh, cm)
    assert last_split.out_spec == (0, 0, 0)
    assert [c.kind for c in last_split.collectives] == ["all_gather", "all_gather"]
    assert all(c.nbytes == 4 * 3 * 8 * 2 for c in last_split.collectives)
