"""Planning speed: `autopar plan` end to end, cold (fresh trace cache), one process per case.

    python bench/plan_bench.py            # the headline cases and the scaling tables
    python bench/plan_bench.py --quick    # just gpt-39b on 64 V100s

Prints a markdown table: wall seconds (2-core machine here), ILPs solved, layer reuses, and the
predicted step time of the plan found.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HEADLINE = [
    ("gpt-39b", "p3.16xlarge", 8, 1024),
    ("llama2-70b", "dgx-a100", 8, 1024),
    ("gpt3-175b", "dgx-a100", 128, 1536),
]
# Planning time against layers (hidden 4096, 64 V100s) and against GPUs (gpt-6.7b).
LAYERS = [(f"gpt:hidden=4096,layers={l},heads=32,seq=1024,vocab=51200", "p3.16xlarge", 8, 1024)
          for l in (12, 24, 48, 96)]
GPUS = [("gpt-6.7b", "p3.16xlarge", n, 128 * n) for n in (1, 2, 4, 8, 16)]


def run(model: str, cluster: str, nodes: int, gb: int) -> dict:
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, AUTOPAR_CACHE_DIR=cache)
        path = os.path.join(out, "plan.json")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "autopar.cli", "plan", model, "--cluster", cluster,
                            "--nodes", str(nodes), "--global-batch", str(gb), "-o", path],
                           env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            return {"model": model, "gpus": nodes * 8, "wall_s": wall, "error": r.stderr.strip()[-300:]}
        plan = json.load(open(path))
    s, p = plan["search"], plan["predicted"]
    return {"model": model, "cluster": cluster, "gpus": nodes * 8, "layers": plan["model"]["n_layers"],
            "wall_s": wall, "ilps": s["ilps"], "reused": s["cache_hits"], "stages": len(plan["stages"]),
            "step_s": p["step_time_s"], "mfu": p["mfu"], "fits": p["fits"]}


def table(rows: list[dict], title: str) -> str:
    out = [f"\n### {title}\n", "| model | GPUs | layers | wall (s) | ILPs | layer reuses | stages | predicted step (s) | MFU |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['gpus']} | | {r['wall_s']:.1f} | error: {r['error']} |")
            continue
        out.append(f"| {r['model']} | {r['gpus']} | {r['layers']} | {r['wall_s']:.1f} | {r['ilps']} | {r['reused']} | "
                   f"{r['stages']} | {r['step_s']:.2f} | "
                   f"{r['mfu']:.1%} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    cases = HEADLINE[:1] if a.quick else HEADLINE
    print(table([run(*c) for c in cases], "Planning time, end to end (cold trace cache)"), flush=True)
    if not a.quick:
        print(table([run(*c) for c in LAYERS], "Planning time vs layers (hidden 4096, 64 V100)"), flush=True)
        print(table([run(*c) for c in GPUS], "Planning time vs GPUs (gpt-6.7b, p3.16xlarge)"), flush=True)


if __name__ == "__main__":
    main()
