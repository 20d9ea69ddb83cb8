"""Alpa's weak-scaling evaluation on a simulated p3.16xlarge cluster (8x V100 per node).

    python examples/weak_scaling.py [--suite gpt|moe|both] [--out weak_scaling] [--strategies ...]

The GPT suite (350M on 1 GPU ... 39B on 64) and the MoE suite (380M on 1 ... 70B on 64), each
strategy planned by `autopar.compare` under one cost model; prints a markdown table of aggregate
PFLOP/s and writes OUT.json and OUT.png (PFLOP/s per strategy against GPU count).
"""

from __future__ import annotations

import argparse
import json

from autopar.compare import compare, summarize_rows

GPT = [("gpt-350m", 1), ("gpt-1.3b", 4), ("gpt-2.6b", 8), ("gpt-6.7b", 16), ("gpt-15b", 32), ("gpt-39b", 64)]
MOE = [("moe-380m", 1), ("moe-1.3b", 4), ("moe-2.4b", 8), ("moe-10b", 16), ("moe-27b", 32), ("moe-70b", 64)]
DEFAULT = "dp,zero2,zero3,tp,pp,3d,inter-only,intra-only,auto"


def cluster_args(gpus: int) -> dict:
    return {"nodes": max(1, gpus // 8), "gpus_per_node": min(gpus, 8)}


def run_suite(suite, strategies, global_batch):
    results = []
    for model, gpus in suite:
        rows = summarize_rows(compare(model, "p3.16xlarge", global_batch=global_batch, strategies=strategies,
                                      **cluster_args(gpus)))
        for r in rows:
            pf = None
            if r["fits"] and "step_time_s" in r:
                pf = r["tflops_per_gpu"] * gpus / 1e3
            results.append({"model": model, "gpus": gpus, "strategy": r["strategy"], "pflops": pf,
                            "config": r.get("config", ""), "error": r.get("error", "")})
        print(f"  {model} on {gpus} GPUs: " + ", ".join(
            f"{x['strategy']} {x['pflops']:.3f}" if x["pflops"] else f"{x['strategy']} OOM/-"
            for x in results if x["model"] == model), flush=True)
    return results


def markdown(results, strategies) -> str:
    models = list(dict.fromkeys((r["model"], r["gpus"]) for r in results))
    lines = ["| model | GPUs | " + " | ".join(strategies) + " |", "|---|---|" + "---|" * len(strategies)]
    for m, g in models:
        cells = []
        for s in strategies:
            r = next(x for x in results if x["model"] == m and x["strategy"] == s)
            cells.append(f"{r['pflops']:.3f}" if r["pflops"] else "OOM")
        lines.append(f"| {m} | {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, strategies, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in strategies:
        pts = [(r["gpus"], r["pflops"]) for r in results if r["strategy"] == s and r["pflops"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs (model size grows with them)")
    ax.set_ylabel("aggregate PFLOP/s (model FLOPs)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="both", choices=["gpt", "moe", "both"])
    ap.add_argument("--strategies", default=DEFAULT)
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--out", default="weak_scaling")
    a = ap.parse_args()
    strategies = a.strategies.split(",")
    doc = {}
    for name, suite in (("gpt", GPT), ("moe", MOE)):
        if a.suite not in (name, "both"):
            continue
        print(f"{name} suite:", flush=True)
        res = run_suite(suite, strategies, a.global_batch)
        doc[name] = res
        print(markdown(res, strategies), flush=True)
        plot(res, strategies, f"{a.out}_{name}.png", f"Weak scaling, {name.upper()} suite, simulated p3.16xlarge")
    with open(f"{a.out}.json", "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
