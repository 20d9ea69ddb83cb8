"""A linear layer's three GEMMs in the layouts autograd runs them, against the layout the GPU
profile times (issue 13: the forward of a transformer layer is predicted 5-15% slow on an H200
while its backward is 2-5% fast, `bench/gpu_layer_predict.py`).

    python bench/gemm_layouts.py --out bench/results/gemm_layouts_<gpu>_<date>.json   # on the GPU
    python bench/gemm_layouts.py --report bench/results/gemm_layouts_h200_2026-12-02.json --cluster dgx-h200

`autopar profile` times `torch.matmul(A, B, out=C)` with A [m, k] and B [k, n] both contiguous
("nn"), and the cost model prices every GEMM on those rows by its (m, n, k). A linear y = x W^T
with x [T, in] and W [out, in] runs three GEMMs of equal FLOPs:
  - forward  (m, n, k) = (T, out, in): x @ W^T, B a transposed view ("nt");
  - dgrad    (T, in, out): dy @ W, both contiguous ("nn");
  - wgrad    (in, out, T) as the einsum rule counts it (dW^T = x^T dy): A a transposed view
    ("tn"); autograd computes dW = dy^T x, the same GEMM transposed.
This times each in its own layout and in "nn" at the same (m, n, k), with the profile's method
(`autopar.profiling.gpu._bench`: inputs rotated over sets larger than L2, calls captured into a
CUDA graph), for the linears of a GPT block (qkv, proj, fc1, fc2) at several widths and token
counts. Prints a table and writes the rows as JSON.

`--report` (no GPU) reads such a file and prints, per role, each layout's time over "nn"'s, the
cost model's price (ComputeModel.matmul_s on the cluster's GPU) over the measured time, and, at
the shapes the shipped profile timed itself, this run's "nn" time over the profile's (the drift
between the two measurements: another GPU of the same kind, another day).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROTATE_BYTES = 2**28          # input sets rotate over at least this many bytes (> 4x L2)
TOKENS = (2048, 4096, 8192, 16384)
HIDDEN = (2048, 4096, 5120, 8192, 12288)
LAYOUTS = ("nn", "nt", "tn")


def linears(hidden: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of a GPT block's linears."""
    return [("qkv", 3 * hidden, hidden), ("proj", hidden, hidden), ("fc1", 4 * hidden, hidden),
            ("fc2", hidden, 4 * hidden)]


def gemms(tokens: int, out: int, inp: int) -> list[tuple[str, str, int, int, int]]:
    """(role, layout autograd runs, m, n, k) of one linear's forward and backward GEMMs, in the
    einsum rule's (m, n, k) (rules/einsum.py: forward (m, n, k), dgrad (m, k, n), wgrad (k, n, m))."""
    return [("forward", "nt", tokens, out, inp), ("dgrad", "nn", tokens, inp, out), ("wgrad", "tn", inp, out, tokens)]


def _operands(torch, layout: str, m: int, n: int, k: int, gen, dev):
    """A [m, k] and B [k, n] in `layout` (a transposed view where the letter is t)."""
    a = torch.randn((k, m) if layout[0] == "t" else (m, k), device=dev, dtype=torch.bfloat16, generator=gen)
    b = torch.randn((n, k) if layout[1] == "t" else (k, n), device=dev, dtype=torch.bfloat16, generator=gen)
    return (a.t() if layout[0] == "t" else a), (b.t() if layout[1] == "t" else b)


