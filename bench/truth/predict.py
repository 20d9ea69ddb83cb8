"""Predict every row of a bench/truth corpus with the current cost model (issue 13).

For each measured run, the equivalent autopar plan on `dgx-h200 --nodes 1 --gpus-per-node N`:

    single  dp1                    ddp   dp2 (microbatch sequences per rank)
    fsdp2   dp2, ZeRO-3            tp    tp2, Megatron (both ranks take the same batch)
    pp      pp2, 1F1B, n_microbatches of `microbatch` sequences; recompute as measured

is built with `build_3d` and evaluated; predicted and measured step time, peak memory (the
prediction against peak RESERVED: that is what must fit) and the breakdown buckets are put
side by side. Errors are (predicted - measured) / measured. The peak allocated is compared
too (`allocated_error`): the model's terms alone, before the allocator's reserve.

    python bench/truth/predict.py [CORPUS.json] [--out bench/results/truth_predicted_DATE.json]

Split for fitting and validation: GPT rows are the fit set, Llama rows are held out (`split`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from autopar.costmodel import eager
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import evaluate
from autopar.hardware.presets import load_cluster
from autopar.model import ModelSource
from graphs.ir import INPUT, MATMUL, OUTPUT, VIEW

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "bench/results/truth_h200_2026-11-30.json"
# the same recipe with gradient accumulation (n_microbatches > 1): where a step's per-microbatch
# host cost comes apart from its once-per-step one (HOST_FSDP_S_PER_BLOCK, fit)
ACCUM_CORPUS = ROOT / "bench/results/truth_h200_accum_2026-11-30.json"
# the allocator study: the corpus's one-GPU rows again with expandable segments (memory_cap.py)
ALLOCATOR_STUDY = ROOT / "bench/results/allocator_expandable_h200_2026-12-01.json"
STRATEGIES = ("single", "ddp", "fsdp2", "tp", "pp")
# Rows whose measured peaks are not their own run's: the peak statistics were reset while the
# previous run's memory was still held (see README "Contaminated rows"); memory is not compared.
CONTAMINATED: dict[str, str] = {}
# fsdp2-gpt-1.3b-s1024-mb1 of the first two calls was one (its peaks were the previous run's); it
# is re-measured in call 3 and the old row kept under the corpus's "superseded_runs".
# A run that starts with more than this reserved by the caching allocator (the harness empties
# the cache between runs: 0.45 GiB or less on every other row that records it) lays its memory
# out around the previous run's segments, so its reserved peak is not its own.
RESERVED_AT_START_MAX_BYTES = 2**30


def contamination(row: dict[str, Any]) -> str | None:
    """Why a row's measured reserved peak is not its own run's, or None."""
    if row["id"] in CONTAMINATED:
        return CONTAMINATED[row["id"]]
    start = max(row.get("reserved_bytes_at_start_per_rank") or [row.get("reserved_bytes_at_start", 0)])
    if start > RESERVED_AT_START_MAX_BYTES:
        return (f"started with {start / 2**30:.1f} GiB reserved by the previous run (the harness empties the "
                f"cache between runs); its peak allocated is compared instead")
    return None


def usable(row: dict[str, Any]) -> bool:
    return not row.get("skipped") and not row.get("error") and not row.get("oom") and bool(row.get("step_s"))


def config_of(row: dict[str, Any]) -> tuple[Config3D, int]:
    """The plan's 3D configuration and global batch (sequences per step) of a measured run."""
    mb, rc, strategy = int(row["microbatch"]), row["recompute"], row["strategy"]
    nmb = int(row.get("n_microbatches", 1))        # accumulated before the optimizer
    if strategy == "single":
        return Config3D(1, 1, 1, mb, recompute=rc), mb * nmb
    if strategy == "ddp":
        return Config3D(2, 1, 1, mb, recompute=rc), 2 * mb * nmb
    if strategy == "fsdp2":
        return Config3D(2, 1, 1, mb, recompute=rc, zero=3), 2 * mb * nmb
    if strategy == "tp":
        return Config3D(1, 2, 1, mb, recompute=rc), mb
    if strategy == "pp":
        return Config3D(1, 1, 2, mb, recompute=rc, schedule="1f1b"), mb * int(row["n_microbatches"])
    raise ValueError(f"row {row['id']}: unknown strategy {strategy!r}")


