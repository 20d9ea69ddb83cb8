"""`autopar run` (plans lowered to PyTorch's engines) against the plain PyTorch recipe for the
same model and strategy on the same GPUs (issue 12).

    python bench/runtime_vs_native.py                       # 2 GPUs, nccl, bf16
    python bench/runtime_vs_native.py --compiled            # the cases with torch.compile per block
    python bench/runtime_vs_native.py --profile DIR         # also torch.profiler tables of gpt-1.3b tp
    python bench/runtime_vs_native.py --case gpt-1.3b:dp:1 --repeat 3 --timed-steps 10   # alternating rounds
    python bench/runtime_vs_native.py --case llama-1b-gqa:pp:4 --memory DIR   # the tensors alive at the peak
    python bench/runtime_vs_native.py --case gpt-1.3b:dp:1 --fresh --repeat 2   # each run in new processes
    python bench/runtime_vs_native.py --merge NEW.json --note '...'   # fold a run's rows into the results
    python bench/runtime_vs_native.py --device cpu --quick  # 2 gloo processes, a tiny model (a smoke test)
    python bench/runtime_vs_native.py --case gpt-1.3b:auto:8 --out FILE    # only the cases named
    python bench/runtime_vs_native.py --program --gpus 4    # the op-by-op program: eager vs compiled
    python bench/runtime_vs_native.py --gpus 1 --compile-mode both   # 1 GPU, every case eager and compiled

Per (model, strategy, microbatch) both ways, one after the other in the same two processes:

    native   (every strategy: fused Adam on CUDA, DTensor parameters included, as torchtitan)
             dp: DistributedDataParallel, no_sync between microbatches, autocast bf16
             cp: DistributedDataParallel over the cp ranks (buffers not broadcast) and torch's
                 context_parallel around each microbatch (tokens and rope tables sharded in its
                 load-balanced order, ring rotation), K/V repeated to the query heads as
                 torchtitan does
             zero3 / zero1: fully_shard per block + root (reshard_after_forward True / False),
                            MixedPrecisionPolicy(bf16, fp32 reduce); zero1
                            accumulates its gradients over the microbatches and reduce-scatters
                            once (set_requires_gradient_sync / set_reshard_after_backward off
                            until the last)
             tp: parallelize_module (ColwiseParallel / RowwiseParallel, vocab-parallel embedding,
                 loss_parallel), autocast bf16, torch.compile per block (both ways, as the
                 runtime's default compiles tensor-parallel stages)
             pp: two PipelineStages, Schedule1F1B, autocast bf16
    autopar  the plan of the same strategy (autopar.evaluation.baselines.build_3d; `auto` is
             autopar.plan's own plan, `auto-eager` the one priced as the eager engines run it
             (autopar plan --eager), each compared with the fastest native recipe of its row),
             applied with autopar.runtime.apply as `autopar run` does

--program: no native recipe; the layout of gpt-39b's headline plan (autopar plan gpt-39b --cluster
p3.16xlarge), which no engine takes, on the fx/DTensor program, op by op (compile False) against
compiled per layer (True; Inductor, or AUTOPAR_COMPILE_BACKEND). Strategy "2d" on a 2 x (gpus/2)
mesh: q/k/v/fc1 "k@0,n@1+rs:b@0" (the weight split on both dims, over both axes), proj/fc2
"b@0,k@1+rs:s@1", attention "b@0,h@1", embeddings "h@0,v@1+rs:s@1" / "h@01", head "b@0,n@1". With
2 GPUs the mesh is 1 x 2 and each strategy keeps its axis-1 part (no weight is split twice there).
Strategy "2d-interleaved" (--gpus 4 or 8): the same layout per chunk, 2 pipeline ranks x 2 chunks
(Interleaved1F1B), each chunk on half the GPUs (1 x 2 with 4, 2 x 2 with 8), every rank running
two program stages.

--gpus 1: one process, the data-parallel strategies (dp, zero3, zero1) and `auto` on a 1-rank
mesh, plans made for 1 node x 1 GPU (ONE_GPU). The native recipes still wrap the model (DDP /
fully_shard over a group of one); the runtime runs the plain module, as a one-device stage has
no data parallelism to engine. --compile-mode both runs every case twice, eager then compiled
per block both ways (native: block.compile() per transformer block, then DDP / fully_shard, as
torchtitan orders them; autopar: compile forced on); each row's "compile" says which, and each
way's "compiled" what ran.

Every strategy trains the same global batch of 4 x microbatch sequences per step. Rows go to
bench/results/runtime_vs_native_<gpu>.json (written after every case, so a run stopped by its
time budget keeps what it measured) and a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autopar.runtime.launch import environ_alloc_conf  # noqa: E402

LLAMA_1B = "llama:hidden=2048,layers=16,heads=16,kv_heads=4,seq=2048,vocab=32000"
LLAMA_1B_16K = "llama:hidden=2048,layers=16,heads=16,kv_heads=4,seq=16384,vocab=32000"
NAMES = {LLAMA_1B: "llama-1b-gqa", LLAMA_1B_16K: "llama-1b-gqa-16k"}
# (model, strategy, microbatch per rank, compile), most important first: the run stops at its
# time budget. Tensor parallelism is compiled per block both ways (the native recipe's and the
# runtime's default); `auto` runs with the runtime's default (None).
STRATS = (("dp", False), ("zero3", False), ("tp", True), ("pp", False), ("auto", None))
CASES = ([("gpt-1.3b", s, mb, c) for mb in (1, 8) for s, c in STRATS]
         + [(LLAMA_1B, s, mb, c) for mb in (4, 1) for s, c in STRATS]
         + [("gpt-6.7b", s, 4, c) for s, c in STRATS if s != "dp"]
         + [("gpt-6.7b", "tp", 1, True), ("gpt-1.3b", "zero1", 8, False), ("gpt-6.7b", "dp", 2, False)]
         # context parallelism at 16K tokens, one sequence per microbatch: cp2 against dp2 and the auto plan
         + [(LLAMA_1B_16K, s, 1, False) for s in ("cp", "dp")] + [(LLAMA_1B_16K, "auto", 1, None)]
         # the auto plan priced for the eager engines that run it (autopar plan --eager)
         + [(m, "auto-eager", mb, None) for m, mb in (("gpt-6.7b", 4), ("gpt-1.3b", 1), ("gpt-1.3b", 8),
                                                       (LLAMA_1B, 1), (LLAMA_1B, 4))])
# torch.compile per block, both ways: where it helps (the runtime's default)
COMPILED = [("gpt-1.3b", "tp", 1, True), ("gpt-1.3b", "dp", 8, True), (LLAMA_1B, "tp", 4, True),
            ("gpt-6.7b", "tp", 4, True), ("gpt-1.3b", "zero3", 8, True)]
# --gpus 1: the data-parallel recipes on a 1-rank mesh and the planner's own 1-GPU plan, the
# cases most wanted first (the run stops at its time budget): gpt-1.3b and llama-1b-gqa, dp then
# zero3 then auto
ONE_GPU = [(m, s, mb, False) for s in ("dp", "zero3", "auto")
           for m, mbs in (("gpt-1.3b", (1, 4, 8)), (LLAMA_1B, (1, 4))) for mb in mbs]
ONE_GPU_QUICK = [("gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128", s, 2, False) for s in ("dp", "zero3", "zero1", "auto")]
QUICK = ([("gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128", s, 2, False)
          for s in ("dp", "zero3", "tp", "pp", "zero1", "auto")]
         + [("llama:hidden=64,layers=2,heads=4,kv_heads=2,seq=32,vocab=128", "tp", 2, False)])
# the op-by-op program, eager and compiled (--program; bench/runtime_vs_native.py's docstring)
PROGRAM = [("gpt-1.3b", "2d", mb, c) for mb in (8, 2) for c in (False, True)]
PROGRAM_QUICK = [("gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128", "2d", 2, c) for c in (False, True)]
# the same layout under an interleaved schedule: 2 rank groups x 2 chunks, each chunk on half the
# GPUs (--program with --gpus 4 or 8: every rank runs two program stages)
PROGRAM_INTERLEAVED = [("gpt-1.3b", "2d-interleaved", mb, c) for mb in (8, 2) for c in (False, True)]
PROGRAM_INTERLEAVED_QUICK = [("gpt:hidden=64,layers=4,heads=4,seq=32,vocab=128", "2d-interleaved", 2, c)
                             for c in (False, True)]
TWO_D_STRATEGIES = ("2d", "2d-interleaved")
# gpt-39b's headline plan, per op kind (the 9 layers of 48 where q/k/v/fc1 split their weights twice)
TWO_D = {"attn_q": "k@0,n@1+rs:b@0", "attn_k": "k@0,n@1+rs:b@0", "attn_v": "k@0,n@1+rs:b@0",
         "mlp_fc1": "k@0,n@1+rs:b@0", "attn_proj": "b@0,k@1+rs:s@1", "mlp_fc2": "b@0,k@1+rs:s@1",
         "scaled_dot_product_attention": "b@0,h@1", "wte": "h@0,v@1+rs:s@1", "wpe": "h@01", "linear": "b@0,n@1"}
CONFIGS = {"dp": dict(dp=2, tp=1, pp=1), "zero3": dict(dp=2, tp=1, pp=1, zero=3), "zero1": dict(dp=2, tp=1, pp=1, zero=1),
           "tp": dict(dp=1, tp=2, pp=1), "pp": dict(dp=1, tp=1, pp=2), "cp": dict(dp=1, tp=1, pp=1, cp=2)}


def config(strategy: str, n_gpus: int) -> dict:
    """The 3-D config of a named strategy on n_gpus: the data-parallel ones over all of them
    (CONFIGS is for 2), the others as listed."""
    c = dict(CONFIGS[strategy])
    if c["dp"] > 1:
        c["dp"] = n_gpus
    if c["dp"] * c["tp"] * c["pp"] * c.get("cp", 1) != n_gpus:
        raise ValueError(f"strategy {strategy!r} runs on {c['dp'] * c['tp'] * c['pp'] * c.get('cp', 1)} GPUs, "
                         f"not {n_gpus}")
    return c
WARMUP_STEPS, TIMED_STEPS = 2, 4
# autopar's own plans: priced by the default (fused-kernel) model, or as the eager engines run them
AUTO = ("auto", "auto-eager")
# --profile DIR: the gpt-1.3b tensor-parallel cases also run two steps under torch.profiler,
# both ways; the op tables go to DIR
PROFILE_DIR: Path | None = None
PROFILED_STEPS = 2                 # the steps each profile covers (its tables sum them)
PROFILED = "gpt-1.3b_tp_"          # tag prefix of the cases profiled (--profile-prefix)
# --memory DIR: every case also runs one step under the CUDA allocator's history, and rank 0
# writes the tensors alive at each rank's peak, grouped by where they were allocated
# (bench/truth/memory_peak.py), to DIR/<tag>.txt
MEMORY_DIR: Path | None = None
NATIVE_DP_GROUP = "default"         # --native-dp-group


# ---------------------------------------------------------------------------------------------
# plans

def make_plan(model: str, strategy: str, micro: int, n_gpus: int, cluster: str, microbatches: int | str = "auto"):
    """The plan a case runs: build_3d for a strategy, autopar.plan for auto / auto-eager
    (`microbatches`: its microbatch count, "auto" to search it, as the benchmark does)."""
    import autopar
    from autopar.evaluation.baselines import Config3D, build_3d
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource
    gb = 4 * micro
    if strategy in TWO_D_STRATEGIES:
        return two_d_plan(model, micro, n_gpus, cluster, interleaved=strategy == "2d-interleaved")
    if strategy in AUTO:
        return autopar.plan(model, cluster, nodes=1, gpus_per_node=n_gpus, global_batch=gb,
                            eager=strategy == "auto-eager", microbatches=microbatches)
    c = config(strategy, n_gpus)
    per_rank = micro if c["dp"] == 1 else micro
    return build_3d(ModelSource(model), load_cluster(cluster, 1, n_gpus), gb, Config3D(microbatch=per_rank, **c))


def two_d_plan(model: str, micro: int, n_gpus: int, cluster: str, interleaved: bool = False):
    """gpt-39b's headline layout (TWO_D) on a 2 x n/2 mesh; on 1 x 2 (2 GPUs), each strategy's
    axis-1 part. interleaved: two pipeline ranks of n/2 GPUs, two chunks each (Interleaved1F1B),
    every chunk in that layout on its n/2 GPUs."""
    import graphs
    from autopar.evaluation.baselines import Config3D, build_3d
    from autopar.evaluation.evaluator import evaluate
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource
    pp = 2 if interleaved else 1
    dp = 2 if n_gpus // pp >= 4 else 1
    cl = load_cluster(cluster, 1, n_gpus)
    kw = dict(schedule="interleaved", virtual_stages=2) if interleaved else {}
    plan = build_3d(ModelSource(model), cl, 4 * micro, Config3D(dp, n_gpus // (dp * pp), pp, micro, **kw))
    graph = graphs.load(model, batch=plan.training.microbatch_size)
    base = [dict(stage.strategies) for stage in plan.stages]
    for stage in plan.stages:
        _two_d_strategies(stage.strategies, dp)
    while True:
        try:
            return evaluate(plan, graph, cl)
        except ValueError as e:        # a strategy the planner does not offer on this mesh: keep Megatron's
            op = str(e).split(":")[0]
            changed = [(st, b) for st, b in zip(plan.stages, base) if op in st.strategies and st.strategies[op] != b[op]]
            if not changed:
                raise
            for st, b in changed:
                st.strategies[op] = b[op]


def _two_d_strategies(strategies: dict, dp: int) -> None:
    import re
    for name in list(strategies):
        kind = re.sub(r"_\d+$", "", re.sub(r"^blocks_\d+_", "", name))
        s = TWO_D.get(kind)
        if s is not None and dp == 1:
            # keep what splits over axis 1 (as axis 1): "k@0,n@1+rs:b@0" -> "n@1"
            parts = [t for t in s.split("+")[0].split(",") if "1" in t.split("@")[1]]
            rs = [t for t in s.split("+")[1:] if t.endswith("@1")]
            s = "+".join([",".join(t.split("@")[0] + "@1" for t in parts)] + rs) if parts else "R"
        if s is not None:
            strategies[name] = s


# ---------------------------------------------------------------------------------------------
# the plain PyTorch recipes

class NativeStage(nn.Module):
    """Blocks [lo, hi) of a zoo GPT/Llama with its embedding (first) or norm, head and loss (last)."""

    def __init__(self, model, first: bool, last: bool, lo: int, hi: int):
        super().__init__()
        self.m_cfg, self.first, self.last = model.cfg, first, last
        llama = model.cfg.family == "llama"
        self.emb = model.tok_emb if llama else model.wte
        self.pos = None if llama else model.wpe
        self.layers = nn.ModuleList(model.blocks[lo:hi])
        self.norm = (model.norm if llama else model.ln_f) if last else None
        self.head = model.head if last and not model.cfg.tied else None
        if not first:
            self.emb = self.emb if (last and model.cfg.tied) else None
            self.pos = None

    def forward(self, x, targets=None):
        if self.first:
            h = self.emb(x)
            x = h + self.pos(torch.arange(x.shape[1], device=x.device)) if self.pos is not None else h
        for layer in self.layers:
            x = layer(x)
        if not self.last:
            return x
        x = self.norm(x)
        logits = F.linear(x, self.emb.weight) if self.head is None else self.head(x)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1)).reshape(1)


def _tp_attention(self, x):
    b, s, _ = x.shape
    if hasattr(self, "wq"):                    # llama: RoPE, GQA
        from graphs.zoo.llama import apply_rope
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[:s].to(x.dtype), self.sin[:s].to(x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))
    q = self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2)
    k = self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2)
    v = self.v(x).view(b, s, -1, self.head_dim).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).reshape(b, s, -1))


def native_tp(model, mesh):
    import types

    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleOutput,
        RowwiseParallel,
        parallelize_module,
    )
    llama = model.cfg.family == "llama"
    col = ("attn.wq", "attn.wk", "attn.wv", "mlp.w1", "mlp.w3") if llama else ("attn.q", "attn.k", "attn.v", "mlp.fc1")
    row = ("attn.wo", "mlp.w2") if llama else ("attn.proj", "mlp.fc2")
    for block in model.blocks:
        parallelize_module(block, mesh, {**{n: ColwiseParallel() for n in col}, **{n: RowwiseParallel() for n in row}})
        block.attn.forward = types.MethodType(_tp_attention, block.attn)
    top = {("tok_emb" if llama else "wte"): RowwiseParallel(input_layouts=Replicate())}
    if not llama:
        top["wpe"] = RowwiseParallel(input_layouts=Replicate())
    if model.cfg.tied:
        top["norm" if llama else "ln_f"] = PrepareModuleOutput(output_layouts=Replicate(),
                                                               desired_output_layouts=Replicate(), use_local_output=False)
    else:
        top["head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, mesh, top)


class Native:
    """One strategy's plain recipe on this rank; step(batch) trains one global batch."""

    def __init__(self, strategy: str, model, device, n_micro: int, micro: int, compile_blocks: bool):
        from torch.distributed.device_mesh import init_device_mesh
        self.device, self.n_micro, self.micro, self.strategy = device, n_micro, micro, strategy
        world, rank = dist.get_world_size(), dist.get_rank()
        self.rank, self.world = rank, world
        self.autocast = torch.bfloat16 if device.type == "cuda" else None
        self.loss_ctx = contextlib.nullcontext
        self.schedule = None
        model.to(device)
        if strategy == "dp":
            if compile_blocks:
                for b in model.blocks:
                    b.compile()
            from torch.nn.parallel import DistributedDataParallel
            group = None
            if NATIVE_DP_GROUP == "mesh":
                # (diagnostic) DDP over the data-parallel group of a (pp, dp, tp) DeviceMesh, as the
                # runtime builds it, instead of the default process group
                group = init_device_mesh(device.type, (1, world, 1), mesh_dim_names=("pp", "dp", "tp"))["dp"].get_group()
            self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  process_group=group, gradient_as_bucket_view=True)
            params = list(model.parameters())
        elif strategy == "cp":
            if model.cfg.family != "llama":
                raise ValueError(f"the native cp recipe shards Llama's rope tables; {model.cfg.family} has none "
                                 "(its positions are computed in forward)")
            from torch.distributed.tensor.experimental._attention import set_rotate_method
            from torch.nn.parallel import DistributedDataParallel
            self.cp_mesh = init_device_mesh(device.type, (world,))
            set_rotate_method("alltoall")
            for b in model.blocks:
                b.attn.repeat_kv = True         # K/V repeated to the query heads, as torchtitan does
            self.cp_tables = [t for b in model.blocks for t in (b.attn.cos, b.attn.sin)]
            self.module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  gradient_as_bucket_view=True, broadcast_buffers=False)
            params = list(model.parameters())
        elif strategy in ("zero3", "zero1"):
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mesh = init_device_mesh(device.type, (world,))
            kw = {"mp_policy": MixedPrecisionPolicy(torch.bfloat16, torch.float32)} if self.autocast else {}
            for i, b in enumerate(model.blocks):
                if compile_blocks:
                    b.compile()
                fully_shard(b, mesh=mesh, reshard_after_forward=strategy == "zero3" and i < len(model.blocks) - 1, **kw)
            fully_shard(model, mesh=mesh, reshard_after_forward=strategy == "zero3", **kw)
            self.autocast = None
            self.module, params = model, list(model.parameters())
        elif strategy == "tp":
            from torch.distributed.tensor.parallel import loss_parallel
            mesh = init_device_mesh(device.type, (world,))
            native_tp(model, mesh)
            if compile_blocks:
                for b in model.blocks:
                    b.compile()
            for b in model.blocks:
                b.attn.heads //= world
                if hasattr(b.attn, "kv_heads"):
                    b.attn.kv_heads //= world
            self.module, params, self.loss_ctx = model, list(model.parameters()), loss_parallel
        elif strategy == "pp":
            import copy

            from torch.distributed.pipelining import PipelineStage, Schedule1F1B
            n = model.cfg.layers
            first, last = rank == 0, rank == world - 1
            lo, hi = rank * n // world, (rank + 1) * n // world
            if last and not first and model.cfg.tied:
                model.wte = copy.deepcopy(model.wte) if hasattr(model, "wte") else model.wte
            stage_mod = NativeStage(model, first, last, lo, hi).to(device)
            mine = {id(p) for p in stage_mod.parameters()}
            for p in model.parameters():       # the other stage's weights
                if id(p) not in mine:
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self.stage_mod = stage_mod
            seq = model.cfg.seq
            x = (torch.zeros(micro, seq, dtype=torch.long, device=device) if first else
                 torch.empty(micro, seq, model.cfg.hidden, device=device, requires_grad=True))
            y = (torch.empty(1, device=device) if last else
                 torch.empty(micro, seq, model.cfg.hidden, device=device, requires_grad=True))
            stage = PipelineStage(stage_mod, rank, world, device, input_args=(x,), output_args=(y,))
            self.schedule = Schedule1F1B(stage, n_microbatches=n_micro, loss_fn=lambda out, tgt: out.sum())
            self.first, self.last = first, last
            self.module, params = stage_mod, list(stage_mod.parameters())
            self.tied = stage_mod.emb.weight if model.cfg.tied and stage_mod.emb is not None and world > 1 else None
            if self.tied is not None:
                self.tied_group = dist.new_group([0, world - 1])
        else:
            raise ValueError(strategy)
        self.compiled = compile_blocks and strategy in ("dp", "zero3", "zero1", "tp")    # (pp, cp: eager)
        self.dp = strategy in ("dp", "zero3", "zero1")
        dtensors = [p for p in params if hasattr(p, "placements")]
        groups = [{"params": g} for g in (dtensors, [p for p in params if not hasattr(p, "placements")]) if g]
        # fused on CUDA, FSDP2's and TP's DTensors included (as torchtitan; autopar's engines too,
        # optim.make_optimizer): foreach's fp32 temporaries would add a shard's copy at the step
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.Adam(groups, lr=1e-4, **fast)

    def step(self, batch):
        B, m = self.n_micro, self.micro
        ids, tgt = batch["ids"], batch["targets"]
        if self.dp:     # this rank's rows of every microbatch
            ids = ids.view(B, self.world, m, -1)[:, self.rank].reshape(B * m, -1)
            tgt = tgt.view(B, self.world, m, -1)[:, self.rank].reshape(B * m, -1)
        ids, tgt = ids.to(self.device, non_blocking=True), tgt.to(self.device, non_blocking=True)
        amp = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with amp, self.loss_ctx():
            if self.schedule is not None:
                losses: list = []
                if self.first:
                    self.schedule.step(ids)
                else:
                    self.schedule.step(target=tgt, losses=losses, targets=tgt)
                if self.tied is not None:
                    dist.all_reduce(self.tied.grad, group=self.tied_group)
            elif self.strategy == "cp":
                from torch.distributed.tensor.experimental import context_parallel
                for i in range(B):
                    ctx = contextlib.nullcontext() if i == B - 1 else self.module.no_sync()
                    x, y = ids[i * m:(i + 1) * m].clone(), tgt[i * m:(i + 1) * m].clone()
                    with ctx, context_parallel(self.cp_mesh, buffers=[x, y, *self.cp_tables],
                                               buffer_seq_dims=[1, 1] + [0] * len(self.cp_tables),
                                               no_restore_buffers={x, y}):
                        (self.module(x, y) / B).backward()
            else:
                for i in range(B):
                    sync = i == B - 1 or self.strategy != "dp"
                    ctx = contextlib.nullcontext() if sync else self.module.no_sync()
                    if self.strategy == "zero1":
                        # ZeRO-1 (gradients not sharded): accumulate them and reduce-scatter once,
                        # the weights kept gathered between microbatches
                        self.module.set_requires_gradient_sync(i == B - 1)
                        self.module.set_reshard_after_backward(i == B - 1)
                    with ctx:
                        loss = self.module(ids[i * m:(i + 1) * m], tgt[i * m:(i + 1) * m])
                        if hasattr(loss, "to_local"):
                            loss = loss.to_local()
                        (loss / B).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------

