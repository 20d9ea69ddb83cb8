"""Time real transformer work on a GPU, to check the cost model against.

Two benchmarks, both self-contained (no autopar imports, so that it runs on a bare GPU
machine with only PyTorch):

1. One GPT transformer layer (pre-LN: LayerNorm, Q/K/V Linear h->h with bias, causal SDPA,
   out proj, residual, LayerNorm, MLP h->4h GELU(tanh) ->h, residual), bf16 weights and
   activations (no autocast), forward (with autograd recording, as in training) and
   forward+backward (input requires grad, so dX is computed too), over a spread of
   (hidden, heads, seq, batch). Written to ``<out-dir>/gpu_layer_<tag>.json``::

       {"gpu": ..., "rows": [{"hidden", "heads", "seq", "batch", "dtype": "bf16",
                              "fwd_s", "fwd_bwd_s"}], "meta": {...}}

2. A full training step (forward, backward, AdamW step) of a GPT with h=2048, L=24,
   heads=32, vocab 51200, seq 1024 (about 1.3 B parameters, tied embedding), in mixed
   precision: fp32 master parameters, gradients and AdamW state (torch.optim.AdamW,
   fused=True), forward/backward under ``torch.autocast(dtype=bfloat16)``; batch sizes
   1, 2, 4, 8, 16 (where it fits). Written to ``<out-dir>/gpt_step_<tag>.json`` with the
   step time and ``torch.cuda.max_memory_allocated``.

Times: CUDA events around each repeat, eager PyTorch (Python dispatch included, as in a
real training loop), warm-up first, median of the repeats.

Usage: python bench/gpu_layer.py --out-dir bench/results --tag h100 [--quick]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden, **kw)
        self.q = nn.Linear(hidden, hidden, **kw)
        self.k = nn.Linear(hidden, hidden, **kw)
        self.v = nn.Linear(hidden, hidden, **kw)
        self.proj = nn.Linear(hidden, hidden, **kw)
        self.ln2 = nn.LayerNorm(hidden, **kw)
        self.fc1 = nn.Linear(hidden, 4 * hidden, **kw)
        self.fc2 = nn.Linear(4 * hidden, hidden, **kw)

    def forward(self, x):
        b, s, h = x.shape
        nh = self.heads
        y = self.ln1(x)
        q = self.q(y).view(b, s, nh, h // nh).transpose(1, 2)
        k = self.k(y).view(b, s, nh, h // nh).transpose(1, 2)
        v = self.v(y).view(b, s, nh, h // nh).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(a)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))
        return x


class GPT(nn.Module):
    def __init__(self, vocab, hidden, layers, heads, seq, device=None):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden, device=device)
        self.wpe = nn.Embedding(seq, hidden, device=device)
        self.layers = nn.ModuleList(Layer(hidden, heads, device=device) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden, device=device)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        b, s = idx.shape
        pos = torch.arange(s, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for layer in self.layers:
            x = layer(x)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight)  # tied LM head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _time(fn, warmup: int, repeats: int, before=None) -> float:
    for _ in range(warmup):
        if before:
            before()
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        if before:
            before()
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return statistics.median(ts)


LAYER_CONFIGS = (
    [(4096, 32, 2048, 4)]
    + [(2048, nh, s, b) for nh in (16, 32) for s in (1024, 2048) for b in (1, 4, 8)]
    + [(768, 12, 1024, 8), (1024, 16, 1024, 8), (1024, 16, 2048, 16), (2560, 32, 2048, 4),
       (4096, 32, 1024, 8), (4096, 32, 2048, 1), (4096, 32, 2048, 2), (4096, 32, 4096, 1),
       (5120, 40, 2048, 2), (6144, 48, 2048, 2), (8192, 64, 2048, 1), (12288, 96, 2048, 1)]
)


def layer_flops(h, s, b):
    """Forward FLOPs of one layer: 24 b s h^2 (matmuls) + 4 b s^2 h (attention, no causal
    halving). Backward is twice that."""
    return 24 * b * s * h * h + 4 * b * s * s * h


def bench_layers(configs, repeats=10, log=print):
    dev = torch.device("cuda")
    rows = []
    for (h, nh, s, b) in configs:
        torch.manual_seed(0)
        try:
            layer = Layer(h, nh, device=dev, dtype=torch.bfloat16)
            x = torch.randn(b, s, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
            go = torch.randn(b, s, h, device=dev, dtype=torch.bfloat16)
            params = list(layer.parameters()) + [x]

            def clear(params=params):
                for p in params:
                    p.grad = None

            def fwd(layer=layer, x=x):
                layer(x)

            def fwd_bwd(layer=layer, x=x, go=go):
                layer(x).backward(go)

            t_f = _time(fwd, 3, repeats)
            t_fb = _time(fwd_bwd, 3, repeats, before=clear)
        except torch.cuda.OutOfMemoryError:
            log(f"layer h={h} heads={nh} s={s} b={b}: out of memory")
            continue
        finally:
            # the closures hold the layer and its inputs too: free them before empty_cache
            layer = x = go = params = clear = fwd = fwd_bwd = None
            torch.cuda.empty_cache()
        fl = layer_flops(h, s, b)
        log(f"layer h={h:5d} heads={nh:3d} s={s:4d} b={b:2d}: fwd {t_f*1e3:8.3f} ms "
            f"({fl/t_f/1e12:5.0f} TF/s)  fwd+bwd {t_fb*1e3:8.3f} ms ({3*fl/t_fb/1e12:5.0f} TF/s)")
        rows.append({"hidden": h, "heads": nh, "seq": s, "batch": b, "dtype": "bf16",
                     "fwd_s": t_f, "fwd_bwd_s": t_fb})
    return rows


def bench_gpt_step(batches, hidden=2048, layers=24, heads=32, vocab=51200, seq=1024,
                   warmup=3, repeats=8, log=print):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(vocab, hidden, layers, heads, seq, device=dev)
    n_params = sum(p.numel() for p in model.parameters())
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        optimizer = "torch.optim.AdamW(fused=True)"
    except Exception:  # noqa: BLE001
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
        optimizer = "torch.optim.AdamW(foreach=True)"
    rows = []
    for b in batches:
        idx = torch.randint(0, vocab, (b, seq), device=dev)
        tgt = torch.randint(0, vocab, (b, seq), device=dev)

        def step(idx=idx, tgt=tgt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(idx, tgt)
            loss.backward()
            opt.step()

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            t = _time(step, warmup, repeats)
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            log(f"gpt step b={b}: out of memory")
            rows.append({"batch": b, "oom": True})
            continue
        peak = torch.cuda.max_memory_allocated()
        # Host time to enqueue one step (no sync inside): when it is close to step_s the
        # step is bound by Python/dispatch overhead, not by the GPU.
        cpu = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            cpu.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        cpu_s = statistics.median(cpu)
        tokens = b * seq
        # 6 N T for the parameter matmuls (embedding lookups counted as if matmuls, the
        # tied head is a real matmul) plus 12 L h s T for attention scores (no causal halving).
        flops = 6 * n_params * tokens + 12 * layers * hidden * seq * tokens
        log(f"gpt step b={b}: {t*1e3:8.1f} ms, {tokens/t:8.0f} tok/s, "
            f"{flops/t/1e12:5.0f} model TF/s, peak {peak/2**30:.2f} GiB, "
            f"host enqueue {cpu_s*1e3:.1f} ms")
        rows.append({"batch": b, "step_s": t, "max_memory_allocated": int(peak),
                     "tokens_per_s": tokens / t, "model_tflops": flops / t / 1e12,
                     "host_enqueue_s": cpu_s,
                     "oom": False})
    return rows, n_params, optimizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--tag", default="h100")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_layer: needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    common = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": _dt.date.today().isoformat()}

    # Warm the clocks up.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_end = time.monotonic() + 2.0
    while time.monotonic() < t_end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
    del a

    if not args.skip_layer:
        t = time.monotonic()
        configs = LAYER_CONFIGS[:4] if args.quick else LAYER_CONFIGS
        rows = bench_layers(configs, repeats=5 if args.quick else 10)
        doc = {**common, "rows": rows, "meta": {
            "layer": "pre-LN GPT layer: LN, Q/K/V Linear(h,h,bias), SDPA causal (default "
                     "backend choice), out proj, residual, LN, Linear(h,4h) GELU(tanh) "
                     "Linear(4h,h), residual",
            "precision": "bf16 weights and activations, no autocast",
            "fwd_s": "forward with autograd recording (training forward)",
            "fwd_bwd_s": "forward + backward from a random output gradient; input requires "
                         "grad; parameter grads set to None before each repeat",
            "timing": "CUDA events around each repeat, eager, 3 warm-ups, median of "
                      f"{5 if args.quick else 10}",
            "flops_note": "forward FLOPs 24*b*s*h^2 + 4*b*s^2*h; backward 2x",
        }}
        with open(out / f"gpu_layer_{args.tag}.json", "w") as f:
            json.dump(doc, f, indent=1)
        print(f"layers: {len(rows)} rows in {time.monotonic()-t:.1f}s", flush=True)

    if not args.skip_step:
        t = time.monotonic()
        batches = [1, 2] if args.quick else [1, 2, 4, 8, 16]
        rows, n_params, optimizer = bench_gpt_step(batches)
        doc = {**common, "model": {"hidden": 2048, "layers": 24, "heads": 32, "vocab": 51200,
                                   "seq": 1024, "params": n_params, "tied_embedding": True},
               "precision": "mixed: fp32 master params, grads and AdamW state; forward and "
                            "backward under torch.autocast(bfloat16)",
               "optimizer": optimizer,
               "timing": "CUDA events around zero_grad+fwd+bwd+opt.step, eager, 3 warm-ups, "
                         "median of 8",
               "model_tflops_note": "(6*params*tokens + 12*L*h*s*tokens) / step_s",
               "host_enqueue_note": "host wall time for step() to return, without a sync "
                                    "inside (median of 3); near step_s means host-bound",
               "rows": rows}
        with open(out / f"gpt_step_{args.tag}.json", "w") as f:
            json.dump(doc, f, indent=1)
        print(f"gpt step: {len(rows)} rows in {time.monotonic()-t:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