def replicate_embedding_and_head(plan, graph):
    """The measured tp runs shard the blocks only: embedding, final norm, LM head and loss
    are replicated on both GPUs (bench/truth/README.md), not vocabulary-parallel as Megatron."""
    outer = set(graph.layers[0].nodes) | set(graph.layers[-1].nodes)
    stages = [replace(st, strategies={n: ("R" if n in outer else s) for n, s in st.strategies.items()})
              for st in plan.stages]
    return replace(plan, stages=stages)


def split(row: dict[str, Any]) -> str:
    """Fit on the GPT rows, hold the Llama rows out (another family: GQA, SwiGLU, 128K vocab)."""
    return "fit" if row["family"] == "gpt" else "held_out"


_SOURCES: dict[str, ModelSource] = {}


def predict_row(row: dict[str, Any]) -> dict[str, Any]:
    cfg, global_batch = config_of(row)
    cluster = load_cluster("dgx-h200", 1, int(row["n_gpus"]))
    src = _SOURCES.setdefault(row["model_spec"], ModelSource(row["model_spec"], seq=int(row["seq"])))
    plan = build_3d(src, cluster, global_batch, cfg)
    graph = src.graph(cfg.microbatch * cfg.dp)
    if row["strategy"] == "tp":
        plan = replicate_embedding_and_head(plan, graph)
    # the corpus ran the eager recipe (every block eager, tp too), its fsdp2 rows with autocast over
    # FSDP2's bf16 parameters (eager.autocast_over_bf16_params)
    # under the allocator the row ran with (the corpus's rows: the default segments)
    expandable = eager.expandable_segments(row.get("alloc_conf", ""))
    evaluated = evaluate(plan, graph, cluster, eager=True, zero_autocast=True, compiled=False,
                         expandable_segments=expandable)
    p = evaluated.predicted
    rebuild = ddp_rebuild_comparison(
        row["peak_allocated_bytes"], row["peak_reserved_bytes"], p,
        lambda: evaluate(plan, graph, cluster, eager=True, zero_autocast=True, compiled=False,
                         ddp_rebuild=False, expandable_segments=expandable).predicted)
    if rebuild:
        rebuild["measured_allocated_per_rank_bytes"] = row.get("peak_allocated_bytes_per_rank")
    if rebuild and rebuild["compared"] == "without":
        p = rebuild["steady"]
    step_err = (p.step_time_s - row["step_s"]) / row["step_s"]
    # The model's peak minus what lies outside the caching allocator (CUDA context, NCCL)
    # against the measured peak reserved.
    mem_err = (p.peak_reserved_bytes - row["peak_reserved_bytes"]) / row["peak_reserved_bytes"]
    # the terms' own error, before the allocator's reserve: predicted against measured peak allocated
    alloc_err = (p.peak_allocated_bytes - row["peak_allocated_bytes"]) / row["peak_allocated_bytes"]
    dirty = contamination(row)
    return {
        "id": row["id"], "model": row["model"], "family": row["family"], "strategy": row["strategy"],
        "n_gpus": row["n_gpus"], "microbatch": row["microbatch"], "seq": row["seq"],
        "n_microbatches": row["n_microbatches"], "recompute": row["recompute"], "split": split(row),
        "plan": cfg.label(),
        "measured_step_s": row["step_s"], "predicted_step_s": p.step_time_s, "step_error": step_err,
        "measured_peak_reserved_bytes": row["peak_reserved_bytes"],
        "measured_peak_allocated_bytes": row["peak_allocated_bytes"],
        "predicted_peak_reserved_bytes": p.peak_reserved_bytes, "predicted_peak_bytes": p.peak_memory_bytes,
        "predicted_peak_allocated_bytes": p.peak_allocated_bytes, "allocated_error": alloc_err,
        "memory_error": mem_err, "memory_safe": p.peak_reserved_bytes >= row["peak_reserved_bytes"],
        "memory_compared": dirty is None, "contaminated": dirty,
        # where the reserved peak is not comparable, the allocated one still is
        "allocated_safe": p.peak_allocated_bytes >= row["peak_allocated_bytes"],
        "measured_breakdown_s": row.get("breakdown_s", {}),
        "predicted_breakdown_s": dict(getattr(p, "breakdown_s", None) or {}),
        "predicted_memory_breakdown_bytes": dict(getattr(p, "memory_breakdown_bytes", None) or {}),
        "ddp_rebuild": {k: v for k, v in rebuild.items() if k != "steady"} if rebuild else None,
    }


