"""Time real training steps of zoo models, the way a user writes them by hand (issue 13).

One process per GPU. Run with plain `python3` for 1-GPU runs (strategy single) or under
`torch.distributed.run --nproc-per-node 2` for ddp / fsdp2 / tp / pp. The runs come from a JSON
list (see configs.py); each result is appended as one JSON line to --out (rank 0 writes), with
an {"event": "start"} line before each run so a driver can tell which run a dead worker was in.

    python3 bench/truth/truth.py --configs runs.json --out rows.jsonl
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/truth/truth.py ...
    python3 bench/truth/truth.py --device cpu ...   # gloo/CPU smoke mode with tiny models

The training step (every strategy):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16): loss = model(ids, targets)
    loss.backward(); opt.step()
with the zoo module (graphs.zoo.build_module on the model_spec), fp32 master params, fp32 grads,
torch.optim.AdamW(fused=True), SDPA attention (what the zoo calls), the zoo's cross-entropy.
Recompute "full" wraps every block in torch.utils.checkpoint.checkpoint(use_reentrant=False).

Strategies (2 GPUs):
  ddp    DistributedDataParallel(model, device_ids=[rank]) with its defaults (25 MB buckets).
  fsdp2  fully_shard(block, mp_policy, reshard_after_forward=True) per block, then the root;
         MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); autocast on top.
  tp     Megatron pattern inside every block through parallelize_module: q/k/v (wq/wk/wv) and
         fc1 (w1, w3) ColwiseParallel, proj (wo) and fc2 (w2) RowwiseParallel; heads per rank
         halved. Embedding, final norm, LM head and loss stay replicated (computed on both
         ranks). Both ranks get the same batch.
  pp     torch.distributed.pipelining: stage 0 = embeddings + blocks[:L/2], stage 1 =
         blocks[L/2:] + final norm + LM head, loss_fn = the zoo's cross-entropy; Schedule1F1B,
         n_microbatches microbatches of `microbatch` sequences per step. A tied GPT head is a
         copy of the token embedding on stage 1 whose gradient is all-reduced with stage 0's
         (Megatron's embedding group). autocast is around the whole schedule step.
  Data-parallel strategies (ddp, fsdp2) take `microbatch` sequences per rank (global batch 2x).

Measured per run (see README.md for the breakdown buckets):
  step_s: CUDA events around each step, back to back, after warm-ups: median of N.
  host_enqueue_s: host wall time for step() to return when started on an idle GPU, no sync
     inside (median of 2 after a warm-up).
  peak_allocated_bytes / peak_reserved_bytes: torch.cuda.max_memory_allocated/reserved over
     the warm-up and timed steps (max over ranks; per-rank lists too).
  breakdown_s: one torch.profiler step after the timed ones, kernels classified by the
     region of the step that launched them.
"""

from __future__ import annotations

import os

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v          # NVLink multicast off before torch or NCCL start

import argparse
import bisect
import contextlib
import datetime as _dt
import gc
import inspect
import json
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.profiler import record_function

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import configs as C  # noqa: E402

from graphs.zoo import build_module, get_config  # noqa: E402

MARK = "truth::mark::"


def mark(label: str) -> None:
    """A zero-length user annotation: the region `label` starts here on this CPU thread."""
    with record_function(MARK + label):
        pass


class Boundary(torch.autograd.Function):
    """Identity whose backward marks the start of a backward region on the autograd thread."""

    @staticmethod
    def forward(ctx, x, label):
        ctx.label = label
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        mark(ctx.label)
        return g, None


