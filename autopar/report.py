"""Human-readable summaries and plots of plans and comparisons."""

from __future__ import annotations

from typing import Any

from .plan import Plan


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def fmt_s(x: float) -> str:
    if x is None:
        return "-"
    if x >= 1:
        return f"{x:.3f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.2f} ms"
    return f"{x * 1e6:.1f} us"


def plan_summary(plan: Plan) -> str:
    pr, tr = plan.predicted, plan.training
    lines = [f"plan: {plan.strategy} ({plan.config.get('label', '')})",
             f"model: {plan.model['name']}  params {plan.model['params'] / 1e9:.2f}B  seq {plan.model['seq']}",
             f"cluster: {plan.cluster['name']}  {plan.cluster['nodes']} x {plan.cluster['gpus_per_node']} "
             f"{plan.cluster['gpu']}",
             f"training: global batch {tr['global_batch']} = {tr['n_microbatches']} microbatches x "
             f"{tr['microbatch_size']}, {tr['dtype']}, schedule {tr['schedule']}"
             + (f" x{tr.get('virtual_stages', 1)}" if tr['schedule'] == 'interleaved' else '')
             + f", ZeRO-{tr['zero']}", ""]
    lines.append(f"{'stage':>5} {'layers':>9} {'devices':>12} {'mesh':>6} {'recompute':>9} "
                 f"{'fwd+bwd/mb':>11} {'memory':>11}")
    for s in plan.stages:
        ids = s.device_ids
        devs = f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ",".join(map(str, ids[:4])) + "..."
        lines.append(f"{s.index:>5} {f'{s.layers[0]}-{s.layers[1] - 1}':>9} {devs:>12} "
                     f"{f'{s.logical_mesh[0]}x{s.logical_mesh[1]}':>6} {s.recompute:>9} {fmt_s(s.t_intra_s):>11} "
                     f"{gib(s.memory.get('total_bytes', 0)):>11}")
    lines += ["", f"predicted step time {fmt_s(pr['step_time_s'])}, {pr['tokens_per_s']:,.0f} tokens/s, "
                  f"{pr['tflops_per_gpu']:.1f} TFLOP/s per GPU, MFU {pr['mfu']:.1%}",
              f"bubble {pr['bubble_fraction']:.1%}, gradient sync {fmt_s(pr['grad_sync_s'])}, "
              f"optimizer {fmt_s(pr['optimizer_s'])}, point-to-point {fmt_s(pr['p2p_s'])}",
              f"peak memory {gib(pr['peak_memory_bytes'])} of {gib(pr['memory_limit_bytes'])}: "
              + ("fits" if pr["fits"] else "DOES NOT FIT")]
    if plan.search:
        s, t = plan.search, plan.timing
        line = (f"search: {s.get('ilps', 0)} ILPs solved, {s.get('cache_hits', 0)} layer solutions reused; "
                f"solver statuses {s.get('statuses', {})}")
        if t:
            line += (f"; seconds summed over workers: trace {t.get('trace_time_s', 0):.1f}, stage tables "
                     f"{t.get('table_time_s', 0):.1f} (ILPs {t.get('ilp_time_s', 0):.1f}), DP "
                     f"{t.get('dp_time_s', 0):.1f}, evaluation {t.get('eval_time_s', 0):.1f}")
        lines.append(line)
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def gantt(plan: Plan, path: str | None = None, ax=None) -> None:
    """Draw the simulated pipeline schedule of a plan, one row per pipeline rank: to `path`,
    or onto a given matplotlib axis."""
    from autopar.evaluation.pipeline import simulate
    plt = _plt()
    tr = plan.training
    v = int(tr.get("virtual_stages", 1) or 1) if tr["schedule"] == "interleaved" else 1
    st = plan.stages
    sched = simulate([s.fwd_s for s in st], [s.bwd_s for s in st], tr["n_microbatches"], tr["schedule"],
                     None, chunks=v)
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(12, 1 + 0.5 * (len(st) // v)))
    for op in sched.ops:
        color = "#4C72B0" if op.kind == "F" else "#DD8452"
        ax.barh(op.device, op.end_s - op.start_s, left=op.start_s, color=color, edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(st) // v))
    ax.set_yticklabels([f"stage {i}" for i in range(len(st) // v)])
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(f"{plan.strategy}: pipeline schedule ({tr['schedule']}, {tr['n_microbatches']} microbatches; "
                 f"blue forward, orange backward)", fontsize=9)
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def compare_plot(rows: list[dict[str, Any]], best_plan: Plan | None, path: str, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3 if best_plan is not None else 1, figsize=(18 if best_plan else 8, 4.5),
                             gridspec_kw={"width_ratios": [1.2, 1.6, 0.8]} if best_plan else None)
    ax = axes[0] if best_plan is not None else axes
    names = [r["strategy"] for r in rows]
    vals = [r.get("tokens_per_s", 0.0) or 0.0 for r in rows]
    colors = ["#55A868" if r["fits"] else "#C44E52" for r in rows]
    ax.bar(names, vals, color=colors)
    for i, r in enumerate(rows):
        if not r["fits"]:
            need = r.get("peak_memory_bytes")
            ax.text(i, max(vals) * 0.02 if max(vals) else 0.02, "OOM" + (f"\n{need / 2**30:.0f} GiB" if need else ""),
                    ha="center", va="bottom", color="#C44E52", fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    if best_plan is not None:
        st = best_plan.stages
        gantt(best_plan, ax=axes[1])
        mx = axes[2]
        mem = [s.memory.get("total_bytes", 0) / 2**30 for s in st]
        mx.bar(range(len(mem)), mem, color="#8172B2")
        mx.set_xticks(range(len(mem)))
        mx.axhline(best_plan.predicted["memory_limit_bytes"] / 2**30, color="#C44E52", linestyle="--")
        mx.set_xlabel("stage")
        mx.set_ylabel("GiB per GPU")
        mx.set_title("memory per device")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
