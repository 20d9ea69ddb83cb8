"""What full recomputation adds to a training step, kernel by kernel (issue 13: every recomputed
row of the H200 corpus was predicted slow, +4..+10%, while its plain twin was within a few
points).

    python bench/recompute_kernels.py --out bench/results/recompute_kernels_<gpu>_<date>.json   # on a GPU
    python bench/recompute_kernels.py --report bench/results/recompute_kernels_h200_2026-12-02.json
    python bench/recompute_kernels.py --which [--device cpu]   # which ops one block's recomputation reruns
    python bench/recompute_kernels.py --compiled --rows gpt-1.3b:16:1024 --out ...   # the blocks compiled

On the GPU: for each (model, microbatch, sequence) of ROWS, bench/truth's single-GPU recipe
(truth.setup_single: bf16 autocast over fp32 weights, fused AdamW, SDPA, every block wrapped in
torch.utils.checkpoint(use_reentrant=False) when recomputed) runs without and with full
recomputation: a few warm-up steps, the step time over timed steps (CUDA events), then one step
under torch.profiler, whose aten ops are kept by name with their calls and self device time.
The difference of the two profiles is what recomputation reruns.

`--report` (no GPU) prints per row the measured step delta, its split by kind of kernel
(bench/truth/op_categories.py's kinds), the GEMM calls per step it adds against the blocks'
linears (the profiler counts a call the early stop enters and cuts before its kernel: the
last linear of each block shows as a call with no device time), and the model's step delta (autopar.evaluation.evaluate as
bench/truth/predict.py prices the corpus: eager, all blocks eager) with torch's early stop
(checkpoint_early_stop=True, how these runs recompute) and without (the whole block again).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "truth"))

# (corpus model, microbatch, sequence): the corpus's recomputed single-GPU rows
ROWS = [("gpt-1.3b", 16, 1024), ("gpt-2.6b", 8, 1024), ("gpt-6.7b", 8, 1024), ("llama-1b", 4, 8192),
        ("llama-3b", 2, 8192), ("llama3-8b", 1, 2048)]
WARMUP, TIMED = 2, 3


def _run(model: str, mb: int, seq: int, recompute: str, compiled: bool = False) -> dict:
    import configs
    import torch
    import truth
    from torch.profiler import ProfilerActivity, profile

    run = configs._r(model, "single", mb, seq, recompute)
    dev = truth.Dev("cuda", 0)
    step, objs, _ = truth.setup_single(run, dev, "cuda")
    if compiled:
        # each block compiled, its checkpoint inside the compiled region (torchtitan's order,
        # and autopar run's on one device): AOTAutograd's partition decides what is rerun
        blocks = objs[0].blocks
        for i in range(len(blocks)):
            blocks[i] = torch.compile(blocks[i])
    for _ in range(WARMUP):
        step()
    dev.sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TIMED):
        step()
    end.record()
    dev.sync()
    step_s = start.elapsed_time(end) / 1e3 / TIMED
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        dev.sync()
    ops = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::") and e.self_device_time_total > 0:
            ops[e.key] = [e.count, e.self_device_time_total / 1e6]
    del step, objs
    truth.free(dev)
    return {"id": run["id"], "model": model, "model_spec": run["model_spec"], "microbatch": mb, "seq": seq,
            "recompute": recompute, "compiled": compiled, "step_s": step_s, "ops": ops}


def measure(out: Path, rows: list[tuple[str, int, int]], compiled: bool = False) -> None:
    import torch

    doc = {"what": "bench/recompute_kernels.py: single-GPU steps without and with full recomputation, "
                   "aten ops of one profiled step (calls, self device seconds)",
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "compiled": compiled, "rows": []}
    for model, mb, seq in rows:
        for rc in ("none", "full"):
            try:
                r = _run(model, mb, seq, rc, compiled)
            except Exception as e:          # an OOM or a missing model must not lose the other rows
                r = {"model": model, "microbatch": mb, "seq": seq, "recompute": rc, "error": f"{type(e).__name__}: {e}"}
            doc["rows"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "ops"}), flush=True)
            out.write_text(json.dumps(doc, indent=1) + "\n")


def _by_kind(ops: dict) -> dict[str, float]:
    from op_categories import CATEGORIES, _category

    out = dict.fromkeys(CATEGORIES, 0.0)
    for name, (_, s) in ops.items():
        out[_category(name)] += s
    return out


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def _model_delta_s(spec: str, mb: int, seq: int, early_stop: bool, compiled: bool = False) -> tuple[float, float]:
    """(predicted step without recomputation, the step with it less that) as predict.py prices
    a single-GPU corpus row (`compiled`: its blocks compiled)."""
    from autopar.evaluation.baselines import Config3D, _unevaluated_3d
    from autopar.evaluation.evaluator import evaluate
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource

    cl = load_cluster("dgx-h200", 1, 1)
    src = ModelSource(spec, seq=seq)
    steps = []
    for rc in ("none", "full"):
        plan, graph = _unevaluated_3d(src, cl, mb, Config3D(1, 1, 1, mb, recompute=rc), None, None)
        p = evaluate(plan, graph, cl, eager=True, zero_autocast=True, compiled=compiled, expandable_segments=False,
                     checkpoint_early_stop=early_stop)
        steps.append(p.predicted.step_time_s)
    return steps[0], steps[1] - steps[0]


def report(path: Path) -> None:
    doc = json.loads(path.read_text())
    compiled = bool(doc.get("compiled"))
    print(f"{doc['gpu']}, torch {doc['torch']}, {doc['date']}{', blocks compiled' if compiled else ''}\n")
    rows = {(r["model"], r["microbatch"], r["seq"], r["recompute"]): r for r in doc["rows"]}
    print("| row | measured step, plain / rc (ms) | rc adds (ms) | of it: gemm / attention / casts / norm / "
          "elementwise (ms) | GEMM calls added / the blocks' linears | model adds, early stop / whole "
          "block (ms) |")
    print("|---|---|---|---|---|---|")
    for (model, mb, seq, rc), plain in rows.items():
        if rc != "none":
            continue
        full = rows.get((model, mb, seq, "full"))
        if full is None or "error" in plain or "error" in full:
            print(f"| {model} mb{mb} s{seq} | {plain.get('error') or (full or {}).get('error') or 'no rc row'} |")
            continue
        a, b = _by_kind(plain["ops"]), _by_kind(full["ops"])
        d = {k: (b[k] - a[k]) * 1e3 for k in a}
        calls = sum(full["ops"].get(k, [0, 0])[0] - plain["ops"].get(k, [0, 0])[0] for k in GEMM_OPS)
        fwd_gemms = _block_linears(plain["model_spec"], seq)
        _, early = _model_delta_s(plain["model_spec"], mb, seq, True, compiled)
        _, whole = _model_delta_s(plain["model_spec"], mb, seq, False, compiled)
        print(f"| {model} mb{mb} s{seq} | {plain['step_s'] * 1e3:.1f} / {full['step_s'] * 1e3:.1f} | "
              f"{(full['step_s'] - plain['step_s']) * 1e3:.1f} | "
              f"{d['gemm']:.1f} / {d['attention']:.1f} / {d['casts']:.1f} / {d['norm']:.1f} / {d['elementwise']:.1f} | "
              f"{calls} / {fwd_gemms} | {early * 1e3:.1f} / {whole * 1e3:.1f} |")


def _block_linears(spec: str, seq: int) -> int:
    """Linears (matmuls with a weight) in the model's blocks, from its traced graph."""
    from autopar.model import ModelSource
    from graphs.ir import MATMUL

    graph = ModelSource(spec, seq=seq).graph(1)
    return sum(1 for layer in graph.layers[1:-1] for n in layer.nodes
               if graph.node(n).kind == MATMUL and graph.node(n).param_operands)


