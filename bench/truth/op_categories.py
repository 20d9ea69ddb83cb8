"""Where a measured step's device time goes, by kind of kernel, beside where the eager model puts it.

    python bench/truth/op_categories.py [PROFILE_DIR] [--top N]
    # default PROFILE_DIR: bench/results/profiles_h200_1gpu_2026-12-01b; --top: also each row's N
    # costliest aten ops by input shapes (from <tag>_ops.json, where the profile has one)

PROFILE_DIR holds `bench/runtime_vs_native.py --profile` output: runs.json (the rows) and one
torch.profiler table per row (`<model>_<strategy>_mb<N>_<eager|compiled>_autopar.txt`). Each row's
aten ops are grouped by their self CUDA time (GEMM, attention, casts, norms, other elementwise,
optimizer, loss) per training step; the row's plan, made as predict_runs.py makes it, is priced
with `evaluate(..., eager=True)` and its ops grouped the same way (the op list's compute per
microbatch times the microbatches, and the eager terms from the breakdown). The tables list the
top 40 ops only: what they leave out is in "other" (the self CUDA total less the listed ops). A kernel row (no `aten::` name) is a listed op's kernel and is not counted again.
"other" is, measured, the device time of the ops the table leaves out and of kernels no aten op
launched (Inductor's fused Triton kernels in compiled rows); modelled, the rest of the predicted
step (the eager recipe's per-block terms, which the op list does not hold, and host waits).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "truth"))

CATEGORIES = ("gemm", "attention", "casts", "norm", "elementwise", "optimizer", "loss")

# measured: aten op name -> category (anything else aten:: is elementwise)
_MEASURED = [
    (re.compile(r"aten::(mm|addmm|bmm|baddbmm|matmul)$"), "gemm"),
    (re.compile(r"aten::_(cudnn|flash|efficient)_attention"), "attention"),
    (re.compile(r"aten::(copy_|_to_copy)$"), "casts"),
    (re.compile(r"norm"), "norm"),
    (re.compile(r"adam|Optimizer"), "optimizer"),
    (re.compile(r"log_softmax|nll_loss|cross_entropy"), "loss"),
]
# model: op kind -> category
_MODEL = {"matmul": "gemm", "attention": "attention", "norm": "norm", "loss": "loss"}


def _category(name: str) -> str:
    for pattern, cat in _MEASURED:
        if pattern.search(name):
            return cat
    return "elementwise"


def _ms(text: str) -> float:
    value = float(re.sub(r"[a-z]+$", "", text))
    return value / 1000 if text.endswith("us") else value * 1000 if text.endswith("s") and not text.endswith("ms") else value


def measured(path: Path, steps: int) -> dict[str, float]:
    """ms per step by category from the first table of a stored profile (self CUDA column)."""
    lines = path.read_text().splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.strip().startswith("Name"))
    cols = re.split(r"\s{2,}", lines[header].strip())
    out: dict[str, float] = defaultdict(float)
    listed = 0.0
    for ln in lines[header + 2:]:
        if ln.startswith("---"):
            break
        fields = re.split(r"\s{2,}", ln.strip())
        if len(fields) != len(cols) or not fields[0].startswith(("aten::", "Optimizer")):
            continue
        if fields[0].startswith("Optimizer"):      # the step's annotation spans the fused kernel below
            continue
        self_ms = _ms(fields[cols.index("Self CUDA")])
        out[_category(fields[0])] += self_ms / steps
        listed += self_ms
    total = next(_ms(ln.split(":")[1].strip()) for ln in lines if ln.startswith("Self CUDA time total"))
    out["other"] = (total - listed) / steps
    return dict(out)


def predicted(row: dict) -> tuple[dict[str, float], float]:
    """ms per step by category under the eager model, and its step time (ms)."""
    from predict_runs import plan_and_graph

    from autopar.evaluation.evaluator import evaluate
    from autopar.hardware.presets import load_cluster

    plan, graph = plan_and_graph(row, 1)
    p = evaluate(plan, graph, load_cluster("dgx-h200", 1, 1), eager=True, compiled=bool(row.get("compile")))
    n_mb = plan.training.n_microbatches
    out: dict[str, float] = defaultdict(float)
    for stage in p.stages:
        for op in stage.ops or []:
            out[_MODEL.get(op["kind"], "elementwise")] += op["compute_s"] * n_mb * 1e3
    bd = p.prediction.breakdown_s
    out["casts"] += bd.get("precision_casts", 0.0) * 1e3
    out["optimizer"] += bd.get("optimizer", 0.0) * 1e3
    step_ms = p.prediction.step_time_s * 1e3
    out["other"] = step_ms - sum(out.values())
    return dict(out), step_ms


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path,
                    default=ROOT / "bench" / "results" / "profiles_h200_1gpu_2026-12-01b")
    ap.add_argument("--top", type=int, default=0, help="also list each row's N costliest aten ops by shapes")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    folder = args.folder
    runs = json.loads((folder / "runs.json").read_text())
    for row in runs["rows"]:
        mode = "compiled" if row.get("compile") else "eager"
        path = folder / f"{row['model']}_{row['strategy']}_mb{row['microbatch']}_{mode}_autopar.txt"
        if not path.is_file():
            continue
        from runtime_vs_native import PROFILED_STEPS
        meas = measured(path, PROFILED_STEPS)
        pred, step_ms = predicted(row)
        print(f"{row['model']} {row['strategy']} mb{row['microbatch']} {mode}: measured "
              f"{row['autopar']['step_time_s'] * 1e3:.1f} ms/step, predicted {step_ms:.1f} "
              f"(the head+loss GEMM is in gemm, its elementwise in loss and elementwise)")
        print(f"  {'category':12s} {'measured':>9s} {'model':>9s}   ms per step")
        for cat in (*CATEGORIES, "other"):
            print(f"  {cat:12s} {meas.get(cat, 0.0):9.1f} {pred.get(cat, 0.0):9.1f}")
        print(f"  {'sum':12s} {sum(meas.values()):9.1f} {sum(pred.values()):9.1f}")
        ops_path = path.with_name(path.stem + "_ops.json")
        if args.top and ops_path.is_file():
            print(f"  the {args.top} costliest aten ops (ms per step, calls per step, input shapes):")
            for op in json.loads(ops_path.read_text())[:args.top]:
                print(f"    {op['self_device_ms_per_step']:7.2f} {op['calls_per_step']:6.0f}  "
                      f"{_category(op['op']):11s} {op['op']} {op['shapes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
