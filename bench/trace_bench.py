"""Trace time and peak memory of the big zoo models (all on the meta device).

    python bench/trace_bench.py [model ...]      # default: gpt3-175b llama2-70b

Each model runs in a fresh process so its peak RSS is its own; "rss after import" is what
python + torch + graphs cost before any tracing.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import graphs
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
g = graphs.load(sys.argv[1])
trace_s = time.perf_counter() - t0
s = graphs.summarize(g)
print(json.dumps({
    "model": sys.argv[1], "trace_s": trace_s,
    "rss_after_import_mib": rss_import / 1024,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "params": s["params"], "forward_flops": s["forward_flops"], "nodes": s["nodes"],
    "layers": s["layers"], "distinct_layer_kinds": s["distinct_layer_kinds"],
    "method": g.meta["trace_method"]}))
"""


def main(models: list[str]) -> None:
    print(f"{'model':<12} {'trace s':>8} {'peak RSS MiB':>13} {'RSS after import':>17} "
          f"{'params':>10} {'fwd TFLOP':>10} {'nodes':>6} {'layers':>6}")
    for model in models:
        out = subprocess.run([sys.executable, "-c", CHILD, model], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['model']:<12} {r['trace_s']:>8.2f} {r['peak_rss_mib']:>13.0f} "
              f"{r['rss_after_import_mib']:>17.0f} {r['params'] / 1e9:>9.1f}B "
              f"{r['forward_flops'] / 1e12:>10.1f} {r['nodes']:>6} {r['layers']:>6}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["gpt3-175b", "llama2-70b"])
