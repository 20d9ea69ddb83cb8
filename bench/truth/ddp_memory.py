"""Where native DDP's memory goes, moment by moment (issue 13: the ddp rows' allocated peak is
one fp32 gradient copy over the prediction at small microbatches and exact at others).

Runs bench/truth/truth.py's DDP recipe (setup_ddp, plain_step: DistributedDataParallel defaults,
fp32 weights, bf16 autocast, fused AdamW, zero_grad(set_to_none=True)) on ONE GPU (world size 1,
NCCL: the reducer, its buckets and NCCL's work objects are the same as on two) and reports:

- per step and per region of the step (truth.py's marks: zero_grad, fwd_other, embed_fwd,
  blocks_fwd, head_fwd, bwd_launch, head_bwd (the loss backward starts), blocks_bwd, embed_bwd,
  bwd_tail, optimizer, end): the allocated bytes when the region starts and the region's peak
  (max_memory_allocated, reset at every mark: the allocator counts on the host, in the order the
  host allocates and frees, so the marks split its peak exactly), in bytes per parameter above
  weights + Adam state (12 B per parameter);
- with history (variant "history"): the allocator's trace with Python stacks: every block DDP
  allocated (its buckets: at construction, and again when the reducer rebuilds them in the
  second step's forward), where each was freed (step and region, and whether by a thread
  without Python frames, such as NCCL's watchdog), and the blocks alive at the run's peak
  (memory_peak.breakdown).

Variants: "single" (no DDP, the harness sequence: the baseline), "harness" (truth.py's
sequence: warm-up 1, sync, two synced warm-ups, then back to back steps), "gap" (the same with
a 1 s sleep after warm-up 1, longer than NCCL's watchdog period), "loop" (every step back to
back, one sync at the end: a user's loop), "history" (harness with the allocator's history),
"view_loop" (loop with DistributedDataParallel(gradient_as_bucket_view=True), as `autopar run`
builds it: runtime/engines.py), "fsdp2" (truth.py's setup_fsdp2 in place of DDP, on a world-size-1
mesh: FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) with autocast on top,
the corpus's fsdp2 recipe; its sharded state is the whole model's, 16 B per parameter, where a
rank of two holds half, and its unsharded buffers and activations are a rank's of two),
"fsdp2_history" (fsdp2 with the allocator's history: the blocks alive at the peak by where they
were allocated, e.g. whether rms_norm / layer_norm allocate fp32 copies, and FSDP2's buffers).

After every DDP run, with its objects deleted: the bytes still allocated once NCCL's watchdog
has had time to see the last collectives complete, and again after one more collective (a
one-element all-reduce). ProcessGroupNCCL keeps an async collective's tensors until the
watchdog sees it complete and releases them at the next collective call, so the first figure
holds the last step's buckets (4 B/param) and the second none; the same stash keeps DDP's
first buckets alive through step 2's forward (eager.ddp_rebuild_transient_bytes).

    python3 bench/truth/ddp_memory.py --out $OUT
    python3 bench/truth/ddp_memory.py --out $OUT --runs gpt-1.3b:1,gpt-1.3b:4 --variants harness,gap
    python3 bench/truth/ddp_memory.py --out $OUT --runs gpt-1.3b:1,gpt-6.7b:1 --variants view_loop,gap,loop
    python3 bench/truth/ddp_memory.py --out $OUT --runs llama-3b:1:4096,llama-3b:4:4096,gpt-1.3b:8 \
        --variants fsdp2_history --budget-s 240
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import configs as C  # noqa: E402
import memory_peak  # noqa: E402
import torch  # noqa: E402
import truth as T  # noqa: E402  (its import sets the NCCL environment, read when NCCL starts)

GB = 1e9
SENTINEL_BASE_BYTES = 512 * 10007      # a sentinel block's size names the mark it stands for


class Recorder:
    """truth.mark, plus the allocator's counters at every mark (and a sentinel block in the
    allocator's trace, so the trace can be cut at the marks)."""

    def __init__(self, sentinels: bool):
        self.rows: list[dict] = []
        self.step = 0
        self.on = False
        self.sentinels = sentinels
        self.main = threading.get_ident()
        self.orig = T.mark

    def mark(self, label: str) -> None:
        self.orig(label)
        if not self.on:
            return
        now, peak = _allocated(), _peak()
        _reset_peak()
        if self.rows:
            self.rows[-1]["peak"] = peak
        self.rows.append({"step": self.step, "label": label, "start": now, "t": time.perf_counter(),
                          "main_thread": threading.get_ident() == self.main})
        if self.sentinels:
            _sentinel(len(self.rows) - 1)


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if _cuda() else 0


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if _cuda() else 0


