"""What one transformer block saves for its backward, eager and compiled per block, measured on
the GPU: every tensor autograd keeps (torch.autograd.graph.saved_tensors_hooks sees the
eager ops' saves and the compiled block's ctx.save_for_backward alike), deduplicated by
storage, with its shape and dtype. The cost model's per-block stash (evaluator, eager and
compiled) is printed beside it for the same block and tokens.

    python bench/truth/saved_activations.py                       # gpt-1.3b and llama-1b-gqa blocks
    python bench/truth/saved_activations.py --model gpt-1.3b --rows 4

The block runs as `autopar run` runs it on one GPU: bf16 autocast over fp32 weights, SDPA,
and for "compiled" torch.compile of the block (Inductor), as runtime.engines.recompute_and_compile
does without recomputation. One JSON object per (model, way) is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

MODELS = {"gpt-1.3b": "gpt-1.3b", "llama-1b-gqa": "llama:hidden=2048,layers=16,heads=16,kv_heads=4,seq=2048,vocab=32000"}


def measure(spec: str, rows: int, compiled: bool) -> dict:
    import torch

    from graphs.zoo import build_module
    from graphs.zoo.config import get_config, parse_spec
    cfg = parse_spec(spec) if ":" in spec else get_config(spec)
    cfg = parse_spec(f"{cfg.family}:hidden={cfg.hidden},layers=2,heads={cfg.heads},seq={cfg.seq},vocab={cfg.vocab}"
                     + (f",kv_heads={cfg.kv_heads},ffn={cfg.ffn}" if cfg.family == "llama" else ""))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    model = build_module(cfg, device=device)
    block = model.blocks[1]
    if compiled:
        block.compile()
    x = torch.randn(rows, cfg.seq, cfg.hidden, device=device, requires_grad=True)
    saved: dict[int, tuple] = {}

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in saved or saved[key][0] < st.nbytes():
            saved[key] = (st.nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        return t

    for _ in range(3):                  # the compiled block compiles on the first call
        saved.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(x)
        y.float().sum().backward()
        x.grad = None
        for p in block.parameters():
            p.grad = None
    by_kind: dict[str, float] = defaultdict(float)
    for nbytes, shape, dtype in saved.values():
        by_kind[f"{dtype} {list(shape)}"] += nbytes
    total = sum(v[0] for v in saved.values())
    # a tensor with the batch's rows first is an activation; the rest are weight copies (bf16
    # casts: autocast's cache in eager blocks, the compiled block's own casts)
    activations = sum(v[0] for v in saved.values() if v[1][:1] == (rows,))
    tokens = rows * cfg.seq
    return {"model": spec, "compiled": compiled, "rows": rows, "seq": cfg.seq, "hidden": cfg.hidden,
            "saved_bytes": total, "activation_bytes": activations, "weight_copy_bytes": total - activations,
            "activation_bytes_per_token_hidden": activations / (tokens * cfg.hidden),
            "tensors": {k: v for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help=f"one of {', '.join(MODELS)} or a spec (repeatable)")
    ap.add_argument("--rows", type=int, default=4, help="sequences (default: %(default)s)")
    args = ap.parse_args()
    for name in args.model or list(MODELS):
        for compiled in (False, True):
            print(json.dumps(measure(MODELS.get(name, name), args.rows, compiled)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
