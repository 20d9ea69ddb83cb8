"""The `autopar` command line: inspect, evaluate, shard, plan, show, compare, profile, run."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path


def _cluster_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--cluster", default="p3.16xlarge", help="preset (p3.16xlarge, dgx-a100, dgx-h100, dgx-h200) "
                                                              "or a .yaml/.json file")
    p.add_argument("--nodes", type=int, help="override the preset's node count")
    p.add_argument("--gpus-per-node", type=int, help="override the preset's GPUs per node")


def _dtype_arg(p):
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="training dtype (default: bf16 where the GPU has it, else fp16)")


def _write_new(path: str, text: str, force: bool) -> None:
    """Never overwrite a user's file silently."""
    p = Path(path)
    if p.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    p.write_text(text)


def cmd_inspect(a) -> int:
    import graphs
    g = graphs.load(a.model, batch=a.batch, seq=a.seq)
    s = graphs.summarize(g)
    if a.json:
        print(json.dumps(s, indent=1, sort_keys=True, default=str))
        return 0
    print(f"model {s.get('name', a.model)}: {s['params']:,} parameters ({s['params'] / 1e9:.3f} B)")
    print(f"forward FLOPs at batch {g.batch}, seq {g.seq}: {s['forward_flops']:.4g}")
    print(f"layers {s['layers']}, nodes {s['nodes']}, distinct layer kinds {s['distinct_layer_kinds']}")
    print("op kinds: " + ", ".join(f"{k} {v}" for k, v in s["op_kind_histogram"].items()))
    if s.get("unsupported"):
        print("ops without a sharding rule (costed as replicated): " + ", ".join(map(str, s["unsupported"])))
    return 0


def cmd_evaluate(a) -> int:
    from autopar.evaluation.baselines import Config3D, build_3d
    from autopar.evaluation.evaluator import memory_report
    from autopar.hardware.presets import load_cluster

    from .model import ModelSource
    from .report import plan_summary
    cl = load_cluster(a.cluster, a.nodes, a.gpus_per_node)
    dtype = cl.gpu.training_dtype(a.dtype)
    src = ModelSource(a.model, dtype=dtype)
    cfg = Config3D(a.dp, a.tp, a.pp, a.microbatch, a.recompute, a.schedule, a.virtual_stages, a.zero)
    t0 = time.perf_counter()
    plan = build_3d(src, cl, a.global_batch, cfg, dtype)
    if a.json:
        print(plan.to_json(), end="")
    else:
        print(plan_summary(plan))
        print(f"(evaluated in {time.perf_counter() - t0:.2f} s)")
    if not plan.predicted["fits"]:
        print("plan does not fit in memory:\n" + memory_report(plan), file=sys.stderr)
    return 0