def _reset_peak() -> None:
    if _cuda():
        torch.cuda.reset_peak_memory_stats()


def _sentinel(index: int) -> None:
    x = torch.empty(SENTINEL_BASE_BYTES + 512 * index, dtype=torch.uint8, device="cuda")
    del x


def run_steps(step, rec: Recorder, variant: str, dev) -> None:
    def one():
        rec.step += 1
        step()
    rec.on = True
    rec.mark("steps_start")
    if variant in ("loop", "view_loop"):
        for _ in range(6):
            one()
        rec.mark("before_sync")
        dev.sync()
    else:
        one()
        dev.sync()
        if variant == "gap":
            time.sleep(1.0)
        for _ in range(2):
            dev.sync()
            one()
            dev.sync()
        for _ in range(3):
            one()
        rec.mark("before_sync")
        dev.sync()
    rec.mark("done")
    rec.on = False


def summarize(rows: list[dict], n_params: int) -> tuple[str, dict]:
    fixed = 12 * n_params                 # fp32 weights and Adam's m, v (after the first step)
    lines = [f"{'step':>4} {'region':<12} {'start GB':>9} {'peak GB':>9} {'peak B/param over 12':>21}"]
    best = max((r for r in rows if "peak" in r), key=lambda r: r["peak"])
    per_step: dict[int, dict] = {}
    for r in rows:
        if "peak" not in r:
            continue
        s = per_step.setdefault(r["step"], r)
        if r["peak"] > s["peak"]:
            per_step[r["step"]] = r
        lines.append(f"{r['step']:>4} {r['label']:<12} {r['start'] / GB:9.3f} {r['peak'] / GB:9.3f} "
                     f"{(r['peak'] - fixed) / n_params:21.2f}" + ("" if r["main_thread"] else "  (autograd thread)"))
    lines.append("per step, the region of its peak: " + "; ".join(
        f"step {k}: {v['peak'] / GB:.3f} GB in {v['label']}" for k, v in sorted(per_step.items())))
    lines.append(f"run peak {best['peak'] / GB:.3f} GB in step {best['step']} region {best['label']}")
    return "\n".join(lines), {"peak_bytes": best["peak"], "peak_step": best["step"], "peak_region": best["label"],
                              "per_step_peak_bytes": {k: v["peak"] for k, v in per_step.items()},
                              "per_step_peak_region": {k: v["label"] for k, v in per_step.items()}}


