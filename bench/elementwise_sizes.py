"""The eager recipe's elementwise kernels that no profile kind times, over sizes (issue 13).

    python bench/elementwise_sizes.py --out bench/results/elementwise_sizes_<gpu>_<date>.json

`autopar profile` times five forward kernels and two backwards in bf16 over sizes
(autopar/profiles/*.json, `memory_bound`), and the cost model prices each memory-bound op of the
graph on its kind's rows (costmodel/compute.py memory_bound_s). The eager recipe's own terms
(costmodel/eager.py: autocast's casts, the fp32 residual stream and norms, gradient accumulation)
still take one streaming figure, and `bench/elementwise_layouts.py` found those kernels at a
quarter to a half of it at two sizes. This times them from 1 MiB to 1 GiB moved with the
profile's method (`autopar.profiling.gpu._bench`: inputs rotated over sets of at least 256 MiB,
short calls batched into a CUDA graph where capture works), so that a later pass can give them
rows of their own. Bytes are read + written, each operand once (a broadcast table once); a
forward-and-backward case counts the forward's bytes and the backward's (read the output's
gradient and the input, write the input's gradient). Prints a table and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN = 4096          # the rows' last dim, as the profile's row-wise kernels
HEAD_DIM = 128
ROTATE_BYTES = 2**28   # every case rotates over input sets of at least this many bytes (> 4x L2)
SIZES = [2**e for e in range(20, 31)]      # bytes moved per call, 1 MiB .. 1 GiB


def _cases(torch):
    """name -> (bytes moved per element of the main tensor, make(numel, device) -> fn(x, *rest))."""
    F = torch.nn.functional
    bf16, fp32 = torch.bfloat16, torch.float32

    def rowwise(dtype, grad=False):
        def make(numel, dev, gen):
            rows = max(1, numel // HIDDEN)
            return [torch.randn((rows, HIDDEN), device=dev, dtype=dtype, generator=gen).requires_grad_(grad)]
        return make

    def two(dtype):
        def make(numel, dev, gen):
            rows = max(1, numel // HIDDEN)
            return [torch.randn((rows, HIDDEN), device=dev, dtype=dtype, generator=gen) for _ in range(2)]
        return make

    def rotary(numel, dev, gen):
        # q as the model holds it: [tokens, heads, head_dim] viewed as [heads, tokens, head_dim],
        # times an fp32 [tokens, head_dim] table (the product promotes to fp32 under autocast)
        tokens = max(1, numel // (32 * HEAD_DIM))
        q = torch.randn((tokens, 32, HEAD_DIM), device=dev, dtype=bf16, generator=gen).transpose(0, 1)
        return [q, torch.randn((tokens, HEAD_DIM), device=dev, dtype=fp32, generator=gen)]

    def norm_weight(x):
        return torch.ones(x.shape[-1], device=x.device, dtype=x.dtype, requires_grad=True)

    def fwd_bwd(norm):
        def fn(x):
            w = norm_weight(x)
            y = norm(x, w)
            torch.autograd.grad(y, (x, w), torch.ones_like(y))
        return fn

    return {
        "cast bf16 -> fp32": (2 + 4, rowwise(bf16), lambda x: x.to(fp32)),
        "cast fp32 -> bf16": (4 + 2, rowwise(fp32), lambda x: x.to(bf16)),
        "add_ fp32 (gradient accumulation)": (12, two(fp32), lambda x, y: x.add_(y)),
        "mul bf16 view x fp32 table (rotary)": (2 + 4, rotary, lambda q, c: q * c),
        "sum over tokens bf16 (bias gradient)": (2, rowwise(bf16), lambda x: x.sum(0)),
        "rms_norm fp32 forward": (8, rowwise(fp32), lambda x: F.rms_norm(x, (x.shape[-1],))),
        "rms_norm fp32 forward + backward": (8 + 12, rowwise(fp32, True),
                                             fwd_bwd(lambda x, w: F.rms_norm(x, (x.shape[-1],), w))),
        "layer_norm fp32 forward + backward": (8 + 12, rowwise(fp32, True),
                                               fwd_bwd(lambda x, w: F.layer_norm(x, (x.shape[-1],), w))),
    }


# each case's kernel kind in a GPU profile (autopar.hardware.profiles.EAGER_KERNELS), for
# bench/update_profile.py; the norms' cases are the profile's layernorm kinds already
KIND_OF_CASE = {
    "cast bf16 -> fp32": "cast_widen",
    "cast fp32 -> bf16": "cast_narrow",
    "add_ fp32 (gradient accumulation)": "accumulate",
    "mul bf16 view x fp32 table (rotary)": "broadcast_mul",
    "sum over tokens bf16 (bias gradient)": "token_sum",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"elementwise_sizes.py: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("elementwise_sizes.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from autopar.profiling.gpu import _bench, _Clock
    dev = torch.device("cuda", 0)
    clock = _Clock(torch, dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(3)
    rows = []
    for name, (bytes_per_element, make, fn) in _cases(torch).items():
        for target in SIZES:
            numel = max(HIDDEN, target // bytes_per_element // HIDDEN * HIDDEN)
            first = make(numel, dev, gen)
            set_bytes = sum(t.numel() * t.element_size() for t in first)
            sets = [first] + [make(numel, dev, gen) for _ in range(max(0, math.ceil(ROTATE_BYTES / set_bytes) - 1))]
            moved = numel * bytes_per_element

            def call(i, sets=sets, fn=fn):
                fn(*sets[i % len(sets)])
            t = _bench(clock, call, max_inner=max(len(sets), 16))
            rows.append({"case": name, "bytes": moved, "time_s": t, "gbps": moved / t / 1e9})
            print(f"{t * 1e6:10.1f} us {moved / t / 1e9:8.0f} GB/s {moved / 2**20:8.1f} MiB  {name}", flush=True)
            del sets, first
        torch.cuda.empty_cache()
    doc = {"what": __doc__.splitlines()[0], "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "rotate_bytes": ROTATE_BYTES, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