def report(path: Path, cluster: str) -> str:
    """The summary table of a measured file (module doc, `--report`)."""
    import numpy as np

    from autopar.costmodel.compute import ComputeModel
    from autopar.hardware.presets import load_cluster
    from autopar.hardware.profiles import load_gpu_profile
    doc = json.loads(path.read_text())
    gpu = load_cluster(cluster, 1, 1).gpu
    cm = ComputeModel(gpu, "bf16")
    prof = load_gpu_profile(gpu.profile) if gpu.profile else None
    grid = {(r["m"], r["n"], r["k"]): r["time_s"] for r in (prof or {}).get("matmul", []) if r["dtype"] == "bf16"}
    lines = [f"{path.name}: {doc['gpu']}, torch {doc['torch']}, {doc['date']}; model: {cluster} ({gpu.name})",
             "| role | layout | GEMMs | own / nn, median (min..max) | model / measured, median (min..max) |",
             "|---|---|---|---|---|"]

    def span(x: list[float]) -> str:
        return f"{np.median(x):.3f} ({min(x):.3f}..{max(x):.3f})"
    for role in ("forward", "dgrad", "wgrad"):
        rs = [r for r in doc["rows"] if r["role"] == role]
        ratio = [r["time_s"] / r["nn_time_s"] for r in rs]
        model = [cm.matmul_s(r["m"], r["n"], r["k"]) / r["time_s"] for r in rs]
        lines.append(f"| {role} | {rs[0]['layout']} | {len(rs)} | {span(ratio)} | {span(model)} |")
    drift = {(r["m"], r["n"], r["k"]): r["nn_time_s"] / grid[(r["m"], r["n"], r["k"])]
             for r in doc["rows"] if (r["m"], r["n"], r["k"]) in grid}
    if drift:
        lines.append(f"at the {len(drift)} shapes the profile timed: this run's nn / the profile's "
                     f"{span(list(drift.values()))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, help="measure on this machine's GPU; JSON file to write")
    what.add_argument("--report", type=Path, help="summarise a measured file (no GPU)")
    ap.add_argument("--cluster", default="dgx-h200", help="--report: the preset whose GPU prices the GEMMs")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    args = ap.parse_args(argv)
    if args.report is not None:
        if not args.report.exists():
            print(f"gemm_layouts.py: {args.report} does not exist", file=sys.stderr)
            return 2
        print(report(args.report, args.cluster))
        return 0
    if args.out.exists() and not args.force:
        print(f"gemm_layouts.py: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("gemm_layouts.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from autopar.profiling.gpu import _bench, _Clock
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True   # as the profile
    dev = torch.device("cuda", 0)
    clock = _Clock(torch, dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(5)
    rows = []
    seen: dict[tuple[str, int, int, int], float] = {}

    def timed(layout: str, m: int, n: int, k: int) -> float:
        key = (layout, m, n, k)
        if key not in seen:
            nsets = max(1, -(-ROTATE_BYTES // ((m * k + k * n) * 2)))
            sets = [_operands(torch, layout, m, n, k, gen, dev) for _ in range(min(nsets, 64))]
            c = torch.empty((m, n), device=dev, dtype=torch.bfloat16)

            def call(i, sets=sets, c=c):
                a, b = sets[i % len(sets)]
                torch.matmul(a, b, out=c)
            seen[key] = _bench(clock, call, max_inner=max(len(sets), 16), total_target_s=0.015)
            del sets, c
        return seen[key]

    print(f"{'linear':>6} {'h':>6} {'T':>6} {'role':>8} {'m':>6} {'n':>6} {'k':>6} {'runs':>4}"
          f" {'own us':>9} {'nn us':>9} {'own/nn':>7}", flush=True)
    for hidden in HIDDEN:
        for tokens in TOKENS:
            for name, out, inp in linears(hidden):
                for role, layout, m, n, k in gemms(tokens, out, inp):
                    t_own = timed(layout, m, n, k)
                    t_nn = timed("nn", m, n, k)
                    rows.append({"linear": name, "hidden": hidden, "tokens": tokens, "role": role,
                                 "layout": layout, "m": m, "n": n, "k": k, "time_s": t_own, "nn_time_s": t_nn,
                                 "tflops": 2.0 * m * n * k / t_own / 1e12})
                    print(f"{name:>6} {hidden:6d} {tokens:6d} {role:>8} {m:6d} {n:6d} {k:6d} {layout:>4}"
                          f" {t_own * 1e6:9.1f} {t_nn * 1e6:9.1f} {t_own / t_nn:7.3f}", flush=True)
            torch.cuda.empty_cache()
    doc = {"what": __doc__.splitlines()[0], "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "rotate_bytes": ROTATE_BYTES, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