def history_report(events: list[dict], rows: list[dict], baseline: int) -> str:
    """DDP's blocks: where allocated, where freed; and what is alive at the peak."""
    # the marks' positions in the trace
    cut: list[tuple[int, int]] = []          # (event index, row index)
    for i, ev in enumerate(events):
        if ev["action"] == "alloc" and any(f.get("name") == "_sentinel" for f in ev.get("frames", [])):
            k = (ev["size"] - SENTINEL_BASE_BYTES) // 512
            if 0 <= k < len(rows):
                cut.append((i, k))

    def where(i: int) -> str:
        k = None
        for j, r in cut:
            if j > i:
                break
            k = r
        return "before the steps" if k is None else f"step {rows[k]['step']} {rows[k]['label']}"

    # who freed a block: the stack of its free request (none: a thread without Python frames, such
    # as NCCL's watchdog); when: the completed free, which the allocator's counters follow
    completed = any(e["action"] == "free_completed" for e in events)
    ddp_allocs: dict[int, tuple[int, dict]] = {}
    requested: dict[int, str] = {}
    groups: dict[str, dict] = defaultdict(lambda: {"bytes": 0, "n": 0, "freed": defaultdict(int)})
    for i, ev in enumerate(events):
        frames = ev.get("frames", [])
        if ev["action"] == "alloc":
            fn = next((f for f in frames if f.get("filename", "").endswith("nn/parallel/distributed.py")), None)
            if fn is not None:
                ddp_allocs[ev["addr"]] = (i, ev)
                key = f"distributed.py {fn.get('name')} (allocated {where(i)})"
                ev["_group"] = key
                groups[key]["bytes"] += ev["size"]
                groups[key]["n"] += 1
        elif ev["action"] == "free_requested" and ev["addr"] in ddp_allocs:
            by = "a thread without Python frames" if not frames else memory_peak.group_key(frames)
            requested[ev["addr"]] = f"requested {where(i)} by {by}"
        if (ev["action"] == ("free_completed" if completed else "free_requested")) and ev["addr"] in ddp_allocs:
            _, a = ddp_allocs.pop(ev["addr"])
            req = requested.pop(ev["addr"], "?")
            groups[a["_group"]]["freed"][f"{req}; completed {where(i)}"] += a["size"]
    for _, a in ddp_allocs.values():
        groups[a["_group"]]["freed"]["never (alive at the end)"] += a["size"]
    lines = ["blocks allocated under torch/nn/parallel/distributed.py:"]
    for key, g in groups.items():
        lines.append(f"  {g['bytes'] / GB:8.3f} GB in {g['n']} blocks: {key}")
        for w, b in sorted(g["freed"].items(), key=lambda kv: -kv[1]):
            lines.append(f"      freed {b / GB:8.3f} GB: {w}")
    peak, peak_i, _ = memory_peak.live_at_peak(events)
    lines.append(f"trace peak at event {peak_i} ({where(peak_i)})")
    lines.append(memory_peak.breakdown(events, baseline, top=30))
    return "\n".join(lines)


def one_run(model: str, mb: int, seq: int, variant: str, dev) -> tuple[str, dict]:
    fsdp2 = variant.startswith("fsdp2")
    run = {"model": model, "model_spec": C.spec(model, seq), "family": C.MODELS[model][0],
           "strategy": "fsdp2" if fsdp2 else "ddp",
           "microbatch": mb, "seq": seq, "n_microbatches": 1, "recompute": "none", "n_gpus": 1}
    history = variant in ("history", "fsdp2_history") and dev.kind == "cuda"
    rec = Recorder(sentinels=history)
    T.mark = rec.mark
    T.free(dev)
    baseline = _allocated()
    if history:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    text = ""
    try:
        amp = "cuda" if dev.kind == "cuda" else "cpu"
        if variant == "single":
            step, objs, _ = T.setup_single(run, dev, amp)
            module = objs[0]
        elif variant == "view_loop":
            step, objs = setup_ddp_bucket_view(run, dev, amp)
            module = objs[1]
        elif fsdp2:
            step, objs, _ = T.setup_fsdp2(run, dev, amp, 1)
            module = objs[0]
        else:
            step, objs, _ = T.setup_ddp(run, dev, amp, 1)
            module = objs[1]
        n_params = sum(p.numel() for p in module.parameters())
        del module
        dev.sync()
        after_setup = _allocated()
        _reset_peak()
        t0 = time.perf_counter()
        try:
            run_steps(step, rec, variant, dev)
        except torch.cuda.OutOfMemoryError as e:
            # where the step ran out: a plan that fits must fit every step (step 2 holds DDP's first buckets)
            at = rec.rows[-1] if rec.rows else {"step": 0, "label": "setup"}
            peak = max((r.get("peak", 0) for r in rec.rows), default=0)
            raise RuntimeError(f"out of memory in step {at['step']} region {at['label']} (allocated "
                               f"{_allocated() / GB:.3f} GB; peak of the regions before {peak / GB:.3f} GB): {e}") from e
        steps_s = time.perf_counter() - t0
        end_alloc = _allocated()
        if history:
            snap = torch.cuda.memory._snapshot()
    finally:
        if history:
            torch.cuda.memory._record_memory_history(enabled=None)
        T.mark = rec.orig
    table, res = summarize(rec.rows, n_params)
    kind = "single" if variant == "single" else "fsdp2" if fsdp2 else "ddp"
    head = (f"== {kind} {model} s{seq} mb{mb} variant {variant}: {n_params / 1e9:.3f} B params; allocated after "
            f"setup {after_setup / GB:.3f} GB ({after_setup / n_params:.2f} B/param), after the steps "
            f"{end_alloc / GB:.3f} GB ({end_alloc / n_params:.2f} B/param); {len(rec.rows)} marks, steps {steps_s:.2f} s")
    text = head + "\n" + table
    if history:
        text += "\n" + history_report(snap["device_traces"][torch.cuda.current_device()], rec.rows, baseline)
    res.update(model=model, mb=mb, seq=seq, variant=variant, n_params=n_params, after_setup_bytes=after_setup,
               end_bytes=end_alloc, rows=rec.rows)
    del step, objs
    if variant != "single" and dev.kind == "cuda":
        left, released = release_probe(dev)
        res.update(left_after_run_bytes=left, left_after_next_collective_bytes=released)
        text += (f"\nobjects deleted, NCCL's watchdog given 1 s: {left / GB:.3f} GB allocated ({left / n_params:.2f} "
                 f"B/param); after one more collective: {released / GB:.3f} GB ({released / n_params:.2f} B/param)")
    return text, res


