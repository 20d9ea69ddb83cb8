"""The auto plan against the best hand-made 3D plan under the same evaluator.

    python bench/auto_vs_3d.py [--global-batch 1024]

Alpa's GPT suite on its weak-scaling GPU counts of p3.16xlarge (1 GPU ... 64 GPUs) and
llama2-70b on 64 dgx-a100 GPUs. The 3D grid is Megatron-LM's: every (dp, tp, pp) with tp inside
a node, every power-of-two micro-batch, recomputation none/full, ZeRO-0/1, 1F1B. Prints a
markdown table; `auto / 3d` must be >= 1.00 (ties allowed).
"""

from __future__ import annotations

import argparse
import time

from autopar.compare import _factorizations, _grid
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from autopar.search.planner import plan

CASES = [("gpt-350m", "p3.16xlarge", 1, 1), ("gpt-760m", "p3.16xlarge", 1, 2), ("gpt-1.3b", "p3.16xlarge", 1, 4),
         ("gpt-2.6b", "p3.16xlarge", 1, 8), ("gpt-6.7b", "p3.16xlarge", 2, 8), ("gpt-15b", "p3.16xlarge", 4, 8),
         ("gpt-39b", "p3.16xlarge", 8, 8), ("llama2-70b", "dgx-a100", 8, 8)]


def compare_one(model: str, cluster: str, nodes: int, gpn: int, gb: int) -> dict:
    cl = load_cluster(cluster, nodes, gpn)
    src = ModelSource(model)
    t0 = time.perf_counter()
    auto = plan(src, cl, global_batch=gb)
    t_auto = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_blocks = src.summary()["n_layers"] - 2
    best3d, tried, err = _grid(src, cl, gb, None, _factorizations(cl, n_blocks), zeros=(0, 1), label="3d")
    t_3d = time.perf_counter() - t0
    a, b = auto.predicted, best3d.predicted if best3d else None
    return {"model": model, "gpus": cl.n_gpus, "auto_step_s": a.step_time_s, "auto_cfg": auto.config.label,
            "auto_fits": a.fits, "3d_step_s": b.step_time_s if b and b.fits else None,
            "3d_cfg": best3d.config.label if best3d else err, "ratio": (b.step_time_s / a.step_time_s)
            if b and b.fits else None, "auto_mfu": a.mfu, "3d_mfu": b.mfu if b else None,
            "auto_search_s": t_auto, "3d_configs": tried, "3d_search_s": t_3d}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--only", help="comma-separated model names")
    a = ap.parse_args()
    print("| model | GPUs | auto step (s) | auto MFU | auto plan | best 3D step (s) | 3D MFU | best 3D | auto / 3D speed-up | 3D configs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, cluster, nodes, gpn in CASES:
        if a.only and model not in a.only.split(","):
            continue
        r = compare_one(model, cluster, nodes, gpn, a.global_batch)
        ratio = f"{r['ratio']:.3f}" if r["ratio"] else "3D does not fit"
        print(f"| {r['model']} | {r['gpus']} | {r['auto_step_s']:.3f} | {r['auto_mfu']:.1%} | {r['auto_cfg']} | "
              f"{r['3d_step_s'] or float('nan'):.3f} | {(r['3d_mfu'] or 0):.1%} | {r['3d_cfg']} | {ratio} | "
              f"{r['3d_configs']} |", flush=True)


if __name__ == "__main__":
    main()