class Ckpt(nn.Module):
    """Full activation checkpointing of one block (non-reentrant)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(self.block, x, use_reentrant=False)


# ---------------------------------------------------------------------------------------------
# device helpers


class Dev:
    def __init__(self, kind: str, local_rank: int):
        self.kind = kind
        if kind == "cuda":
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")

    def sync(self):
        if self.kind == "cuda":
            torch.cuda.synchronize()

    def reset_peaks(self):
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def mem(self) -> dict:
        if self.kind != "cuda":
            return {"peak_allocated_bytes": 0, "peak_reserved_bytes": 0}
        st = torch.cuda.memory_stats()
        free, total = torch.cuda.mem_get_info()
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                "allocated_bytes_now": torch.cuda.memory_allocated(),
                "reserved_bytes_now": torch.cuda.memory_reserved(),
                "device_used_bytes_now": total - free,
                "device_total_bytes": total,
                "alloc_retries": st.get("num_alloc_retries", 0),
                "peak_inactive_split_bytes": st.get("inactive_split_bytes.all.peak", 0)}

    def timer(self):
        if self.kind == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            return (lambda: s.record(), lambda: e.record(), lambda: s.elapsed_time(e) / 1e3)
        box = {}
        return (lambda: box.__setitem__("s", time.perf_counter()),
                lambda: box.__setitem__("e", time.perf_counter()),
                lambda: box["e"] - box["s"])


# ---------------------------------------------------------------------------------------------
# model building


def final_norm(model):
    return model.ln_f if hasattr(model, "ln_f") else model.norm


def embed_params(model):
    return [m.weight for m in (getattr(model, "wte", None), getattr(model, "wpe", None),
                               getattr(model, "tok_emb", None)) if m is not None]


def instrument(model) -> None:
    """Region markers on the zoo module (hooks only: the zoo's forward is untouched).

    forward, main thread:  embed_fwd (root pre-hook) -> blocks_fwd (blocks[0] pre-hook) ->
                           head_fwd (final-norm pre-hook: final norm, LM head, cross-entropy)
    backward, autograd thread: head_bwd (Boundary on the loss) -> blocks_bwd (Boundary on the
                           final norm's input) -> embed_bwd (Boundary on blocks[0]'s input) ->
                           bwd_tail (post-accumulate-grad hook of the embedding weights)
    """
    model.register_forward_pre_hook(lambda m, a: mark("embed_fwd"))

    def pre_block0(m, args):
        mark("blocks_fwd")
        return (Boundary.apply(args[0], "embed_bwd"),) + tuple(args[1:])

    def pre_norm(m, args):
        mark("head_fwd")
        return (Boundary.apply(args[0], "blocks_bwd"),) + tuple(args[1:])

    model.blocks[0].register_forward_pre_hook(pre_block0)
    final_norm(model).register_forward_pre_hook(pre_norm)
    for p in embed_params(model):
        with contextlib.suppress(Exception):    # older torch / wrapped params have no such hook
            p.register_post_accumulate_grad_hook(lambda p: mark("bwd_tail"))


def build(run: dict, dev: Dev, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_module(get_config(run["model_spec"]), device=dev.device)
    return model


def apply_recompute(model) -> None:
    for i in range(len(model.blocks)):
        model.blocks[i] = Ckpt(model.blocks[i])


def make_batch(run: dict, vocab: int, dev: Dev, batch: int):
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (batch, run["seq"]), generator=g)
    tgt = torch.randint(0, vocab, (batch, run["seq"]), generator=g)
    return ids.to(dev.device), tgt.to(dev.device)


def make_opt(params):
    params = [p for p in params if p.requires_grad]
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:           # torch < 2.5
        DTensor = ()
    dt = [p for p in params if isinstance(p, DTensor)] if DTensor else []
    plain = [p for p in params if not (DTensor and isinstance(p, DTensor))]
    groups = [g for g in ({"params": dt}, {"params": plain}) if g["params"]]
    # one param group per tensor type: the fused kernel takes one list of one kind
    return torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.01, fused=True)


# ---------------------------------------------------------------------------------------------
# strategies: each returns (step_fn, objects_to_free, tokens_per_step_global)


def setup_single(run, dev, amp):
    model = build(run, dev)
    if run["recompute"] == "full":
        apply_recompute(model)
    instrument(model)
    opt = make_opt(model.parameters())
    ids, tgt = make_batch(run, model.cfg.vocab, dev, run["microbatch"])
    nmb = run.get("n_microbatches", 1)
    step = plain_step(model, opt, ids, tgt, amp, nmb)
    return step, [model, opt], run["microbatch"] * run["seq"] * nmb


def plain_step(model, opt, ids, tgt, amp, nmb: int = 1, no_sync=None):
    """One optimizer step over nmb microbatches (the same rows each time); `no_sync()` (DDP's)
    holds back the gradient reduction of all but the last."""
    def step():
        mark("zero_grad")
        opt.zero_grad(set_to_none=True)
        for i in range(nmb):
            last = i == nmb - 1
            with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
                mark("fwd_other")
                with torch.autocast(amp, dtype=torch.bfloat16):
                    loss = model(ids, tgt)
                scaled = Boundary.apply(loss / nmb if nmb > 1 else loss, "head_bwd")
                mark("bwd_launch")
                scaled.backward()
        mark("optimizer")
        opt.step()
        mark("end")
        return loss
    return step


def setup_ddp(run, dev, amp, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = build(run, dev)
    if run["recompute"] == "full":
        apply_recompute(model)
    instrument(model)
    ddp = DDP(model, device_ids=[dev.device.index] if dev.kind == "cuda" else None)
    opt = make_opt(ddp.parameters())
    ids, tgt = make_batch(run, model.cfg.vocab, dev, run["microbatch"])
    nmb = run.get("n_microbatches", 1)
    return (plain_step(ddp, opt, ids, tgt, amp, nmb, ddp.no_sync), [ddp, model, opt],
            world * run["microbatch"] * run["seq"] * nmb)


def _fsdp_api():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def setup_fsdp2(run, dev, amp, world):
    fully_shard, MP = _fsdp_api()
    model = build(run, dev)
    if run["recompute"] == "full":
        apply_recompute(model)
    instrument(model)
    mp = MP(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for blk in model.blocks:
        fully_shard(blk, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mp_policy=mp, reshard_after_forward=True)
    if dev.kind == "cuda":
        torch.cuda.empty_cache()      # the unsharded fp32 init copies are gone
    opt = make_opt(model.parameters())
    ids, tgt = make_batch(run, model.cfg.vocab, dev, run["microbatch"])
    nmb = run.get("n_microbatches", 1)
    # ZeRO-3 reduce-scatters every microbatch's gradients (as autopar's engine and the cost model
    # do); set_requires_gradient_sync(False) would hold them unsharded until the last one instead
    return plain_step(model, opt, ids, tgt, amp, nmb), [model, opt], world * run["microbatch"] * run["seq"] * nmb


def _gpt_attn_forward_tp(self, x):
    """The zoo's GPT attention with the heads of this rank only (reshape to -1, not h)."""
    b, s, _ = x.shape
    q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
    k = self.k(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
    v = self.v(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).reshape(b, s, -1))


def setup_tp(run, dev, amp, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh(dev.kind, (world,))
    model = build(run, dev)
    gpt = run["family"] == "gpt"
    plan = ({"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
             "attn.proj": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}
            if gpt else
            {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
             "attn.wo": RowwiseParallel(), "mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(),
             "mlp.w2": RowwiseParallel()})
    for blk in model.blocks:
        parallelize_module(blk, mesh, plan)
        blk.attn.heads //= world
        if gpt:
            blk.attn.forward = types.MethodType(_gpt_attn_forward_tp, blk.attn)
        else:
            blk.attn.kv_heads //= world
    if run["recompute"] == "full":
        apply_recompute(model)
    instrument(model)
    opt = make_opt(model.parameters())
    ids, tgt = make_batch(run, model.cfg.vocab, dev, run["microbatch"])
    return plain_step(model, opt, ids, tgt, amp), [model, opt, mesh], run["microbatch"] * run["seq"]


class Stage0(nn.Module):
    """Embeddings + the first half of the blocks: the zoo forward up to the split."""

    def __init__(self, model, k):
        super().__init__()
        self.gpt = hasattr(model, "wte")
        if self.gpt:
            self.wte, self.wpe = model.wte, model.wpe
        else:
            self.tok_emb = model.tok_emb
        self.blocks = nn.ModuleList(model.blocks[:k])

    def forward(self, ids):
        mark("embed_fwd")
        if self.gpt:
            x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        else:
            x = self.tok_emb(ids)
        mark("blocks_fwd")
        x = Boundary.apply(x, "embed_bwd")
        for b in self.blocks:
            x = b(x)
        x = Boundary.apply(x, "blocks_bwd")   # stage 0's backward starts in the blocks
        mark("pp_sched")
        return x


class Stage1(nn.Module):
    """The second half of the blocks + final norm + LM head (logits; the loss is loss_fn)."""

    def __init__(self, model, k):
        super().__init__()
        self.blocks = nn.ModuleList(model.blocks[k:])
        self.norm = final_norm(model)
        if model.cfg.tied:
            w = model.wte.weight
            self.head_w = nn.Parameter(w.detach().clone())
        else:
            self.head_w = model.head.weight

    def forward(self, x):
        mark("blocks_fwd")
        x = Boundary.apply(x, "pp_sched")       # end of stage 1's backward
        for b in self.blocks:
            x = b(x)
        mark("head_fwd")
        x = Boundary.apply(x, "blocks_bwd")
        x = self.norm(x)
        logits = F.linear(x, self.head_w)
        mark("pp_sched")
        return logits


def pp_loss(logits, targets):
    mark("head_fwd")
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
    loss = Boundary.apply(loss, "head_bwd")
    mark("pp_sched")
    return loss


def setup_pp(run, dev, amp, world, rank):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    assert world == 2, "pp here is 2 stages"
    model = build(run, dev)
    L = len(model.blocks)
    k = L // 2
    if run["recompute"] == "full":
        apply_recompute(model)
    tied = model.cfg.tied
    if rank == 0:
        sub = Stage0(model, k)
    else:
        sub = Stage1(model, k)
    vocab = model.cfg.vocab
    del model
    gc.collect()
    if dev.kind == "cuda":
        torch.cuda.empty_cache()
    stage = PipelineStage(sub, stage_index=rank, num_stages=world, device=dev.device)
    nmb = run["n_microbatches"]
    sched = Schedule1F1B(stage, n_microbatches=nmb, loss_fn=pp_loss)
    has_ro = "return_outputs" in inspect.signature(sched.step).parameters
    opt = make_opt(sub.parameters())
    ids, tgt = make_batch(run, vocab, dev, run["microbatch"] * nmb)
    tied_p = (sub.wte.weight if rank == 0 else sub.head_w) if tied else None
    import torch.distributed as dist

    def step():
        mark("zero_grad")
        opt.zero_grad(set_to_none=True)
        mark("fwd_other")
        kw = {"return_outputs": False} if has_ro else {}
        with torch.autocast(amp, dtype=torch.bfloat16):
            if rank == 0:
                sched.step(ids, **kw)
            else:
                losses = []
                sched.step(target=tgt, losses=losses, **kw)
        if tied_p is not None:
            mark("tied_grad_sync")
            dist.all_reduce(tied_p.grad)
        mark("optimizer")
        opt.step()
        mark("end")
        if rank == world - 1:
            return torch.stack(losses).mean().detach()
        return None

    return step, [sub, stage, sched, opt], nmb * run["microbatch"] * run["seq"]


# ---------------------------------------------------------------------------------------------
# profile classification


def _merge(iv):
    iv = sorted(iv)
    out = []
    for s, e in iv:
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return out


def _length(iv):
    return sum(e - s for s, e in iv)


def _intersect_len(a, b):
    i = j = 0
    tot = 0.0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][1], b[j][1])
        if e > s:
            tot += e - s
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tot


BUCKETS = ("embed_fwd", "blocks_fwd", "head_fwd", "head_bwd", "blocks_bwd", "embed_bwd",
           "optimizer", "zero_grad", "other")
MAIN_ONLY = {"zero_grad", "fwd_other", "bwd_launch", "optimizer", "end", "tied_grad_sync"}


def classify_trace(path: str, cpu_mode: bool) -> dict:
    """Breakdown of one profiled step from a chrome trace (see README.md for the definitions).

    GPU activities (kernels, memcpy, memset) are tied to the CPU call that launched them by the
    trace's correlation id; that call's CPU thread and time give the region: the last
    `truth::mark::` annotation on that thread at or before the launch. NCCL kernels (name
    contains "nccl") are communication, whatever region launched them.
    """
    with open(path) as f:
        evs = json.load(f)["traceEvents"]
    marks: dict = {}
    launches: dict = {}
    ops: dict = {}           # External id -> (tid, ts) of CPU ops: the fallback link of a kernel
    gpu = []
    for e in evs:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        name = e.get("name", "")
        if cat == "user_annotation" and name.startswith(MARK):
            marks.setdefault(e["tid"], []).append((float(e["ts"]), name[len(MARK):]))
        elif cat in ("cuda_runtime", "cuda_driver"):
            c = (e.get("args") or {}).get("correlation")
            if c is not None:
                launches[c] = (e["tid"], float(e["ts"]), float(e.get("dur", 0)))
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            args = e.get("args") or {}
            gpu.append((float(e["ts"]), float(e.get("dur", 0)), name,
                        args.get("correlation"), args.get("External id")))
        elif not cpu_mode and cat == "cpu_op":
            x = (e.get("args") or {}).get("External id")
            if x is not None:
                ops[x] = (e["tid"], float(e["ts"]))
        elif cpu_mode and cat == "cpu_op" and name.startswith("aten::"):
            # smoke mode: CPU ops stand in for kernels (nested ops double count; only a check)
            c = ("cpu", len(launches))
            launches[c] = (e["tid"], float(e["ts"]), 0.0)
            gpu.append((float(e["ts"]), float(e.get("dur", 0)), name, c, None))
    for v in marks.values():
        v.sort()
    allm = sorted(m for v in marks.values() for m in v)
    starts = [t for t, lab in allm if lab == "zero_grad"]
    ends = [t for t, lab in allm if lab == "end"]
    if not starts or not ends:
        return {"error": "no step markers in the trace"}
    t0, t_end_cpu = starts[-1], ends[-1]
    gpu = [g for g in gpu if g[0] + g[1] >= t0]
    # (launch events on a thread without marks fall back to the CPU op's External id)
    launches = {c: v for c, v in launches.items() if v[0] in marks}
    t1 = max([t_end_cpu] + [g[0] + g[1] for g in gpu])
    window = t1 - t0

    gpu_b = {b: 0.0 for b in BUCKETS}
    unattributed = 0.0
    comm_iv, comp_iv = [], []
    n_kernels = 0
    n_fallback = 0
    top: dict = {}
    for ts, dur, name, corr, ext in gpu:
        s, e = max(ts, t0), min(ts + dur, t1)
        if e <= s:
            continue
        n_kernels += 1
        if "nccl" in name.lower():
            comm_iv.append((s, e))
            continue
        comp_iv.append((s, e))
        lab = None
        for link in (launches.get(corr), ops.get(ext)):
            if link is None:
                continue
            seq = marks.get(link[0])
            if seq:
                i = bisect.bisect_right(seq, (link[1], "\uffff")) - 1
                lab = seq[i][1] if i >= 0 else None
                if link is not launches.get(corr):
                    n_fallback += 1
                break
        if lab is None:
            unattributed += e - s
            lab = "other"
        gpu_b[lab if lab in gpu_b else "other"] += e - s
        key = (lab, name[:80])
        top[key] = top.get(key, 0.0) + e - s
    comm_m, comp_m = _merge(comm_iv), _merge(comp_iv)
    comm_total = _length(comm_m)
    exposed = comm_total - _intersect_len(comm_m, comp_m)
    busy = _length(_merge(comm_iv + comp_iv))
    idle = window - busy

    # host time per region: from each marker to the next one on the same thread
    host_b: dict = {}
    for _tid, seq in marks.items():
        seq = [m for m in seq if m[0] >= t0]
        for (ts, lab), nxt in zip(seq, seq[1:] + [(None, None)]):
            if lab == "end":
                continue
            te = nxt[0] if nxt[0] is not None else ts
            host_b[lab] = host_b.get(lab, 0.0) + te - ts
    main_tid = next((tid for tid, seq in marks.items() if any(l == "zero_grad" for _, l in seq)), None)
    us = 1e-6
    bd = {k: v * us for k, v in gpu_b.items()}
    out = {
        "breakdown_s": {
            "blocks_fwd": bd["blocks_fwd"], "blocks_bwd": bd["blocks_bwd"],
            "head_loss_fwd": bd["head_fwd"], "head_loss_bwd": bd["head_bwd"],
            "embed_fwd": bd["embed_fwd"], "embed_bwd": bd["embed_bwd"],
            "optimizer": bd["optimizer"], "zero_grad": bd["zero_grad"], "other": bd["other"],
            "exposed_comm": exposed * us, "host": idle * us,     # replaced in assemble()
            "blocks": bd["blocks_fwd"] + bd["blocks_bwd"],
            "head_loss": bd["head_fwd"] + bd["head_bwd"],
            "embedding": bd["embed_fwd"] + bd["embed_bwd"],
        },
        "breakdown_host_s": {k: v * us for k, v in host_b.items()},
        "profiled_step_s": window * us,
        "gpu_idle_profiled_s": idle * us,
        "host_cpu_s": (t_end_cpu - t0) * us,
        "comm_total_s": comm_total * us,
        "gpu_busy_s": busy * us,
        "unattributed_s": unattributed * us,
        "n_gpu_activities": n_kernels,
        "n_linked_by_external_id": n_fallback,
        # the 3 longest kernel names (summed) of every raw region label: what a region's time is
        "top_kernels": {lab: [[n, round(t * us, 6)] for (l2, n), t in
                              sorted(top.items(), key=lambda kv: -kv[1]) if l2 == lab][:3]
                        for lab in sorted({k[0] for k in top})},
        "n_cpu_threads_with_marks": len(marks),
        "main_thread_seen": main_tid is not None,
    }
    return out


def profile_step(step, dev: Dev) -> dict:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.kind == "cuda" else [])
    dev.sync()
    with profile(activities=acts) as prof:
        step()
        dev.sync()
    fd, path = tempfile.mkstemp(suffix=".json", prefix="truth_trace_")
    os.close(fd)
    try:
        t = time.perf_counter()
        prof.export_chrome_trace(path)
        res = classify_trace(path, cpu_mode=dev.kind != "cuda")
        res["parse_s"] = time.perf_counter() - t
    finally:
        os.unlink(path)
    return res


