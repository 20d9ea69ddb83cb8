"""Per-layer recomputation on PyTorch's engines (gloo, fp32): a stage recomputing only its first
k layers trains exactly as one process without recomputation does (checkpointing changes what
is kept, not what is computed; which blocks are checkpointed is checked in
tests/unit/test_layer_recompute.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autopar.evaluation.baselines import Config3D, build_3d
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.plan import Plan
from autopar.runtime.launch import run_plan
from tests.integration.test_engines import M, assert_exact


def plan_with_layers(dp: int, pp: int, layers: list[int | None]) -> Plan:
    cl = load_cluster("p3.16xlarge", 1, dp * pp)
    plan = build_3d(ModelSource(M), cl, 8, Config3D(dp, 1, pp, 2, recompute="full"))
    plan.stages = [replace(s, recompute_layers=k) for s, k in zip(plan.stages, layers)]
    return plan


@pytest.mark.runtime
@pytest.mark.parametrize("dp,pp,layers", [(2, 1, [3]), (1, 2, [2, 1])])
def test_first_k_layers_recomputed_match_one_process(tmp_path, dp, pp, layers):
    plan = plan_with_layers(dp, pp, layers)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    out = run_plan(str(path), steps=2, check=True, optimizer="sgd", lr=0.1)
    assert_exact(out)
