"""Plan your own nn.Module: write a factory that returns (module, example_inputs).

    autopar plan examples/custom_model.py:factory --cluster dgx-a100 --nodes 1
    python examples/custom_model.py

The module is built on the meta device, so no weights are allocated however large it is.
Blocks are found from module paths like `layers.3.`; the factory's batch is the microbatch.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.out(a)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=32000, d=2048, layers=16, heads=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids, targets):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def factory(batch: int = 8, seq: int = 2048):
    with torch.device("meta"):
        model = TinyLM().to(torch.bfloat16)
        ids = torch.zeros(batch, seq, dtype=torch.long)
    return model, (ids, ids)


if __name__ == "__main__":
    import autopar
    from autopar.report import plan_summary
    module, inputs = factory()
    from autopar.model import ModelSource
    # An nn.Module with example inputs is traced at that microbatch; the global batch is a multiple.
    plan = autopar.plan(ModelSource(module, example_inputs=inputs), "dgx-a100", nodes=1, global_batch=64)
    print(plan_summary(plan))