# ---------------------------------------------------------------------------------------------
# one run


def measure(run: dict, dev: Dev, amp: str, world: int, rank: int) -> dict:
    strat = run["strategy"]
    start_mem = dev.mem()     # what the previous run left (free() waits for it to go)
    if run.get("memory_cap_bytes") and dev.kind == "cuda":
        # bench/truth/memory_cap.py: the caching allocator may reserve this much and no more;
        # past it, it frees its cached blocks and retries before it raises OutOfMemoryError
        total = torch.cuda.get_device_properties(dev.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, run["memory_cap_bytes"] / total), dev.device)
    if strat == "single":
        step, objs, toks = setup_single(run, dev, amp)
    elif strat == "ddp":
        step, objs, toks = setup_ddp(run, dev, amp, world)
    elif strat == "fsdp2":
        step, objs, toks = setup_fsdp2(run, dev, amp, world)
    elif strat == "tp":
        step, objs, toks = setup_tp(run, dev, amp, world)
    elif strat == "pp":
        step, objs, toks = setup_pp(run, dev, amp, world, rank)
    else:
        raise ValueError(strat)
    res: dict = {"tokens_per_step": toks, "allocated_bytes_at_start": start_mem.get("allocated_bytes_now", 0),
                 "reserved_bytes_at_start": start_mem.get("reserved_bytes_now", 0)}
    if dev.kind == "cuda":
        # The peaks are the training steps': the setup's (unsharded init copies) are kept apart.
        res["setup_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        res["setup_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        dev.reset_peaks()
    retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0) if dev.kind == "cuda" else 0
    t_build = time.perf_counter()
    loss = step()                         # warm-up 1: optimizer state, cuBLAS plans, NCCL comms
    dev.sync()
    res["first_step_s"] = time.perf_counter() - t_build
    res["loss_first"] = float(loss.detach()) if loss is not None else None
    host = []
    for i in range(2):                    # warm-ups 2, 3: host enqueue on an idle GPU
        dev.sync()
        t = time.perf_counter()
        loss = step()
        host.append(time.perf_counter() - t)
        dev.sync()
        if i == 0:                        # the loss after one AdamW update: a cross-strategy check
            res["loss_second"] = float(loss.detach()) if loss is not None else None
    est = max(statistics.median(host), res["first_step_s"] / 3)
    n = [C.n_timed(est)]
    if world > 1:                         # every rank must run the same number of steps
        import torch.distributed as dist
        dist.broadcast_object_list(n, src=0)
    n = n[0]
    timers = [dev.timer() for _ in range(n)]
    dev.sync()
    w0 = time.perf_counter()
    for start, end, _ in timers:
        start()
        loss = step()
        end()
    dev.sync()
    wall = (time.perf_counter() - w0) / n
    times = [el() for _, _, el in timers]
    res.update(step_s=statistics.median(times), step_s_all=times, step_wall_s=wall, n_timed=n,
               host_enqueue_s=statistics.median(host), host_enqueue_all=host,
               loss_last=float(loss.detach()) if loss is not None else None)
    res.update(dev.mem())
    res["alloc_retries"] = res.get("alloc_retries", 0) - retries0     # this run's, not the process's
    try:
        res["profile"] = profile_step(step, dev)
    except Exception as e:  # noqa: BLE001
        res["profile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    del objs, step
    return res


def free(dev: Dev):
    gc.collect()
    if dev.kind == "cuda":
        torch.cuda.synchronize()
        # NCCL's watchdog thread releases the tensors its finished collectives hold a moment
        # later; resetting the peaks before that let a run's peaks include the previous run's
        # memory (fsdp2-gpt-1.3b-s1024-mb1 of the 2026-11-30 corpus).
        deadline = time.time() + 5.0
        while torch.cuda.memory_allocated() > 256 * 2**20 and time.time() < deadline:
            time.sleep(0.1)
            gc.collect()
        # The cuBLAS workspaces (2 x 32 MiB, through the caching allocator) outlive a run; a
        # segment holding one cannot be released, and the next run then lays its memory out
        # around it (fsdp2-gpt-1.3b-s1024-mb1 of call 3 started with 19.7 GiB reserved at 65 MiB
        # allocated). Free them, so every run starts from an empty cache.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
        if torch.cuda.memory_reserved() > 2**30:
            print(f"truth: {torch.cuda.memory_reserved() / 2**30:.1f} GiB still reserved after a run; the next "
                  f"row's reserved_bytes_at_start says so and bench/truth/predict.py leaves its reserved peak "
                  f"uncompared", file=sys.stderr, flush=True)
        torch.cuda.reset_peak_memory_stats()


def meta_info(dev: Dev) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
            "datetime_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if dev.kind == "cuda":
        p = torch.cuda.get_device_properties(dev.device)
        info.update(gpu=torch.cuda.get_device_name(dev.device), gpu_memory_bytes=p.total_memory,
                    sm_count=p.multi_processor_count,
                    nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
    else:
        info.update(gpu=None, device="cpu")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", required=True, help="JSON list of runs (configs.py); each may carry 'deadline' (unix time)")
    ap.add_argument("--out", required=True, help="JSON lines, appended (rank 0)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = Dev(a.device, local)
    amp = "cuda" if a.device == "cuda" else "cpu"
    pid_dir = os.environ.get("TRUTH_PID_DIR")
    if pid_dir:                           # the driver kills these by id if the worker hangs
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"pid_{os.getpid()}").write_text(str(os.getpid()))
    dist = None
    if world > 1:
        import datetime

        import torch.distributed as dist
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=150),
                                **({"device_id": dev.device} if a.device == "cuda" else {}))
    runs = json.loads(Path(a.configs).read_text())
    # appended to by emit() for the whole run, row by row, so a killed run keeps its rows
    out = open(a.out, "a") if rank == 0 else None  # noqa: SIM115

    def emit(obj):
        if out is not None:
            out.write(json.dumps(obj) + "\n")
            out.flush()

    emit({"event": "meta", **meta_info(dev), "world": world})
    if a.device == "cuda":    # CUPTI's first start is slow: keep it out of the first run
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            torch.ones(8, device=dev.device).sum().item()

    for run in runs:
        if run["n_gpus"] != world:
            continue
        t_start = time.time()
        est = C.est_run_s(run)
        go = [run.get("deadline") is None or t_start + est < run["deadline"]]
        if dist is not None:
            dist.broadcast_object_list(go, src=0)
        row = {k: run[k] for k in ("id", "model", "model_spec", "family", "n_gpus", "strategy",
                                   "microbatch", "seq", "n_microbatches", "recompute")}
        if run.get("memory_cap_bytes"):
            row["memory_cap_bytes"] = run["memory_cap_bytes"]
        row["params"] = C.params(run["model"])
        if not go[0]:
            row.update(skipped=True, oom=False, reason=f"time budget: needs ~{est:.0f}s")
            emit(row)
            continue
        emit({"event": "start", "id": run["id"], "t": t_start})
        print(f"[rank{rank}] {run['id']} ...", flush=True)
        res, err, oom = None, None, False
        if os.environ.get("TRUTH_CRASH_ID") == run["id"]:     # tests of the driver's recovery
            os._exit(3)
        if os.environ.get("TRUTH_HANG_ID") == run["id"] and rank == world - 1:
            time.sleep(1e6)
        try:
            res = measure(run, dev, amp, world, rank)
        except torch.cuda.OutOfMemoryError as e:
            oom = True
            err = f"OutOfMemoryError: {str(e).splitlines()[0][:300]}"
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
            if "out of memory" in str(e).lower():
                oom = True
        finally:
            mem_at_fail = dev.mem() if res is None else None
            res_local = res
            res = None
            free(dev)
            if run.get("memory_cap_bytes") and dev.kind == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, dev.device)
        mine = {"rank": rank, "res": res_local, "err": err, "oom": oom, "mem_at_fail": mem_at_fail}
        allr = [mine]
        if dist is not None:
            allr = [None] * world
            dist.all_gather_object(allr, mine)
        row.update(assemble(run, allr, time.time() - t_start))
        emit(row)
        print(f"[rank{rank}] {run['id']}: step {row.get('step_s')} oom {row['oom']} err {row.get('error')}",
              flush=True)
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def assemble(run: dict, allr: list, wall: float) -> dict:
    row: dict = {"wall_s": wall}
    errs = [r["err"] for r in allr if r["err"]]
    row["oom"] = any(r["oom"] for r in allr)
    if errs:
        row["error"] = errs[0]
        row["errors_per_rank"] = [r["err"] for r in allr]
        fail = [r["mem_at_fail"] for r in allr if r.get("mem_at_fail")]
        if fail:
            row["peak_allocated_bytes"] = max(m["peak_allocated_bytes"] for m in fail)
            row["peak_reserved_bytes"] = max(m["peak_reserved_bytes"] for m in fail)
            row["mem_at_failure_per_rank"] = fail
        return row
    res = [r["res"] for r in allr]
    r0 = res[0]
    step = max(r["step_s"] for r in res)
    toks = r0["tokens_per_step"]
    p = C.params(run["model"])
    _, shp = C.MODELS[run["model"]]
    flops = 6 * p * toks + 6 * shp["l"] * shp["h"] * run["seq"] * toks
    row.update(
        step_s=step, tokens_per_s=toks / step, tokens_per_step=toks,
        model_tflops_per_gpu=flops / step / run["n_gpus"] / 1e12,
        step_s_per_rank=[r["step_s"] for r in res], step_s_all=r0["step_s_all"],
        step_wall_s=max(r["step_wall_s"] for r in res), n_timed=r0["n_timed"],
        host_enqueue_s=max(r["host_enqueue_s"] for r in res),
        host_enqueue_s_per_rank=[r["host_enqueue_s"] for r in res],
        first_step_s=r0["first_step_s"],
        loss_first=next((r["loss_first"] for r in res if r["loss_first"] is not None), None),
        loss_second=next((r["loss_second"] for r in res if r["loss_second"] is not None), None),
        loss_last=next((r["loss_last"] for r in res if r["loss_last"] is not None), None),
        peak_allocated_bytes=max(r["peak_allocated_bytes"] for r in res),
        peak_reserved_bytes=max(r["peak_reserved_bytes"] for r in res),
        peak_allocated_bytes_per_rank=[r["peak_allocated_bytes"] for r in res],
        peak_reserved_bytes_per_rank=[r["peak_reserved_bytes"] for r in res],
    )
    for k in ("device_used_bytes_now", "alloc_retries", "allocated_bytes_at_start", "reserved_bytes_at_start",
              "setup_peak_allocated_bytes", "setup_peak_reserved_bytes", "peak_inactive_split_bytes", "allocated_bytes_now",
              "reserved_bytes_now", "device_total_bytes"):
        if k in r0:
            row[k + "_per_rank"] = [r.get(k) for r in res]
    prof = [r.get("profile") or {} for r in res]
    # rank 0 for the symmetric strategies; for pp the last stage (it holds the head and loss)
    pr = len(prof) - 1 if run["strategy"] == "pp" else 0
    row["breakdown_rank"] = pr
    for r, p in zip(res, prof):
        if "breakdown_s" in p:
            # host: the time the GPU waits for the CPU in an unprofiled step = that rank's step
            # time minus the GPU's busy time in the profiled step (kernel times barely move under
            # the profiler; the CPU side slows down, so the profiled idle time overstates it)
            p["breakdown_s"]["host"] = max(0.0, r["step_s"] - p["gpu_busy_s"])
    if "breakdown_s" in prof[pr]:
        row["breakdown_s"] = prof[pr]["breakdown_s"]
        row["breakdown_host_s"] = prof[pr]["breakdown_host_s"]
        for k in ("profiled_step_s", "gpu_idle_profiled_s", "host_cpu_s", "comm_total_s", "gpu_busy_s",
                  "unattributed_s", "n_gpu_activities", "n_linked_by_external_id", "parse_s"):
            row[k] = prof[pr].get(k)
    else:
        row["profile_error"] = prof[pr].get("error")
    if len(prof) > 1:
        row["profile_per_rank"] = prof
    return row


if __name__ == "__main__":
    sys.exit(main())
