"""Predicted vs measured times of one GPT layer on an H100 (bench/gpu_layer.py's layer).

The layer is traced through the zoo (`gpt:hidden=H,layers=1,heads=A,seq=S,vocab=V`, graph
layer 1 = the block: LN, Q/K/V linears, causal SDPA, out proj, residual, LN, fc1, GELU, fc2,
residual) and costed by `StageProblem.evaluate` on one GPU of dgx-h100 (mesh 1x1): forward =
`fwd_s`, forward + backward = `fwd_s + bwd_s`, the same terms the planner's ILP minimises.
The measured times come from bench/results/gpu_layer_<tag>.json (eager PyTorch, bf16).

Usage: python bench/gpu_layer_predict.py [--tag h100] [--cluster dgx-h100] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def layer_problem(hidden: int, heads: int, seq: int, batch: int, cluster: str = "dgx-h100",
                  dtype: str = "bf16", vocab: int = 256):
    """StageProblem of the block of a 1-layer zoo GPT on one GPU, and its single choice."""
    import graphs
    from autopar.costmodel.compute import ComputeModel
    from autopar.hardware.mesh import Mesh, Submesh
    from autopar.hardware.presets import load_cluster
    from autopar.sharding.stage_problem import StageProblem
    from graphs.query import main_boundary

    g = graphs.load(f"gpt:hidden={hidden},layers=1,heads={heads},seq={seq},vocab={vocab}",
                    batch=batch, dtype=dtype)
    names = list(g.layers[1].nodes)
    cl = load_cluster(cluster, 1, 1)
    mesh = Mesh(cl, Submesh(1, 1), (1, 1))
    src = main_boundary(g, names)
    prob = StageProblem(g, names, mesh, ComputeModel(cl.gpu, dtype),
                        boundary={src: tuple(0 for _ in g.node(src).out_shape)})
    return prob, np.zeros(len(prob.groups), dtype=np.int64)


def predict(hidden: int, heads: int, seq: int, batch: int, cluster: str = "dgx-h100") -> tuple[float, float]:
    """(forward, forward + backward) seconds predicted for one layer."""
    prob, choice = layer_problem(hidden, heads, seq, batch, cluster)
    ev = prob.evaluate(choice)
    return ev.fwd_s, ev.fwd_s + ev.bwd_s


def rows(tag: str = "h100", cluster: str = "dgx-h100") -> list[dict]:
    doc = json.loads((ROOT / "bench" / "results" / f"gpu_layer_{tag}.json").read_text())
    out = []
    for r in doc["rows"]:
        f, fb = predict(r["hidden"], r["heads"], r["seq"], r["batch"], cluster)
        out.append({**{k: r[k] for k in ("hidden", "heads", "seq", "batch")},
                    "fwd_measured_s": r["fwd_s"], "fwd_predicted_s": f,
                    "fwd_error": f / r["fwd_s"] - 1,
                    "fwd_bwd_measured_s": r["fwd_bwd_s"], "fwd_bwd_predicted_s": fb,
                    "fwd_bwd_error": fb / r["fwd_bwd_s"] - 1})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", default="h100", help="bench/results/gpu_layer_<tag>.json")
    ap.add_argument("--cluster", default="dgx-h100")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    table = rows(a.tag, a.cluster)
    if a.json:
        print(json.dumps(table, indent=1))
        return 0
    print(f"{'hidden':>6} {'heads':>5} {'seq':>5} {'batch':>5} | {'fwd meas':>9} {'fwd pred':>9} {'err':>7} | "
          f"{'f+b meas':>9} {'f+b pred':>9} {'err':>7}")
    for r in table:
        print(f"{r['hidden']:>6} {r['heads']:>5} {r['seq']:>5} {r['batch']:>5} | "
              f"{r['fwd_measured_s'] * 1e3:>7.3f}ms {r['fwd_predicted_s'] * 1e3:>7.3f}ms {r['fwd_error']:>+7.1%} | "
              f"{r['fwd_bwd_measured_s'] * 1e3:>7.3f}ms {r['fwd_bwd_predicted_s'] * 1e3:>7.3f}ms "
              f"{r['fwd_bwd_error']:>+7.1%}")
    errs = np.array([[abs(r["fwd_error"]), abs(r["fwd_bwd_error"])] for r in table])
    print(f"\nmean |error|: forward {errs[:, 0].mean():.1%}, forward+backward {errs[:, 1].mean():.1%} "
          f"over {len(table)} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