def ddp_rebuild_comparison(measured_allocated_bytes: float, measured_reserved_bytes: float, p,
                           steady_prediction: Callable[[], Any]) -> dict[str, Any] | None:
    """A DDP run's measured peak against the model's two: the run's (`p`: step 2 holds DDP's
    first buckets beside the rebuilt ones at its activation peak, eager.ddp_rebuild_transient_bytes)
    and the steps' after it (`steady_prediction()`: the plan evaluated with ddp_rebuild=False).
    A harness that syncs after its first step lets NCCL's watchdog see that step's all-reduce
    finish before the second step's rebuild, or not: a race (bench/results/
    ddp_memory_h200_2026-12-01.txt: truth.py's sequence has the transient at gpt-1.3b mb4 and
    not at mb1 or gpt-2.6b mb4; the ranks of ddp-llama-3b's rows differ). So a row is compared
    with the peak its measured allocated is nearer to (`compared`), both errors kept beside it;
    None where the two peaks are one (no DDP, or the end of the backward is the peak)."""
    if not (p.memory_breakdown_bytes or {}).get("ddp_rebuild_transient"):
        return None
    steady = steady_prediction()
    compared = ("without" if measured_allocated_bytes < (p.peak_allocated_bytes + steady.peak_allocated_bytes) / 2
                else "with")

    def err(x: float, m: float) -> float:
        return (x - m) / m
    return {"compared": compared, "steady": steady,
            "predicted_allocated_with_bytes": p.peak_allocated_bytes,
            "predicted_allocated_without_bytes": steady.peak_allocated_bytes,
            "allocated_error_with": err(p.peak_allocated_bytes, measured_allocated_bytes),
            "allocated_error_without": err(steady.peak_allocated_bytes, measured_allocated_bytes),
            "memory_error_with": err(p.peak_reserved_bytes, measured_reserved_bytes),
            "memory_error_without": err(steady.peak_reserved_bytes, measured_reserved_bytes)}


def _op_counts(spec: str, seq: int) -> tuple[int, int, int]:
    """(linears with a weight, other launched ops, transformer blocks) of a whole model, as the
    evaluator counts them for the host's dispatch time."""
    g = _SOURCES.setdefault(spec, ModelSource(spec, seq=seq)).graph(1)
    nodes = [g.node(n) for layer in g.layers for n in layer.nodes]
    linears = sum(1 for n in nodes if n.kind == MATMUL and n.param_operands)
    other = sum(1 for n in nodes if n.kind not in (VIEW, INPUT, OUTPUT) and not (n.kind == MATMUL and n.param_operands))
    return linears, other, len(g.layers) - 2


