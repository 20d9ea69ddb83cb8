"""GPU profiler: measure the efficiency curves the cost model reads (DESIGN.md section 4).

``measure_profile(device="cuda", quick=False)`` measures, on the GPU it runs on:

* matmul: achieved TFLOP/s over a grid of (m, n, k) for bf16, fp16, fp32 with TF32 off
  (dtype "fp32") and fp32 with TF32 on (dtype "tf32");
* attention: ``F.scaled_dot_product_attention`` forward and backward time in bf16, causal and
  not, over batch x heads x seq x head_dim, with SDPA's own choice of backend (what a training
  step calls: cuDNN's kernels on an H200 with torch 2.11) or one backend forced
  (``attention_backend``);
* memory-bound kernels (copy, add, GELU, LayerNorm, softmax) in bf16: achieved bandwidth,
  counting bytes read plus bytes written, from 1 MB to 4 GB moved;
* launch overhead: seconds per eager launch of a tiny kernel, from a loop of many.

Method: CUDA events; a warm-up before each measurement; the median of several timed
repeats; random (never zero) inputs; where the inputs of one call would fit in L2, calls
rotate over several input sets whose total is several times the L2 size, so that the
numbers are not cache hits. Short kernels are captured many to a CUDA graph and the graph
replays are timed, so that the numbers are GPU time, not Python dispatch time (the eager
dispatch cost is what ``launch_overhead_s`` records, for the cost model to add per launch).

The JSON written (``schema: autopar.gpu_profile/v1``)::

    {"schema", "gpu", "memory_bytes", "sm_count", "torch", "cuda", "date",
     "matmul":       [{"dtype", "m", "n", "k", "time_s", "tflops"}],
     "attention":    [{"dtype", "batch", "heads", "seq", "head_dim", "causal", "fwd_s", "bwd_s"}],
     "memory_bound": [{"kernel", "bytes", "time_s", "gbps"}],
     "launch_overhead_s",
     "meta": {...how it was measured...}}

``gbps`` is 1e9 bytes per second; ``tflops`` is 1e12 FLOP/s with a matmul counted as
2*m*n*k. Attention FLOPs (for readers): forward 4*b*h*s*s*d (halved when causal), backward
2.5x that.

Shipped profiles live in ``autopar/profiles/*.json``; ``autopar.hardware.profiles.load_gpu_profile_file(name_or_path)`` reads
one and checks it with ``validate_gpu_profile``. Importing this module does not import torch.

CLI: ``python -m autopar.profiling.gpu --out FILE [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from autopar.fileio import check_output, write_text
from autopar.hardware.profiles import (
    GPU_SCHEMA,
    MATMUL_DTYPES,
    MEMORY_BOUND_KERNELS,
    load_gpu_profile_file,
    validate_gpu_profile,
)

# Largest single measurement, in bytes of all operands together (the brief: skip over ~4 GB).
MAX_OPERAND_BYTES = 4 * 2**30
# Hidden size used for the row-wise kernels (LayerNorm, softmax over the last dim).
ROW_DIM = 4096
# the measured parts a run can be limited to (`--sections`)
SECTIONS = ("matmul", "attention", "memory_bound")


# --------------------------------------------------------------------------- timing


class _Clock:
    """Times a region on one device: CUDA events on a GPU, a host clock elsewhere
    (the host path exists only for smoke tests of this module on a CPU)."""

    def __init__(self, torch, device):
        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def time(self, run: Callable[[], Any]) -> float:
        if self.cuda:
            s = self.torch.cuda.Event(enable_timing=True)
            e = self.torch.cuda.Event(enable_timing=True)
            s.record()
            run()
            e.record()
            e.synchronize()
            return s.elapsed_time(e) / 1e3
        t = time.perf_counter()
        run()
        return time.perf_counter() - t


def _clamp(x, lo, hi):
    return max(lo, min(hi, x))


def _bench(clock: _Clock, fn: Callable[[int], Any], *, graph: bool = True,
           inner_target_s: float = 2e-3, max_inner: int = 256,
           total_target_s: float = 0.03, min_repeats: int = 3, max_repeats: int = 15,
           warmup: int = 2) -> float:
    """Median seconds of one ``fn(i)``.

    ``fn(i)`` enqueues the work of call ``i`` (rotating over input sets by ``i``). Calls are
    batched ``n_inner`` to a timed region so that one region lasts about
    ``inner_target_s``; on a GPU that batch is captured into a CUDA graph when ``graph``
    (falling back to an eager loop if capture fails), so launch gaps do not count.
    """
    torch = clock.torch
    for i in range(warmup):
        fn(i)
    clock.sync()
    t0 = statistics.median(clock.time(lambda: fn(0)) for _ in range(3))
    t0 = max(t0, 1e-7)
    n_inner = int(_clamp(round(inner_target_s / t0), 1, max_inner))

    run = None
    g = None
    if graph and clock.cuda:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(min(n_inner, 3)):
                    fn(i)
            torch.cuda.current_stream().wait_stream(side)
            clock.sync()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(n_inner):
                    fn(i)
            g.replay()
            clock.sync()
            run = g.replay
        except Exception:  # noqa: BLE001 - any capture failure: time eagerly instead
            g = None
            run = None
            with contextlib.suppress(Exception):
                clock.sync()
    if run is None:
        def run():
            for i in range(n_inner):
                fn(i)
        run()
        clock.sync()

    per_region = max(t0 * n_inner, 1e-7)
    repeats = int(_clamp(round(total_target_s / per_region), min_repeats, max_repeats))
    med = statistics.median(clock.time(run) for _ in range(repeats))
    del g
    return med / n_inner


# --------------------------------------------------------------------------- grids


POW2 = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
TYPICAL = [768, 1536, 3072, 5120, 6144, 12288]
M_TOKENS = POW2 + [32768, 65536]

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4}
# Rough peak rates (TFLOP/s) used only to skip shapes that would take too long.
_ROUGH_PEAK = {"bf16": 800.0, "fp16": 800.0, "tf32": 400.0, "fp32": 55.0}
_MAX_SHAPE_S = 0.06  # skip a shape whose one call would take longer than this at peak


def matmul_grid(quick: bool = False) -> list[tuple[str, int, int, int]]:
    """(dtype, m, n, k) to measure. bf16 gets the full grid (powers of two and the usual
    transformer widths for n and k, powers of two up to 65536 for the token dim m); fp16
    and tf32 powers of two; fp32 (no TF32) powers of two, smaller."""
    out = []

    def add(dtype, ms, ns, ks):
        for m in ms:
            for n in ns:
                for k in ks:
                    b = (m * k + k * n + m * n) * _DTYPE_BYTES[dtype]
                    if b > MAX_OPERAND_BYTES:
                        continue
                    if 2.0 * m * n * k / (_ROUGH_PEAK[dtype] * 1e12) > _MAX_SHAPE_S:
                        continue
                    out.append((dtype, m, n, k))

    if quick:
        q = [128, 512, 2048, 8192]
        add("bf16", [128, 512, 2048, 8192, 32768], q + [3072, 12288], q + [3072, 12288])
        add("fp16", [512, 4096], [4096], [4096])
        add("tf32", [512, 4096], [4096], [4096])
        add("fp32", [512, 4096], [4096], [4096])
        return out
    nk = sorted(POW2 + TYPICAL)
    add("bf16", M_TOKENS, nk, nk)
    add("fp16", M_TOKENS, POW2, POW2)
    add("tf32", M_TOKENS, POW2, POW2)
    add("fp32", POW2[:-1], POW2[:-1], POW2[:-1])
    return out


def attention_grid(quick: bool = False) -> list[tuple[int, int, int, int, bool]]:
    """(batch, heads, seq, head_dim, causal)."""
    if quick:
        return [(b, h, s, d, c) for (b, h) in [(1, 16), (4, 32)] for s in (512, 2048)
                for d in (64, 128) for c in (True, False)]
    out = []
    for b, h in [(1, 16), (1, 32), (4, 16), (4, 32), (8, 32)]:
        for s in (512, 1024, 2048, 4096, 8192, 16384):
            for d in (64, 128):
                for c in (True, False):
                    out.append((b, h, s, d, c))
    return out


def memory_bound_grid(quick: bool = False) -> list[tuple[str, int]]:
    """(kernel, target bytes moved)."""
    exps = range(20, 33, 3) if quick else range(20, 33)  # 1 MB .. 4 GB
    return [(k, 2**e) for k in MEMORY_BOUND_KERNELS for e in exps]


# --------------------------------------------------------------------------- measurements


def _torch_dtype(torch, name):
    return {"bf16": torch.bfloat16, "fp16": torch.float16,
            "fp32": torch.float32, "tf32": torch.float32}[name]


def _rotation_sets(set_bytes: int, rot_bytes: int, max_sets: int) -> int:
    """How many input sets to rotate over so that together they exceed ``rot_bytes``."""
    return int(_clamp(math.ceil(rot_bytes / max(set_bytes, 1)), 1, max_sets))


def _measure_matmul(torch, clock, device, grid, rot_bytes, deadline, log):
    rows = []
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    try:
        for idx, (dname, m, n, k) in enumerate(grid):
            if time.monotonic() > deadline:
                log(f"matmul: deadline reached after {idx}/{len(grid)} shapes")
                break
            torch.backends.cuda.matmul.allow_tf32 = dname == "tf32"
            dt = _torch_dtype(torch, dname)
            esz = _DTYPE_BYTES[dname]
            nsets = _rotation_sets((m * k + k * n) * esz, rot_bytes, 256)
            try:
                A = torch.randn((nsets, m, k), device=device, dtype=dt, generator=gen)
                B = torch.randn((nsets, k, n), device=device, dtype=dt, generator=gen)
                C = torch.empty((m, n), device=device, dtype=dt)

                def fn(i, A=A, B=B, C=C, nsets=nsets):
                    j = i % nsets
                    torch.matmul(A[j], B[j], out=C)

                t = _bench(clock, fn, max_inner=max(nsets, 16), total_target_s=0.015)
            except torch.cuda.OutOfMemoryError:
                log(f"matmul {dname} {m}x{n}x{k}: out of memory, skipped")
                continue
            finally:
                A = B = C = None
            rows.append({"dtype": dname, "m": m, "n": n, "k": k, "time_s": t,
                         "tflops": 2.0 * m * n * k / t / 1e12})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return rows


ATTENTION_BACKENDS = ("default", "flash", "cudnn", "efficient")


def _sdpa_context(torch, backend: str = "default"):
    """A context that forces SDPA's `backend` ("default": SDPA picks, as a training step's call
    does), and the backend's name; (nullcontext, 'default') where torch has no selector."""
    if backend == "default":
        return contextlib.nullcontext, "default"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kind = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
        return (lambda: sdpa_kernel([kind])), backend
    except Exception:  # noqa: BLE001
        return contextlib.nullcontext, "default"


