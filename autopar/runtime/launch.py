"""`autopar run PLAN.json`: start one process per device of the plan, train a few steps, report
the measured step time next to the predicted one; with --check, also run the same steps in one
process without parallelism and report the largest loss / gradient / parameter differences.

Started under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) it runs as that rank instead of
spawning; rank 0 reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from autopar.validation import MAX_GPUS, float_arg, int_arg

EXIT_BAD_INPUT = 2
CPU_PROCS_PER_CORE = 4          # more gloo processes than this per core is a mistake, not a test
MAX_STEPS = 10_000              # a measurement, not a training run: keeps `run` bounded
MAX_TIMEOUT_S = 7 * 24 * 3600.0
# PyTorch's allocator configuration variables: PYTORCH_ALLOC_CONF (torch 2.9+) and the older
# PYTORCH_CUDA_ALLOC_CONF, which is the one set (torch 2.9.1 ignores expandable_segments in the
# newer one: pytorch/pytorch#183387)
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class LaunchError(ValueError):
    """The plan cannot be started here (devices, backend, model); says what to change."""


@dataclass
class RunConfig:
    plan_json: str
    steps: int = 3
    device: str = "cpu"                  # cpu | cuda
    check: bool = False
    optimizer: str = "adam"
    lr: float = 1e-3
    seed: int = 0
    timeout_s: float = 900.0
    precision: str = "fp32"              # fp32 | bf16 | fp16 (autocast on cuda)
    master_port: int = 0
    result_path: str = ""
    extra: dict = field(default_factory=dict)
    compile: bool | None = None          # torch.compile per transformer block (None: the runtime's default)
    alloc_conf: str = ""                 # the CUDA caching allocator's configuration the ranks run with


# ---------------------------------------------------------------------------------------------
# checks before any process starts

def world_size(plan) -> int:
    from .apply import rank_layout
    return len(rank_layout(plan))


def validate(plan, device: str, nproc: int | None) -> int:
    """The number of processes to start; LaunchError / PlanError / NotAppliableError otherwise."""
    import torch
    import torch.distributed as dist

    from .apply import check_plan_matches, zoo_inputs
    from .context import check_context_parallel
    n = world_size(plan)
    if nproc is not None and nproc != n:
        raise LaunchError(f"--nproc {nproc} does not match the plan, which runs on {n} devices "
                          f"({len(plan.stages)} stage(s): " + ", ".join(
                              f"{len(s.device_ids)} on a {s.logical_mesh[0]}x{s.logical_mesh[1]} mesh"
                              for s in plan.stages) + ")")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise LaunchError(f"--device cuda needs the nccl backend and CUDA GPUs, but CUDA is not available "
                              f"here (torch {torch.__version__}); run with --device cpu (gloo)")
        if not dist.is_nccl_available():
            raise LaunchError("--device cuda needs the nccl backend, which this torch build lacks")
        have = torch.cuda.device_count()
        if n > have:
            raise LaunchError(f"the plan runs on {n} devices but this machine has {have} GPU(s); make a plan "
                              f"for {have} (e.g. --nodes 1 --gpus-per-node {have})")
    elif device == "cpu":
        if not dist.is_gloo_available():
            raise LaunchError("--device cpu needs the gloo backend, which this torch build lacks")
        cores = os.cpu_count() or 1
        if n > CPU_PROCS_PER_CORE * cores and nproc is None:
            raise LaunchError(f"the plan runs on {n} devices, more than this machine's {cores} CPU cores can "
                              f"stand in for ({CPU_PROCS_PER_CORE} processes per core); pass --nproc {n} to "
                              "start them anyway")
    else:
        raise LaunchError(f"--device must be cpu or cuda, got {device!r}")
    import graphs
    ir = graphs.load(plan.model.name, batch=plan.training.microbatch_size, seq=plan.model.seq,
                     dtype=plan.training.dtype)
    check_plan_matches(plan, ir)
    check_context_parallel(plan, ir)
    zoo_inputs(plan)
    _check_pipeline(plan, device)
    return n


def _check_pipeline(plan, device: str) -> None:
    """The pipeline's shape, before any process starts instead of failing in every rank: chunks
    round-robin over the device groups, and interleaving over groups of different sizes
    (runtime.pipeline.P2PPipeline runs it) in whole rounds of one microbatch per group, on gloo
    only: it posts its sends early and relies on each receive matching its own message, which
    NCCL, matching a pair's messages in issue order and able to hold a send until the peer's
    receive, has not been shown to do here (never run on GPUs); a hang would be worse."""
    from .apply import pipeline_groups
    from .program import NotAppliableError
    pp = max(pipeline_groups(plan)) + 1
    tr = plan.training
    mixed_interleaved = tr.schedule == "interleaved" and len({len(s.device_ids) for s in plan.stages}) > 1
    if mixed_interleaved and device == "cuda":
        sizes = ", ".join(f"stage {s.index}: {len(s.device_ids)}" for s in plan.stages)
        raise NotAppliableError(f"interleaved 1F1B over device groups of different sizes ({sizes} devices) runs on "
                                "gloo only (--device cpu) until its point-to-point order is checked on NCCL; "
                                "autopar plan does not emit such plans, so re-plan, or use schedule 1f1b or gpipe")
    if mixed_interleaved and tr.n_microbatches % pp:
        raise NotAppliableError(f"interleaved 1F1B over device groups of different sizes runs {tr.n_microbatches} "
                                f"microbatches in rounds of {pp} (one per group); use a multiple of {pp}")


# ---------------------------------------------------------------------------------------------
# one rank

def _autocast_dtype(cfg: RunConfig):
    import torch
    if cfg.device != "cuda" or cfg.precision == "fp32":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank_body(rank: int, world: int, local_rank: int, cfg: RunConfig) -> dict | None:
    """Train cfg.steps steps as `rank`; returns the gathered results on rank 0, None elsewhere."""
    import torch
    import torch.distributed as dist

    from autopar.plan import Plan

    from .apply import build_model, make_batch, rank_layout
    from .engines import EngineModel, apply

    plan = Plan.from_json(cfg.plan_json)
    layout = rank_layout(plan)
    stage_index, local_index, device_id = layout[rank]
    if cfg.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(plan, device=device, seed=cfg.seed)
    pm = apply(plan, model, device=device, optimizer=cfg.optimizer, lr=cfg.lr, autocast_dtype=_autocast_dtype(cfg),
               compile=cfg.compile)
    times, losses, grads, params = [], [], {}, {}
    for step in range(cfg.steps):
        batch = make_batch(plan, step, cfg.seed)
        if world > 1:
            dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        loss = pm.forward_backward(batch)
        _sync(device)
        t1 = time.perf_counter()
        if cfg.check and step == cfg.steps - 1:
            grads = pm.full_grads()
        t2 = time.perf_counter()
        pm.optimizer_step()
        _sync(device)
        t3 = time.perf_counter()
        times.append((t1 - t0) + (t3 - t2))
        if loss is not None:              # the last stage's ranks (under interleaving, its chunk's)
            losses.append(float(loss))
    if cfg.check:
        params = pm.full_params()
    mine = {"rank": rank, "stage": stage_index, "local_index": local_index, "device_id": device_id,
            "times_s": times, "losses": losses if (losses and local_index == 0) else None,
            "grads": grads if local_index == 0 else {}, "params": params if local_index == 0 else {},
            "shard_local_ops": pm.shard_local_ops, "param_specs": pm.param_specs(),
            "engines": isinstance(pm, EngineModel),      # not the fx/DTensor program
            "compiled": bool(getattr(pm, "compiled", False)),   # torch.compile per block
            "compiled_graphs": _compiled_graphs(),
            "max_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None}
    if world == 1:
        return {"ranks": [mine]}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return {"ranks": gathered} if rank == 0 else None


def _compiled_graphs() -> int:
    """The graphs torch.compile made in this process (dynamo's count): 0 when nothing compiled,
    whatever was asked for (a block dynamo skips runs eagerly without failing)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _spawned(index: int, world: int, cfg: RunConfig, body=None) -> None:
    """Entry of a spawned process (torch.multiprocessing passes the process index first)."""
    body = body or _rank_body
    import faulthandler

    import torch
    import torch.distributed as dist
    faulthandler.enable(all_threads=True)    # a rank killed by a signal shows where it was
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg.master_port), RANK=str(index),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(index))
    if cfg.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    res = None
    if world > 1:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", rank=index, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.timeout_s))
    # On failure the process group is left as is: tearing it down under a peer's pending
    # collective can abort the process before its traceback is recorded.
    res = body(index, world, _device_index(cfg, index), cfg)
    if res is not None:
        torch.save(res, cfg.result_path)
    if world > 1:
        dist.barrier()                 # nobody tears down while a peer still sends to it
        dist.destroy_process_group()
    _exit_done(0)