def fit(corpus: Path, accum_corpus: Path = ACCUM_CORPUS) -> dict[str, float]:
    """The constants of autopar.costmodel.eager that are fitted, from the fit rows (GPT) only:
    those of `corpus`, and for FSDP2's per-microbatch host cost those of `accum_corpus` (steps
    of several microbatches)."""
    data = json.loads(corpus.read_text())
    rows = [r for r in data["runs"] if usable(r) and split(r) == "fit"]
    accum = [r for r in json.loads(accum_corpus.read_text())["runs"] if usable(r) and split(r) == "fit"]
    launch_s = ComputeModel(load_cluster("dgx-h200", 1, 1).gpu).launch_s
    adamw = [eager.ADAMW_BYTES_PER_PARAM * r["params"] / r["breakdown_s"]["optimizer"]
             for r in rows if r["strategy"] in ("single", "ddp")]
    # Host-bound single-GPU steps (the host's enqueue outlasts the GPU's step): step = host.
    base = {r["id"]: _op_counts(r["model_spec"], r["seq"]) for r in rows + accum}
    per_linear = [(r["step_s"] - base[r["id"]][1] * 2 * launch_s) / base[r["id"]][0] for r in rows
                  if r["strategy"] == "single" and r["host_enqueue_s"] >= r["step_s"]]
    a = statistics.median(per_linear)

    def host_bound_2gpu(r: dict[str, Any]) -> bool:
        """The GPU's own work (the profiled step's busy time less its exposed NCCL time, which on
        a host-bound step is waiting for the other rank) leaves a tenth of the step or more idle.
        Not the host's enqueue of one step: started on an idle GPU it misses the ranks' desync
        (tp-gpt-1.3b mb1: 453.6 ms steps, enqueue 393.8 / 345.4 ms, 24 ms of GPU compute)."""
        return r["gpu_busy_s"] - r["breakdown_s"]["exposed_comm"] < 0.9 * r["step_s"]

    def per_block(strategy: str, among: list[dict[str, Any]], less: float = 0.0) -> float:
        """Host seconds per block and microbatch beyond the ops on the host-bound rows of
        `strategy` among `among`, less `less`."""
        extra = []
        for r in among:
            if r["strategy"] == strategy and host_bound_2gpu(r):
                lin, other, blocks = base[r["id"]]
                nmb = int(r.get("n_microbatches", 1))
                extra.append((r["step_s"] / nmb - lin * a - other * 2 * launch_s) / blocks - less)
        return statistics.median(extra)
    # FSDP2 per microbatch from the accumulated steps; once per step, what the one-microbatch
    # steps leave beyond it
    fsdp_microbatch = per_block("fsdp2", accum)
    def overlap_slowdown() -> float:
        """The compute's slowdown per second of FSDP2 collective hidden behind it: on the
        device-bound GPT fsdp2 rows, the GPU's own work (profiled busy time less exposed NCCL
        time) beyond the model's compute, over the model's hidden collective time."""
        k = eager.COMM_OVERLAP_SLOWDOWN
        implied = []
        for r in rows:
            if r["strategy"] != "fsdp2" or host_bound_2gpu(r):
                continue
            p = predict_row(r)["predicted_breakdown_s"]
            if p["host"] > 0 or p["comm_overlap"] <= 0:
                continue
            # the GPU's busy time has no idle in it
            compute = sum(p.values()) - p["exposed_comm"] - p["comm_overlap"] - p.get("gpu_idle", 0.0)
            implied.append((r["gpu_busy_s"] - r["breakdown_s"]["exposed_comm"] - compute) / (p["comm_overlap"] / k))
        return statistics.median(implied)
    def gpu_idle() -> float:
        """The GPU's idle per block and microbatch, measured: on the device-bound GPT single and
        ddp rows, the profiled step's time with no kernel running (gpu_idle_profiled_s) less
        what the profiler added to the step (profiled_step_s - step_s), per block and
        microbatch; the median. (A pipeline's idle holds its bubble. Fitting the constant to the
        rows' residual instead finds 0.10-0.60 ms growing with the tokens per block: work the
        model misses, not idle.)"""
        per_block = []
        for r in rows:
            if r["strategy"] not in ("single", "ddp") or host_bound_2gpu(r):
                continue
            _, _, blocks = base[r["id"]]
            idle = r["gpu_idle_profiled_s"] - (r["profiled_step_s"] - r["step_s"])
            per_block.append(idle / (blocks * int(r.get("n_microbatches", 1))))
        return statistics.median(per_block)
    share = [r["breakdown_host_s"]["blocks_fwd"] / (r["breakdown_host_s"]["blocks_fwd"] + r["breakdown_host_s"]["blocks_bwd"])
             for r in rows if r["strategy"] == "single"]
    # The allocator's envelopes come from every row (both families) without recomputation: the
    # memory bound must hold on all of them (recomputed rows reserve more, but the model's
    # recompute working set over-counts their allocation by more).
    every = [r for r in data["runs"] if usable(r) and r["recompute"] == "none" and contamination(r) is None]
    reserve = [(r["peak_reserved_bytes"] - r["peak_allocated_bytes"]) / r["peak_allocated_bytes"] for r in every]
    return {"ADAMW_BYTES_PER_S_H200": statistics.median(adamw),
            "HOST_S_PER_LINEAR": a,
            "HOST_FORWARD_SHARE": statistics.median(share),
            "HOST_TP_S_PER_BLOCK": per_block("tp", rows),
            "HOST_FSDP_S_PER_BLOCK": fsdp_microbatch,
            "HOST_FSDP_STEP_S_PER_BLOCK": per_block("fsdp2", rows, less=fsdp_microbatch),
            "HOST_DDP_S_PER_BLOCK": per_block("ddp", rows),
            "COMM_OVERLAP_SLOWDOWN": overlap_slowdown(),
            "GPU_IDLE_S_PER_BLOCK": gpu_idle(),
            "RESERVE_FRACTION": max(x for x, r in zip(reserve, every) if r["strategy"] != "fsdp2")}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and max |error| of time and memory, per set (all, fit, held_out) and per strategy."""
    def stats(sel: list[dict[str, Any]]) -> dict[str, Any]:
        if not sel:
            return {"n": 0}
        t = [abs(r["step_error"]) for r in sel]
        mem = [r for r in sel if r["memory_compared"]]
        m = [abs(r["memory_error"]) for r in mem] or [0.0]
        margin = [r["memory_error"] for r in mem] or [0.0]
        a = [abs(r["allocated_error"]) for r in sel]
        return {"n": len(sel), "time_median": statistics.median(t), "time_max": max(t),
                "allocated_median": statistics.median(a), "allocated_max": max(a),
                "n_memory": len(mem), "memory_median": statistics.median(m), "memory_max": max(m),
                "memory_unsafe": sum(not r["memory_safe"] for r in mem),
                "memory_margin_min": min(margin), "memory_margin_median": statistics.median(margin)}
    out: dict[str, Any] = {"all": stats(rows)}
    for s in ("fit", "held_out"):
        out[s] = stats([r for r in rows if r["split"] == s])
    for s in STRATEGIES:
        out[s] = stats([r for r in rows if r["strategy"] == s])
    return out


def ranking(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per 2-GPU group (model, seq, microbatch per rank, recompute): the strategies ordered by
    measured and by predicted time per token. pp rows enter with their microbatch and count."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["n_gpus"] != 2:
            continue
        groups.setdefault((r["model"], r["seq"], r["microbatch"], r["recompute"]), []).append(r)
    out = []
    for key, sel in sorted(groups.items()):
        if len(sel) < 2:
            continue

        def per_token(r: dict[str, Any], which: str) -> float:
            tokens = r["microbatch"] * r["seq"] * r["n_microbatches"]
            tokens *= 2 if r["strategy"] in ("ddp", "fsdp2") else 1
            return r[f"{which}_step_s"] / tokens
        name = [f"{r['strategy']}" + (f"x{r['n_microbatches']}" if r["strategy"] == "pp" else "") for r in sel]
        measured = [name[i] for i in sorted(range(len(sel)), key=lambda i: per_token(sel[i], "measured"))]
        predicted = [name[i] for i in sorted(range(len(sel)), key=lambda i: per_token(sel[i], "predicted"))]
        out.append({"model": key[0], "seq": key[1], "microbatch": key[2], "recompute": key[3],
                    "measured": measured, "predicted": predicted, "same": measured == predicted})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'id':34s} {'meas ms':>8s} {'pred ms':>8s} {'err':>6s}  {'resv GiB':>8s} {'pred GiB':>8s} {'err':>6s}"
             f"  {'allc GiB':>8s} {'pred GiB':>8s} {'err':>6s}"]
    for r in rows:
        lines.append(f"{r['id']:34s} {r['measured_step_s'] * 1e3:8.1f} {r['predicted_step_s'] * 1e3:8.1f} "
                     f"{r['step_error']:+6.1%}  {r['measured_peak_reserved_bytes'] / 2**30:8.1f} "
                     f"{r['predicted_peak_reserved_bytes'] / 2**30:8.1f} {r['memory_error']:+6.1%}  "
                     f"{r['measured_peak_allocated_bytes'] / 2**30:8.1f} "
                     f"{r['predicted_peak_allocated_bytes'] / 2**30:8.1f} {r['allocated_error']:+6.1%}")
    return "\n".join(lines)


def rebuild_table(rows: list[dict[str, Any]]) -> str:
    """The ddp rows against both of the model's peaks (`ddp_rebuild_comparison`)."""
    lines = ["\nddp rows, allocated against the peak with DDP's first buckets in step 2 (a run's) and without "
             "(the steps after it); the row is compared with the nearer (*):",
             f"{'id':34s} {'meas GiB':>8s} {'with':>8s} {'err':>6s}  {'without':>8s} {'err':>6s}  per rank GiB"]
    for r in rows:
        d = r.get("ddp_rebuild")
        if not d:
            continue
        ranks = ", ".join(f"{b / 2**30:.1f}" for b in d.get("measured_allocated_per_rank_bytes") or [])
        lines.append(f"{r['id']:34s} {r['measured_peak_allocated_bytes'] / 2**30:8.1f} "
                     f"{d['predicted_allocated_with_bytes'] / 2**30:8.1f} {d['allocated_error_with']:+6.1%}"
                     f"{'*' if d['compared'] == 'with' else ' '} "
                     f"{d['predicted_allocated_without_bytes'] / 2**30:8.1f} {d['allocated_error_without']:+6.1%}"
                     f"{'*' if d['compared'] == 'without' else ' '} {ranks}")
    return "\n".join(lines)


