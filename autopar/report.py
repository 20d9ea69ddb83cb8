"""Human-readable summaries and plots of plans, models and comparisons.

Plans are read through `Plan.to_dict()` (the stable `autopar.plan/v1` form), so a plan loaded
from a hand-edited file with some predicted figures missing or null still prints ("-").
"""

from __future__ import annotations

from typing import Any

from autopar.costmodel import eager
from autopar.evaluation.pipeline import simulate

from .plan import Plan

# Above this many microbatches a schedule chart draws each rank's busy intervals instead of one
# bar per op (a thousand bars per row read as a barcode).
GANTT_OPS_PER_RANK = 64


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1:
        return f"{x:.3f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.2f} ms"
    return f"{x * 1e6:.1f} us"


def fmt_ms(x: float | None) -> str:
    """Milliseconds without decimals from 10 ms up (a breakdown's parts read side by side)."""
    if x is None:
        return "-"
    ms = x * 1e3
    return f"{ms:.0f} ms" if abs(ms) >= 10 or ms == 0 else f"{ms:.1f} ms"


# The memory breakdown's parts by the three things a user can change: the model state (ZeRO,
# fewer parameters per GPU), the activations (microbatch, recomputation, pipeline depth) and
# what the runtime keeps (allocator, workspaces, CUDA context, NCCL).
MEMORY_GROUPS = {
    "weights+grads+optimizer": ("weights_grads_optimizer", "ddp_buckets", "ddp_rebuild_transient", "autocast_cache",
                                "fsdp_buffers"),
    "activations": ("activations", "recompute_working", "cross_entropy"),
    "allocator/workspace": ("allocator_reserve", "fsdp_grad_pool", "cublas_workspace", "cuda_context", "nccl"),
}
_PART_NAMES = {"head_loss": "head+loss", "weights_grads_optimizer": "weights, grads, Adam", "activations": "stashed",
               "exposed_comm": "exposed comm", "cublas_workspace": "cuBLAS workspace", "nccl": "NCCL",
               "cuda_context": "CUDA context", "ddp_buckets": "DDP buckets",
               "ddp_rebuild_transient": "DDP's first buckets (step 2)", "fsdp_buffers": "FSDP buffers",
               "fsdp_grad_pool": "FSDP2 gradient pool"}


def _part_name(key: str) -> str:
    return _PART_NAMES.get(key, key.replace("_", " "))


def memory_groups(parts: dict[str, float]) -> dict[str, dict[str, float]]:
    """A memory breakdown's parts under MEMORY_GROUPS; parts no group names (a newer plan file
    read by older code) go to "other", so the groups always add up to the whole."""
    known = {k for keys in MEMORY_GROUPS.values() for k in keys}
    out = {g: {k: parts[k] for k in keys if k in parts} for g, keys in MEMORY_GROUPS.items()}
    rest = {k: v for k, v in parts.items() if k not in known}
    if rest:
        out["other"] = rest
    return {g: p for g, p in out.items() if p}


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _recompute(stage: dict) -> str:
    """A stage's recomputation: none, selective, full, or "full 3/7" where it recomputes the
    first 3 of its 7 layers (Megatron's block method)."""
    rc = stage.get("recompute", "none")
    k = stage.get("recompute_layers")
    if rc == "full" and k is not None:
        a, b = stage["layers"]
        return f"full {k}/{b - a}"
    return rc


def _devices(ids: list[int]) -> str:
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])
    return ",".join(map(str, ids[:4])) + ("..." if len(ids) > 4 else "")