def _measure_attention(torch, clock, device, grid, deadline, log, backend: str = "default"):
    import torch.nn.functional as F
    ctx_forced, forced = _sdpa_context(torch, backend)
    rows: list[dict] = []
    backends: dict[str, int] = {}
    dt = torch.bfloat16 if clock.cuda else torch.float32
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    for idx, (b, h, s, d, causal) in enumerate(grid):
        if time.monotonic() > deadline:
            log(f"attention: deadline reached after {idx}/{len(grid)} configs")
            break
        try:
            q, k, v = (torch.randn((b, h, s, d), device=device, dtype=dt, generator=gen)
                       .requires_grad_(True) for _ in range(3))
            go = torch.randn((b, h, s, d), device=device, dtype=dt, generator=gen)
            used, ctx = forced, ctx_forced
            try:
                with ctx():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            except Exception:  # noqa: BLE001 - the forced backend is unavailable for this shape/device
                ctx, used = contextlib.nullcontext, "default"

            def fwd(i, q=q, k=k, v=v, ctx=ctx, causal=causal):
                with torch.no_grad(), ctx():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def fwd_bwd(i, q=q, k=k, v=v, go=go, ctx=ctx, causal=causal):
                with ctx():
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                torch.autograd.grad(o, (q, k, v), go)

            t_f = _bench(clock, fwd, max_inner=64)
            t_fb = _bench(clock, fwd_bwd, max_inner=64)
        except torch.cuda.OutOfMemoryError:
            log(f"attention {b}x{h}x{s}x{d}: out of memory, skipped")
            continue
        finally:
            q = k = v = go = None
            fwd = fwd_bwd = None  # type: ignore[assignment]  # the closures hold the inputs too
        backends[used] = backends.get(used, 0) + 1
        rows.append({"dtype": "bf16" if clock.cuda else "fp32", "batch": b, "heads": h,
                     "seq": s, "head_dim": d, "causal": causal, "fwd_s": t_f,
                     "bwd_s": max(t_fb - t_f, 1e-9)})
    return rows, backends