def buckets(rows: list[dict[str, Any]]) -> str:
    """Measured vs predicted buckets (ms) of the parts both sides name."""
    keys = ("blocks", "head_loss", "embedding", "optimizer", "exposed_comm", "comm_overlap", "host", "other")
    lines = [f"{'id':34s} " + " ".join(f"{k[:10]:>15s}" for k in keys) + "   (measured/predicted ms)"]
    for r in rows:
        m, p = r["measured_breakdown_s"], r["predicted_breakdown_s"]
        cells = []
        for k in keys:
            pv = p.get(k)
            cells.append(f"{m.get(k, 0) * 1e3:7.1f}/" + (f"{pv * 1e3:<7.1f}" if pv is not None else f"{'-':<7s}"))
        lines.append(f"{r['id']:34s} " + " ".join(cells))
    return "\n".join(lines)


def expandable_rows(study: Path = ALLOCATOR_STUDY) -> list[dict[str, Any]]:
    """The corpus's one-GPU rows run again with expandable segments (the allocator study: its
    native rows, with their peaks; those it printed in GiB only, to 0.1 GiB), each as its stored
    row with those peaks and the allocator configuration it ran with."""
    data = json.loads(study.read_text())
    stored = {r["id"]: r for path in (CORPUS, ACCUM_CORPUS) for r in json.loads(path.read_text())["runs"]}
    peaks = [(r["id"], r["peak_allocated_bytes"], r["peak_reserved_bytes"]) for r in data["native_single_expandable"]
             if not r.get("oom")]
    peaks += [(r["id"], r["allocated_gib"] * 2**30, r["reserved_gib"] * 2**30)
              for r in data["native_single_expandable_printed"]]
    # each ran alone in new processes (one id per run_all.py call): nothing reserved at its start
    start = ("reserved_bytes_at_start", "reserved_bytes_at_start_per_rank")
    return [{**{k: v for k, v in stored[i].items() if k not in start}, "peak_allocated_bytes": a,
             "peak_reserved_bytes": res, "alloc_conf": eager.ALLOC_CONF} for i, a, res in peaks]


