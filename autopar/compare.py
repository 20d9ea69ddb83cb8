"""Side-by-side comparison: data, ZeRO, tensor, pipeline, 3D, Alpa's ablations and auto.

Every row is a Plan scored by the one evaluator. Baselines with free parameters are tuned by a
small grid under that evaluator, as the papers tune theirs; a baseline that fits nowhere is
reported with the memory its best configuration needs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

from autopar.evaluation.baselines import Config3D, build_3d, step_lower_bound_s, unevaluated_recomputes
from autopar.evaluation.evaluator import evaluate
from autopar.hardware.presets import load_cluster
from autopar.hardware.specs import Cluster
from autopar.model import model_source
from autopar.plan import Plan, PlanError
from autopar.search.planner import default_global_batch
from autopar.search.planner import plan as auto_plan
from autopar.validation import check_training

RECOMPUTES = ("none", "selective", "full")
MAX_CHUNKS = 8          # virtual stages per GPU in the megatron grid (published recipes use up to 8)
STRATEGIES = ("dp", "zero1", "zero2", "zero3", "tp", "pp", "3d", "megatron", "inter-only", "intra-only", "auto")


@dataclass
class Row:
    strategy: str
    plan: Plan | None
    error: str = ""
    seconds: float = 0.0
    tried: int = 0

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.predicted.fits

    def throughput(self) -> float:
        return self.plan.predicted.tokens_per_s if self.plan is not None and self.fits else 0.0


def predicted(plan: Plan) -> dict[str, Any]:
    """A plan's predicted figures as a mapping ({} before the evaluator has run)."""
    return dataclasses.asdict(plan.prediction) if plan.prediction is not None else {}


def _pow2_upto(n: int) -> list[int]:
    out, k = [], 1
    while k <= n:
        out.append(k)
        k *= 2
    return out


def _best(plans: list[Plan]) -> Plan | None:
    """Fastest plan that fits; if none fits, the one needing the least memory (for its OOM row)."""
    fit = [p for p in plans if p.predicted.fits]
    if fit:
        return min(fit, key=lambda p: p.predicted.step_time_s)
    return min(plans, key=lambda p: p.predicted.peak_memory_bytes) if plans else None


