"""Side-by-side comparison: data, ZeRO, tensor, pipeline, 3D, Alpa's ablations and auto.

Every row is a Plan scored by the one evaluator. Baselines with free parameters are tuned by a
small grid under that evaluator, as the papers tune theirs; a baseline that fits nowhere is
reported with the memory its best configuration needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from autopar.evaluation.baselines import Config3D, build_3d
from autopar.hardware.presets import load_cluster
from autopar.hardware.specs import Cluster
from autopar.model import ModelSource
from autopar.plan import Plan, PlanError
from autopar.search.planner import default_global_batch
from autopar.search.planner import plan as auto_plan

STRATEGIES = ("dp", "zero1", "zero2", "zero3", "tp", "pp", "3d", "inter-only", "intra-only", "auto")


@dataclass
class Row:
    strategy: str
    plan: Plan | None
    error: str = ""
    seconds: float = 0.0
    tried: int = 0

    @property
    def fits(self) -> bool:
        return self.plan is not None and bool(self.plan.predicted.get("fits"))

    def throughput(self) -> float:
        return self.plan.predicted["tokens_per_s"] if self.fits else 0.0


def _pow2_upto(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    return out


def _best(plans: list[Plan]) -> Plan | None:
    """Fastest plan that fits; if none fits, the one needing the least memory (for its OOM row)."""
    fit = [p for p in plans if p.predicted.get("fits")]
    if fit:
        return min(fit, key=lambda p: p.predicted["step_time_s"])
    return min(plans, key=lambda p: p.predicted["peak_memory_bytes"]) if plans else None


def _grid(source, cluster, gb, dtype, dps_tps_pps, recomputes=("none", "full"), schedules=("1f1b",),
          zeros=(0,), virtual=(1,), label=None) -> tuple[Plan | None, int, str]:
    plans: list[Plan] = []
    errors: list[str] = []
    for dp, tp, pp in dps_tps_pps:
        for mb in _pow2_upto(max(1, gb // dp)):
            if gb % (dp * mb):
                continue
            for sched in schedules:
                for v in (virtual if sched == "interleaved" else (1,)):
                    for z in zeros:
                        for rc in recomputes:
                            cfg = Config3D(dp, tp, pp, mb, rc, sched, v, z)
                            try:
                                plans.append(build_3d(source, cluster, gb, cfg, dtype, label=label))
                            except PlanError as e:
                                errors.append(str(e))
    best = _best(plans)
    return best, len(plans), (errors[0] if errors and best is None else "")


def _factorizations(cluster: Cluster, n_blocks: int) -> list[tuple[int, int, int]]:
    n, m = cluster.n_gpus, cluster.gpus_per_node
    out = []
    for tp in _pow2_upto(m):
        for pp in range(1, n // tp + 1):
            if (n // tp) % pp or pp > n_blocks:
                continue
            dp = n // (tp * pp)
            if dp * tp > m and (dp * tp) % m:
                continue
            out.append((dp, tp, pp))
    return out


def compare(model: Any, cluster: str | Cluster = "p3.16xlarge", *, nodes: int | None = None,
            gpus_per_node: int | None = None, global_batch: int | None = None,
            strategies: list[str] | tuple[str, ...] = STRATEGIES, dtype: str | None = None,
            progress: bool = False) -> list[Row]:
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise PlanError(f"unknown strateg{'y' if len(bad) == 1 else 'ies'} {', '.join(bad)}; "
                        f"valid: {', '.join(STRATEGIES)}")
    cl = load_cluster(cluster, nodes, gpus_per_node) if not isinstance(cluster, Cluster) else cluster
    dtype = cl.gpu.training_dtype(dtype)
    source = model if isinstance(model, ModelSource) else ModelSource(model, dtype=dtype)
    gb = global_batch or default_global_batch(cl)
    n, m = cl.n_gpus, cl.gpus_per_node
    n_blocks = source.summary()["n_layers"] - 2
    rows: list[Row] = []
    for s in strategies:
        t0 = time.perf_counter()
        best, tried, err = None, 0, ""
        try:
            if s in ("dp", "zero1", "zero2", "zero3"):
                z = 0 if s == "dp" else int(s[-1])
                best, tried, err = _grid(source, cl, gb, dtype, [(n, 1, 1)], zeros=(z,), label=s)
            elif s == "tp":
                best, tried, err = _grid(source, cl, gb, dtype, [(n // m, m, 1)], label=s)
            elif s == "pp":
                pp = max(p for p in _pow2_upto(n) if p <= n_blocks)
                best, tried, err = _grid(source, cl, gb, dtype, [(n // pp, 1, pp)], schedules=("gpipe", "1f1b"),
                                         label=s)
            elif s == "3d":
                best, tried, err = _grid(source, cl, gb, dtype, _factorizations(cl, n_blocks),
                                         schedules=("1f1b", "interleaved"), zeros=(1,), virtual=(2,), label=s)
            elif s == "auto":
                best, tried = auto_plan(source, cl, global_batch=gb, dtype=dtype, progress=progress), 1
            elif s == "intra-only":
                best, tried = auto_plan(source, cl, global_batch=gb, dtype=dtype, max_stages=1), 1
                best.strategy = s
            elif s == "inter-only":
                best, tried = auto_plan(source, cl, global_batch=gb, dtype=dtype, intra="dp"), 1
                best.strategy = s
        except PlanError as e:
            err = str(e)
        rows.append(Row(s, best, err, time.perf_counter() - t0, tried))
    return rows


def summarize_rows(rows: list[Row]) -> list[dict[str, Any]]:
    base = next((r for r in rows if r.strategy == "dp" and r.fits), None)
    out = []
    for r in rows:
        p = r.plan
        d: dict[str, Any] = {"strategy": r.strategy, "fits": r.fits, "error": r.error, "search_s": r.seconds,
                             "configs_tried": r.tried}
        if p is not None:
            pr = p.predicted
            d.update({"config": p.config.get("label", ""), "step_time_s": pr["step_time_s"],
                      "tokens_per_s": pr["tokens_per_s"] if r.fits else 0.0,
                      "tflops_per_gpu": pr["tflops_per_gpu"] if r.fits else 0.0,
                      "mfu": pr["mfu"] if r.fits else 0.0, "bubble_fraction": pr["bubble_fraction"],
                      "comm_s_per_microbatch": pr["comm_s_per_microbatch"],
                      "compute_s_per_microbatch": pr["compute_s_per_microbatch"],
                      "grad_sync_s": pr["grad_sync_s"], "peak_memory_bytes": pr["peak_memory_bytes"],
                      "memory_limit_bytes": pr["memory_limit_bytes"],
                      "speedup_vs_dp": (pr["tokens_per_s"] / base.throughput()) if (base and r.fits) else None})
        out.append(d)
    return out


def why_winner(rows: list[Row]) -> str:
    fit = sorted((r for r in rows if r.fits), key=lambda r: -r.throughput())
    if not fit:
        return "no strategy fits in memory"
    w = fit[0]
    if len(fit) == 1:
        return f"{w.strategy} is the only strategy that fits in memory"
    ties = [x.strategy for x in fit[1:] if x.throughput() >= w.throughput() * 0.995]
    if ties:
        return (f"{', '.join([w.strategy] + ties)} tie (within 0.5%): they reach the same kind of plan "
                f"({w.plan.config.get('label', '')})")
    r = fit[1]
    pw, pr = w.plan.predicted, r.plan.predicted
    reasons = []
    if pr["bubble_fraction"] > pw["bubble_fraction"] + 0.02:
        reasons.append(f"less pipeline bubble ({pw['bubble_fraction']:.0%} vs {pr['bubble_fraction']:.0%})")
    cw = pw["comm_s_per_microbatch"] * w.plan.training["n_microbatches"] + pw["grad_sync_s"]
    cr = pr["comm_s_per_microbatch"] * r.plan.training["n_microbatches"] + pr["grad_sync_s"]
    if cr > cw * 1.1:
        reasons.append(f"less communication per step ({cw:.2f} s vs {cr:.2f} s summed over stages)")
    if pw["peak_memory_bytes"] < pr["peak_memory_bytes"] * 0.9:
        reasons.append(f"less memory per GPU ({pw['peak_memory_bytes'] / 2**30:.1f} vs "
                       f"{pr['peak_memory_bytes'] / 2**30:.1f} GiB), which allows its microbatching")
    if not reasons:
        reasons.append("a better balance of compute, communication and bubble")
    gain = w.throughput() / r.throughput()
    return f"{w.strategy} beats {r.strategy} by {gain:.2f}x: " + "; ".join(reasons)