def plan_summary(plan: Plan | dict[str, Any]) -> str:
    d = plan if isinstance(plan, dict) else plan.to_dict()
    pr, tr, m, c = d.get("predicted") or {}, d["training"], d["model"], d["cluster"]
    label = (d.get("config") or {}).get("label", "")
    interleaved = tr["schedule"] == "interleaved"
    lines = [f"plan: {d['strategy']}" + (f" ({label})" if label else ""),
             f"model: {m['name']}  params {m['params'] / 1e9:.2f}B  seq {m['seq']}",
             f"cluster: {c['name']}  {c['nodes']} x {c['gpus_per_node']} {c['gpu']}",
             f"training: global batch {tr['global_batch']} = {tr['n_microbatches']} microbatches x "
             f"{tr['microbatch_size']}, {tr['dtype']}, schedule {tr['schedule']}"
             + (f" x{tr.get('virtual_stages', 1)}" if interleaved else '')
             + f", ZeRO-{tr['zero']}", ""]
    lines.append(f"{'stage':>5} {'layers':>9} {'devices':>12} {'mesh':>6} {'recompute':>9} "
                 f"{'fwd+bwd/mb':>11} {'memory':>11}")
    for s in d["stages"]:
        a, b = s["layers"]
        lines.append(f"{s['index']:>5} {f'{a}-{b - 1}':>9} {_devices(s['device_ids']):>12} "
                     f"{'{}x{}'.format(*s['logical_mesh']):>6} {_recompute(s):>9} "
                     f"{fmt_s(s.get('t_intra_s')):>11} {gib((s.get('memory') or {}).get('total_bytes')):>11}")
    for s in d["stages"]:
        if s.get("sharded_storage"):
            lines.append(f"stage {s['index']}: parameters stored sharded (ZeRO-3) in a ZeRO-{tr['zero']} stage: "
                         + ", ".join(s["sharded_storage"]))
    if interleaved:
        lines.append("(interleaved: stage k runs on the devices of stage k mod ranks; the memory column is per "
                     "chunk, the peak below is per GPU)")
    lines.append("")
    if not pr:
        lines.append("no prediction in this plan (evaluate it: autopar evaluate, or autopar.evaluate)")
    else:
        fits = pr.get("fits")
        lines += [f"predicted step time {fmt_s(pr.get('step_time_s'))}, {_num(pr.get('tokens_per_s'), ',.0f')} "
                  f"tokens/s, {_num(pr.get('tflops_per_gpu'), '.1f')} TFLOP/s per GPU, MFU {_num(pr.get('mfu'), '.1%')}",
                  f"bubble {_num(pr.get('bubble_fraction'), '.1%')}, gradient sync {fmt_s(pr.get('grad_sync_s'))}, "
                  f"optimizer {fmt_s(pr.get('optimizer_s'))}, point-to-point {fmt_s(pr.get('p2p_s'))}",
                  f"peak memory per GPU {gib(pr.get('peak_memory_bytes'))} of {gib(pr.get('memory_limit_bytes'))}: "
                  + ("fits" if fits else "DOES NOT FIT" if fits is not None else "unknown")]
        # Where the time and the memory go (absent from plans written before issue 13).
        if pr.get("breakdown_s"):
            lines.append("step time (slowest GPU): " + ", ".join(f"{_part_name(k)} {fmt_ms(v)}"
                                                                for k, v in pr["breakdown_s"].items()))
        if pr.get("memory_breakdown_bytes"):
            lines.append("memory (fullest GPU): " + "; ".join(
                f"{group} {gib(sum(parts.values()))}"
                + (" (" + ", ".join(f"{_part_name(k)} {gib(v)}" for k, v in parts.items() if v) + ")"
                   if sum(1 for v in parts.values() if v) > 1 else "")
                for group, parts in memory_groups(pr["memory_breakdown_bytes"]).items()))
    search = d.get("search") or {}
    if search:
        line = (f"search: {search.get('ilps', 0)} ILPs solved, {search.get('cache_hits', 0)} layer solutions "
                f"reused; solver statuses {search.get('statuses', {})}")
        t = getattr(plan, "timing", None) or {}
        if t:
            line += (f"; seconds summed over workers: trace {t.get('trace_time_s', 0):.1f}, stage tables "
                     f"{t.get('table_time_s', 0):.1f} (ILPs {t.get('ilp_time_s', 0):.1f}), DP "
                     f"{t.get('dp_time_s', 0):.1f}, evaluation {t.get('eval_time_s', 0):.1f}")
        lines.append(line)
    return "\n".join(lines)