def run(corpus: Path, ids: set[str] | None = None) -> dict[str, Any]:
    """Predict the usable rows of `corpus` (those named in `ids`, if given)."""
    data = json.loads(corpus.read_text())
    rows = [predict_row(r) for r in data["runs"] if usable(r) and (ids is None or r["id"] in ids)]
    return {"corpus": str(corpus.relative_to(ROOT)) if corpus.is_relative_to(ROOT) else str(corpus),
            "gpu": data["gpu"], "torch": data["torch"], "date": data["date"],
            "cluster": "dgx-h200 --nodes 1 --gpus-per-node 1|2",
            "error": "(predicted - measured) / measured; memory against peak reserved",
            "split": "fit: family gpt; held_out: family llama",
            "summary": summarize(rows), "ranking": ranking(rows), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="?", default=str(CORPUS))
    ap.add_argument("--out", help="write the JSON here (e.g. bench/results/truth_predicted_DATE.json)")
    ap.add_argument("--buckets", action="store_true", help="also print the breakdown buckets per row")
    ap.add_argument("--fit", action="store_true", help="print the fitted constants of autopar.costmodel.eager")
    ap.add_argument("--attention-rows", metavar="FILE", help="a what-if: price attention with FILE's rows (a "
                    "bench/results attention file, e.g. attention_default_h200_2026-12-01.json: SDPA's own backend) "
                    "instead of the shipped profile's")
    ap.add_argument("--expandable", action="store_true", help="the one-GPU rows run again with expandable "
                    "segments (bench/results/allocator_expandable_h200_2026-12-01.json): memory only")
    args = ap.parse_args(argv)
    if args.attention_rows:
        if not Path(args.attention_rows).is_file():
            ap.error(f"--attention-rows {args.attention_rows}: no such file")
        from predict_runs import use_attention_rows
        use_attention_rows(Path(args.attention_rows))
    if args.expandable:
        rows = [predict_row(r) for r in expandable_rows()]
        for r in rows:
            print(f"{r['id']:34s} reserved measured {r['measured_peak_reserved_bytes'] / 2**30:6.1f} GiB, predicted "
                  f"{r['predicted_peak_reserved_bytes'] / 2**30:6.1f} GiB, error {r['memory_error']:+6.1%}")
        s = summarize(rows)["all"]
        print(f"{s['n_memory']} rows: memory median {s['memory_median']:.1%}, max {s['memory_max']:.1%}, "
              f"least margin {s['memory_margin_min']:+.1%}, predicted short {s['memory_unsafe']}")
        return 0
    if args.fit:
        for name, value in fit(Path(args.corpus)).items():
            print(f"{name:24s} fitted {value:.4g}   in eager.py {getattr(eager, name):.4g}")
        return 0
    res = run(Path(args.corpus))
    print(table(res["rows"]))
    print(rebuild_table(res["rows"]))
    if args.buckets:
        print(buckets(res["rows"]))
    print(f"\n{'set':10s} {'n':>3s} {'time med':>9s} {'time max':>9s} {'n mem':>5s} {'mem med':>8s} {'mem max':>8s} "
          f"{'unsafe':>6s} {'min margin':>10s} {'med margin':>10s} {'allc med':>8s} {'allc max':>8s}")
    for name, s in res["summary"].items():
        if s["n"]:
            print(f"{name:10s} {s['n']:3d} {s['time_median']:9.1%} {s['time_max']:9.1%} {s['n_memory']:5d} "
                  f"{s['memory_median']:8.1%} {s['memory_max']:8.1%} {s['memory_unsafe']:6d} "
                  f"{s['memory_margin_min']:+10.1%} {s['memory_margin_median']:+10.1%} "
                  f"{s['allocated_median']:8.1%} {s['allocated_max']:8.1%}")
    for r in res["rows"]:
        if r["contaminated"]:
            print(f"memory not compared: {r['id']}: {r['contaminated']}")
    print("\nranking on 2 GPUs (fastest first, time per token):")
    for g in res["ranking"]:
        print(f"  {g['model']} s{g['seq']} mb{g['microbatch']} {g['recompute']}: measured {g['measured']} "
              f"predicted {g['predicted']} {'ok' if g['same'] else 'DIFFERENT'}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
