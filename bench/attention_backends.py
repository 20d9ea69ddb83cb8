"""SDPA's attention time per backend on this GPU, up to long sequences (issue 13).

autopar/profiles/h200.json's attention rows were measured with the flash backend forced and stop
at seq 8192, but on the H200 (torch 2.11) SDPA picks cuDNN's kernels by default, which the
stored step profiles show taking 1/1.45-1/2.07 of the time the model prices. This measures the
same calls under each backend (the default pick, flash, cuDNN, memory-efficient), causal, with
the zoo's head shapes, MHA and GQA (enable_gqa), forward and forward + backward, so the cost
model's attention rows can be measured for the backend that runs, not scaled.

    python bench/attention_backends.py --out bench/results/attention_backends_h200.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_layer import _time  # noqa: E402  (CUDA events around each call, the median)

# (heads, kv_heads, head_dim): gpt-1.3b, llama-1b-gqa, llama3-8b's attention
SHAPES = [(32, 32, 64), (32, 8, 64), (32, 8, 128)]
SEQS = (1024, 2048, 4096, 8192, 16384)
TOKENS = 16384          # batch x seq per call: the batch shrinks as the sequence grows


def _backends():
    from torch.nn.attention import SDPBackend
    return {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def measure(repeats: int) -> list[dict]:
    from torch.nn.attention import sdpa_kernel
    rows = []
    for heads, kv_heads, d in SHAPES:
        for seq in SEQS:
            b = max(1, TOKENS // seq)
            q = torch.randn(b, heads, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(b, kv_heads, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            go = torch.randn(b, heads, seq, d, device="cuda", dtype=torch.bfloat16)
            gqa = kv_heads != heads
            for name, backend in _backends().items():
                def call(q=q, k=k, v=v, gqa=gqa):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

                def fwd(backend=backend, call=call):
                    with torch.no_grad():
                        if backend is None:
                            call()
                        else:
                            with sdpa_kernel([backend]):
                                call()

                def fwd_bwd(backend=backend, call=call, q=q, k=k, v=v, go=go):
                    if backend is None:
                        o = call()
                    else:
                        with sdpa_kernel([backend]):
                            o = call()
                    torch.autograd.grad(o, (q, k, v), go)

                row = {"heads": heads, "kv_heads": kv_heads, "head_dim": d, "seq": seq, "batch": b,
                       "causal": True, "backend": name}
                try:
                    t_f = _time(fwd, 3, repeats)
                    t_fb = _time(fwd_bwd, 3, repeats)
                    row.update(fwd_s=t_f, bwd_s=max(t_fb - t_f, 0.0),
                               fwd_tflops=2 * b * heads * seq * seq * d / t_f / 1e12)   # causal: half of 4 b h s^2 d
                except Exception as e:  # noqa: BLE001 - a backend may not take this shape
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
            del q, k, v, go
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="", help="write the rows here as JSON")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_backends: no CUDA device here; it measures GPU kernels", file=sys.stderr)
        return 2
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    rows = measure(a.repeats)
    doc = {"what": __doc__.split("\n\n")[0], "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": _dt.date.today().isoformat(), "tokens_per_call": TOKENS, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
