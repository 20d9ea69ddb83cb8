"""Attention (sdpa): batch and heads split over the mesh axes; no communication (each head's
queries, keys and values stay on one device)."""

from __future__ import annotations

import itertools

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh
from autopar.sharding.rules.common import local_out_bytes, strategy_name
from autopar.sharding.strategy import Strategy
from graphs.ir import OpNode


def attention_strategies(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    q, k = node.operands[0], node.operands[1]
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    causal = bool(node.attrs.get("is_causal", False))
    out = []
    for combo in itertools.product([None, "b", "h"], repeat=len(mesh.live_axes)):
        lt: dict[str, int] = {}
        for bit, ch in zip(mesh.live_axes, combo):
            if ch:
                lt[ch] = lt.get(ch, 0) | bit
        mb, mh = lt.get("b", 0), lt.get("h", 0)
        if b % mesh.factor(mb) or hq % mesh.factor(mh) or hkv % mesh.factor(mh):
            continue
        spec = (mb, mh, 0, 0)
        bl, hl = b // mesh.factor(mb), hq // mesh.factor(mh)
        specs = tuple(spec if o.source is not None else None for o in node.operands)
        out.append(Strategy(strategy_name(lt), spec, specs, cm.attention_s(bl, hl, s, d, causal),
                            cm.attention_s(bl, hl, s, d, causal, True), out_bytes_local=local_out_bytes(node, spec, mesh),
                            letters=lt))
    return out