def inspect_table(s: dict[str, Any]) -> str:
    """`autopar inspect`: the model in a few lines and one row per run of identical layers."""
    meta = s.get("meta") or {}
    shape = ", ".join(f"{k} {meta[k]}" for k in ("family", "hidden", "layers", "heads", "kv_heads", "ffn", "vocab",
                                                  "experts") if meta.get(k) not in (None, "", 0))
    lines = [f"model {s['name']}: {s['params']:,} parameters ({s['params'] / 1e9:.3f} B), "
             f"{s['param_bytes'] / 2**30:.2f} GiB of weights in {s.get('dtype') or '?'}"]
    if shape:
        lines.append(f"config: {shape}")
    per_token = s.get("forward_flops_per_token")
    lines.append(f"FLOPs at batch {s['batch']}, seq {s['seq']}: forward {s['forward_flops']:.4g}, backward "
                 f"{s['backward_flops']:.4g}" + (f" ({per_token:.4g} forward per token)" if per_token else ""))
    lines.append(f"graph: {s['nodes']} ops, {s['layers']} layers, {s['distinct_layer_kinds']} distinct layer kinds")
    lines += ["", f"{'layers':>11}  {'name':<24} {'ops':>5} {'params':>14} {'fwd FLOPs':>11}"]
    runs: list[list[dict]] = []
    for row in s["layer_table"]:
        if runs and runs[-1][0]["structural_hash"] == row["structural_hash"]:
            runs[-1].append(row)
        else:
            runs.append([row])
    for run in runs:
        first, last = run[0], run[-1]
        idx = str(first["index"]) if len(run) == 1 else f"{first['index']}-{last['index']}"
        name = first["name"] if len(run) == 1 else f"{first['name']} .. {last['name']}"
        each = " each" if len(run) > 1 else ""
        lines.append(f"{idx:>11}  {name[:24]:<24} {first['nodes']:>5} {first['params']:>14,} "
                     f"{first['fwd_flops']:>11.4g}{each}")
    lines += ["", "op kinds: " + ", ".join(f"{k} {v}" for k, v in s["op_kind_histogram"].items())]
    bad = s.get("unsupported") or []
    if bad:
        names = [str(u.get("target") or u.get("op")) for u in bad]
        lines.append(f"ops without a sharding rule (costed as replicated): {len(bad)}: "
                     + ", ".join(sorted(set(names))[:10]) + (" ..." if len(set(names)) > 10 else ""))
    lines.append("(--json prints everything, including each layer's structural hash)")
    return "\n".join(lines)


