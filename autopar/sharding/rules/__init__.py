"""Per-op parallel strategies on a logical mesh, with their cost records.

Decision ops (matmuls, attention, embedding, graph inputs) enumerate strategies: which mesh
axis splits which index letter (`DECISION_RULES`, one function per kind; ops without a rule,
or whose rule finds nothing that divides, run replicated). Everything else *follows* its
leading operand (`follow`, one rule per kind in follow.py).
"""

from __future__ import annotations

from collections.abc import Callable

from autopar.costmodel.compute import ComputeModel
from autopar.hardware.mesh import Mesh
from autopar.sharding.rules.attention import attention_strategies
from autopar.sharding.rules.common import GRAD_BYTES, strategy_name
from autopar.sharding.rules.einsum import PER_PART, matmul_strategies, parse_equation
from autopar.sharding.rules.embedding import embedding_strategies
from autopar.sharding.rules.follow import FOLLOW_RULES, follow, leader_operand, view_spec
from autopar.sharding.rules.inputs import input_strategies, replicated_strategy
from autopar.sharding.strategy import Strategy
from graphs.ir import ATTENTION, EMBEDDING, INPUT, MATMUL, OUTPUT, UNKNOWN, OpNode

__all__ = ["DECISION_KINDS", "DECISION_RULES", "FOLLOW_RULES", "GRAD_BYTES", "PER_PART", "decision_strategies", "follow",
           "is_decision", "leader_operand", "parse_equation", "strategy_name", "view_spec"]

DECISION_KINDS = (MATMUL, ATTENTION, EMBEDDING, INPUT, UNKNOWN, OUTPUT)


def _matmul(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    ok = "equation" in node.attrs and len(node.operands) >= 2
    return matmul_strategies(node, mesh, cm) if ok else []


def _attention(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    ok = len(node.operands) >= 3 and len(node.operands[0].shape) == 4
    return attention_strategies(node, mesh, cm) if ok else []


def _embedding(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    ok = len(node.operands) >= 2 and len(node.operands[1].shape) == 2
    return embedding_strategies(node, mesh, cm) if ok else []


def _input(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    return input_strategies(node, mesh)


DecisionRule = Callable[[OpNode, Mesh, ComputeModel], list[Strategy]]
DECISION_RULES: dict[str, DecisionRule] = {MATMUL: _matmul, ATTENTION: _attention, EMBEDDING: _embedding,
                                           INPUT: _input}


def decision_strategies(node: OpNode, mesh: Mesh, cm: ComputeModel) -> list[Strategy]:
    rule = DECISION_RULES.get(node.kind)
    out = rule(node, mesh, cm) if rule is not None else []
    return out or [replicated_strategy(node, mesh, cm)]


def is_decision(node: OpNode) -> bool:
    return node.kind in DECISION_KINDS
