"""FSDP2's ZeRO-1 gradient accumulation on one GPU: what the caching allocator reserves when
FSDP2 allocates the fp32 accumulated gradients itself (tensor by tensor, in the first
microbatch's backward, as `autopar run` leaves it), against allocating them all before that
backward (`preallocate_accumulated_grads` here), and what each costs in step time. The question
it answers: do the accumulated gradients fragment the compute stream's pool beyond the cost
model's reserve fraction (costmodel/eager.py RESERVE_FRACTION)? Its answer
(bench/results/fsdp_accumulation_h200_2026-12-01.jsonl): no. The compute stream's pool
reserves 1.03-1.12x its peak allocated either way, and the rest of the reserved memory is
FSDP2's gradient pool (eager.zero3_grad_pool_bytes), the sharded fp32 gradients, reserved by the
reduce-scatter stream all step.

    python bench/truth/fsdp_accumulation.py                              # both ways, defaults
    python bench/truth/fsdp_accumulation.py --model gpt-6.7b:layers=16 --microbatches 4 --rows 2

Each way runs in a fresh process (the allocator's history must not carry over) on a one-rank
mesh, with the runtime's own pieces: apply_fsdp (one unit per block and the root,
reshard_after_forward=False, MixedPrecisionPolicy(bf16, fp32 reduce)), fused Adam
(make_optimizer), and the microbatch loop's ZeRO-1 switches (gradient sync and resharding off
until the last microbatch). One rank shards nothing, but the accumulated gradients, their
allocation order and the activations are those of a rank of a larger mesh. Prints one JSON row
per way: median step time, peak allocated and reserved after the warm-up steps, and
reserved / allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WAYS = ("fsdp2", "preallocated")


def preallocate_accumulated_grads(units) -> None:
    """The fp32 gradients FSDP2 accumulates over ZeRO-1's microbatches, allocated all at once
    (zeros: FSDP2 then adds the first microbatch's gradient into them where it would have cast
    it, FSDPParam.accumulate_unsharded_grad_if_needed), after the first microbatch's forward,
    when its unsharded parameters exist. Reads FSDP2's private parameter objects: an
    experiment, not the runtime's way."""
    for unit in units:
        for fp in unit._get_fsdp_state()._fsdp_param_group.fsdp_params:
            param = fp._unsharded_param
            if fp.reduce_dtype not in (None, param.dtype) and fp.unsharded_accumulated_grad is None:
                fp.unsharded_accumulated_grad = torch.zeros_like(param, dtype=fp.reduce_dtype)


def one_way(args) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from autopar.runtime.engines import apply_fsdp, make_optimizer
    from graphs.zoo import build_module
    from graphs.zoo.config import parse_spec

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1)
    mesh = init_device_mesh("cuda", (1,))
    cfg = parse_spec(args.model)
    torch.manual_seed(0)
    model = build_module(cfg, device=device)
    apply_fsdp(model, list(model.blocks), mesh, zero=1, param_dtype=torch.bfloat16)
    units = [m for m in model.modules() if hasattr(m, "_get_fsdp_state")]
    opt = make_optimizer(list(model.parameters()), "adam", 1e-4, device)
    B, rows, seq = args.microbatches, args.rows, cfg.seq
    ids = torch.randint(0, cfg.vocab, (B * rows, seq), device=device)
    targets = torch.randint(0, cfg.vocab, (B * rows, seq), device=device)

    def step() -> None:
        for i in range(B):
            last = i == B - 1
            model.set_requires_gradient_sync(last)
            model.set_reshard_after_backward(last)
            loss = model(ids[i * rows:(i + 1) * rows], targets[i * rows:(i + 1) * rows])
            if args.way == "preallocated" and i == 0 and B > 1:
                preallocate_accumulated_grads(units)
            (loss / B).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    dist.destroy_process_group()
    return {"way": args.way, "model": args.model, "microbatches": B, "rows": rows, "seq": seq,
            "params": sum(p.numel() for p in model.parameters()),
            "step_s": statistics.median(times), "step_s_all": times,
            "peak_allocated_gib": alloc / 2**30, "peak_reserved_gib": reserved / 2**30,
            "reserved_over_allocated": reserved / alloc,
            # less FSDP2's gradient pool (the sharded fp32 gradients, 4 B per parameter, reserved
            # on the reduce-scatter stream): the compute stream's pool against its peak
            "compute_pool_reserved_over_allocated": (reserved - 4 * sum(p.numel() for p in model.parameters())) / alloc,
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-6.7b:layers=16", help="zoo name or spec (default: %(default)s)")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--rows", type=int, default=2, help="sequences per microbatch")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--way", choices=WAYS, help="run one way in this process (the driver spawns these)")
    ap.add_argument("--order", default=",".join(WAYS), help="ways to run, comma-separated, each in its own process")
    ap.add_argument("--port", type=int, default=29531)
    ap.add_argument("--out", help="append the JSON rows to this file")
    args = ap.parse_args()
    if args.way:
        print("ROW " + json.dumps(one_way(args)), flush=True)
        return 0
    rows = []
    for way in args.order.split(","):
        if way not in WAYS:
            sys.exit(f"--order: unknown way {way!r}; the ways are {', '.join(WAYS)}")
        cmd = [sys.executable, __file__, "--way", way, "--model", args.model, "--microbatches", str(args.microbatches),
               "--rows", str(args.rows), "--warmup", str(args.warmup), "--steps", str(args.steps), "--port", str(args.port)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
        line = next((x for x in res.stdout.splitlines() if x.startswith("ROW ")), None)
        if line is None:
            print(f"{way}: failed\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(line[4:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