def cmd_shard(a) -> int:
    import graphs
    from autopar.costmodel.compute import ComputeModel
    from autopar.hardware.mesh import Mesh, Submesh
    from autopar.hardware.presets import load_cluster
    from autopar.sharding.stage_problem import Settings, StageProblem
    from graphs.query import main_boundary

    from .report import fmt_s, gib
    cl = load_cluster(a.cluster, a.nodes, a.gpus_per_node)
    try:
        d0, d1 = (int(x) for x in a.mesh.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh must look like 2x4 (got {a.mesh!r})") from None
    n = d0 * d1
    if n > cl.n_gpus:
        raise ValueError(f"mesh {a.mesh} needs {n} GPUs; cluster {cl.name} has {cl.n_gpus}")
    m = cl.gpus_per_node
    if n <= m and n & (n - 1) == 0:
        sub = Submesh(1, n)
    elif n % m == 0:
        sub = Submesh(n // m, m)
    else:
        raise ValueError(f"mesh {a.mesh}: {n} devices is neither a power of two within a node nor whole nodes of {m}")
    g = graphs.load(a.model, batch=a.batch, seq=a.seq, dtype=cl.gpu.training_dtype(a.dtype))
    L = len(g.layers)
    i, j = 0, L
    if a.layers:
        try:
            i, j = (int(x) if x else d for x, d in zip(a.layers.split(":"), (0, L)))
        except ValueError:
            raise ValueError(f"--layers must look like 3:7 (got {a.layers!r})") from None
        if not (0 <= i < j <= L):
            raise ValueError(f"--layers {a.layers}: the model has layers 0..{L - 1}")
    names = [n for li in range(i, j) for n in g.layers[li].nodes]
    mesh = Mesh(cl, sub, (d0, d1))
    dtype = cl.gpu.training_dtype(a.dtype)
    cm = ComputeModel(cl.gpu, dtype)
    settings = Settings(n_microbatches=a.microbatches, zero=a.zero)
    t0 = time.perf_counter()
    if a.memory_limit:
        # One ILP over the whole range: the memory constraint couples the layers.
        src = main_boundary(g, names)
        bspec = {src: tuple([1 if d0 > 1 and g.node(src).out_shape[0] % d0 == 0 else 0]
                            + [0] * (len(g.node(src).out_shape) - 1))} if src else None
        prob = StageProblem(g, names, mesh, cm, boundary=bspec)
        res = prob.solve(settings, mem_budget_bytes=cl.gpu.memory_bytes, time_limit_s=a.time_limit)
        if res.choice is None:
            raise ValueError(f"no sharding of layers {i}:{j} on mesh {a.mesh} fits in "
                             f"{gib(cl.gpu.memory_bytes)} ({res.status})")
        choice, status = res.choice, res.status
        ilp = {"ilps": 1, "variables_before": res.n_variables_before, "variables": res.n_variables}
    else:
        from autopar.search.planner import solve_stage
        sol = solve_stage(g, (i, j), mesh, cm, settings, time_limit_s=a.time_limit)
        src = main_boundary(g, names)
        bspec = {src: sol.input_spec} if src else None
        prob = StageProblem(g, names, mesh, cm, boundary=bspec)
        choice = prob.choice_from_names(sol.strategies)
        st = sol.stats
        status = ",".join(sorted(st.statuses)) or "optimal"
        ilp = {"ilps": st.ilps, "cache_hits": st.cache_hits, "variables_before": st.ilp_vars_before,
               "variables": st.ilp_vars_after}
    solve_s = time.perf_counter() - t0
    ev = prob.evaluate(choice, settings, with_ops=True)
    out = {"mesh": [d0, d1], "layers": [i, j], "status": status, "solve_time_s": solve_s, "ilp": ilp,
           "objective_s": ev.per_microbatch_s + ev.sync_s / a.microbatches,
           "fwd_s": ev.fwd_s, "bwd_s": ev.bwd_s, "comm_s": ev.comm_s, "grad_sync_s": ev.sync_s,
           "param_state_bytes": ev.param_state_bytes(a.zero), "stash_bytes_per_microbatch": ev.stash_bytes,
           "ops": ev.ops}
    if a.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    print(f"{'op':<34} {'kind':<11} {'strategy':<22} {'out spec':<10} {'compute':>10} {'comm':>10}")
    for o in ev.ops:
        if not a.all and o["kind"] in ("view",) and o["comm_s"] == 0:
            continue
        print(f"{o['name'][:34]:<34} {o['kind']:<11} {o['strategy'][:22]:<22} {o['out_spec']:<10} "
              f"{fmt_s(o['compute_s']):>10} {fmt_s(o['comm_s']):>10}")
    print(f"\nstage layers {i}:{j} on mesh {d0}x{d1} ({status}; {ilp['ilps']} ILP(s) in {solve_s:.2f} s"
          + (f", {ilp['cache_hits']} layers reused" if "cache_hits" in ilp else "")
          + f"; ILP variables {ilp['variables_before']} -> {ilp['variables']} after shrinking)")
    print(f"per microbatch: forward {fmt_s(ev.fwd_s)}, backward {fmt_s(ev.bwd_s)}, of which communication "
          f"{fmt_s(ev.comm_s)}; gradient sync per step {fmt_s(ev.sync_s)}")
    print(f"memory per device: weights+grads+optimizer {gib(ev.param_state_bytes(a.zero))}, activations "
          f"{gib(ev.stash_bytes)} per microbatch in flight")
    return 0


def cmd_plan(a) -> int:
    from autopar.search.planner import plan

    from .report import plan_summary
    mb = a.microbatches if a.microbatches == "auto" else int(a.microbatches)
    if a.output and Path(a.output).exists() and not a.force:
        raise FileExistsError(f"{a.output} already exists; pass --force to overwrite it")
    t0 = time.perf_counter()
    p = plan(a.model, a.cluster, nodes=a.nodes, gpus_per_node=a.gpus_per_node, global_batch=a.global_batch,
             microbatches=mb, schedule=a.schedule, max_stages=a.max_stages, dtype=a.dtype,
             progress=sys.stderr.isatty(), zero=a.zero)
    elapsed = time.perf_counter() - t0
    text = p.to_json()
    if a.output:
        _write_new(a.output, text, a.force)
        print(plan_summary(p))
        print(f"\nwrote {a.output} (planned in {elapsed:.1f} s)")
    else:
        print(text, end="")
        print(f"planned in {elapsed:.1f} s", file=sys.stderr)
    return 0


def cmd_show(a) -> int:
    from .plan import Plan
    from .report import plan_summary
    p = Plan.from_json(a.plan)
    print(plan_summary(p))
    if a.gantt:
        from .report import gantt
        gantt(p, a.gantt)
        print(f"wrote {a.gantt}")
    return 0


def cmd_compare(a) -> int:
    from autopar.compare import STRATEGIES, compare, summarize_rows, why_winner

    from .report import compare_plot, gib
    strategies = [s.strip() for s in a.strategies.split(",")] if a.strategies else list(STRATEGIES)
    for path in (a.json, a.plot, a.csv):
        if path and Path(path).exists() and not a.force:
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    t0 = time.perf_counter()
    rows = compare(a.model, a.cluster, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                   global_batch=a.global_batch, strategies=strategies, dtype=a.dtype,
                   progress=sys.stderr.isatty())
    table = summarize_rows(rows)
    elapsed = time.perf_counter() - t0
    from rich.console import Console
    from rich.table import Table
    first = next((r.plan for r in rows if r.plan is not None), None)
    title = (f"{a.model} on {first.cluster['nodes']}x{first.cluster['gpus_per_node']} {first.cluster['gpu']}, "
             f"global batch {first.training['global_batch']}") if first else a.model
    t = Table(title=title)
    for c in ("strategy", "configuration", "step time", "tokens/s", "TFLOP/s/GPU", "MFU", "vs dp",
              "peak mem/GPU", "fits"):
        t.add_column(c, justify="left" if c in ("strategy", "configuration") else "right")
    for r in table:
        if "step_time_s" not in r:
            t.add_row(r["strategy"], r["error"][:60], "-", "-", "-", "-", "-", "-", "error")
            continue
        fits = "yes" if r["fits"] else "OOM"
        t.add_row(r["strategy"], r["config"][:60], f"{r['step_time_s']:.3f} s" if r["fits"] else "-",
                  f"{r['tokens_per_s']:,.0f}" if r["fits"] else "-",
                  f"{r['tflops_per_gpu']:.1f}" if r["fits"] else "-", f"{r['mfu']:.1%}" if r["fits"] else "-",
                  f"{r['speedup_vs_dp']:.2f}x" if r.get("speedup_vs_dp") else "-",
                  gib(r["peak_memory_bytes"]), fits if r["fits"] else
                  f"OOM (needs {r['peak_memory_bytes'] / 2**30:.1f} of {r['memory_limit_bytes'] / 2**30:.0f} GiB)")
    con = Console(width=160)
    con.print(t)
    con.print(why_winner(rows))
    con.print(f"(compared in {elapsed:.1f} s)")
    if a.json:
        doc = {"model": a.model, "rows": table, "why": why_winner(rows),
               "plans": {r.strategy: r.plan.to_dict() for r in rows if r.plan is not None}}
        _write_new(a.json, json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n", a.force)
    if a.csv:
        keys = ["strategy", "config", "step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "speedup_vs_dp",
                "peak_memory_bytes", "fits", "error"]
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(table)
    if a.plot:
        fit = [r for r in rows if r.fits]
        best = max(fit, key=lambda r: (round(r.throughput(), 6), r.strategy == "auto")).plan if fit else None
        compare_plot(table, best, a.plot, title)
    return 0


def cmd_profile(a) -> int:
    from autopar.profiling.gpu import main as profile_main
    return profile_main(a.rest)


def cmd_run(a) -> int:
    from .runtime.launch import main as run_main
    return run_main(a.rest)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autopar", description="Automatic parallelization planner for training "
                                                             "transformers (Alpa-style).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("inspect", help="parameters, FLOPs, layers and op kinds of a model")
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("evaluate", help="predict a hand-made Megatron-style (dp, tp, pp) plan")
    p.add_argument("model")
    _cluster_args(p)
    _dtype_arg(p)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--dp", type=int, required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--microbatch", type=int, required=True, help="micro-batch size per data-parallel rank")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe", "interleaved"])
    p.add_argument("--virtual-stages", type=int, default=1)
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("shard", help="the intra-op ILP for one stage on one logical mesh")
    p.add_argument("model")
    _cluster_args(p)
    _dtype_arg(p)
    p.add_argument("--mesh", required=True, help="logical mesh, e.g. 2x4")
    p.add_argument("--layers", help="layer range i:j (default: all)")
    p.add_argument("--batch", type=int, default=8, help="microbatch size")
    p.add_argument("--seq", type=int)
    p.add_argument("--microbatches", type=int, default=1, help="microbatches per step (amortises grad sync)")
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--memory-limit", action="store_true", help="constrain memory to the GPU's")
    p.add_argument("--time-limit", type=float, default=30.0)
    p.add_argument("--all", action="store_true", help="also list views")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_shard)

    p = sub.add_parser("plan", help="search the best parallel plan (inter-op DP + intra-op ILP)")
    p.add_argument("model")
    _cluster_args(p)
    _dtype_arg(p)
    p.add_argument("--global-batch", type=int)
    p.add_argument("--microbatches", default="auto", help="auto, or a number of microbatches")
    p.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    p.add_argument("--max-stages", type=int)
    p.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("-o", "--output", help="write the plan JSON here (default: print it)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("show", help="summarise a plan file")
    p.add_argument("plan")
    p.add_argument("--gantt", help="draw the pipeline schedule to this PNG")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("compare", help="dp vs zero vs tp vs pp vs 3d vs auto on one cluster")
    p.add_argument("model")
    _cluster_args(p)
    _dtype_arg(p)
    p.add_argument("--global-batch", type=int)
    p.add_argument("--strategies", help="comma-separated subset of dp,zero1,zero2,zero3,tp,pp,3d,inter-only,"
                                        "intra-only,auto")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--csv")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("profile", help="measure this machine's GPU into a profile JSON", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("run", help="run a plan with torch.distributed", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `run` and `profile` own their options (argparse's REMAINDER would reject `run --help`
    # or an option before the plan file), so they get the rest of the line untouched.
    if argv and argv[0] in ("run", "profile"):
        try:
            if argv[0] == "run":
                from .runtime.launch import main as sub_main
            else:
                from autopar.profiling.gpu import main as sub_main
            return sub_main(argv[1:]) or 0
        except (ValueError, FileExistsError, FileNotFoundError) as e:
            print(f"autopar: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        # Our errors (ClusterError, PlanError, graphs' errors) are ValueErrors that say what to do.
        print(f"autopar: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