def _free():
    if "torch._dynamo" in sys.modules:
        # the next run compiles its own blocks: dynamo's cache is per code object (every block's
        # _call_impl), so runs of other shapes would recompile as dynamic-shape graphs and,
        # past its recompile limit, run eager
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _profile(step, batches, device, tag: str) -> None:
    """Two more steps under torch.profiler; rank 0 writes the op tables (by GPU time and by CPU
    time) and the step's wall time against its summed kernel time to PROFILE_DIR/<tag>.txt, and
    the aten ops by input shapes (and dtypes where the torch records them), self GPU time and
    calls per step, to PROFILE_DIR/<tag>_ops.json: which casts and copies run, at which sizes
    (bench/truth/op_categories.py --top). ("summed kernel time"
    sums every event's self device time, an op's and its kernel's both: the tables' "Self CUDA
    time total" is the device time.)"""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    n = PROFILED_STEPS
    dist.barrier()
    with profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            step(batches[i % 2])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) / n
    if dist.get_rank() != 0 or PROFILE_DIR is None:
        return
    ka = prof.key_averages()
    key = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
    gpu_us = sum(getattr(e, key) for e in ka) / n
    launches = sum(e.count for e in ka if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel"))) / n
    text = (f"{tag}: wall {wall * 1e3:.1f} ms/step, summed kernel time {gpu_us / 1e3:.1f} ms/step, "
            f"{launches:.0f} kernel launches/step\n\n"
            + ka.table(sort_by=key, row_limit=40) + "\n\n" + ka.table(sort_by="cpu_time_total", row_limit=40))
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    (PROFILE_DIR / f"{tag}.txt").write_text(text)
    by_op: dict[tuple, list] = {}
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        k = (e.name, str(e.input_shapes), str(getattr(e, "input_dtypes", "")))
        acc = by_op.setdefault(k, [0, 0.0])
        acc[0] += 1
        acc[1] += getattr(e, key)
    ops = [{"op": name, "shapes": sh, "dtypes": dt, "calls_per_step": c / n, "self_device_ms_per_step": us / 1e3 / n}
           for (name, sh, dt), (c, us) in sorted(by_op.items(), key=lambda kv: -kv[1][1]) if us > 0]
    (PROFILE_DIR / f"{tag}_ops.json").write_text(json.dumps(ops, indent=0))
    print(text.splitlines()[0], flush=True)


def _memory_peak(step, batches, device, tag: str) -> None:
    sys.path.insert(0, str(ROOT / "bench" / "truth"))
    from memory_peak import record_peak
    dist.barrier()
    text = record_peak(lambda: step(batches[0]), device)
    texts: list = [None] * dist.get_world_size()
    dist.all_gather_object(texts, text)
    if dist.get_rank() == 0 and MEMORY_DIR is not None:
        MEMORY_DIR.mkdir(parents=True, exist_ok=True)
        (MEMORY_DIR / f"{tag}.txt").write_text("".join(f"== {tag} rank {r}\n{t}\n\n" for r, t in enumerate(texts)))
        print(f"{tag}: memory at the peak written", flush=True)


def _measure(step, plan, device, tag: str = "") -> dict:
    from autopar.runtime.apply import make_batch
    batches = [make_batch(plan, i) for i in range(2)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(batches[i % 2])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    timed = torch.tensor(times[WARMUP_STEPS:], dtype=torch.float64, device=device)
    dist.all_reduce(timed, op=dist.ReduceOp.MAX)          # a step ends when its slowest rank does
    t = torch.tensor([statistics.median(times[WARMUP_STEPS:]),
                      torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
                      torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if PROFILE_DIR is not None and tag.startswith(PROFILED):
        _profile(step, batches, device, tag)
    if MEMORY_DIR is not None and device.type == "cuda":
        _memory_peak(step, batches, device, tag)
    tokens = plan.training.global_batch * plan.model.seq
    return {"step_time_s": t[0].item(), "tokens_per_s": tokens / t[0].item(), "peak_allocated_bytes": int(t[1].item()),
            "peak_reserved_bytes": int(t[2].item()), "step_times_s": [round(x, 6) for x in timed.tolist()]}


def _pooled(runs: list[dict], tokens: int) -> dict:
    """One way's figures over the rounds: the median of every timed step of every round (tokens
    per step given), the largest peaks."""
    out = dict(runs[-1])
    steps = [x for r in runs for x in r["step_times_s"]]
    med = statistics.median(steps)
    out.update(step_time_s=med, tokens_per_s=tokens / med, step_times_s=steps,
               peak_allocated_bytes=max(r["peak_allocated_bytes"] for r in runs),
               peak_reserved_bytes=max(r["peak_reserved_bytes"] for r in runs))
    return out


def _tag(plan, who: str, strategy: str, compiled: bool | None) -> str:
    name = NAMES.get(plan.model.name, plan.model.name).replace(":", "_").replace(",", "_").replace("=", "")
    how = {True: "compiled", False: "eager", None: "default"}[compiled]
    return f"{name}_{strategy}_mb{plan.training.microbatch_size}_{how}_{who}"


def run_native(strategy, plan, device, compile_blocks):
    from autopar.runtime.apply import build_model
    model = build_model(plan, device=device)
    c = config(strategy, dist.get_world_size())
    micro = plan.training.microbatch_size // c["dp"]
    nat = Native(strategy, model, device, plan.training.n_microbatches, micro, compile_blocks)
    try:
        return {**_measure(nat.step, plan, device, _tag(plan, "native", strategy, compile_blocks)),
                "compiled": nat.compiled}
    finally:
        del nat, model
        _free()


def run_autopar(plan, device, compile_blocks, strategy: str):
    import warnings

    from autopar.runtime.apply import build_model
    from autopar.runtime.engines import EngineModel
    from autopar.runtime.engines import apply as autopar_apply
    model = build_model(plan, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = autopar_apply(plan, model, device=device, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
                           compile=compile_blocks, engines=strategy not in TWO_D_STRATEGIES)
    try:
        out = _measure(pm.step, plan, device, _tag(plan, "autopar", strategy, compile_blocks))
        if hasattr(pm, "layout"):
            out["layout"] = str(pm.layout)
        out["engines"] = isinstance(pm, EngineModel)
        out["compiled"] = bool(getattr(pm, "compiled", False))      # what ran: forced, or the runtime's default
        if not out["engines"]:
            out["fallback"] = "; ".join(str(w.message) for w in caught)[:400]
        return out
    finally:
        del pm, model
        _free()


def body(rank: int, world: int, args) -> None:
    global TIMED_STEPS, PROFILED, NATIVE_DP_GROUP
    TIMED_STEPS, PROFILED, NATIVE_DP_GROUP = args.timed_steps, args.profile_prefix, args.native_dp_group
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank), WORLD_SIZE=str(world))
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    start = time.monotonic()
    gpu = torch.cuda.get_device_name(device).split()[-1].lower() if cuda else "cpu"
    out_path = Path(args.out or ROOT / "bench" / "results" / f"runtime_vs_native_{gpu}.json")
    rows: list[dict] = []
    global PROFILE_DIR, MEMORY_DIR
    PROFILE_DIR = Path(args.profile) if args.profile else None
    MEMORY_DIR = Path(args.memory) if args.memory else None
    cases = _cases(args)
    if args.case:
        cases = [c for c in cases if f"{NAMES.get(c[0], c[0])}:{c[1]}:{c[2]}" in args.case]
    for model, strategy, micro, comp in cases:
        left = args.budget_s - (time.monotonic() - start)
        flag = torch.tensor([1.0 if left > args.case_s else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)          # every rank stops at the same case
        if flag.item() == 0:
            if rank == 0:
                print(f"time budget: stopping before {model} {strategy} mb{micro}", flush=True)
            break
        row = {"model": NAMES.get(model, model), "strategy": strategy, "microbatch": micro, "compile": comp}
        if strategy in TWO_D_STRATEGIES:
            row["way"] = "program compiled" if comp else "program op by op"
        t0 = time.monotonic()
        try:
            obj: list = [None]
            if rank == 0:
                try:
                    obj = [make_plan(model, strategy, micro, world, args.cluster)]
                except Exception as e:           # noqa: BLE001 - rank 1 must hear of it, not wait
                    obj = [f"{type(e).__name__}: {e}"]
            dist.broadcast_object_list(obj, src=0)
            if isinstance(obj[0], str):
                raise RuntimeError(f"making the plan failed: {obj[0]}")
            plan = obj[0]
            # the split as well as the label: a planner label names stages, layers and devices,
            # so a later planner can make the same label at another microbatch size
            # (bench/truth/predict_runs.py re-plans an auto row at the split it records)
            row.update(global_batch=plan.training.global_batch, seq=plan.model.seq, plan=plan.config.label or plan.strategy,
                       zero=plan.training.zero, plan_microbatch_size=plan.training.microbatch_size,
                       plan_n_microbatches=plan.training.n_microbatches)
            rounds = []
            for r in range(args.repeat):
                # alternate the order, so that neither way always runs first in the processes
                order = ("native", "autopar") if r % 2 == 0 else ("autopar", "native")
                got: dict = {}
                for who in order:
                    if args.only and who != args.only:
                        continue
                    if who == "native" and strategy not in AUTO + TWO_D_STRATEGIES:
                        got["native"] = run_native(strategy, plan, device, comp)
                    elif who == "autopar":
                        got["autopar"] = run_autopar(plan, device, comp, strategy)
                rounds.append({"order": "/".join(w for w in order if w in got), **got})
            for who in ("native", "autopar"):
                if rounds and who in rounds[0]:
                    row[who] = _pooled([x[who] for x in rounds], plan.training.global_batch * plan.model.seq)
            if args.repeat > 1:
                row["rounds"] = [{"order": x["order"], **{w: x[w]["step_time_s"] for w in ("native", "autopar")
                                                        if w in x}} for x in rounds]
        except Exception as e:                   # noqa: BLE001 - a failed case is a row, the run goes on
            row["error"] = f"{type(e).__name__}: {e}"[:600]
            if rank == 0:
                traceback.print_exc()
            _free()
        row["wall_s"] = round(time.monotonic() - t0, 1)
        _ratios(row)
        rows.append(row)
        if rank == 0:
            if not args.only:
                print(json.dumps(row), flush=True)
            _write(out_path, rows, world, gpu)
    if rank == 0:
        _write(out_path, rows, world, gpu)
        if not args.only:                     # (a --fresh part: its parent prints the table)
            print(table(rows))
    dist.barrier()
    dist.destroy_process_group()


def _ratios(row: dict) -> None:
    if "native" in row and "autopar" in row:
        n, a = row["native"], row["autopar"]
        row["throughput_ratio"] = a["tokens_per_s"] / n["tokens_per_s"]
        row["allocated_ratio"] = a["peak_allocated_bytes"] / max(1, n["peak_allocated_bytes"])
        row["reserved_ratio"] = a["peak_reserved_bytes"] / max(1, n["peak_reserved_bytes"])


def _write(path: Path, rows: list[dict], world: int, gpu: str) -> None:
    _ratio_auto(rows)          # the auto plan against the fastest native recipe of its (model, microbatch)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"gpus": world, "gpu": gpu, "torch": torch.__version__, "warmup_steps": WARMUP_STEPS,
            "timed_steps": TIMED_STEPS, "precision": "bf16" if gpu != "cpu" else "fp32",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            # the CUDA caching allocator's configuration both ways ran with ("": default segments)
            "alloc_conf": environ_alloc_conf() or "",
            # (an absolute path, e.g. --out on the GPU machine, by its file name: results are committed)
            "argv": " ".join(Path(a).name if os.path.isabs(a) else a for a in sys.argv[1:])}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def _key(r: dict) -> tuple:
    return (r["model"], r["strategy"], r["microbatch"], r.get("compile"))


def merge(new_path: Path, out_path: Path | None, note: str) -> int:
    """Fold a run's rows into the results file: a row of the same case is replaced (the old one
    kept under "replaced_rows"), each new row names its run, whose meta goes to meta.runs."""
    new = json.loads(new_path.read_text())
    path = out_path or ROOT / "bench" / "results" / f"runtime_vs_native_{new['meta']['gpu']}.json"
    doc: dict = json.loads(path.read_text()) if path.exists() else {"meta": {"runs": {}}, "rows": []}
    runs = doc["meta"].setdefault("runs", {})
    run_id = str(max([int(k) for k in runs if k.isdigit()] + [0]) + 1)
    runs[run_id] = {**new["meta"], **({"note": note} if note else {})}
    fresh = {_key(r): r for r in new["rows"]}
    kept, replaced = [], doc.setdefault("replaced_rows", [])
    for r in doc["rows"]:
        if _key(r) in fresh:
            replaced.append({**r, "replaced_by_run": run_id})
        else:
            kept.append(r)
    doc["rows"] = kept + [{**r, "run": run_id} for r in new["rows"]]
    # the auto rows' ratio against the fastest native of their case, over the merged rows
    _ratio_auto(doc["rows"])
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc["rows"]))
    return 0


def _ratio_auto(rows: list[dict]) -> None:
    for r in rows:
        if r["strategy"] in AUTO and "autopar" in r:
            # (an auto row run eager or compiled (--compile-mode) against the natives run so)
            best = max((x for x in rows if x["model"] == r["model"] and x["microbatch"] == r["microbatch"]
                        and "native" in x and (r.get("compile") is None or x.get("compile") == r["compile"])),
                       key=lambda x: x["native"]["tokens_per_s"], default=None)
            if best is not None:
                r["best_native"] = best["strategy"]
                r["throughput_ratio"] = r["autopar"]["tokens_per_s"] / best["native"]["tokens_per_s"]


def table(rows: list[dict]) -> str:
    def gib(x):
        return f"{x / 2**30:.1f}"
    out = ["| model | strategy | mb | compile | native s/step | autopar s/step | native tok/s | autopar tok/s | "
           "ratio | native alloc/resv GiB | autopar alloc/resv GiB | engines |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, a = r.get("native"), r.get("autopar")
        if a is None:
            out.append(f"| {r['model']} | {r['strategy']} | {r['microbatch']} | {r['compile']} | error: "
                       f"{r.get('error', '')[:80]} |||||||")
            continue
        ns = f"{n['step_time_s']:.4f}" if n else f"(best: {r.get('best_native', '-')})"
        nt = f"{n['tokens_per_s']:.0f}" if n else ""
        nm = f"{gib(n['peak_allocated_bytes'])}/{gib(n['peak_reserved_bytes'])}" if n else ""
        ratio = f"{r['throughput_ratio']:.3f}" if "throughput_ratio" in r else ""
        out.append(f"| {r['model']} | {r['strategy']} | {r['microbatch']} | {r['compile']} | {ns} | "
                   f"{a['step_time_s']:.4f} | {nt} | {a['tokens_per_s']:.0f} | {ratio} | {nm} | "
                   f"{gib(a['peak_allocated_bytes'])}/{gib(a['peak_reserved_bytes'])} | {a.get('engines')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="a tiny model on 2 processes (smoke test)")
    p.add_argument("--compiled", action="store_true", help="only the cases compiled per block")
    p.add_argument("--program", action="store_true", help="only gpt-39b's layout on the fx/DTensor program, op by op "
                   "and compiled per layer (with --quick: a tiny model)")
    p.add_argument("--gpus", type=int, choices=[1, 2, 4, 8], default=2, help="processes (GPUs); 4 puts --program's "
                   "layout on a 2x2 mesh, its weights split on both dims, and adds its interleaved cases (two "
                   "chunks per rank, each chunk on a 1x2 mesh; on 2x2 with 8); 1 runs the data-parallel "
                   "strategies and auto on one GPU (ONE_GPU)")
    p.add_argument("--compile-mode", choices=["case", "eager", "compiled", "both"], default="case",
                   help="torch.compile per transformer block: as each case lists it, off or on both ways "
                        "(native: block.compile() then DDP / fully_shard; autopar: forced on), or each case "
                        "eager then compiled")
    p.add_argument("--profile", default="", help="also profile the gpt-1.3b tensor-parallel cases under "
                   "torch.profiler; the tables go to this folder")
    p.add_argument("--profile-prefix", default=PROFILED, help="with --profile: the cases whose tag starts so "
                   "(MODEL_STRATEGY_mbN_eager|compiled|default_native|autopar) are profiled")
    p.add_argument("--memory", default="", metavar="DIR",
                   help="also record one step's allocations per case and write the tensors alive at the peak to DIR")
    p.add_argument("--fresh", action="store_true", help="run every (case, round, way) in a new pair of processes "
                   "(the first run in shared processes measured faster than the later ones)")
    p.add_argument("--only", choices=["native", "autopar"], default=None, help="run only this way of each case")
    p.add_argument("--native-dp-group", choices=["default", "mesh"], default="default",
                   help="the native DDP's process group: the default one, or (a diagnostic) the dp group of a "
                        "(pp, dp, tp) DeviceMesh as the runtime uses")
    p.add_argument("--cluster", default="dgx-h200")
    p.add_argument("--budget-s", type=float, default=330.0, help="start no case after this many seconds")
    p.add_argument("--case-s", type=float, default=25.0, help="time a case needs at most")
    p.add_argument("--out", default="")
    p.add_argument("--case", action="append", default=[], metavar="MODEL:STRATEGY:MB",
                   help="run only these cases of the chosen list (repeatable), e.g. gpt-1.3b:auto:8")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--repeat", type=int, default=1, help="rounds per case, alternating which way runs first; "
                   "the row pools every round's timed steps")
    p.add_argument("--timed-steps", type=int, default=TIMED_STEPS, help=f"timed steps per round, after {WARMUP_STEPS} "
                   "warm-up steps")
    p.add_argument("--merge", default="", metavar="NEW.json",
                   help="no run: merge the rows of NEW.json (a run's --out) into the results file (--out or the "
                        "GPU's default), replacing rows of the same model, strategy, microbatch and compile")
    p.add_argument("--note", default="", help="with --merge: how the new rows were made (the command, the machine)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(Path(args.merge), Path(args.out) if args.out else None, args.note)
    if args.repeat < 1 or args.timed_steps < 1:
        p.error("--repeat and --timed-steps must be at least 1")
    if args.gpus == 1 and args.program:
        p.error("--program needs a mesh: --gpus 2 or more")
    if args.fresh and args.compile_mode == "both":
        p.error("--fresh runs one compile mode per case: use --compile-mode eager or compiled")
    listed = {f"{NAMES.get(c[0], c[0])}:{c[1]}:{c[2]}" for c in QUICK + COMPILED + CASES + PROGRAM + PROGRAM_QUICK
              + PROGRAM_INTERLEAVED + PROGRAM_INTERLEAVED_QUICK + ONE_GPU + ONE_GPU_QUICK}
    unknown = [c for c in args.case if c not in listed]
    if unknown:
        p.error(f"unknown case(s) {unknown}; the cases are: {', '.join(sorted(listed))}")
    import torch.multiprocessing as mp
    if args.device == "cuda":
        # both ways under the allocator `autopar run` sets (expandable segments), unless
        # PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF is set (empty: the default segments)
        from autopar.runtime.launch import cuda_alloc_conf
        print(f"allocator: {cuda_alloc_conf() or 'default segments'}", flush=True)
    if not args.fresh:
        mp.spawn(body, args=(args.gpus, args), nprocs=args.gpus, join=True)
        return 0
    return run_fresh(args)


def _cases(args) -> list:
    if args.program:
        more = (PROGRAM_INTERLEAVED_QUICK if args.quick else PROGRAM_INTERLEAVED) if args.gpus >= 4 else []
        cases = (PROGRAM_QUICK if args.quick else PROGRAM) + more
    elif args.gpus == 1:
        cases = ONE_GPU_QUICK if args.quick else ONE_GPU
    else:
        cases = QUICK if args.quick else COMPILED if args.compiled else CASES
    # --compile-mode: each case as listed, or eager / compiled per block both ways, or both in turn
    modes = {"case": None, "eager": (False,), "compiled": (True,), "both": (False, True)}[args.compile_mode]
    return cases if modes is None else [(m, s, mb, c) for m, s, mb, _ in cases for c in modes]


def run_fresh(args) -> int:
    """--fresh: every (case, round, way) in a pair of processes of its own, as `autopar run` and
    a plain training script each start theirs (in shared processes, the first run measured
    faster than every later one, whichever way it was: bench/results/runtime_vs_native_h200.json,
    gpt-1.3b dp mb1's rounds). The rows pool each way's rounds as a shared run does."""
    import copy
    import tempfile

    import torch.multiprocessing as mp
    global TIMED_STEPS
    TIMED_STEPS = args.timed_steps          # for the meta this process writes
    cases = _cases(args)
    keys = [f"{NAMES.get(c[0], c[0])}:{c[1]}:{c[2]}" for c in cases]
    if args.case:
        keys = [k for k in keys if k in args.case]
    start, port = time.monotonic(), args.port
    rows, meta = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            if time.monotonic() - start > args.budget_s - args.case_s:
                print(f"time budget: stopping before {key}", flush=True)
                break
            parts: list[tuple[str, dict]] = []
            for r in range(args.repeat):
                order = ("native", "autopar") if r % 2 == 0 else ("autopar", "native")
                for who in order:
                    if who == "native" and key.split(":")[1] in AUTO + TWO_D_STRATEGIES:
                        continue
                    if args.only and who != args.only:      # --only: the other way not at all
                        continue
                    sub = copy.copy(args)
                    port += 1
                    sub.case, sub.only, sub.repeat, sub.port = [key], who, 1, port
                    sub.budget_s, sub.out = 1e9, str(Path(tmp) / f"{len(rows)}_{r}_{who}.json")
                    mp.spawn(body, args=(args.gpus, sub), nprocs=args.gpus, join=True)
                    doc = json.loads(Path(sub.out).read_text())
                    meta = doc["meta"]
                    parts.append((who, doc["rows"][0]))
            row = {k: v for k, v in parts[0][1].items() if k not in ("native", "autopar", "throughput_ratio",
                                                                      "allocated_ratio", "reserved_ratio")}
            errors = [x["error"] for _, x in parts if "error" in x]
            if errors:
                row["error"] = errors[0]
            tokens = row.get("global_batch", 0) * row.get("seq", 0)
            for who in ("native", "autopar"):
                got = [x[who] for w, x in parts if w == who and who in x]
                if got and tokens:
                    row[who] = _pooled(got, tokens)
            row["rounds"] = [{"way": w, "step_time_s": x[w]["step_time_s"]} for w, x in parts if w in x]
            row["wall_s"] = round(sum(x.get("wall_s", 0.0) for _, x in parts), 1)
            row["fresh_processes"] = True
            _ratios(row)
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(Path(args.out or ROOT / "bench" / "results" / f"runtime_vs_native_{meta['gpu']}.json"), rows,
                   meta["gpus"], meta["gpu"])
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
