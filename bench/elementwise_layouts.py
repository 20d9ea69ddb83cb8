"""Achieved bandwidth of the eager recipe's elementwise kernels by layout and dtype (issue 13).

    python bench/elementwise_layouts.py --out bench/results/elementwise_layouts_<gpu>_<date>.json

The GPU profile's memory-bound rows time contiguous bf16 kernels (autopar/profiling/gpu.py). An
eager training step under autocast runs many of its elementwise ops otherwise: rotary's multiply
of a transposed q view by fp32 tables (promoted to fp32), casts of the fp32 residual stream,
layout copies of transposed views, the bias gradients' sums over the tokens, norm backwards in
fp32 (bench/truth/op_categories.py, the eleventh pass in bench/truth/README.md). Each case here
is one such kernel at the shapes of the truth corpus's models; bytes are those read plus those
written (each operand once, broadcast tables once), time from CUDA events, median of 20 calls
after 5 warm-up calls. Prints a table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path


def _cases(torch, dev):
    """(name, fn, bytes moved) per case: fn runs the kernel once."""
    F = torch.nn.functional
    bf16, fp32 = torch.bfloat16, torch.float32
    out = []

    def t(shape, dtype, grad=False):
        return torch.randn(shape, device=dev, dtype=dtype, requires_grad=grad)

    for b, h, s, d in ((4, 16, 2048, 128), (8, 32, 1024, 64)):
        n = b * h * s * d
        q_c = t((b, h, s, d), bf16)                          # contiguous
        q_t = t((b, s, h, d), bf16).transpose(1, 2)          # the model's q: a transposed view
        cos32, cos16 = t((s, d), fp32), t((s, d), bf16)
        tag = f"[{b},{h},{s},{d}]"
        out += [
            (f"mul bf16 x fp32 table, contiguous {tag}", lambda q=q_c, c=cos32: q * c, n * (2 + 4) + s * d * 4),
            (f"mul bf16 x fp32 table, transposed view {tag}", lambda q=q_t, c=cos32: q * c, n * (2 + 4) + s * d * 4),
            (f"mul bf16 x bf16 table, transposed view {tag}", lambda q=q_t, c=cos16: q * c, n * (2 + 2) + s * d * 2),
            (f"mul bf16 x bf16 table, contiguous {tag}", lambda q=q_c, c=cos16: q * c, n * (2 + 2) + s * d * 2),
            (f"contiguous() of a transposed bf16 view {tag}", lambda q=q_t: q.contiguous(), n * 4),
        ]
        x32, y32 = t((b, h, s, d), fp32), t((b, h, s, d), fp32)
        out.append((f"cast fp32 -> bf16, contiguous {tag}", lambda x=x32: x.to(bf16), n * 6))
        out += [
            (f"add fp32 + fp32 {tag}", lambda x=x32, y=y32: x + y, n * 12),
            (f"add_ fp32 += fp32 {tag}", lambda x=x32, y=y32: x.add_(y), n * 12),
            (f"cat of two bf16 halves (rotate_half) {tag}",
             lambda q=q_t, hd=d // 2: torch.cat((-q[..., hd:], q[..., :hd]), dim=-1), n * 4 + n * 2),
        ]
    for tokens, hidden in ((8192, 2048), (8192, 8192), (8192, 5632)):
        n = tokens * hidden
        tag = f"[{tokens},{hidden}]"
        g16, x32, x16 = t((tokens, hidden), bf16), t((tokens, hidden), fp32), t((tokens, hidden), bf16)
        y32, y16 = t((tokens, hidden), fp32), t((tokens, hidden), bf16)
        out += [
            (f"sum over tokens (bias gradient), bf16 {tag}", lambda g=g16: g.sum(0), n * 2 + hidden * 2),
            (f"cast fp32 -> bf16 {tag}", lambda x=x32: x.to(bf16), n * 6),
            (f"cast bf16 -> fp32 {tag}", lambda x=x16: x.to(fp32), n * 6),
            (f"add_ fp32 += fp32 {tag}", lambda x=x32, y=y32: x.add_(y), n * 12),
            (f"mul bf16 x bf16 {tag}", lambda x=x16, y=y16: x * y, n * 6),
        ]
        if hidden != 5632:
            w, bias = t((hidden,), fp32, True), t((hidden,), fp32, True)
            xin = t((tokens, hidden), fp32, True)
            y = F.layer_norm(xin, (hidden,), w, bias)
            gy = torch.randn_like(y)
            out += [
                (f"layer_norm fp32 forward {tag}", lambda x=xin, w=w, b=bias: F.layer_norm(x.detach(), (x.shape[-1],), w.detach(), b.detach()), n * 8),
                (f"layer_norm fp32 backward {tag}",
                 lambda x=xin, w=w, b=bias, gy=gy: torch.autograd.grad(F.layer_norm(x, (x.shape[-1],), w, b), (x, w, b), gy),
                 n * (8 + 12)),     # the forward again (in the timing) + the backward: read x, gy, write gx
                (f"rms_norm fp32 backward {tag}",
                 lambda x=xin, w=w, gy=gy: torch.autograd.grad(F.rms_norm(x, (x.shape[-1],), w), (x, w), gy),
                 n * (8 + 12)),
            ]
        if hidden != 2048:
            a = t((tokens, hidden), bf16)
            ga = torch.randn_like(a)
            out += [
                (f"gelu bf16 forward {tag}", lambda a=a: F.gelu(a), n * 4),
                (f"silu bf16 forward {tag}", lambda a=a: F.silu(a), n * 4),
                (f"gelu backward bf16 {tag}", lambda a=a, g=ga: torch.ops.aten.gelu_backward(g, a), n * 6),
            ]
    return out


def _time(torch, fn, reps: int = 20, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("elementwise_layouts.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0)
    rows = []
    for name, fn, nbytes in _cases(torch, dev):
        s = _time(torch, fn)
        rows.append({"case": name, "time_s": s, "bytes": nbytes, "gbps": nbytes / s / 1e9})
        print(f"{s * 1e6:9.1f} us {nbytes / s / 1e9:8.0f} GB/s  {name}", flush=True)
    doc = {"what": __doc__.splitlines()[0], "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