WHICH_SPEC = "gpt:hidden=256,layers=2,heads=4,seq=128,vocab=512"


def which(device: str) -> None:
    """Per setting (autocast on or off, each SDPA backend this machine has), the aten calls that
    checkpointing every block of a small GPT adds to its backward: what the recomputation reruns,
    with torch's early stop and without."""
    from collections import Counter

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode
    from truth import Ckpt  # the corpus's checkpointing: torch.utils.checkpoint, non-reentrant

    import graphs.zoo

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[func._overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    def backward_calls(ckpt: bool, amp: bool, backend, early: bool) -> Counter[str]:
        torch.manual_seed(0)
        model = graphs.zoo.build_module(WHICH_SPEC, device=device)
        if ckpt:
            for i, block in enumerate(model.blocks):
                model.blocks[i] = Ckpt(block)
        ids = torch.randint(0, 512, (2, 128), device=device)
        with torch.utils.checkpoint.set_checkpoint_early_stop(early), sdpa_kernel([backend]):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                loss = model(ids, ids)
            count = Count()
            with count:
                loss.backward()
        return count.calls

    backends = [SDPBackend.MATH] + ([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                     SDPBackend.CUDNN_ATTENTION] if device == "cuda" else [SDPBackend.FLASH_ATTENTION])
    print(f"torch {torch.__version__}, {device}; {WHICH_SPEC}: {len(graphs.zoo.build_module(WHICH_SPEC).blocks)} blocks")
    for amp in (False, True):
        for backend in backends:
            for early in (True, False):
                try:
                    a, b = backward_calls(False, amp, backend, early), backward_calls(True, amp, backend, early)
                except Exception as e:          # a backend this GPU or dtype does not run
                    print(f"autocast {amp!s:5s} {backend.name:20s} early stop {early!s:5s}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                added = {k: b[k] - a[k] for k in sorted(b) if b[k] != a[k] and k not in ("detach", "view", "t",
                                                                                        "transpose", "_unsafe_view")}
                print(f"autocast {amp!s:5s} {backend.name:20s} early stop {early!s:5s}: {added}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="measure on this machine's GPU and write the rows here")
    ap.add_argument("--report", help="print the table of a stored file (no GPU)")
    ap.add_argument("--rows", help="comma list of model:microbatch:seq (default: ROWS)")
    ap.add_argument("--compiled", action="store_true", help="with --out: each block compiled (torch.compile), "
                    "its checkpoint inside")
    ap.add_argument("--which", action="store_true", help="print what one block's recomputation reruns, per setting")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="with --which")
    a = ap.parse_args(argv)
    if a.which:
        which(a.device)
        return 0
    if bool(a.out) == bool(a.report):
        ap.error("give exactly one of --out FILE (on a GPU) or --report FILE")
    if a.report:
        if not Path(a.report).is_file():
            ap.error(f"--report {a.report}: no such file")
        try:
            report(Path(a.report))
        except (ValueError, KeyError, TypeError) as e:
            ap.error(f"--report {a.report}: not a file this script wrote ({type(e).__name__}: {e})")
        return 0
    rows = ROWS
    if a.rows:
        try:
            rows = [(m, int(b), int(s)) for m, b, s in (x.split(":") for x in a.rows.split(","))]
        except ValueError:
            ap.error(f"--rows {a.rows!r}: expected model:microbatch:seq[,...], e.g. gpt-1.3b:16:1024")
    measure(Path(a.out), rows, a.compiled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