def _exit_done(code: int) -> NoReturn:
    """End a rank whose work is done and saved, without the interpreter's finalization.

    destroy_process_group drops only c10d's own references: DeviceMeshes and DTensors keep the
    gloo/NCCL groups alive, and their C++ worker threads are torn down during finalization. On
    gloo (torch 2.13, CI) that aborted a finished rank now and then ("terminate called without
    an active exception", SIGABRT), turning a good run into a failed one. Nothing is left to
    run at this point, so skip finalization, as a fork-started worker does."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _device_index(cfg: RunConfig, rank: int) -> int:
    """The GPU of a spawned rank: its plan device id, taken modulo this machine's GPUs."""
    if cfg.device != "cuda":
        return 0
    import torch

    from autopar.plan import Plan

    from .apply import rank_layout
    return rank_layout(Plan.from_json(cfg.plan_json))[rank][2] % torch.cuda.device_count()


# ---------------------------------------------------------------------------------------------
# the reference: the same steps in one process, no parallelism

def reference(cfg: RunConfig) -> dict:
    import torch

    from autopar.plan import Plan

    from .apply import build_model, make_batch
    plan = Plan.from_json(cfg.plan_json)
    device = torch.device("cuda", 0) if cfg.device == "cuda" else torch.device("cpu")
    model = build_model(plan, device=device, seed=cfg.seed)
    params = dict(model.named_parameters())
    fused: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    opt = (torch.optim.Adam(params.values(), lr=cfg.lr, **fused) if cfg.optimizer == "adam"
           else torch.optim.SGD(params.values(), lr=cfg.lr))
    B, mb = plan.training.n_microbatches, plan.training.microbatch_size
    dt = _autocast_dtype(cfg)
    losses, times, grads = [], [], {}
    for step in range(cfg.steps):
        batch = {k: v.to(device) for k, v in make_batch(plan, step, cfg.seed).items()}
        _sync(device)
        t0 = time.perf_counter()
        total = 0.0
        for i in range(B):
            with torch.autocast(device.type, dtype=dt, enabled=dt is not None):
                loss = model(batch["ids"][i * mb:(i + 1) * mb], batch["targets"][i * mb:(i + 1) * mb])
            (loss / B).backward()
            total += float(loss.detach()) / B
        if step == cfg.steps - 1:
            grads = {n: p.grad.detach().float().cpu().clone() for n, p in params.items() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(total)
    return {"losses": losses, "grads": grads, "params": {n: p.detach().float().cpu() for n, p in params.items()},
            "times_s": times}


# ---------------------------------------------------------------------------------------------
# many plans in one launch: one forward/backward each, compared with one process

def check_plans(plan_jsons: list[str], *, device: str = "cpu", seed: int = 0, timeout_s: float = 900.0,
                compile: bool | None = None) -> list[dict]:
    """For plans of one model on one device count: apply each in turn in one set of processes
    (starting processes dominates the cost of a small check), run one forward/backward, and
    return per plan the largest |loss diff| and |grad diff| against one process. compile: as
    `autopar run --compile` (a compiled program's first microbatch runs op by op)."""
    from autopar.plan import Plan
    plans = [Plan.from_json(p) for p in plan_jsons]
    ns = {validate(p, device, None) for p in plans}
    if len(ns) != 1 or len({p.model.name for p in plans}) != 1:
        raise LaunchError("check_plans needs plans of one model on one device count")
    cfg = RunConfig(plans[0].to_json(), 1, device, True, "sgd", 0.0, seed, timeout_s, "fp32", _free_port(), "",
                    extra={"plans": [p.to_json() for p in plans]}, compile=compile)
    return _launch(cfg, ns.pop(), _check_body)["results"]


def _check_body(rank: int, world: int, local_rank: int, cfg: RunConfig) -> dict | None:
    import torch
    import torch.distributed as dist

    from autopar.plan import Plan

    from .apply import build_model, make_batch
    from .engines import apply
    device = torch.device("cpu") if cfg.device == "cpu" else torch.device("cuda", local_rank)
    results = []
    refs: dict[tuple[int, int], dict] = {}
    for text in cfg.extra["plans"]:
        plan = Plan.from_json(text)
        batch = make_batch(plan, 0, cfg.seed)
        try:
            pm = apply(plan, build_model(plan, device=device, seed=cfg.seed), device=device, optimizer="sgd", lr=0.0,
                       compile=cfg.compile)
            loss = pm.forward_backward(batch)
            grads = pm.full_grads()             # collective over the stage's mesh: every rank calls it
            mine = {"loss": None if loss is None or pm.local_index else float(loss),
                    "grads": grads if pm.local_index == 0 else {}}
        except Exception as e:
            raise RuntimeError(f"plan {plan.config.label or plan.strategy!r} failed: {type(e).__name__}: {e}") from e
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        if world > 1:
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if rank != 0 or gathered is None:
            continue
        key = (plan.training.n_microbatches, plan.training.microbatch_size)
        if key not in refs:
            refs[key] = _reference_step(plan, device, cfg.seed, batch)
        ref = refs[key]
        loss_par = next(g["loss"] for g in gathered if g["loss"] is not None)
        gdiff, worst = 0.0, ""
        for g in gathered:
            for name, t in g["grads"].items():
                d = float((t - ref["grads"][name]).abs().max())
                if d >= gdiff:
                    gdiff, worst = d, name
        results.append({"label": plan.config.label or plan.strategy, "max_abs_loss_diff": abs(loss_par - ref["loss"]),
                        "max_abs_grad_diff": gdiff, "worst_grad": worst,
                        "n_grads_compared": len({n for g in gathered for n in g["grads"]}),
                        "shard_local_ops": pm.shard_local_ops})
    return {"results": results} if rank == 0 else None


def _reference_step(plan, device, seed: int, batch: dict) -> dict:
    """Loss and gradients of one step in one process: the plain module, microbatch by microbatch."""
    from .apply import build_model
    model = build_model(plan, device=device, seed=seed)
    B, mb = plan.training.n_microbatches, plan.training.microbatch_size
    total = 0.0
    for i in range(B):
        loss = model(batch["ids"][i * mb:(i + 1) * mb].to(device), batch["targets"][i * mb:(i + 1) * mb].to(device))
        (loss / B).backward()
        total += float(loss.detach()) / B
    return {"loss": total, "grads": {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
                                     if p.grad is not None}}


# ---------------------------------------------------------------------------------------------
# driver

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_after_warmup(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def summarize(plan, cfg: RunConfig, res: dict, ref: dict | None, n: int, eager: Any) -> dict[str, Any]:
    """`autopar run --json`'s summary; `eager`: the plan priced as these engines run it
    (_eager_prediction, worked out once per run), or None."""
    ranks = sorted(res["ranks"], key=lambda r: r["rank"])
    per_step = [max(r["times_s"][i] for r in ranks) for i in range(cfg.steps)]
    losses = next(r["losses"] for r in ranks if r["losses"] is not None)
    out: dict[str, Any] = {
        "plan": plan.config.label or plan.strategy, "model": plan.model.name,
        "n_processes": n, "device": cfg.device, "backend": "nccl" if cfg.device == "cuda" else "gloo",
        "precision": cfg.precision, "steps": cfg.steps, "optimizer": cfg.optimizer, "lr": cfg.lr,
        "global_batch": plan.training.global_batch, "microbatch_size": plan.training.microbatch_size,
        "n_microbatches": plan.training.n_microbatches, "schedule": plan.training.schedule,
        "measured_step_time_s": _median_after_warmup(per_step), "step_times_s": per_step,
        "predicted_step_time_s": plan.prediction.step_time_s if plan.prediction else None,
        "predicted_for": _predicted_for(plan),
        "predicted_eager_step_time_s": eager.step_time_s if eager is not None else None,
        "losses": losses,
        "shard_local_ops": sorted({o for r in ranks for o in r["shard_local_ops"]}),
        "engines": all(r.get("engines", False) for r in ranks),
        # the stages (under interleaving, a rank group's first) that ran compiled per block, and
        # the most graphs torch.compile made on one rank
        "compiled_stages": sorted({r["stage"] for r in ranks if r.get("compiled")}),
        "compiled_graphs": max(r.get("compiled_graphs", 0) for r in ranks),
        # per rank group (under interleaving one group runs several stages)
        "param_specs": [next(r["param_specs"] for r in ranks if r["stage"] == k and r["local_index"] == 0)
                        for k in sorted({r["stage"] for r in ranks})],
    }
    mem = [r["max_memory_bytes"] for r in ranks if r["max_memory_bytes"] is not None]
    if mem:
        out["max_memory_bytes"] = max(mem)
        out["max_memory_reserved_bytes"] = max(r.get("max_memory_reserved_bytes") or 0 for r in ranks)
        out["predicted_peak_memory_bytes"] = plan.prediction.peak_memory_bytes if plan.prediction else None
        # what the eager model says the allocator reserves, against the ranks' measured peak
        out["predicted_eager_reserved_bytes"] = eager.peak_reserved_bytes if eager is not None else None
        out["cuda_alloc_conf"] = cfg.alloc_conf
    if ref is not None:
        out["reference_step_time_s"] = _median_after_warmup(ref["times_s"])
        out["reference_losses"] = ref["losses"]
        out["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref["losses"]))
        worst = ("", 0.0)
        pworst = ("", 0.0)
        compared = set()
        for r in ranks:
            for name, g in r["grads"].items():
                d = float((g - ref["grads"][name]).abs().max())
                compared.add(name)
                if d >= worst[1]:
                    worst = (name, d)
            for name, p in r["params"].items():
                d = float((p - ref["params"][name]).abs().max())
                if d >= pworst[1]:
                    pworst = (name, d)
        missing = sorted(set(ref["grads"]) - compared)
        if missing:
            raise RuntimeError(f"the parallel run produced no gradient for {missing}")
        out["max_abs_grad_diff"], out["worst_grad"] = worst[1], worst[0]
        out["max_abs_param_diff"], out["worst_param"] = pworst[1], pworst[0]
        out["n_grads_compared"] = len(compared)
    return out


def memory_warning(plan, eager: Any, gpu_bytes: int) -> str | None:
    """A warning when the plan, as this runtime executes it, is predicted to need more memory
    per GPU than the GPU has: the default (fused-kernel) model prices Megatron's mixed precision,
    and a plan it calls a fit can run out of memory here (gpt-6.7b dp2 at microbatch 2 on 141 GB
    H200s: 107 GiB by that model, 186 by the eager one (199 with the default segments), out of memory measured). A warning, not
    a refusal: the eager model errs high, by up to half on accumulating steps
    (bench/truth/predict_runs.py). `eager`: the plan's _eager_prediction."""
    p = eager
    if p is None or not p.peak_reserved_bytes or p.peak_reserved_bytes <= gpu_bytes:
        return None
    own = plan.prediction.peak_memory_bytes if plan.prediction else None
    return (f"this plan is predicted to need {p.peak_reserved_bytes / 2**30:.1f} GiB per GPU as autopar run "
            f"executes it (eager PyTorch: fp32 weights and gradients, autocast copies, the fp32 loss, DDP and "
            f"FSDP buffers), and the GPU has {gpu_bytes / 2**30:.1f} GiB"
            + (f"; the plan's own {own / 2**30:.1f} GiB prices fused kernels" if own else "")
            + ". It may run out of memory: re-plan with `autopar plan --eager` for a plan priced as this runs it")


def environ_alloc_conf() -> str | None:
    """The CUDA caching allocator's configuration this process's environment sets
    (PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF; "" where set empty: the default segments), or
    None where neither is set."""
    return next((os.environ[var] for var in ALLOC_CONF_VARS if var in os.environ), None)


def cuda_alloc_conf() -> str:
    """The CUDA caching allocator's configuration the ranks run with, and made so: the user's where
    the environment sets one (environ_alloc_conf), else eager.ALLOC_CONF (expandable segments), set
    here for the processes started from now on and for this one, before it first allocates on a
    GPU. The eager model prices the allocator's reserve by it (eager.reserve_fraction)."""
    from autopar.costmodel.eager import ALLOC_CONF
    user = environ_alloc_conf()
    if user is not None:
        return user
    os.environ[ALLOC_CONF_VARS[-1]] = ALLOC_CONF
    return ALLOC_CONF


def _eager_prediction(plan, compile: bool | None = None, alloc_conf: str = ""):
    """The plan's Prediction priced as the eager PyTorch engines this runtime uses run it
    (evaluate(..., eager=True): autocast casts, fp32 loss, host dispatch, FSDP2's overlap; blocks
    compiled as `compile` says, None: where the runtime compiles them by default; the allocator's
    reserve as `alloc_conf` (the ranks' cuda_alloc_conf) sets it), on the plan's cluster. A plan made without --eager is priced for fused kernels; this is the figure
    to hold a run against. None where the plan's cluster is no preset (a YAML file may be gone)
    or its model is not a zoo name, and for a plan the evaluator does not take (one edited by hand
    to a strategy the planner does not offer there: it still runs, and is checked elsewhere)."""
    from autopar.hardware.presets import PRESETS, load_cluster
    if plan.cluster.name not in PRESETS or not plan.model.loadable:
        return None
    from autopar.costmodel.eager import expandable_segments
    from autopar.evaluation.evaluator import evaluate
    from autopar.model import ModelSource
    from autopar.plan import PlanError
    cl = load_cluster(plan.cluster.name, plan.cluster.nodes, plan.cluster.gpus_per_node)
    graph = ModelSource(plan.model.name, seq=plan.model.seq, dtype=plan.training.dtype).graph(
        plan.training.microbatch_size)
    try:
        return evaluate(plan, graph, cl, eager=True, compiled=compile,
                        expandable_segments=expandable_segments(alloc_conf)).prediction
    except (ValueError, PlanError):
        return None


def _predicted_for(plan) -> str:
    """The hardware the plan's prediction is for, e.g. "8 x V100-SXM2-16GB (p3.16xlarge)"."""
    c = plan.to_dict()["cluster"]
    return f"{c['nodes'] * c['gpus_per_node']} x {c['gpu']} ({c['name']})"


def run_plan(plan_json: str, *, steps: int = 3, device: str = "cpu", check: bool = False, nproc: int | None = None,
             optimizer: str = "adam", lr: float = 1e-3, seed: int = 0, timeout_s: float = 900.0,
             precision: str | None = None, compile: bool | None = None) -> dict[str, Any]:
    """Launch the plan (a path or JSON text), return the summary dict `autopar run --json` prints.
    Raises LaunchError/PlanError before starting anything when the input is wrong, RankFailed
    when a rank fails (its traceback in the message)."""
    from autopar.validation import load_plan
    plan = load_plan(plan_json)
    text = plan.to_json()
    if steps < 1:
        raise LaunchError("--steps must be at least 1")
    n = validate(plan, device, nproc)
    prec = precision or ("fp32" if device == "cpu" else plan.training.dtype)
    # the allocator set before the ranks start: they read it as CUDA starts
    cfg = RunConfig(text, steps, device, check, optimizer, lr, seed, timeout_s, prec, _free_port(), compile=compile,
                    alloc_conf=cuda_alloc_conf() if device == "cuda" else "")
    eager = _eager_prediction(plan, compile, cfg.alloc_conf)
    if device == "cuda":
        import torch
        warning = memory_warning(plan, eager, torch.cuda.get_device_properties(0).total_memory)
        if warning:
            print(f"autopar run: warning: {warning}", file=sys.stderr, flush=True)
    res = _launch(cfg, n, _rank_body)
    ref = reference(cfg) if check else None
    return summarize(plan, cfg, res, ref, n, eager)


def _launch(cfg: RunConfig, n: int, body) -> dict:
    """Run body on n spawned ranks; rank 0's return value. A rank that fails stops the others
    (its traceback is in the RankFailed message); so does the deadline."""
    import torch
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="autopar-run-") as tmp:
        cfg.result_path = str(Path(tmp) / "result.pt")
        ctx = mp.start_processes(_spawned, args=(n, cfg, body), nprocs=n, join=False, start_method="spawn")
        deadline = time.monotonic() + cfg.timeout_s
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    _terminate(ctx)
                    raise RankFailed(f"the run did not finish within {cfg.timeout_s:.0f} s; all {n} processes "
                                     "were stopped (raise --timeout-s for longer runs)")
        except mp.ProcessRaisedException as e:
            index, trace = _root_cause(ctx, e)
            raise RankFailed(f"rank {index} failed; the other ranks were stopped.\n{trace}") from None
        except mp.ProcessExitedException as e:
            raise RankFailed(f"rank {e.error_index} exited with code {e.exit_code}"
                             f"{' (signal ' + str(e.signal_name) + ')' if e.signal_name else ''}; the other "
                             "ranks were stopped") from None
        return torch.load(cfg.result_path, weights_only=False)


class RankFailed(RuntimeError):
    pass


_SECONDARY = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer",
              "Broken pipe", "NCCL communicator was aborted")


def _root_cause(ctx, e) -> tuple[int, str]:
    """The failure to show: the first rank whose traceback is not a collective broken off by
    another rank's death (the rank that join() reports first is often only such a victim)."""
    import pickle
    traces = {}
    for i, path in enumerate(ctx.error_files):
        try:
            with open(path, "rb") as fh:
                traces[i] = pickle.load(fh)
        except (OSError, EOFError, pickle.UnpicklingError, TypeError):
            continue
    primary = [i for i, t in traces.items() if not any(m in t for m in _SECONDARY)]
    if primary:
        return primary[0], traces[primary[0]]
    return e.error_index, str(e)


def _terminate(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    for p in ctx.processes:
        p.join(5)
        if p.is_alive():
            p.kill()


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) and "TORCHELASTIC_RUN_ID" in os.environ


def _run_torchrun(a) -> NoReturn:
    import torch.distributed as dist

    from autopar.validation import load_plan
    plan = load_plan(a.plan)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    n = world_size(plan)
    if world != n:
        raise LaunchError(f"torchrun started {world} processes, the plan runs on {n} devices")
    prec = a.precision or ("fp32" if a.device == "cpu" else plan.training.dtype)
    cfg = RunConfig(plan.to_json(), a.steps, a.device, a.check, a.optimizer, a.lr, a.seed, a.timeout_s, prec,
                    compile=a.compile, alloc_conf=cuda_alloc_conf() if a.device == "cuda" else "")
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=a.timeout_s))
    res = _rank_body(rank, world, local, cfg)
    dist.barrier()
    dist.destroy_process_group()
    code = 0
    if rank == 0 and res is not None:
        code = _report(summarize(plan, cfg, res, reference(cfg) if a.check else None, n,
                                 _eager_prediction(plan, a.compile, cfg.alloc_conf)),
                       a.json, a.tol)
    _exit_done(code)


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .engines import default_compile_text
    p = _Parser(prog="autopar run", description="Run a plan on torch.distributed: one process "
                "per device, a few training steps, measured vs predicted step time.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("plan", help="plan JSON (autopar plan -o / autopar evaluate --json)")
    p.add_argument("--steps", type=int_arg("--steps", 1, MAX_STEPS), default=3, help="training steps (the first is warm-up for timing)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="cpu (gloo) or cuda (nccl); default cuda if available")
    p.add_argument("--check", action="store_true", help="also run the steps in one process and compare the loss, "
                                                         "gradients and parameters")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--nproc", type=int_arg("--nproc", 1, MAX_GPUS), help="number of processes (must equal the plan's device count)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="optimizer of the training steps")
    p.add_argument("--lr", type=float_arg("--lr", 0.0, 1e3), default=1e-3, help="learning rate")
    p.add_argument("--seed", type=int_arg("--seed", 0, 2**32 - 1), default=0, help="seed of weights and batches")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="compute precision (autocast; cuda only). Default: fp32 on cpu, the plan's dtype on cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block (plans lowered to PyTorch's engines; other plans' "
                        "fx/DTensor program per layer); --compile forces it on, --no-compile off; default: on for "
                        f"{default_compile_text()} and the program on cuda, off elsewhere")
    p.add_argument("--tol", type=float_arg("--tol", 0.0, 1e30), default=1e-4, help="with --check: exit 1 when a difference exceeds this")
    p.add_argument("--timeout-s", type=float_arg("--timeout-s", 0.0, MAX_TIMEOUT_S, lo_open=True), default=900.0, help="stop every process after this long")
    return p


def _report(out: dict, as_json: bool, tol: float) -> int:
    bad = any(out.get(k, 0.0) > tol for k in ("max_abs_loss_diff", "max_abs_grad_diff"))
    if as_json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return 1 if bad else 0
    pred = out["predicted_step_time_s"]
    meas = out["measured_step_time_s"]
    print(f"plan {out['plan']} ({out['model']}) on {out['n_processes']} {out['device']} process(es), "
          f"{out['backend']}, {out['precision']}; {out['steps']} steps of global batch {out['global_batch']} "
          f"({out['n_microbatches']} x {out['microbatch_size']}), {out['optimizer']} lr {out['lr']}")
    ratio = f" (measured/predicted {meas / pred:.2f})" if pred else ""
    target = out.get("predicted_for", "the plan's cluster")
    eager = out.get("predicted_eager_step_time_s")
    compiled = out.get("compiled_stages") or []
    # the eager model prices the run as it goes: its stages compiled per block where they ran so
    # (costmodel.eager "compiled blocks"), eager kernels elsewhere
    how = "these PyTorch engines run it, compiled blocks priced as compiled" if compiled \
        else "these eager PyTorch engines run it"
    as_run = f"; {eager:.4g} s as {how}" if eager and eager != pred else ""
    print(f"step time: measured {meas:.4g} s (median after the first step) on {out['n_processes']} "
          f"{out['device']} process(es); predicted {pred:.4g} s for {target}{ratio}{as_run}"
          if pred is not None else f"step time: measured {meas:.4g} s; the plan has no prediction")
    if pred is not None and out["device"] == "cpu":
        print(f"  (the prediction is for {target}; CPU processes check that the plan runs and computes the "
              "same numbers, not its speed)")
    if compiled:
        stages = ", ".join(str(k) for k in compiled)
        print(f"compiled: stage{'s' if len(compiled) > 1 else ''} {stages} ran torch.compile'd per transformer block "
              f"({out.get('compiled_graphs', 0)} graph(s) on the busiest rank; `--no-compile` runs eager); the "
              "first step, which compiles, is left out of the measured median")
    if out.get("max_memory_reserved_bytes"):
        pred_mem = out.get("predicted_eager_reserved_bytes")
        print(f"memory: peak reserved {out['max_memory_reserved_bytes'] / 2**30:.2f} GiB measured on the fullest GPU"
              + (f", predicted {pred_mem / 2**30:.2f} GiB as these engines run it" if pred_mem else "")
              + f" (allocator: {out.get('cuda_alloc_conf') or 'default segments'})")
    print("loss per step: " + " ".join(f"{x:.6f}" for x in out["losses"]))
    if out["shard_local_ops"]:
        print(f"run shard-locally (no DTensor rule): {', '.join(out['shard_local_ops'][:8])}"
              + (" ..." if len(out["shard_local_ops"]) > 8 else ""))
    if "max_abs_loss_diff" in out:
        print(f"check vs one process ({out['reference_step_time_s']:.4g} s/step): max |loss diff| "
              f"{out['max_abs_loss_diff']:.3g}, max |grad diff| {out['max_abs_grad_diff']:.3g} "
              f"({out['worst_grad']}), max |param diff| after {out['steps']} steps {out['max_abs_param_diff']:.3g} "
              f"({out['worst_param']}); {out['n_grads_compared']} gradients compared"
              + ("" if not bad else f"  -- OVER --tol {tol:g}"))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:           # --help, or a bad argument already reported in one line
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    from autopar.plan import PlanError
    try:
        if _under_torchrun():
            _run_torchrun(a)
        out = run_plan(a.plan, steps=a.steps, device=a.device, check=a.check, nproc=a.nproc, optimizer=a.optimizer,
                       lr=a.lr, seed=a.seed, timeout_s=a.timeout_s, precision=a.precision, compile=a.compile)
    except (LaunchError, PlanError, NotImplementedError, ValueError, OSError) as e:
        msg = f"{e.strerror}: {e.filename!r}" if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        print(f"autopar run: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RankFailed as e:
        print(f"autopar run: {e}", file=sys.stderr)
        return 1
    return _report(out, a.json, a.tol)



