"""The host's dispatch time of eager training, measured where the GPU never bounds it (issue 13).

An eager step whose kernels are short waits on the CPU, which launches every op from Python.
This measures that CPU time directly, with the zoo's own modules at a tiny width (hidden 64,
a few tokens) so each kernel takes a few microseconds and the host is always the slower side:

- whole models (`graphs.zoo.build_module`), the bench/truth recipe: fp32 master weights,
  autocast bf16, the zoo's cross-entropy, fused AdamW, zero_grad(set_to_none=True). Their
  depth varies (1, 2, 4, 8 blocks), so the slope is the host seconds per block and the
  intercept the embedding, head, loss and optimizer; forward, backward and optimizer apart;
- each op kind the traced graph names (linear, layer_norm, rms_norm, gelu, silu, add, mul,
  neg, cat, view, transpose, reshape, getitem, sdpa), called as the zoo calls it, forward;
- with `--recipes`, the same depth sweep under each engine recipe `autopar run` uses, on a
  one-rank process group (the host's work per block does not depend on the ranks' count):
  `autocast` (fp32 weights, autocast bf16: single GPU and DDP stages), `bf16` (bf16 weights,
  no autocast: what FSDP2's MixedPrecisionPolicy computes with), `ddp` (DistributedDataParallel
  over `autocast`), `fsdp2-zero3` (fully_shard per block and root, reshard after forward, bf16
  param / fp32 reduce policy), `fsdp2-zero1` (the same without resharding, and the gradients'
  sync off as in an accumulating microbatch) and `fsdp2-zero1-sync` (its last microbatch). The
  differences of their slopes are the engines' own host seconds per block.

    python bench/host_ops.py --out bench/results/host_ops_h200.json

Times are the least over repeats of the host wall clock around the calls (noise on a shared
host only adds), without a device sync inside (a sync after each measured region, outside the
timer, drains the queue first).
"""

from __future__ import annotations

import os

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from graphs.zoo import build_module, example_inputs  # noqa: E402