def _measure_memory_bound(torch, clock, device, grid, rot_bytes, deadline, log):
    import torch.nn.functional as F
    rows = []
    dt = torch.bfloat16
    esz = 2
    gen = torch.Generator(device=device)
    gen.manual_seed(2)
    for idx, (kernel, target) in enumerate(grid):
        if time.monotonic() > deadline:
            log(f"memory_bound: deadline reached after {idx}/{len(grid)} sizes")
            break
        # tensors touched: inputs + output (a backward reads the output's gradient and the
        # forward's input, writes the input's gradient)
        n_tensors = 3 if kernel in ("add", "gelu_backward", "layernorm_backward") else 2
        numel = max(ROW_DIM, (target // (n_tensors * esz)) // ROW_DIM * ROW_DIM)
        rows_ = numel // ROW_DIM
        in_bytes = (n_tensors - 1) * numel * esz
        nsets = _rotation_sets(in_bytes, rot_bytes, 256)
        try:
            X = torch.randn((nsets, rows_, ROW_DIM), device=device, dtype=dt, generator=gen)
            Y = (torch.randn((nsets, rows_, ROW_DIM), device=device, dtype=dt, generator=gen)
                 if n_tensors == 3 else None)
            out = torch.empty((rows_, ROW_DIM), device=device, dtype=dt)
            w = torch.randn(ROW_DIM, device=device, dtype=dt, generator=gen)
            bias = torch.randn(ROW_DIM, device=device, dtype=dt, generator=gen)

            fn = _memory_bound_call(torch, F, kernel, X, Y, out, w, bias, nsets)
            t = _bench(clock, fn, max_inner=max(nsets, 16))
        except torch.cuda.OutOfMemoryError:
            log(f"memory_bound {kernel} {target}: out of memory, skipped")
            continue
        finally:
            X = Y = out = fn = None   # fn holds the inputs too
        moved = n_tensors * numel * esz
        rows.append({"kernel": kernel, "bytes": moved, "time_s": t, "gbps": moved / t / 1e9})
    return rows


def _memory_bound_call(torch, F, kernel, X, Y, out, w, bias, nsets):
    """fn(i) for _bench: one `kernel` call on input set i of X (and Y)."""
    if kernel == "copy":
        def fn(i):
            out.copy_(X[i % nsets])
    elif kernel == "add":
        def fn(i):
            torch.add(X[i % nsets], Y[i % nsets], out=out)
    elif kernel == "gelu":
        def fn(i):
            F.gelu(X[i % nsets])
    elif kernel == "layernorm":
        def fn(i):
            F.layer_norm(X[i % nsets], (ROW_DIM,), w, bias)
    elif kernel == "softmax":
        def fn(i):
            torch.softmax(X[i % nsets], dim=-1)
    elif kernel == "gelu_backward":
        def fn(i):     # Y: the output's gradient, X: the forward's input
            torch.ops.aten.gelu_backward(Y[i % nsets], X[i % nsets])
    elif kernel == "layernorm_backward":
        # the forward's row statistics, per input set (fp32, one pair per row: small)
        stats = [torch.ops.aten.native_layer_norm(X[j], (ROW_DIM,), w, bias, 1e-5)[1:] for j in range(nsets)]

        def fn(i):     # input, weight and bias gradients, as autograd asks for them
            mean, rstd = stats[i % nsets]
            torch.ops.aten.native_layer_norm_backward(Y[i % nsets], X[i % nsets], (ROW_DIM,), mean, rstd,
                                                      w, bias, [True, True, True])
    else:  # pragma: no cover
        raise ValueError(kernel)
    return fn


def _measure_launch(torch, clock, device):
    """(eager seconds per launch of a one-element add, same inside a CUDA graph)."""
    x = torch.ones(1, device=device)
    n = 2000
    for _ in range(200):
        x.add_(1.0)
    clock.sync()

    def loop():
        for _ in range(n):
            x.add_(1.0)

    eager = statistics.median(clock.time(loop) for _ in range(5)) / n
    graphed = _bench(clock, lambda i: x.add_(1.0), inner_target_s=2e-3, max_inner=1000)
    return eager, graphed


def _warm_up(torch, clock, device, seconds):
    """Run large matmuls for a while so that clocks have ramped before measuring."""
    if not clock.cuda:
        return
    a = torch.randn((8192, 8192), device=device, dtype=torch.bfloat16)
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        for _ in range(10):
            a2 = a @ a
        clock.sync()
    del a, a2


# --------------------------------------------------------------------------- entry points


def _device_info(torch, device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"gpu": p.name, "memory_bytes": int(p.total_memory),
                "sm_count": int(p.multi_processor_count),
                "l2_bytes": int(getattr(p, "L2_cache_size", 0) or 0)}
    return {"gpu": "cpu", "memory_bytes": 0, "sm_count": 0, "l2_bytes": 0}


def _measure(device, quick: bool, *, grids: dict | None = None, max_seconds: float = 1e9,
             log: Callable[[str], None] | None = None,
             checkpoint: Callable[[dict], None] | None = None, attention_backend: str = "default") -> dict:
    """Implementation behind ``measure_profile``; accepts a CPU device only so that the
    code paths can be smoke-tested without a GPU (such numbers mean nothing)."""
    import torch

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    clock = _Clock(torch, device)
    info = _device_info(torch, device)
    l2 = info.pop("l2_bytes") or 50 * 2**20
    rot_bytes = 4 * l2
    grids = grids or {}
    mm_grid = grids.get("matmul", matmul_grid(quick))
    at_grid = grids.get("attention", attention_grid(quick))
    mb_grid = grids.get("memory_bound", memory_bound_grid(quick))

    t_start = time.monotonic()
    deadline = t_start + max_seconds
    prof: dict[str, Any] = {
        "schema": GPU_SCHEMA, **info, "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "date": _dt.date.today().isoformat(),
        "matmul": [], "attention": [], "memory_bound": [], "launch_overhead_s": None,
    }
    meta: dict[str, Any] = {
        "quick": quick,
        "l2_bytes": l2,
        "timing": ("CUDA events; warm-up; median of 3-15 timed regions; short calls batched "
                   "into a CUDA graph (eager loop if capture fails) and divided by the count"),
        "inputs": f"torch.randn; inputs rotated over sets totalling >= {rot_bytes} bytes "
                  "(4x L2) where one set is smaller",
        "matmul": "torch.matmul(A, B, out=C), A m x k, B k x n, row-major; tflops = 2mnk/t; "
                  "dtype fp32 = TF32 off (allow_tf32=False), tf32 = allow_tf32=True",
        "matmul_defaults": {
            "allow_bf16_reduced_precision_reduction":
                bool(torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
            "allow_fp16_reduced_precision_reduction":
                bool(torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction),
        },
        "attention": "F.scaled_dot_product_attention on (batch, heads, seq, head_dim) bf16, backend "
                     f"{attention_backend!r} ('default': SDPA's own pick); fwd_s under no_grad; "
                     "bwd_s = time(fwd + autograd.grad) - fwd_s",
        "memory_bound": f"bf16; bytes = bytes read + written; gbps = 1e9 B/s; layernorm and "
                        f"softmax over a last dim of {ROW_DIM}; add is out-of-place a+b; "
                        "gelu_backward and layernorm_backward read the output's gradient and the "
                        "input and write the input's gradient (layernorm_backward also the weight's "
                        "and bias's, not counted in bytes)",
        "launch_overhead": "eager x.add_(1) on a one-element tensor, median over loops of 2000",
    }
    prof["meta"] = meta

    def save():
        if checkpoint:
            checkpoint(prof)

    _warm_up(torch, clock, device, 3.0 if not quick else 1.0)

    t = time.monotonic()
    eager, graphed = _measure_launch(torch, clock, device)
    prof["launch_overhead_s"] = eager
    meta["launch_in_graph_s"] = graphed
    log(f"launch overhead {eager*1e6:.2f} us eager, {graphed*1e6:.2f} us per graphed kernel "
        f"({time.monotonic()-t:.1f}s)")

    t = time.monotonic()
    prof["memory_bound"] = _measure_memory_bound(torch, clock, device, mb_grid, rot_bytes,
                                                 deadline, log)
    log(f"memory_bound: {len(prof['memory_bound'])} rows ({time.monotonic()-t:.1f}s)")
    save()

    t = time.monotonic()
    prof["attention"], meta["attention_backends"] = _measure_attention(
        torch, clock, device, at_grid, deadline, log, attention_backend)
    log(f"attention: {len(prof['attention'])} rows, backends {meta['attention_backends']} "
        f"({time.monotonic()-t:.1f}s)")
    save()

    t = time.monotonic()
    prof["matmul"] = _measure_matmul(torch, clock, device, mm_grid, rot_bytes, deadline, log)
    log(f"matmul: {len(prof['matmul'])}/{len(mm_grid)} rows ({time.monotonic()-t:.1f}s)")

    meta["truncated"] = time.monotonic() > deadline
    meta["seconds"] = round(time.monotonic() - t_start, 1)
    save()
    return prof


def measure_profile(device: str = "cuda", quick: bool = False, **kwargs) -> dict:
    """Measure a GPU profile (schema ``autopar.gpu_profile/v1``) on a CUDA ``device``.

    ``quick`` measures a small subset (about a tenth of the full grid). Extra keyword
    arguments: ``max_seconds`` (stop adding shapes past this; ``meta.truncated`` says so),
    ``log`` (callable taking a line), ``checkpoint`` (callable taking the partial profile
    after each section), ``attention_backend`` (one of ATTENTION_BACKENDS; default "default":
    SDPA's own pick, the kernels a training step runs). Raises ValueError for a non-CUDA device and RuntimeError where
    CUDA is not available.
    """
    dev = str(device)
    if not dev.startswith("cuda"):
        raise ValueError(f"measure_profile needs a CUDA device (got {device!r}): the "
                         "profile is of a GPU; run `autopar profile` on a machine with one")
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("measure_profile: CUDA is not available on this machine "
                           f"(torch {torch.__version__}); run it where a GPU is")
    return _measure(dev, quick, **kwargs)


MERGE_SPREAD = 1.5


def _merge_times(ts: list[float]) -> float:
    """Runs that agree within MERGE_SPREAD are averaged; otherwise the fastest is taken
    (a slow outlier is a hiccup: a clock dip, a host stall), never the slowest."""
    if max(ts) <= MERGE_SPREAD * min(ts):
        return sum(ts) / len(ts)
    return min(ts)


def merge_profiles(profiles: list[dict]) -> dict:
    """Merge repeated measurements of one GPU into one profile, row by row (rows are matched
    on their non-time fields), by ``_merge_times``. Derived rates are recomputed."""
    if not profiles:
        raise ValueError("merge_profiles needs at least one profile")
    gpus = {p["gpu"] for p in profiles}
    if len(gpus) != 1:
        raise ValueError(f"merge_profiles: profiles are of different GPUs {sorted(gpus)}")
    for p in profiles:
        validate_gpu_profile(p)
    out = {k: v for k, v in profiles[0].items()
           if k not in ("matmul", "attention", "memory_bound")}
    timed = {"matmul": ("time_s",), "attention": ("fwd_s", "bwd_s"),
             "memory_bound": ("time_s",)}
    derived = ("tflops", "gbps")
    for sec, fields in timed.items():
        order: list[tuple] = []
        groups: dict[tuple, list[dict]] = {}
        for p in profiles:
            for r in p[sec]:
                key = tuple((k, v) for k, v in r.items() if k not in fields + derived)
                if key not in groups:
                    order.append(key)
                    groups[key] = []
                groups[key].append(r)
        rows = []
        for key in order:
            rs = groups[key]
            row = dict(key)
            for f in fields:
                row[f] = _merge_times([r[f] for r in rs])
            if sec == "matmul":
                row["tflops"] = 2.0 * row["m"] * row["n"] * row["k"] / row["time_s"] / 1e12
            elif sec == "memory_bound":
                row["gbps"] = row["bytes"] / row["time_s"] / 1e9
            rows.append(row)
        out[sec] = rows
    out["launch_overhead_s"] = sum(p["launch_overhead_s"] for p in profiles) / len(profiles)
    meta = dict(profiles[0].get("meta", {}))
    meta["merged_runs"] = len(profiles)
    meta["merge_rule"] = (f"per row: mean of the runs' times where they agree within "
                          f"{MERGE_SPREAD}x, else the fastest; launch overhead: mean")
    meta["run_dates"] = [p["date"] for p in profiles]
    out["meta"] = meta
    out["date"] = max(p["date"] for p in profiles)
    return out


def summarize(prof: dict) -> str:
    """A few key numbers of a profile, as text."""
    lines = [f"{prof['gpu']}  torch {prof['torch']}  cuda {prof['cuda']}  {prof['date']}"]
    for dt in MATMUL_DTYPES:
        rs = [r for r in prof["matmul"] if r["dtype"] == dt]
        if rs:
            best = max(rs, key=lambda r: r["tflops"])
            lines.append(f"matmul {dt:5s} best {best['tflops']:7.1f} TFLOP/s at "
                         f"{best['m']}x{best['n']}x{best['k']} ({len(rs)} shapes)")
    for shape in [(8192, 4096, 4096), (2048, 12288, 4096), (8192, 8192, 8192)]:
        for r in prof["matmul"]:
            if r["dtype"] == "bf16" and (r["m"], r["n"], r["k"]) == shape:
                lines.append(f"matmul bf16 {shape}: {r['tflops']:.1f} TFLOP/s")
    for r in prof["attention"]:
        if r["seq"] == 2048 and r["batch"] == 4 and r["heads"] == 32 and r["head_dim"] == 128:
            fl = 4 * r["batch"] * r["heads"] * r["seq"] ** 2 * r["head_dim"]
            if r["causal"]:
                fl /= 2
            lines.append(f"attention b4 h32 s2048 d128 causal={r['causal']}: fwd "
                         f"{r['fwd_s']*1e3:.3f} ms ({fl/r['fwd_s']/1e12:.0f} TF/s), bwd "
                         f"{r['bwd_s']*1e3:.3f} ms ({2.5*fl/r['bwd_s']/1e12:.0f} TF/s)")
    for kern in MEMORY_BOUND_KERNELS:
        rs = [r for r in prof["memory_bound"] if r["kernel"] == kern]
        if rs:
            big = max(rs, key=lambda r: r["bytes"])
            best = max(rs, key=lambda r: r["gbps"])
            lines.append(f"{kern:9s} {big['gbps']:7.0f} GB/s at {big['bytes']/2**20:.0f} MiB; "
                         f"best {best['gbps']:.0f} at {best['bytes']/2**20:.0f} MiB")
    if prof.get("launch_overhead_s"):
        lines.append(f"launch overhead {prof['launch_overhead_s']*1e6:.2f} us")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="autopar profile",
                                 description="Measure a GPU profile for the cost model.")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="measure a small subset")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-seconds", type=float, default=1e9,
                    help="stop adding measurements after this many seconds")
    ap.add_argument("--merge", nargs="+", metavar="PROFILE",
                    help="measure nothing: merge these profiles (repeated runs on one GPU) "
                         "into --out")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated parts to measure (of {','.join(SECTIONS)}; default all); "
                         "merge a partial profile into a full one with --merge")
    ap.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="default",
                    help="SDPA backend to time attention with; default: SDPA's own pick, as a "
                         "training step calls it")
    args = ap.parse_args(list(argv) if argv is not None else None)
    out = Path(args.out)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown or not sections:
        print(f"autopar profile: --sections {args.sections!r}: each part must be one of "
              f"{', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    check_output(out, args.force, "--out")      # before minutes of measuring, not after
    if args.merge:
        prof = merge_profiles([load_gpu_profile_file(p) for p in args.merge])
        validate_gpu_profile(prof)
        write_text(out, json.dumps(prof, indent=1), args.force, "--out")
        print(summarize(prof))
        print(f"wrote {out}")
        return 0

    def checkpoint(prof):
        # the first checkpoint creates --out; later ones replace this run's own file
        write_text(out, json.dumps(prof, indent=1), True, "--out")

    try:
        prof = measure_profile(args.device, args.quick, max_seconds=args.max_seconds,
                               checkpoint=checkpoint, attention_backend=args.attention_backend,
                               grids={sec: [] for sec in SECTIONS if sec not in sections})
    except (ValueError, RuntimeError) as e:
        print(f"autopar profile: {e}", file=sys.stderr)
        return 2
    validate_gpu_profile(prof)
    checkpoint(prof)
    print(summarize(prof))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
