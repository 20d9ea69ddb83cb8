"""The `autopar` command line: inspect, evaluate, shard, plan, show, compare, profile, run.

Bad input never gets a traceback: arguments are checked by the types in autopar.validation,
files by autopar.fileio, and every ValueError / OSError becomes one line
`autopar: error: ...` with exit code 2.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import io
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import graphs
from autopar.compare import STRATEGIES, compare, csv_rows, legend, summarize_rows, table_rows, why_winner
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.evaluation.evaluator import EAGER_DEFAULT, memory_report
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.profiling.gpu import main as profile_main
from autopar.search.planner import default_global_batch
from autopar.search.planner import plan as search_plan
from autopar.search.solve_stage import solve_stage
from autopar.sharding.stage_problem import Settings, StageProblem
from graphs.query import main_boundary

from .fileio import PathError, atomic_path, check_outputs, write_text
from .model import ModelSource
from .report import compare_plot, fmt_s, gantt, gib, inspect_table, plan_summary
from .validation import (
    MAX_GLOBAL_BATCH,
    MAX_GPUS,
    MAX_MICROBATCH_SIZE,
    MAX_MICROBATCHES,
    MAX_SEQ,
    MAX_TIME_LIMIT_S,
    check_plan,
    check_training,
    float_arg,
    int_arg,
    layer_range,
    load_plan,
    mesh_arg,
    microbatches_arg,
)

EXIT_BAD_INPUT = 2
PROGRESS_EVERY_S = 5.0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"autopar: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default in --help."""


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default="p3.16xlarge", help="preset (p3.16xlarge, dgx-a100, dgx-h100, dgx-h200) "
                                                              "or a .yaml/.json file")
    p.add_argument("--nodes", type=int_arg("--nodes", 1, MAX_GPUS),
                   help="override the preset's node count (default: the preset's)")
    p.add_argument("--gpus-per-node", type=int_arg("--gpus-per-node", 1, MAX_GPUS),
                   help="override the preset's GPUs per node, a power of two (default: the preset's)")


def _dtype_arg(p):
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="training dtype (default: bf16 where the GPU has it, else fp16)")


def _global_batch_arg(p):
    p.add_argument("--global-batch", type=int_arg("--global-batch", 1, MAX_GLOBAL_BATCH),
                   help=f"sequences per training step, at most {MAX_GLOBAL_BATCH:,} "
                        "(default: 16 per GPU, at least 8; 16 on one GPU)")


def _zero_arg(p, default: int) -> None:
    p.add_argument("--zero", type=int, default=default, choices=[0, 1, 2, 3],
                   help="ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also weights")


def _force_arg(p) -> None:
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


