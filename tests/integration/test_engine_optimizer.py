"""The engines' optimizer (autopar.runtime.optim.make_optimizer: fused Adam, FSDP2's DTensor
parameters included) steps each parameter as torch's plain Adam steps the full tensor, given the
same gradients. Oracle: one process's torch.optim.Adam (its default, single-tensor on CPU) fed
the gathered gradients of the same steps. (A comparison of the trained parameters with a
one-process run cannot show this: Adam's first steps move every parameter by about lr whatever
its gradient's size, so round-off in gradients that are nearly zero shows as lr-sized
differences.)"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.runtime

M = "llama:hidden=64,layers=2,heads=4,kv_heads=2,seq=32,vocab=128"
STEPS = 3
LR = 1e-2


def _plan(dp: int, tp: int, zero: int):
    from autopar.evaluation.baselines import Config3D, build_3d
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource
    cl = load_cluster("p3.16xlarge", 1, dp * tp)
    return build_3d(ModelSource(M), cl, 4 * dp, Config3D(dp, tp, 1, 2, zero=zero))


def _rank(index: int, world: int, port: int, plan_json: str, out_dir: str) -> None:
    """STEPS training steps through the engines; per step the full gradients and parameters
    after the step (rank 0 keeps them), and which Adam the engine built."""
    import torch
    import torch.distributed as dist

    from autopar.plan import Plan
    from autopar.runtime.apply import build_model, make_batch
    from autopar.runtime.engines import EngineModel, ShardOptimizer, apply

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=index, world_size=world, timeout=datetime.timedelta(seconds=120))
    plan = Plan.from_json(plan_json)
    pm = apply(plan, build_model(plan), optimizer="adam", lr=LR)
    assert isinstance(pm, EngineModel)
    opt = pm.optimizer.inner if isinstance(pm.optimizer, ShardOptimizer) else pm.optimizer

    def full(tensors: dict) -> dict:         # (a plain parameter comes back as itself)
        return {n: t.detach().clone() for n, t in tensors.items()}
    start = full(pm.full_params())
    grads, params = [], []
    for step in range(STEPS):
        pm.forward_backward(make_batch(plan, step))
        grads.append(full(pm.full_grads()))
        pm.optimizer_step()
        params.append(full(pm.full_params()))
    torch.save({"start": start, "grads": grads, "params": params,
                "fused": [g["fused"] for g in opt.param_groups]}, Path(out_dir) / f"{index}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("dp,tp,zero", [(2, 1, 3), (2, 1, 1), (2, 2, 3), (1, 2, 0)])
def test_engine_adam_steps_as_plain_adam(dp, tp, zero):
    # FSDP2's 1-D DTensors (ZeRO-3, ZeRO-1), 2-D ones (FSDP2 over tensor parallelism), and the
    # local shards of tensor-parallel DTensors (ShardOptimizer)
    import torch
    import torch.multiprocessing as mp
    plan = _plan(dp, tp, zero)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(dp * tp, port, plan.to_json(), tmp), nprocs=dp * tp, start_method="spawn")
        out = torch.load(Path(tmp) / "0.pt")
    assert out["fused"] and all(out["fused"])
    ref = {n: torch.nn.Parameter(p.clone()) for n, p in out["start"].items()}
    opt = torch.optim.Adam(ref.values(), lr=LR)
    for grads, params in zip(out["grads"], out["params"]):
        assert grads.keys() == ref.keys()
        for n, p in ref.items():
            p.grad = grads[n].clone()
        opt.step()
        for n, p in ref.items():
            torch.testing.assert_close(params[n], p.detach(), rtol=0, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
