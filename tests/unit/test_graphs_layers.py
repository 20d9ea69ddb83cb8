"""Layer grouping, structural hashes, clustering inputs and view dim maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphs
from graphs.layers import block_of, cut_bytes
from graphs.lower_rules import canonical_einsum, linear_equation, matmul_equation, reshape_dim_groups


def small(family: str, layers: int = 4) -> str:
    base = {"gpt": "gpt:hidden=64,heads=4,seq=32,vocab=100",
            "llama": "llama:hidden=64,heads=4,kv_heads=2,seq=32,vocab=100,ffn=128",
            "moe": "moe:hidden=64,heads=4,seq=32,vocab=100,experts=4"}[family]
    return f"{base},layers={layers}"


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_blocks_share_one_hash_and_differ_from_embed_and_head(family):
    g = graphs.load(small(family, 4))
    names = [L.name for L in g.layers]
    assert names == ["embed", "block.0", "block.1", "block.2", "block.3", "head"]
    hashes = [L.structural_hash for L in g.layers]
    assert len(set(hashes[1:5])) == 1
    assert hashes[0] != hashes[1] and hashes[5] != hashes[1] and hashes[0] != hashes[5]
    assert graphs.summarize(g)["distinct_layer_kinds"] == 3
    # every node is in exactly one layer, and node.layer agrees
    assert sorted(n for L in g.layers for n in L.nodes) == sorted(n.name for n in g.nodes())
    for L in g.layers:
        assert all(g.node(n).layer == L.index for n in L.nodes)
    # blocks own their parameters and FLOPs
    assert g.layers[1].param_count == g.layers[2].param_count > 0
    assert sum(L.param_count for L in g.layers) == g.param_count
    assert g.layers[1].fwd_flops == pytest.approx(g.layers[4].fwd_flops)


def test_moe_blocks_alternate_between_two_hashes():
    g = graphs.load(small("moe", 4))
    blocks = g.layers[1:5]
    dense, moe = {blocks[0].structural_hash, blocks[2].structural_hash}, \
        {blocks[1].structural_hash, blocks[3].structural_hash}
    assert len(dense) == 1 and len(moe) == 1 and dense != moe
    assert any(n.module_path.startswith("blocks.1.moe") for n in g.layer_nodes(2))


def test_hash_is_sensitive_to_shapes_and_insensitive_to_batch_position():
    a = graphs.load(small("gpt", 2))
    b = graphs.load(small("gpt", 3))
    c = graphs.load(small("gpt", 2).replace("hidden=64", "hidden=128"))
    assert a.layers[1].structural_hash == b.layers[3].structural_hash
    assert a.layers[1].structural_hash != c.layers[1].structural_hash


def test_hf_and_zoo_block_paths_are_recognised():
    assert block_of("blocks.3.attn.q") == (3, "blocks.3")
    assert block_of("model.layers.12.self_attn.q_proj") == (12, "model.layers.12")
    assert block_of("transformer.h.0.mlp.c_fc") == (0, "transformer.h.0")
    assert block_of("wte") is None and block_of("head") is None
    assert block_of("encoder.layer.5.attention") == (5, "encoder.layer.5")
    assert block_of("blocks_extra.1") is None and block_of("layers.x") is None


class Tower(nn.Module):
    """No transformer blocks: the clustering DP groups its ops."""

    def __init__(self, depth: int = 6, width: int = 32):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for fc in self.fcs:
            x = torch.relu(fc(x))
        return x.sum()


def test_cut_bytes_counts_each_live_tensor_once():
    g = graphs.trace(Tower(depth=2), (torch.randn(4, 32),), dtype="fp32", n_layers=1)
    nodes = list(g.nodes())
    cuts = cut_bytes(g, nodes)
    assert cuts[0] == 0 and len(cuts) == len(nodes)
    # the chain placeholder -> linear -> relu -> ...: one [4, 32] fp32 tensor at every cut
    for i in range(1, len(nodes) - 2):
        assert cuts[i] == 4 * 32 * 4, (i, nodes[i].name)


def test_graph_without_blocks_is_clustered_by_the_dp():
    g = graphs.trace(Tower(depth=6), (torch.randn(64, 32),), n_layers=3)
    assert [L.name for L in g.layers] == ["cluster.0", "cluster.1", "cluster.2"]
    linears = [[n for n in L.nodes if g.node(n).op == "linear"] for L in g.layers]
    assert [len(x) for x in linears] == [2, 2, 2]


def test_graph_without_blocks_gets_contiguous_clusters():
    g = graphs.trace(Tower(depth=6), (torch.randn(64, 32),), n_layers=3)
    assert 1 <= len(g.layers) <= 3
    order = [n.name for n in g.nodes()]
    flat = [n for L in g.layers for n in L.nodes]
    assert flat == order
    assert all(L.name == f"cluster.{L.index}" for L in g.layers)
    assert sum(L.fwd_flops for L in g.layers) == pytest.approx(g.fwd_flops)


# --- dim maps and equations ---------------------------------------------------------------

def test_reshape_dim_groups():
    assert reshape_dim_groups((2, 16, 64), (2, 16, 4, 16)) == [[[0], [0]], [[1], [1]],
                                                               [[2], [2, 3]]]
    assert reshape_dim_groups((2, 16, 4, 16), (32, 64)) == [[[0, 1], [0]], [[2, 3], [1]]]
    assert reshape_dim_groups((1, 16, 64), (16, 64)) == [[[0], []], [[1], [0]], [[2], [1]]]
    assert reshape_dim_groups((16, 64), (16, 1, 64)) == [[[0], [0]], [[], [1]], [[1], [2]]]
    assert reshape_dim_groups((6, 4), (4, 6)) == [[[0, 1], [0, 1]]]


def test_equations():
    assert linear_equation(3) == "bsk,nk->bsn"
    assert linear_equation(2) == "bk,nk->bn"
    assert linear_equation(4) == "bask,nk->basn"
    assert matmul_equation(4, 4) == "bhmk,bhkn->bhmn"
    assert matmul_equation(3, 2) == "bmk,kn->bmn"
    assert matmul_equation(2, 1) == "mk,k->m"
    assert canonical_einsum("BSE,EF->BSF", [3, 2]) == "bse,ef->bsf"
    assert canonical_einsum("...d,de->...e", [3, 2]) == "abd,de->abe"
    assert canonical_einsum("ij,jk", [2, 2]) == "ij,jk->ik"


def test_view_dims_can_be_followed_through_the_attention_reshapes():
    g = graphs.load(small("gpt", 1))
    reshape = next(n for n in g.nodes() if n.op == "reshape")
    # [b, s, a, d] -> [b, s, h]: heads and head dim merge back into hidden
    assert reshape.attrs["dim_groups"] == [[[0], [0]], [[1], [1]], [[2, 3], [2]]]
    out = next(n for n in g.nodes() if n.op == "view" and n.layer == len(g.layers) - 1)
    assert out.attrs["dim_groups"] == [[[0], []], [[1], [0]], [[2], [1]]]