@contextlib.contextmanager
def _progress_lines(what: str) -> Iterator[None]:
    """On a terminal the planner draws rich's bar; in a log or CI job (stderr not a terminal)
    one line every few seconds says the search is alive and how long it has run."""
    if sys.stderr.isatty():
        yield
        return
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat() -> None:
        while not stop.wait(PROGRESS_EVERY_S):
            with contextlib.suppress(OSError, ValueError):
                print(f"autopar: {what}: {time.perf_counter() - t0:.0f} s so far", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _default_batch(cluster) -> int:
    return default_global_batch(cluster)


def cmd_inspect(a) -> int:
    g = graphs.load(a.model, batch=a.batch, seq=a.seq)
    s = graphs.summarize(g)
    if a.json:
        print(json.dumps(s, indent=1, sort_keys=True, default=str))
    else:
        print(inspect_table(s))
    return 0


def cmd_evaluate(a) -> int:
    cl = load_cluster(a.cluster, a.nodes, a.gpus_per_node)
    check_training(a.global_batch, cl.n_gpus)
    gb = a.global_batch or _default_batch(cl)
    dtype = cl.gpu.training_dtype(a.dtype)
    src = ModelSource(a.model, seq=a.seq, dtype=dtype)
    cfg = Config3D(a.dp, a.tp, a.pp, a.microbatch, a.recompute, a.schedule, a.virtual_stages, a.zero)
    t0 = time.perf_counter()
    plan = build_3d(src, cl, gb, cfg, dtype, eager=a.eager)
    d = plan.to_dict()
    check_plan(d)
    if a.json:
        print(plan.to_json(), end="")
    else:
        print(plan_summary(plan))
        print(f"(evaluated in {time.perf_counter() - t0:.2f} s)")
    if not d["predicted"].get("fits"):
        print("plan does not fit in memory:\n" + memory_report(plan), file=sys.stderr)
    return 0


def cmd_shard(a) -> int:
    cl = load_cluster(a.cluster, a.nodes, a.gpus_per_node)
    d0, d1 = a.mesh
    n = d0 * d1
    if n > cl.n_gpus:
        raise ValueError(f"mesh {d0}x{d1} needs {n} GPUs; cluster {cl.name} has {cl.n_gpus}")
    m = cl.gpus_per_node
    if n <= m and n & (n - 1) == 0:
        sub = Submesh(1, n)
    elif n % m == 0:
        sub = Submesh(n // m, m)
    else:
        raise ValueError(f"mesh {d0}x{d1}: {n} devices is neither a power of two within a node nor whole nodes of {m}")
    g = graphs.load(a.model, batch=a.batch, seq=a.seq, dtype=cl.gpu.training_dtype(a.dtype))
    L = len(g.layers)
    i, j = layer_range(a.layers, L) if a.layers else (0, L)
    names = [n for li in range(i, j) for n in g.layers[li].nodes]
    mesh = Mesh(cl, sub, (d0, d1))
    dtype = cl.gpu.training_dtype(a.dtype)
    cm = ComputeModel(cl.gpu, dtype)
    settings = Settings(n_microbatches=a.microbatches, zero=a.zero)
    if a.sharded_storage and not (a.memory_limit and a.zero in (1, 2)):
        raise ValueError("--sharded-storage needs --memory-limit and --zero 1 or 2")
    roots: frozenset[str] = frozenset()
    t0 = time.perf_counter()
    if a.memory_limit:
        # One ILP over the whole range: the memory constraint couples the layers.
        src = main_boundary(g, names)
        bspec = {src: tuple([1 if d0 > 1 and g.node(src).out_shape[0] % d0 == 0 else 0]
                            + [0] * (len(g.node(src).out_shape) - 1))} if src else None
        prob = StageProblem(g, names, mesh, cm, boundary=bspec)
        if a.sharded_storage:
            res, roots = prob.solve_storage(settings, mem_budget_bytes=cl.gpu.memory_bytes, time_limit_s=a.time_limit)
        else:
            res = prob.solve(settings, mem_budget_bytes=cl.gpu.memory_bytes, time_limit_s=a.time_limit)
        if res.choice is None:
            raise ValueError(f"no sharding of layers {i}:{j} on mesh {d0}x{d1} fits in "
                             f"{gib(cl.gpu.memory_bytes)} ({res.status})")
        choice, status = res.choice, res.status
        ilp = {"ilps": 1, "variables_before": res.n_variables_before, "variables": res.n_variables}
    else:
        sol = solve_stage(g, (i, j), mesh, cm, settings, time_limit_s=a.time_limit)
        src = main_boundary(g, names)
        entry: dict[str, Any] | None = {src: sol.input_spec} if src else None
        prob = StageProblem(g, names, mesh, cm, boundary=entry)
        choice = prob.choice_from_names(sol.strategies)
        st = sol.stats
        status = ",".join(sorted(st.statuses)) or "optimal"
        ilp = {"ilps": st.ilps, "cache_hits": st.cache_hits, "variables_before": st.ilp_vars_before,
               "variables": st.ilp_vars_after}
    solve_s = time.perf_counter() - t0
    ev = prob.evaluate(choice, settings, with_ops=True, sharded_roots=roots)
    out = {"mesh": [d0, d1], "layers": [i, j], "status": status, "solve_time_s": solve_s, "ilp": ilp,
           "objective_s": ev.per_microbatch_s + ev.sync_s / a.microbatches,
           "fwd_s": ev.fwd_s, "bwd_s": ev.bwd_s, "comm_s": ev.comm_s, "grad_sync_s": ev.sync_s,
           "param_state_bytes": ev.param_state_bytes(a.zero), "stash_bytes_per_microbatch": ev.stash_bytes,
           "ops": ev.ops}
    if a.sharded_storage:
        out["sharded_storage"] = sorted(roots)
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
    if a.sharded_storage:
        print(f"parameters stored sharded (ZeRO-3): {len(roots)} of {len(prob.storage_groups(settings))} groups"
              + (": " + ", ".join(sorted(roots)) if roots else ""))
    return 0


def _eager_arg(p) -> None:
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=EAGER_DEFAULT,
                   help="cost the step as the eager PyTorch recipe runs it (autocast casts, fp32 loss, host "
                        "dispatch, DDP/FSDP2 buffers, allocator reserve; measured on H200, see bench/truth); "
                        "--no-eager: the per-op model alone")


def cmd_plan(a) -> int:
    if a.output is not None:
        check_outputs([("-o", a.output)], a.force)
    t0 = time.perf_counter()
    with _progress_lines(f"planning {a.model}"):
        p = search_plan(a.model, a.cluster, nodes=a.nodes, gpus_per_node=a.gpus_per_node, global_batch=a.global_batch,
                 microbatches=a.microbatches, schedule=a.schedule, max_stages=a.max_stages, dtype=a.dtype,
                 progress=sys.stderr.isatty(), zero=a.zero, seq=a.seq, eager=a.eager,
                 context_parallel=a.context_parallel, sharded_storage=a.sharded_storage)
    elapsed = time.perf_counter() - t0
    text = p.to_json()
    if a.json:
        print(text, end="")
    else:
        print(plan_summary(p))
    if a.output is not None:
        write_text(a.output, text, a.force, "-o")
        print(f"\nwrote {a.output} (planned in {elapsed:.1f} s)", file=sys.stderr if a.json else sys.stdout)
    elif not a.json:
        print(f"\nplanned in {elapsed:.1f} s; pass -o plan.json to save the plan (or --json to print it)")
    return 0


def cmd_show(a) -> int:
    if a.gantt is not None:
        check_outputs([("--gantt", a.gantt)], a.force)
    p = load_plan(a.plan)
    print(plan_summary(p))
    if a.gantt is not None:
        with atomic_path(a.gantt, a.force, "--gantt") as tmp:
            gantt(p, str(tmp), fmt=_image_format(a.gantt))
        print(f"wrote {a.gantt}")
    return 0


def _image_format(path: str) -> str:
    """matplotlib's format for a file name (the temporary file's suffix is .tmp)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in ("png", "pdf", "svg", "jpg", "jpeg"):
        raise PathError(f"{path!r}: give the image a .png, .pdf, .svg or .jpg name")
    return ext


def cmd_compare(a) -> int:
    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()] if a.strategies else list(STRATEGIES)
    check_outputs([("--json", a.json), ("--plot", a.plot), ("--csv", a.csv)], a.force)
    if a.plot is not None:
        _image_format(a.plot)
    t0 = time.perf_counter()
    with _progress_lines(f"comparing strategies for {a.model}"):
        rows = compare(a.model, a.cluster, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                       global_batch=a.global_batch, strategies=strategies, dtype=a.dtype, seq=a.seq,
                       progress=sys.stderr.isatty())
    table = summarize_rows(rows)
    elapsed = time.perf_counter() - t0
    from rich.console import Console  # deferred: rich's table is only drawn here
    from rich.table import Table
    first = next((r.plan.to_dict() for r in rows if r.plan is not None), None)
    title = (f"{a.model} on {first['cluster']['nodes']}x{first['cluster']['gpus_per_node']} "
             f"{first['cluster']['gpu']}, global batch {first['training']['global_batch']}") if first else a.model
    t = Table(title=title)
    header, cells = table_rows(table)
    for c in header:
        t.add_column(c, justify="left" if c in ("strategy", "configuration") else "right",
                     overflow="fold", no_wrap=c not in ("configuration",))
    for row in cells:
        t.add_row(*row)
    con = Console(width=160)
    con.print(t)
    con.print(legend(table))
    con.print(why_winner(rows))
    con.print(f"(compared in {elapsed:.1f} s)")
    if a.json is not None:
        doc = {"model": a.model, "rows": table, "why": why_winner(rows),
               "plans": {r.strategy: r.plan.to_dict() for r in rows if r.plan is not None}}
        write_text(a.json, json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n", a.force, "--json")
    if a.csv is not None:
        keys, values = csv_rows(table)
        buf = io.StringIO()
        w = csv.DictWriter(buf, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(values)
        write_text(a.csv, buf.getvalue(), a.force, "--csv")
    if a.plot is not None:
        fit = [r for r in rows if r.fits]
        best = max(fit, key=lambda r: (round(r.throughput(), 6), r.strategy == "auto")).plan if fit else None
        with atomic_path(a.plot, a.force, "--plot") as tmp:
            compare_plot(table, best, str(tmp), title, fmt=_image_format(a.plot))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="autopar", description="Automatic parallelization planner for training "
                                             "transformers (Alpa-style).")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def command(name: str, help_text: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help)
        p.set_defaults(fn=fn)
        return p

    p = command("inspect", "parameters, FLOPs, layers and op kinds of a model", cmd_inspect)
    p.add_argument("model", help="zoo name, spec (gpt:hidden=..,layers=..,heads=..), hf:config.json or "
                                 "file.py:factory")
    p.add_argument("--batch", type=int_arg("--batch", 1, MAX_MICROBATCH_SIZE), default=1,
                   help="batch of the traced input")
    p.add_argument("--seq", type=int_arg("--seq", 1, MAX_SEQ), help="sequence length (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the full summary as JSON")

    p = command("evaluate", "predict a hand-made Megatron-style (dp, tp, pp) plan", cmd_evaluate)
    p.add_argument("model")
    p.add_argument("--seq", type=int_arg("--seq", 1, MAX_SEQ), help="sequence length (default: the model's)")
    _cluster_args(p)
    _dtype_arg(p)
    _global_batch_arg(p)
    for flag, what in (("--dp", "data"), ("--tp", "tensor"), ("--pp", "pipeline")):
        p.add_argument(flag, type=int_arg(flag, 1, MAX_GPUS), required=True, help=f"{what}-parallel degree")
    p.add_argument("--microbatch", type=int_arg("--microbatch", 1, MAX_MICROBATCH_SIZE), required=True,
                   help="micro-batch size per data-parallel rank")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                   help="activation recomputation")
    p.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe", "interleaved"], help="pipeline schedule")
    p.add_argument("--virtual-stages", type=int_arg("--virtual-stages", 1, 1024), default=1,
                   help="model chunks per GPU (interleaved schedule)")
    _zero_arg(p, 0)
    _eager_arg(p)
    p.add_argument("--json", action="store_true", help="print the plan JSON")

    p = command("shard", "the intra-op ILP for one stage on one logical mesh", cmd_shard)
    p.add_argument("model")
    _cluster_args(p)
    _dtype_arg(p)
    p.add_argument("--mesh", type=mesh_arg, required=True, help="logical mesh, e.g. 2x4")
    p.add_argument("--layers", help="layer range i:j (default: all)")
    p.add_argument("--batch", type=int_arg("--batch", 1, MAX_MICROBATCH_SIZE), default=8, help="microbatch size")
    p.add_argument("--seq", type=int_arg("--seq", 1, MAX_SEQ), help="sequence length (default: the model's)")
    p.add_argument("--microbatches", type=int_arg("--microbatches", 1, MAX_MICROBATCHES), default=1,
                   help="microbatches per step (amortises grad sync)")
    _zero_arg(p, 0)
    p.add_argument("--memory-limit", action="store_true", help="constrain memory to the GPU's")
    p.add_argument("--sharded-storage", action="store_true",
                   help="with --memory-limit and --zero 1 or 2: the ILP also chooses, per parameter group, to "
                        "store it sharded (ZeRO-3: gathered for forward and backward, gradient reduce-scattered)")
    p.add_argument("--time-limit", type=float_arg("--time-limit", 0.0, MAX_TIME_LIMIT_S, lo_open=True), default=30.0,
                   help="seconds per ILP")
    p.add_argument("--all", action="store_true", help="also list views")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = command("plan", "search the best parallel plan (inter-op DP + intra-op ILP)", cmd_plan)
    p.add_argument("model")
    p.add_argument("--seq", type=int_arg("--seq", 1, MAX_SEQ), help="sequence length (default: the model's)")
    _cluster_args(p)
    _dtype_arg(p)
    _global_batch_arg(p)
    p.add_argument("--microbatches", type=microbatches_arg, default="auto",
                   help=f"auto, or microbatches per step (1 to {MAX_MICROBATCHES:,}, dividing the global batch)")
    p.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"], help="pipeline schedule")
    p.add_argument("--max-stages", type=int_arg("--max-stages", 1, 4096), help="most pipeline stages (default: no limit)")
    _zero_arg(p, 1)
    _eager_arg(p)
    p.add_argument("--context-parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="offer sequence (context-parallel) splits; --no-context-parallel searches without them, "
                        "about half the planning time where long sequences make them win layers (the plan "
                        "with them is never worse)")
    p.add_argument("--sharded-storage", action=argparse.BooleanOptionalAction, default=False,
                   help="let a ZeRO-1/2 stage that does not fit store some parameter groups sharded (ZeRO-3); "
                        "the plan is never worse, but planning is slower (gpt-39b: about 5x)")
    p.add_argument("-o", "--output", help="write the plan JSON to this file (default: only the summary is printed)")
    p.add_argument("--json", action="store_true", help="print the plan JSON instead of the summary")
    _force_arg(p)

    p = command("show", "summarise a plan file", cmd_show)
    p.add_argument("plan", help="plan JSON (autopar plan -o / autopar evaluate --json)")
    p.add_argument("--gantt", help="draw the pipeline schedule to this image (.png, .pdf, .svg)")
    _force_arg(p)

    p = command("compare", "dp vs zero vs tp vs pp vs 3d vs auto on one cluster", cmd_compare)
    p.add_argument("model")
    p.add_argument("--seq", type=int_arg("--seq", 1, MAX_SEQ), help="sequence length (default: the model's)")
    _cluster_args(p)
    _dtype_arg(p)
    _global_batch_arg(p)
    p.add_argument("--strategies", help=f"comma-separated subset of {','.join(STRATEGIES)} (default: all)")
    p.add_argument("--json", help="write the rows and every row's plan to this JSON file")
    p.add_argument("--plot", help="draw throughput, the best plan's schedule and its memory per GPU to this image")
    p.add_argument("--csv", help="write the rows to this CSV file (time fields empty for rows that do not fit)")
    _force_arg(p)

    sub.add_parser("profile", help="measure this machine's GPU into a profile JSON (see autopar profile --help)",
                   add_help=False)
    sub.add_parser("run", help="run a plan with torch.distributed (see autopar run --help)", add_help=False)
    return ap


def _dispatch(argv: list[str]) -> int:
    # `run` and `profile` own their options (argparse's REMAINDER would reject `run --help`
    # or an option before the plan file), so they get the rest of the line untouched.
    if argv and argv[0] == "run":
        # deferred: the runtime imports torch._dynamo (about 1.3 s of every other command's start)
        from autopar.runtime.launch import main as run_main
        return run_main(argv[1:]) or 0
    if argv and argv[0] == "profile":
        return profile_main(argv[1:]) or 0
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:           # --help, or a bad argument already reported in one line
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    return args.fn(args) or 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f" {e.filename!r}" if e.filename else ""
        return f"{e.strerror}{where}"
    text = " ".join(str(e).split()) if not isinstance(e, KeyError) else f"missing field {e}"
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except BrokenPipeError:
        # `autopar show plan.json | head`: the reader left; not an error worth a traceback.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("autopar: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RecursionError, OverflowError) as e:
        # Our errors (ClusterError, PlanError, PathError, InputError, graphs' errors) are
        # ValueErrors that say what to do; OSErrors are the file system's answer to a path.
        print(f"autopar: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def entry() -> NoReturn:
    """The `autopar` command and `python -m autopar.cli`. The interpreter's teardown frees every
    object one by one, torch's modules among them: 0.8 s of CPU after `autopar plan` has written
    its plan (gpt-39b plans in about 12 s). A command's output is complete when main returns, so
    after the exit handlers (atexit's: pools joined, logs flushed) and flushing stdout and stderr
    the process leaves without the teardown. `run` and `profile` start processes and hold
    resources of their own, so they exit the usual way."""
    argv = sys.argv[1:]
    rc = main(argv)
    if argv and argv[0] in ("run", "profile"):
        sys.exit(rc)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):    # a reader that left (`| head`) or a closed stream
            stream.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()