WIDTH = 64          # hidden; heads 4 of 16
SEQ = 16
DEPTHS = (2, 4, 8, 16)
MODELS = {
    "gpt": f"gpt:hidden={WIDTH},layers={{L}},heads=4,seq={SEQ},vocab=128",
    "llama-gqa": f"llama:hidden={WIDTH},layers={{L}},heads=4,kv_heads=2,seq={SEQ},vocab=128",
    "llama-mha": f"llama:hidden={WIDTH},layers={{L}},heads=4,kv_heads=4,seq={SEQ},vocab=128",
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _least_s(fn: Callable[[], None], dev: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    _sync(dev)
    return min(times)


RECIPES = ("autocast", "bf16", "ddp", "fsdp2-zero3", "fsdp2-zero1", "fsdp2-zero1-sync")


def _one_rank_mesh(dev: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1)
    return init_device_mesh(dev.type, (1,))


def _wrap(model: torch.nn.Module, recipe: str, dev: torch.device) -> torch.nn.Module:
    """`model` as `autopar run`'s engines run it under `recipe` (runtime/engines.py apply_fsdp)."""
    if recipe == "bf16":
        return model.to(torch.bfloat16)
    if recipe == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        _one_rank_mesh(dev)
        return DistributedDataParallel(model, device_ids=[dev.index or 0] if dev.type == "cuda" else None)
    if recipe.startswith("fsdp2"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = _one_rank_mesh(dev)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        zero3 = recipe == "fsdp2-zero3"
        blocks = list(model.blocks)
        for i, block in enumerate(blocks):
            fully_shard(block, mesh=mesh, reshard_after_forward=zero3 and i < len(blocks) - 1, mp_policy=mp)
        fully_shard(model, mesh=mesh, reshard_after_forward=zero3, mp_policy=mp)
        if recipe == "fsdp2-zero1":
            model.set_requires_gradient_sync(False)
    return model


def model_step(spec: str, dev: torch.device, repeats: int, recipe: str = "autocast") -> dict:
    """Host seconds of forward, backward and optimizer step of one microbatch (least of repeats)."""
    model = _wrap(build_module(spec, device=dev), recipe, dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    ids, targets = example_inputs(spec, batch=1, device=dev)
    autocast = recipe in ("autocast", "ddp")
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast)
    state: dict = {}

    def fwd() -> None:
        with amp:
            state["loss"] = model(ids, targets)

    def bwd() -> None:
        state["loss"].backward()

    def step() -> None:
        opt.step()

    def zero() -> None:
        opt.zero_grad(set_to_none=True)

    for _ in range(5):          # warm-up: caches, the allocator, fused kernels' first calls
        zero(); fwd(); bwd(); step()
    f, b, s = [], [], []
    for _ in range(repeats):
        zero()
        _sync(dev)
        t0 = time.perf_counter(); fwd(); f.append(time.perf_counter() - t0)
        _sync(dev)
        t0 = time.perf_counter(); bwd(); b.append(time.perf_counter() - t0)
        _sync(dev)
        t0 = time.perf_counter(); step(); s.append(time.perf_counter() - t0)
        _sync(dev)
    return {"forward_s": min(f), "backward_s": min(b), "optimizer_s": min(s)}


def _fit_line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def op_forward(dev: torch.device, repeats: int, calls: int) -> dict[str, float]:
    """Host seconds per forward call of each op kind, as the zoo calls it under autocast."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev, dtype).requires_grad_()

    x = t(1, SEQ, WIDTH)                       # the fp32 residual stream
    xb = t(1, SEQ, WIDTH, dtype=torch.bfloat16)
    w, bias = t(WIDTH, WIDTH), t(WIDTH)
    nw = t(WIDTH)
    q = t(1, 4, SEQ, WIDTH // 4, dtype=torch.bfloat16)
    kv = t(1, 2, SEQ, WIDTH // 4, dtype=torch.bfloat16)
    ops: dict[str, Callable[[], object]] = {
        "linear (bias)": lambda: F.linear(x, w, bias),
        "linear": lambda: F.linear(x, w),
        "layer_norm": lambda: F.layer_norm(x, (WIDTH,), nw, bias),
        "rms_norm": lambda: F.rms_norm(x, (WIDTH,), nw),
        "gelu": lambda: F.gelu(xb),
        "silu": lambda: F.silu(xb),
        "add": lambda: x + xb,
        "mul": lambda: xb * xb,
        "neg": lambda: -xb,
        "cat": lambda: torch.cat([xb, xb], dim=-1),
        "view": lambda: xb.view(1, SEQ, 4, WIDTH // 4),
        "transpose": lambda: xb.transpose(1, 2),
        "reshape": lambda: xb.reshape(SEQ, WIDTH),
        "getitem": lambda: xb[..., WIDTH // 2:],
        "sdpa": lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True),
        "sdpa (gqa)": lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True),
    }
    out = {}
    for name, fn in ops.items():
        def run(fn: Callable[[], object] = fn) -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                for _ in range(calls):
                    fn()
        run()
        out[name] = _least_s(run, dev, repeats) / calls
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="", help="write the results here as JSON")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200, help="calls per timed op loop")
    ap.add_argument("--recipes", default="", help=f"comma-separated engine recipes to sweep too ({', '.join(RECIPES)}), "
                    "or 'all'; each model's sweep then runs per recipe")
    ap.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="block counts of the sweep")
    args = ap.parse_args()
    recipes = list(RECIPES) if args.recipes == "all" else [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"host_ops: unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)} or 'all'")
    try:
        depths = tuple(int(x) for x in args.depths.split(","))
    except ValueError:
        sys.exit(f"host_ops: --depths takes comma-separated block counts, not {args.depths!r}")
    if len(depths) < 2 or min(depths) < 1:
        sys.exit("host_ops: --depths needs at least two block counts, each 1 or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("host_ops: no CUDA device here; use --device cpu for a smoke run")
    dev = torch.device(args.device)
    res: dict = {"date": _dt.date.today().isoformat(), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "cpu": platform.processor() or platform.machine(), "width": WIDTH, "seq": SEQ,
                 "depths": list(depths), "models": {}, "per_block": {}, "ops_forward_s": {}}
    sweeps = [(name, template, "autocast") for name, template in MODELS.items()] + \
        [(f"{name} {recipe}", template, recipe) for recipe in recipes if recipe != "autocast"
         for name, template in MODELS.items() if name != "llama-mha"]
    for name, template, recipe in sweeps:
        rows = {L: model_step(template.format(L=L), dev, args.repeats, recipe) for L in depths}
        res["models"][name] = {str(L): r for L, r in rows.items()}
        fit = {}
        for part in ("forward_s", "backward_s", "optimizer_s"):
            slope, icpt = _fit_line(list(depths), [rows[L][part] for L in depths])
            fit[part] = {"per_block_s": slope, "rest_s": icpt}
        res["per_block"][name] = fit
        print(f"{name:24s} per block: fwd {fit['forward_s']['per_block_s'] * 1e6:7.1f} us  "
              f"bwd {fit['backward_s']['per_block_s'] * 1e6:7.1f} us  opt {fit['optimizer_s']['per_block_s'] * 1e6:6.1f} us;"
              f"  rest: fwd {fit['forward_s']['rest_s'] * 1e6:7.1f} bwd {fit['backward_s']['rest_s'] * 1e6:7.1f} "
              f"opt {fit['optimizer_s']['rest_s'] * 1e6:7.1f} us", flush=True)
    res["ops_forward_s"] = op_forward(dev, args.repeats, args.calls)
    for k, v in res["ops_forward_s"].items():
        print(f"  {k:14s} {v * 1e6:7.2f} us forward", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
