"""Planning speed: `autopar plan` end to end, cold (fresh trace cache), one process per case.

    python bench/plan_bench.py            # the headline cases and the scaling tables
    python bench/plan_bench.py --quick    # just gpt-39b on 64 V100s
    python bench/plan_bench.py --headline gpt-39b llama3-405b gpt-1t   # only these headline cases
    python bench/plan_bench.py --quick --save-plans DIR   # also keep each plan file (to diff plans)

Prints a markdown table: wall seconds (2-core machine here), user CPU seconds of the planning
process and its workers (steadier than wall time on a shared machine), the peak RSS of the
largest of those processes, ILPs solved, layer reuses, and the predicted step time of the plan
found, and the plan's label.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

# Llama 3 405B (Meta's config, seq 8192; global batch 2048 sequences = 16M tokens, as published)
LLAMA3_405B = "llama3-70b:hidden=16384,layers=126,heads=128,ffn=53248,seq=8192"
# Megatron-LM's 1T GPT (Narayanan et al. 2021, Table 1: 3072 A100s, global batch 3072)
GPT_1T = "gpt:hidden=25600,layers=128,heads=160,seq=2048,vocab=51200"
HEADLINE = [
    ("gpt-39b", "p3.16xlarge", 8, 1024),
    ("llama2-70b", "dgx-a100", 8, 1024),
    ("gpt3-175b", "dgx-a100", 128, 1536),
    (LLAMA3_405B, "dgx-h100", 128, 2048),
    (GPT_1T, "dgx-a100", 384, 3072),
]
NAMES = {LLAMA3_405B: "llama3-405b", GPT_1T: "gpt-1t"}
# Planning time against layers (hidden 4096, 64 V100s) and against GPUs (gpt-6.7b).
LAYERS = [(f"gpt:hidden=4096,layers={l},heads=32,seq=1024,vocab=51200", "p3.16xlarge", 8, 1024)
          for l in (12, 24, 48, 96)]
GPUS = [("gpt-6.7b", "p3.16xlarge", n, 128 * n) for n in (1, 2, 4, 8, 16)]


def run(model: str, cluster: str, nodes: int, gb: int, save_dir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, AUTOPAR_CACHE_DIR=cache)
        path = os.path.join(out, "plan.json")
        # ru_maxrss of the children is the largest of any one process (the planner or a worker)
        user0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "autopar.cli", "plan", model, "--cluster", cluster,
                            "--nodes", str(nodes), "--global-batch", str(gb), "-o", path],
                           env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        user, rss = usage.ru_utime - user0, usage.ru_maxrss * 1024
        name = NAMES.get(model, model)
        if r.returncode != 0:
            return {"model": name, "gpus": nodes * 8, "wall_s": wall, "user_s": user, "rss_bytes": rss,
                    "error": r.stderr.strip()[-300:]}
        with open(path) as f:
            plan = json.load(f)
        if save_dir:
            shutil.copy(path, os.path.join(save_dir, f"{name.replace(':', '_').replace('/', '_')}-{nodes * 8}.json"))
    s, p = plan["search"], plan["predicted"]
    return {"model": name, "cluster": cluster, "gpus": nodes * 8, "layers": plan["model"]["n_layers"],
            "wall_s": wall, "user_s": user, "rss_bytes": rss, "ilps": s["ilps"], "reused": s["cache_hits"], "stages": len(plan["stages"]),
            "step_s": p["step_time_s"], "mfu": p["mfu"], "fits": p["fits"],
            "label": plan["config"]["label"]}


def table(rows: list[dict], title: str) -> str:
    out = [f"\n### {title}\n", "| model | GPUs | layers | wall (s) | user CPU (s) | peak RSS (GiB) | ILPs | layer reuses | "
           "stages | predicted step (s) | MFU | plan |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['rss_bytes'] / 2**30:.2f}"
        if "error" in r:
            out.append(f"| {r['model']} | {r['gpus']} | | {r['wall_s']:.1f} | {r['user_s']:.1f} | {rss} | error: {r['error']} |")
            continue
        out.append(f"| {r['model']} | {r['gpus']} | {r['layers']} | {r['wall_s']:.1f} | {r['user_s']:.1f} | {rss} | {r['ilps']} | "
                   f"{r['reused']} | "
                   f"{r['stages']} | {r['step_s']:.2f} | "
                   f"{r['mfu']:.1%} | {r['label']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--headline", nargs="+", metavar="MODEL", help="run only these headline cases")
    ap.add_argument("--save-plans", metavar="DIR", help="copy each plan file into DIR (to compare plans)")
    a = ap.parse_args()
    if a.save_plans:
        os.makedirs(a.save_plans, exist_ok=True)
    cases = HEADLINE[:1] if a.quick else HEADLINE
    if a.headline:
        cases = [c for c in HEADLINE if NAMES.get(c[0], c[0]) in a.headline]
    print(table([run(*c, a.save_plans) for c in cases], "Planning time, end to end (cold trace cache)"), flush=True)
    if not (a.quick or a.headline):
        print(table([run(*c, a.save_plans) for c in LAYERS], "Planning time vs layers (hidden 4096, 64 V100)"), flush=True)
        print(table([run(*c, a.save_plans) for c in GPUS], "Planning time vs GPUs (gpt-6.7b, p3.16xlarge)"), flush=True)


if __name__ == "__main__":
    main()