def _grid(source, cluster, gb, dtype, dps_tps_pps, recomputes=("none", "full"), schedules=("1f1b",),
          zeros=(0,), virtual=(1,), label=None) -> tuple[Plan | None, int, str]:
    plans: list[Plan] = []
    errors: list[str] = []
    for dp, tp, pp in dps_tps_pps:
        for mb in _pow2_upto(max(1, gb // dp)):
            # a traced graph's batch is the only microbatch (dp ranks times their share) it can cost
            if gb % (dp * mb) or (source.fixed_batch and dp * mb != source.fixed_batch):
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


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


CP_SIZES = (1, 2, 4, 8)   # Megatron-Core's context-parallel sizes in the grid


def _megatron_configs(cluster: Cluster, gb: int, n_blocks: int, fixed_batch: int | None) -> list[Config3D]:
    """Megatron-Core's grid less recomputation (each configuration is built once for all three):
    every dp x cp x tp x pp with tp inside a node and a 2-D stage mesh, TP with and without SP,
    1F1B and interleaved schedules, the distributed optimizer, every microbatch size. A cp whose
    microbatch divides over it is left out: the same plan with the batch split there is in the
    grid and costs no more (Config3D's check)."""
    out = []
    for dp_all, tp, pp in _factorizations(cluster, n_blocks):
        for cp in CP_SIZES:
            if dp_all % cp or (cp > 1 and dp_all // cp > 1 and tp > 1):
                continue
            dp = dp_all // cp
            # two chunks per GPU even where they split the blocks unevenly (Megatron-Core's
            # uneven first and last stages), so this grid holds the 3d row's
            chunks = sorted({v for v in _divisors(n_blocks // pp)[1:] if n_blocks % (pp * v) == 0 and v <= MAX_CHUNKS}
                            | ({2} if 2 * pp <= n_blocks else set())) if pp > 1 else []
            for sched, v in [("1f1b", 1)] + [("interleaved", v) for v in chunks]:
                for sp in ((False, True) if tp > 1 else (False,)):
                    for mb in _divisors(gb // dp) if gb % dp == 0 else []:
                        if (fixed_batch and dp * mb != fixed_batch) or (cp > 1 and mb % cp == 0):
                            continue
                        out.append(Config3D(dp, tp, pp, mb, "none", sched, v, 1, sp, cp))
    return out


def _megatron_grid(source, cluster: Cluster, gb: int, dtype: str, n_blocks: int) -> tuple[Plan | None, int, str]:
    """The best point of Megatron-Core's grid under the one evaluator: every dp x cp x tp x pp
    factorization (cp 1, 2, 4, 8; `_megatron_configs`), tensor parallelism with and without
    sequence parallelism, 1F1B and the interleaved schedule with two virtual stages and with
    every number up to MAX_CHUNKS that splits the blocks evenly (Megatron's rule), the
    distributed optimizer (ZeRO-1 over dp), no, selective or full recomputation, and every
    microbatch size that divides a data-parallel rank's batch.

    Exact pruning. (1) Memory does not decrease as the microbatch grows (the activations in
    flight are min(warm-up, microbatches) microbatches of a stash that grows with it;
    tests/integration/test_megatron_baseline.py), so once a configuration does not fit, its
    larger microbatches are not built. (2) A point is simulated only if a lower bound on its
    step (baselines.step_lower_bound_s: the busiest pipeline rank's forwards and backwards, from
    its stages' costs, no simulation) is below the best fitting step found so far; families
    (everything but the microbatch) are visited in order of their first point's bound so that
    a good plan is found early."""
    errors: list[str] = []
    families: dict[Config3D, list[Config3D]] = {}
    for cfg in _megatron_configs(cluster, gb, n_blocks, source.fixed_batch):
        families.setdefault(dataclasses.replace(cfg, microbatch=1), []).append(cfg)

    memo: dict = {}                     # stage costs by structure (step_lower_bound_s)

    def built(cfg: Config3D, recomputes: tuple[str, ...]) -> list[tuple[float, Plan, Any]]:
        try:
            plans, graph = unevaluated_recomputes(source, cluster, gb, cfg, recomputes, dtype, label="megatron")
        except PlanError as e:
            errors.append(str(e))
            return []
        return [(step_lower_bound_s(p, graph, cluster, memo=memo), p, graph) for p in plans]

    first = {fam: built(cfgs[0], RECOMPUTES) for fam, cfgs in families.items()}
    order = sorted(families, key=lambda fam: min((b for b, _, _ in first[fam]), default=math.inf))
    evaluated: list[Plan] = []
    best_fit, tried = math.inf, 0
    for fam in order:
        alive: tuple[str, ...] = RECOMPUTES
        for i, cfg in enumerate(families[fam]):
            points = first[fam] if i == 0 else built(cfg, alive)
            if not points:                      # refused (PlanError): says nothing of larger microbatches
                continue
            tried += len(points)
            keep = []
            for bound, p, graph in points:
                rc = p.stages[0].recompute
                if bound >= best_fit:           # cannot win; whether it fits is not needed
                    keep.append(rc)
                    continue
                ev = evaluate(p, graph, cluster)
                evaluated.append(ev)
                if ev.predicted.fits:
                    best_fit = min(best_fit, ev.predicted.step_time_s)
                    keep.append(rc)
            alive = tuple(rc for rc in alive if rc in keep)
            if not alive:
                break
    best = _best(evaluated)
    return best, tried, (errors[0] if errors and best is None else "")


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
            seq: int | None = None, example_inputs: Any = None, progress: bool = False) -> list[Row]:
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise PlanError(f"unknown strateg{'y' if len(bad) == 1 else 'ies'} {', '.join(bad)}; "
                        f"valid: {', '.join(STRATEGIES)}")
    cl = load_cluster(cluster, nodes, gpus_per_node) if not isinstance(cluster, Cluster) else cluster
    check_training(global_batch, cl.n_gpus)
    dtype = cl.gpu.training_dtype(dtype)
    source = model_source(model, seq=seq, dtype=dtype, example_inputs=example_inputs)
    gb = global_batch if global_batch is not None else default_global_batch(cl)
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
            elif s == "megatron":
                best, tried, err = _megatron_grid(source, cl, gb, dtype, n_blocks)
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
    """One mapping per row. Rows that do not fit keep their memory need but no time figures
    (None): sorting by step time must never pick a plan that cannot run."""
    dp = next((r for r in rows if r.strategy == "dp" and r.fits), None)
    best_3d = next((r for r in rows if r.strategy == "3d" and r.fits), None)
    out = []
    for r in rows:
        p = r.plan
        d: dict[str, Any] = {"strategy": r.strategy, "fits": r.fits, "error": r.error, "search_s": r.seconds,
                             "configs_tried": r.tried}
        if p is not None:
            pr = predicted(p)
            ok = r.fits
            d.update({"config": p.config.label,
                      "step_time_s": pr.get("step_time_s") if ok else None,
                      "tokens_per_s": pr.get("tokens_per_s") if ok else None,
                      "tflops_per_gpu": pr.get("tflops_per_gpu") if ok else None,
                      "mfu": pr.get("mfu") if ok else None,
                      "bubble_fraction": pr.get("bubble_fraction"),
                      "comm_s_per_microbatch": pr.get("comm_s_per_microbatch"),
                      "compute_s_per_microbatch": pr.get("compute_s_per_microbatch"),
                      "grad_sync_s": pr.get("grad_sync_s"), "peak_memory_bytes": pr.get("peak_memory_bytes"),
                      "memory_limit_bytes": pr.get("memory_limit_bytes"),
                      "speedup_vs_dp": _ratio(r, dp), "speedup_vs_3d": _ratio(r, best_3d)})
        out.append(d)
    return out


def _ratio(r: Row, base: Row | None) -> float | None:
    if base is None or not r.fits or base.throughput() <= 0:
        return None
    return r.throughput() / base.throughput()


TABLE_HEADER = ("strategy", "configuration", "step time", "tokens/s", "TFLOP/s/GPU", "MFU", "vs best 3D",
                "peak mem/GPU", "fits")


def table_rows(table: list[dict[str, Any]]) -> tuple[tuple[str, ...], list[list[str]]]:
    """The terminal table: header and cells (configurations whole, never cut mid-token)."""
    cells = []
    for r in table:
        if "peak_memory_bytes" not in r:
            cells.append([r["strategy"], r["error"], "-", "-", "-", "-", "-", "-", "error"])
            continue
        ok = r["fits"]
        need, limit = r.get("peak_memory_bytes"), r.get("memory_limit_bytes")
        fits = "yes" if ok else (f"OOM (needs {need / 2**30:.1f} of {limit / 2**30:.0f} GiB)" if need and limit
                                 else "OOM")
        cells.append([r["strategy"], r["config"],
                      f"{r['step_time_s']:.3f} s" if ok and r.get("step_time_s") is not None else "-",
                      f"{r['tokens_per_s']:,.0f}" if ok and r.get("tokens_per_s") is not None else "-",
                      f"{r['tflops_per_gpu']:.1f}" if ok and r.get("tflops_per_gpu") is not None else "-",
                      f"{r['mfu']:.1%}" if ok and r.get("mfu") is not None else "-",
                      f"{r['speedup_vs_3d']:.2f}x" if r.get("speedup_vs_3d") else "-",
                      f"{need / 2**30:.2f} GiB" if need is not None else "-", fits])
    return TABLE_HEADER, cells


def legend(table: list[dict[str, Any]]) -> str:
    """What the table's notation means, and why a "vs best 3D" cell may be empty."""
    lines = ["notation: dpA tpB ppC = data-, tensor- and pipeline-parallel degrees; mbN = microbatch of N "
             "sequences per data-parallel rank; rc:full / rc:selective = activation recomputation (+rc in "
             "auto plans; +rcK/N, rc:full/K: a stage's first K layers of N recomputed, the rest kept); zeroN = ZeRO stage (zero1 = Megatron's distributed optimizer); interleavedxV = V model "
             "chunks per GPU; sp = sequence parallelism (norms and residual stream split over the tp axis); "
             "cpN = context parallelism (each sequence split over N GPUs through every layer, attention by ring "
             "or all-gathered K/V; +cpN in auto plans);",
             "  '5L@1x16 x3' = 3 consecutive pipeline stages of 5 layers, each on a 1x16 logical device mesh; "
             "'R ranks x V chunks' = interleaved pipeline of R ranks running V chunks each.",
             "vs best 3D = tokens/s relative to the best hand-tuned Megatron 3D plan (dp x tp x pp) that fits."]
    three_d = next((r for r in table if r["strategy"] == "3d"), None)
    if three_d is None:
        lines.append("  (no 3d row was asked for: add 3d to --strategies to fill that column)")
    elif not three_d["fits"]:
        lines.append("  (no 3D configuration fits in memory, so that column is empty)")
    return "\n".join(lines)


CSV_KEYS = ["strategy", "config", "fits", "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu",
            "speedup_vs_3d", "speedup_vs_dp", "peak_memory_bytes", "memory_limit_bytes", "error"]


def csv_rows(table: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """CSV columns and rows; None (no time for a row that does not fit) is an empty field."""
    return CSV_KEYS, [{k: ("" if r.get(k) is None else r.get(k)) for k in CSV_KEYS} for r in table]


def why_winner(rows: list[Row]) -> str:
    fit = sorted((r for r in rows if r.fits), key=lambda r: -r.throughput())
    if not fit:
        return "no strategy fits in memory"
    w = fit[0]
    if len(fit) == 1:
        return f"{w.strategy} is the only strategy that fits in memory"
    ties = [x.strategy for x in fit[1:] if x.throughput() >= w.throughput() * 0.995]
    if ties and w.plan is not None:
        return (f"{', '.join([w.strategy] + ties)} tie (within 0.5%): they reach the same kind of plan "
                f"({w.plan.config.label})")
    r = fit[1]
    assert w.plan is not None and r.plan is not None     # rows that fit have plans
    pw, pr = predicted(w.plan), predicted(r.plan)
    reasons = []
    if pr["bubble_fraction"] > pw["bubble_fraction"] + 0.02:
        reasons.append(f"less pipeline bubble ({pw['bubble_fraction']:.0%} vs {pr['bubble_fraction']:.0%})")
    cw = pw["comm_s_per_microbatch"] * w.plan.training.n_microbatches + pw["grad_sync_s"]
    cr = pr["comm_s_per_microbatch"] * r.plan.training.n_microbatches + pr["grad_sync_s"]
    if cr > cw * 1.1:
        reasons.append(f"less communication per step ({cw:.2f} s vs {cr:.2f} s summed over stages)")
    if pw["peak_memory_bytes"] < pr["peak_memory_bytes"] * 0.9:
        reasons.append(f"less memory per GPU ({pw['peak_memory_bytes'] / 2**30:.1f} vs "
                       f"{pr['peak_memory_bytes'] / 2**30:.1f} GiB), which allows its microbatching")
    if not reasons:
        reasons.append("a better balance of compute, communication and bubble")
    gain = w.throughput() / r.throughput()
    return f"{w.strategy} beats {r.strategy} by {gain:.2f}x: " + "; ".join(reasons)