def setup_ddp_bucket_view(run: dict, dev, amp: str):
    """truth.setup_ddp with gradient_as_bucket_view=True, the DDP `autopar run` builds
    (runtime/engines.py): `.grad` are views of the buckets."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = T.build(run, dev)
    T.instrument(model)
    ddp = DDP(model, device_ids=[dev.device.index] if dev.kind == "cuda" else None, gradient_as_bucket_view=True)
    opt = T.make_opt(ddp.parameters())
    ids, tgt = T.make_batch(run, model.cfg.vocab, dev, run["microbatch"])
    return T.plain_step(ddp, opt, ids, tgt, amp, 1, ddp.no_sync), [ddp, model, opt]


def release_probe(dev) -> tuple[int, int]:
    """(allocated once the run's objects are gone and NCCL's watchdog has had 1 s, allocated
    after one more collective): what ProcessGroupNCCL's stash still holds, and that the next
    collective call releases it."""
    import gc

    import torch.distributed as dist
    gc.collect()
    dev.sync()
    time.sleep(1.0)
    gc.collect()
    left = _allocated()
    x = torch.zeros(1, device=dev.device)
    dist.all_reduce(x)
    dev.sync()
    del x
    gc.collect()
    return left, _allocated()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for ddp_memory.txt and ddp_memory.json")
    ap.add_argument("--runs", default="gpt-1.3b:1,gpt-1.3b:4,gpt-2.6b:4", help="model:microbatch[:seq],...")
    ap.add_argument("--variants", default="history,harness,gap,single,loop")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no run after this many seconds")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: gloo and a tiny model, every code path but no memory figures (smoke test)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("ddp_memory: no CUDA GPU here (it measures the CUDA caching allocator); --device cpu is the smoke "
              "test", file=sys.stderr)
        return 2
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    import torch.distributed as dist
    dev = T.Dev(a.device, 0)
    if a.device == "cuda":
        dist.init_process_group("nccl", device_id=dev.device)
    else:
        dist.init_process_group("gloo")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    texts, results = [], []
    env = {k: os.environ.get(k) for k in ("TORCH_NCCL_AVOID_RECORD_STREAMS", "PYTORCH_CUDA_ALLOC_CONF")}
    where = f"nccl {torch.cuda.nccl.version()}, {torch.cuda.get_device_name()}" if a.device == "cuda" else "cpu, gloo"
    texts.append(f"torch {torch.__version__}, {where}, env {env}")
    for spec in a.runs.split(","):
        parts = spec.split(":")
        model, mb, seq = parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else 1024
        for variant in a.variants.split(","):
            if time.time() - t_start > a.budget_s:
                texts.append(f"== skipped {spec} {variant}: budget")
                continue
            try:
                text, res = one_run(model, mb, seq, variant, dev)
            except Exception as e:  # noqa: BLE001
                text, res = f"== {spec} {variant}: {type(e).__name__}: {e}"[:2000], {"error": str(e)[:2000]}
            print(text, flush=True)
            texts.append(text)
            results.append(res)
            (out / "ddp_memory.txt").write_text("\n\n".join(texts) + "\n")
            (out / "ddp_memory.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
