"""The host's dispatch time of eager training, measured where the GPU never bounds it (issue 13).

An eager step whose kernels are short waits on the CPU, which launches every op from Python.
This measures that CPU time directly, with the zoo's own modules at a tiny width (hidden 64,
a few tokens) so each kernel takes a few microseconds and the host is always the slower side:

- whole models (`graphs.zoo.build_module`), the bench/truth recipe: fp32 master weights,
  autocast bf16, the zoo's cross-entropy, fused AdamW, zero_grad(set_to_none=True). Their
  depth varies (1, 2, 4, 8 blocks), so the slope is the host seconds per block and the
  intercept the embedding, head, loss and optimizer; forward, backward and optimizer apart;
- each op kind the traced graph names (linear, layer_norm, rms_norm, gelu, silu, add, mul,
  neg, cat, view, transpose, reshape, getitem, sdpa), called as the zoo calls it, forward.

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


def model_step(spec: str, dev: torch.device, repeats: int) -> dict:
    """Host seconds of forward, backward and optimizer step of one microbatch (least of repeats)."""
    model = build_module(spec, device=dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    ids, targets = example_inputs(spec, batch=1, device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
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
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("host_ops: no CUDA device here; use --device cpu for a smoke run")
    dev = torch.device(args.device)
    res: dict = {"date": _dt.date.today().isoformat(), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "cpu": platform.processor() or platform.machine(), "width": WIDTH, "seq": SEQ,
                 "models": {}, "per_block": {}, "ops_forward_s": {}}
    for name, template in MODELS.items():
        rows = {L: model_step(template.format(L=L), dev, args.repeats) for L in DEPTHS}
        res["models"][name] = {str(L): r for L, r in rows.items()}
        fit = {}
        for part in ("forward_s", "backward_s", "optimizer_s"):
            slope, icpt = _fit_line(list(DEPTHS), [rows[L][part] for L in DEPTHS])
            fit[part] = {"per_block_s": slope, "rest_s": icpt}
        res["per_block"][name] = fit
        print(f"{name:10s} per block: fwd {fit['forward_s']['per_block_s'] * 1e6:7.1f} us  "
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