def memory_per_gpu(d: dict[str, Any]) -> list[float]:
    """Peak bytes on each pipeline rank's GPUs: an interleaved rank holds all its chunks'
    weights and stashes but recomputes one layer at a time, and for plans evaluated as the
    eager recipe the caching allocator's reserve, the CUDA context and NCCL come on top (as the
    evaluator counts it)."""
    tr, stages = d["training"], d["stages"]
    n_gpus = len({x for s in stages for x in s["device_ids"]})
    zero3 = tr.get("zero", 0) >= 3 and any(len(s["device_ids"]) > 1 for s in stages)
    v = tr.get("virtual_stages", 1) if tr["schedule"] == "interleaved" else 1
    ranks = max(1, len(stages) // v)
    held, work = [0.0] * ranks, [0.0] * ranks
    for i, s in enumerate(stages):
        mem = s.get("memory") or {}
        total, working = mem.get("total_bytes") or 0.0, mem.get("working_bytes") or 0.0
        held[i % ranks] += total - working
        work[i % ranks] = max(work[i % ranks], working)
    if not ((d.get("predicted") or {}).get("memory_breakdown_bytes") or {}).get("cuda_context"):
        return [h + w for h, w in zip(held, work)]           # not evaluated as the eager recipe
    return [eager.device_peak_bytes(h + w, zero3, n_gpus) for h, w in zip(held, work)]


def _plt():
    import matplotlib  # deferred: matplotlib takes a second to import and only plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def busy_intervals(ops, gap_s: float) -> dict[int, list[tuple[float, float, str]]]:
    """Per device, its ops merged into busy intervals (ops closer than gap_s join), each marked
    "F", "B" or "FB" by the kinds it holds: a schedule of thousands of ops drawn readably."""
    out: dict[int, list[tuple[float, float, str]]] = {}
    for op in sorted(ops, key=lambda o: (o.device, o.start_s)):
        rows = out.setdefault(op.device, [])
        if rows and op.start_s - rows[-1][1] <= gap_s:
            a, b, kinds = rows[-1]
            rows[-1] = (a, max(b, op.end_s), kinds if op.kind in kinds else "FB")
        else:
            rows.append((op.start_s, op.end_s, op.kind))
    return out


def gantt(plan: Plan, path: str | None = None, ax=None, fmt: str | None = None) -> None:
    """Draw the simulated pipeline schedule of a plan, one row per pipeline rank: to `path`,
    or onto a given matplotlib axis. Above GANTT_OPS_PER_RANK microbatches each rank's busy
    time is drawn as merged intervals (blue forward only, orange backward only, purple both)."""
    plt = _plt()
    d = plan.to_dict()
    tr, st = d["training"], d["stages"]
    v = int(tr.get("virtual_stages", 1) or 1) if tr["schedule"] == "interleaved" else 1
    sched = simulate([s.get("fwd_s") or 0.0 for s in st], [s.get("bwd_s") or 0.0 for s in st],
                     tr["n_microbatches"], tr["schedule"], None, chunks=v)
    ranks = len(st) // v
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(12, 1 + 0.5 * min(ranks, 64)))
    colors = {"F": "#4C72B0", "B": "#DD8452", "FB": "#8172B2"}
    many = tr["n_microbatches"] > GANTT_OPS_PER_RANK
    if many:
        for dev, rows in busy_intervals(sched.ops, sched.makespan_s / 2000).items():
            ax.broken_barh([(a, b - a) for a, b, _ in rows], (dev - 0.4, 0.8),
                           facecolors=[colors[k] for _, _, k in rows])
        note = "intervals merged: blue forward, orange backward, purple both"
    else:
        for op in sched.ops:
            ax.barh(op.device, op.end_s - op.start_s, left=op.start_s, color=colors[op.kind], edgecolor="white",
                    linewidth=0.3)
        note = "blue forward, orange backward"
    if ranks <= 32:
        ax.set_yticks(range(ranks))
        ax.set_yticklabels([f"rank {i}" for i in range(ranks)])
    ax.set_ylim(ranks - 0.5, -0.5)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("pipeline rank")
    ax.set_title(f"{d['strategy']}: pipeline schedule ({tr['schedule']}, {tr['n_microbatches']} microbatches, "
                 f"bubble {sched.bubble_fraction:.1%}; {note})", fontsize=9)
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=110, format=fmt)
        plt.close(fig)


def compare_plot(rows: list[dict[str, Any]], best_plan: Plan | None, path: str, title: str,
                 fmt: str | None = None) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3 if best_plan is not None else 1, figsize=(18 if best_plan else 8, 4.5),
                             gridspec_kw={"width_ratios": [1.2, 1.6, 0.8]} if best_plan else None)
    ax = axes[0] if best_plan is not None else axes
    names = [r["strategy"] for r in rows]
    vals = [r.get("tokens_per_s") or 0.0 for r in rows]
    colors = ["#55A868" if r["fits"] else "#C44E52" for r in rows]
    ax.bar(names, vals, color=colors)
    top = max(vals) if vals and max(vals) > 0 else 1.0
    for i, r in enumerate(rows):
        if not r["fits"]:
            need = r.get("peak_memory_bytes")
            ax.text(i, top * 0.02, "OOM" + (f"\n{need / 2**30:.0f} GiB" if need else ""),
                    ha="center", va="bottom", color="#C44E52", fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    if best_plan is not None:
        d = best_plan.to_dict()
        gantt(best_plan, ax=axes[1])
        mx = axes[2]
        mem = [b / 2**30 for b in memory_per_gpu(d)]
        mx.bar(range(len(mem)), mem, color="#8172B2")
        if len(mem) <= 32:
            mx.set_xticks(range(len(mem)))
        limit = (d.get("predicted") or {}).get("memory_limit_bytes")
        if limit:
            mx.axhline(limit / 2**30, color="#C44E52", linestyle="--", label="GPU memory")
            mx.legend(fontsize=8, loc="lower right")
        mx.set_xlabel("pipeline rank")
        mx.set_ylabel("GiB per GPU")
        mx.set_title("peak memory per GPU (all chunks of a rank)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format=fmt)
    plt.close(fig)
