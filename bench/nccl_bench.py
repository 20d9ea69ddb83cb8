"""Collective benchmark: the raw timings `python -m autopar.profiling.comm fit` turns into a link's
alpha-beta (issue 8).

One process per GPU (backend nccl), or per CPU slot (``--backend gloo --device cpu``, for
checking the code path without a GPU: such numbers describe the loopback, not a GPU link).
For every group size g the world allows (2, 4, ..., N by default), the ranks are split into
N/g consecutive groups (``new_group``) that all run at once, as the groups of one mesh axis do
in a plan, and each group measures

* ``all_reduce``     in place on a tensor of B bytes;
* ``all_gather``     of B/g bytes per rank into a B-byte result;
* ``reduce_scatter`` of a B-byte input to B/g bytes per rank;
* ``all_to_all``     of B/g bytes per rank (B bytes over the group, ``all_to_all_single``);
* ``p2p``            every rank sends B bytes to its ring neighbour r+1 and receives B bytes
                     from r-1 at once (``batch_isend_irecv``);

so that ``bytes`` means what the ``nbytes`` argument of ``autopar.costmodel.collectives``'s functions means
(the full tensor after an all-reduce / all-gather, the input of a reduce-scatter, the total
over the group of an all-to-all, one message of a send).

Method: random inputs (``torch.randn``); each (collective, g, B) is checked once for the
right result at the smallest size, warmed up, then timed in regions of ``inner`` back-to-back
calls (about ``--region-ms`` each; the same count on every rank), after a barrier, with CUDA
events (a host clock on the CPU); the time of one call is the median over the regions of
region / inner, and the row keeps the slowest rank's median (a collective ends when its last
rank does).

NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 are set at import (before torch is imported, before the process group
is made, and so inherited by the processes this script spawns), and every rank asserts them
before it initialises; the JSON records each rank's values.

Output (``schema: autopar.comm_raw/v1``)::

    {"schema", "machine": {host, gpu, gpus, torch, cuda, nccl, driver, topology, link, ...},
     "meta": {backend, device, world_size, dtype, layout, group_sizes, sizes, env_per_rank, ...},
     "rows": [{"collective", "group_size", "bytes", "time_s", "concurrent_groups",
               "inner", "repeats", "time_min_s", "time_max_s"}]}

Run (GPU):  torchrun --standalone --nproc-per-node 8 bench/nccl_bench.py --out raw.json
       or:  python bench/nccl_bench.py --nproc 8 --out raw.json      (spawns the 8 ranks)
Run (CPU):  python bench/nccl_bench.py --backend gloo --device cpu --nproc 4 --out raw.json
Then:       python -m autopar.profiling.comm fit raw.json --out autopar/profiles/comm_h200_nvlink.json

On the lent 8x H200 machine (device `run`, kind nvidia-h200-x8, no carry: the machine's
python3 has torch; this script imports nothing of autopar), about 1-3 minutes:

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
    set -o pipefail; python3 -m torch.distributed.run --standalone --nproc-per-node 8 \
        bench/nccl_bench.py --out $OUT/nccl_raw_h200x8.json --max-seconds 420 2>&1 | tee $OUT/nccl_bench.log

and fit here (the fit needs autopar's dependencies, which that machine may lack).
"""

from __future__ import annotations

import os
import sys

# ---- NVLink multicast off, before anything imports torch ------------------------------------
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def force_safe_env() -> None:
    """Set the multicast-off variables in this process (and so in its children)."""
    for k, v in SAFE_ENV.items():
        old = os.environ.get(k)
        if old is not None and old != v:
            print(f"nccl_bench: {k}={old} overridden to {v} (NVLink multicast must stay off)",
                  file=sys.stderr, flush=True)
        os.environ[k] = v


def assert_safe_env() -> None:
    bad = {k: os.environ.get(k) for k, v in SAFE_ENV.items() if os.environ.get(k) != v}
    assert not bad, f"nccl_bench: NVLink multicast variables not set as required {SAFE_ENV}: {bad}"


force_safe_env()

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SCHEMA = "autopar.comm_raw/v1"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
DTYPES = {"bf16": ("bfloat16", 2), "fp16": ("float16", 2), "fp32": ("float32", 4)}


def size_grid(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    out, b = [], int(min_bytes)
    while b <= max_bytes:
        out.append(b)
        b *= factor
    return out


def default_group_sizes(world: int) -> list[int]:
    return [g for g in (2 ** k for k in range(1, int(math.log2(world)) + 1)) if world % g == 0] if world >= 2 else []


# ---- machine info (rank 0) -------------------------------------------------------------------

def _cmd(args: list[str]) -> str | None:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:  # noqa: BLE001 - tool missing or hung: leave the field empty
        return None


def machine_info(torch, device_type: str, backend: str) -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda or "none", "cpu_count": os.cpu_count()}
    if device_type == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info.update(gpu=names[0] if names else None, gpus=len(names), gpu_names=names,
                    gpu_memory_bytes=int(torch.cuda.get_device_properties(0).total_memory))
        try:
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # noqa: BLE001
            info["nccl"] = None
        info["driver"] = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        topo = _cmd(["nvidia-smi", "topo", "-m"])
        info["topology"] = topo
        nvl = _cmd(["nvidia-smi", "nvlink", "--status", "-i", "0"])
        info["nvlink_status_gpu0"] = nvl
        matrix = (topo or "").split("Legend")[0]
        info["link"] = "nvlink" if any(f"NV{k}" in matrix for k in range(1, 40)) else (
            "pcie" if topo else "unknown")
    else:
        info.update(gpu=f"cpu ({backend} processes)", gpus=0, nccl=None, link=f"{backend}-loopback")
    return info


# ---- one rank --------------------------------------------------------------------------------

class Clock:
    def __init__(self, torch, device):
        self.torch, self.device, self.cuda = torch, device, device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def time(self, run) -> float:
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


def make_op(torch, dist, coll: str, nbytes: int, group, members: list[int], rank: int, device, dtype,
            esize: int, gen, fill=None):
    """A callable enqueuing one call of `coll` for a `nbytes` tensor (cost.py's meaning), its
    buffers, and a checker of the result when the inputs were filled with `fill` (verification)."""
    g = len(members)
    me = members.index(rank)
    numel = nbytes // esize

    def rnd(n):
        return torch.randn(n, device=device, dtype=torch.float32, generator=gen).to(dtype)

    def val(n, v):
        return torch.full((n,), float(v), device=device, dtype=dtype)

    if coll == "all_reduce":
        x = val(numel, rank + 1) if fill else rnd(numel)

        def op():
            dist.all_reduce(x, group=group)

        def check():
            return bool((x == float(sum(m + 1 for m in members))).all())
    elif coll == "all_gather":
        inp = val(numel // g, rank) if fill else rnd(numel // g)
        out = torch.empty(numel, device=device, dtype=dtype)

        def op():
            dist.all_gather_into_tensor(out, inp, group=group)

        def check():
            exp = torch.cat([val(numel // g, m) for m in members])
            return bool((out == exp).all())
    elif coll == "reduce_scatter":
        inp = val(numel, rank + 1) if fill else rnd(numel)
        out = torch.empty(numel // g, device=device, dtype=dtype)

        def op():
            dist.reduce_scatter_tensor(out, inp, group=group)

        def check():
            return bool((out == float(sum(m + 1 for m in members))).all())
    elif coll == "all_to_all":
        per = numel // g                      # elements per rank; per // g to each peer
        if fill:
            inp = torch.cat([val(per // g, rank * g + j) for j in range(g)])
        else:
            inp = rnd(per)
        out = torch.empty(per, device=device, dtype=dtype)

        def op():
            dist.all_to_all_single(out, inp, group=group)

        def check():
            exp = torch.cat([val(per // g, m * g + me) for m in members])
            return bool((out == exp).all())
    elif coll == "p2p":
        send = val(numel, rank) if fill else rnd(numel)
        recv = torch.empty(numel, device=device, dtype=dtype)
        nxt, prv = members[(me + 1) % g], members[(me - 1) % g]

        def op():
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt, group),
                                           dist.P2POp(dist.irecv, recv, prv, group)])
            for r in reqs:
                r.wait()

        def check():
            return bool((recv == float(prv)).all())
    else:
        raise ValueError(f"unknown collective {coll!r}; known: {COLLECTIVES}")
    return op, check


def worker(rank: int, world: int, local_rank: int, a: argparse.Namespace) -> None:
    assert_safe_env()
    import warnings

    import torch
    import torch.distributed as dist
    # torch >= 2.13 renames all_gather_into_tensor / reduce_scatter_tensor (*_single); the old
    # names are kept: the GPU machines run torch 2.11.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    if a.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(a.backend, rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=a.timeout_s), **kw)
    try:
        _run(torch, dist, rank, world, device, a)
    finally:
        dist.destroy_process_group()


def _run(torch, dist, rank: int, world: int, device, a: argparse.Namespace) -> None:
    clock = Clock(torch, device)
    dtype = getattr(torch, DTYPES[a.dtype][0])
    esize = DTYPES[a.dtype][1]
    gen = torch.Generator(device=device)
    gen.manual_seed(1234 + rank)
    t_start = time.monotonic()
    log = (lambda s: print(f"[nccl_bench {time.monotonic() - t_start:6.1f}s] {s}", flush=True)) \
        if rank == 0 else (lambda s: None)

    def allmax(v: float) -> float:
        t = torch.tensor([float(v)], device=device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    env_all = [None] * world
    dist.all_gather_object(env_all, {k: os.environ.get(k) for k in SAFE_ENV})
    if any(e != SAFE_ENV for e in env_all):
        raise RuntimeError(f"NVLink multicast variables differ on some rank: {env_all}")

    group_sizes = [int(g) for g in a.group_sizes.split(",")] if a.group_sizes else default_group_sizes(world)
    for g in group_sizes:
        if g < 2 or world % g:
            raise SystemExit(f"nccl_bench: group size {g} does not divide world size {world} (or is < 2)")
    collectives = a.collectives.split(",") if a.collectives else list(COLLECTIVES)
    for c in collectives:
        if c not in COLLECTIVES:
            raise SystemExit(f"nccl_bench: unknown collective {c!r}; known: {', '.join(COLLECTIVES)}")
    max_bytes = a.max_bytes if a.max_bytes else (2**30 if device.type == "cuda" else 16 * 2**20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cap = 2 ** int(math.log2(free / 6))      # a B-byte p2p holds 2B; keep NCCL room besides
        if max_bytes > cap:
            log(f"max size capped by free GPU memory: {max_bytes} -> {cap} bytes")
            max_bytes = cap
    sizes = size_grid(a.min_bytes, max_bytes, a.factor)
    align = max(group_sizes) ** 2 * esize
    bad = [b for b in sizes if b % align]
    if bad:
        raise SystemExit(f"nccl_bench: sizes {bad} are not multiples of g^2 x element size = {align}")

    machine = machine_info(torch, device.type, a.backend) if rank == 0 else None
    doc = {"schema": SCHEMA, "machine": machine,
           "meta": {"backend": a.backend, "device": device.type, "world_size": world, "dtype": a.dtype,
                    "layout": a.layout, "group_sizes": group_sizes, "collectives": collectives, "sizes": sizes,
                    "date": _dt.date.today().isoformat(), "env_per_rank": env_all,
                    "timing": ("CUDA events" if device.type == "cuda" else "host perf_counter")
                    + f" around regions of `inner` back-to-back calls (~{a.region_ms} ms, same count on every "
                      f"rank) after a barrier; {a.warmup} warm-up calls; median over {a.min_repeats}-"
                      f"{a.max_repeats} regions; the slowest rank's median kept",
                    "inputs": "torch.randn cast to dtype; results checked once per (collective, group size) "
                              "at the smallest size with known values",
                    "bytes": "cost.py's nbytes: all_reduce tensor; all_gather result; reduce_scatter input; "
                             "all_to_all total over the group (B/g per rank); p2p one message (each rank "
                             "sends B to r+1 and receives B from r-1 at once)",
                    "truncated": False},
           "rows": []}
    out_path = Path(a.out)

    def save():
        if rank != 0:
            return
        out_path.parent.mkdir(parents=True, exist_ok=True)
        doc["meta"]["seconds"] = round(time.monotonic() - t_start, 1)
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out_path)

    deadline = t_start + a.max_seconds
    log(f"{a.backend} on {world} {device.type} ranks, {a.dtype}: {len(collectives)} collectives x group sizes "
        f"{group_sizes} ({a.layout}) x {len(sizes)} sizes {sizes[0]}..{sizes[-1]} bytes")
    for g in group_sizes:
        parts = [list(range(i, i + g)) for i in range(0, world, g)]
        groups = [dist.new_group(p) for p in parts]          # every rank makes every group, same order
        mine = rank // g
        active_parts = parts if a.layout == "concurrent" else parts[:1]
        active = mine < len(active_parts)
        group, members = groups[mine], parts[mine]
        for coll in collectives:
            if allmax(time.monotonic() > deadline):
                doc["meta"]["truncated"] = True
                break
            # correctness once, at the smallest size, with known values
            ok = True
            if active:
                op, check = make_op(torch, dist, coll, sizes[0], group, members, rank, device, dtype, esize,
                                    gen, fill=True)
                op()
                clock.sync()
                ok = check()
                del op, check
            if allmax(0.0 if ok else 1.0) > 0:
                raise RuntimeError(f"nccl_bench: {coll} over groups of {g} gave a wrong result")
            n_rows = 0
            for nbytes in sizes:
                if allmax(time.monotonic() > deadline):
                    doc["meta"]["truncated"] = True
                    break
                op = None
                if active:
                    op, chk = make_op(torch, dist, coll, nbytes, group, members, rank, device, dtype, esize, gen)
                    del chk                            # it holds the buffers too
                    for _ in range(a.warmup):
                        op()
                    clock.sync()
                dist.barrier()
                t0 = clock.time(op) if active else 0.0
                t0 = max(allmax(t0), 1e-7)
                inner = int(min(max(round(a.region_ms * 1e-3 / t0), 1), a.max_inner))
                repeats = int(min(max(round(a.total_ms * 1e-3 / (t0 * inner)), a.min_repeats), a.max_repeats))
                ts = []
                for _ in range(repeats):
                    dist.barrier()
                    if active:
                        ts.append(clock.time(lambda op=op, inner=inner: [op() for _ in range(inner)]) / inner)
                med = statistics.median(ts) if ts else 0.0
                t = allmax(med)
                tmin = -allmax(-(min(ts) if ts else math.inf))   # fastest region of any active rank
                tmax = allmax(max(ts) if ts else 0.0)
                del op
                if rank == 0:
                    doc["rows"].append({"collective": coll, "group_size": g, "bytes": nbytes, "time_s": t,
                                        "concurrent_groups": len(active_parts), "inner": inner,
                                        "repeats": repeats, "time_min_s": tmin, "time_max_s": tmax})
                n_rows += 1
            if device.type == "cuda":
                torch.cuda.empty_cache()
            last = [r for r in doc["rows"] if r["collective"] == coll and r["group_size"] == g][-1:] \
                if rank == 0 else []
            if last:
                r = last[0]
                log(f"{coll:14s} g={g}: {n_rows} sizes; largest {r['bytes']} B in {r['time_s'] * 1e6:.1f} us "
                    f"({r['bytes'] / r['time_s'] / 1e9:.2f} GB/s algbw)")
            save()
        if doc["meta"]["truncated"]:
            log("deadline (--max-seconds) reached: the rest is skipped and meta.truncated is set")
            break
    save()
    if rank == 0:
        print(f"nccl_bench: wrote {len(doc['rows'])} rows to {out_path}", flush=True)


# ---- launching -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(i: int, world: int, a: argparse.Namespace) -> None:
    os.environ.update(RANK=str(i), LOCAL_RANK=str(i), WORLD_SIZE=str(world))
    worker(i, world, i, a)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Time collectives over every group size (see module doc).")
    ap.add_argument("--out", required=True, help="raw JSON to write (rank 0)")
    ap.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--nproc", type=int, default=0,
                    help="processes to spawn when not started by torchrun (default: the GPU count, or 2 on CPU)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--min-bytes", type=int, default=1024)
    ap.add_argument("--max-bytes", type=int, default=0, help="default 1 GiB on cuda (capped by free memory), "
                                                              "16 MiB on cpu")
    ap.add_argument("--factor", type=int, default=2, help="size step (2 or 4)")
    ap.add_argument("--group-sizes", default="", help="comma list; default 2, 4, ..., world")
    ap.add_argument("--collectives", default="", help=f"comma list; default {','.join(COLLECTIVES)}")
    ap.add_argument("--layout", default="concurrent", choices=["concurrent", "single"],
                    help="all world/g groups at once (as one mesh axis's groups run), or only the first")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--region-ms", type=float, default=2.0, help="target length of one timed region")
    ap.add_argument("--total-ms", type=float, default=40.0, help="target timed length per size")
    ap.add_argument("--min-repeats", type=int, default=5)
    ap.add_argument("--max-repeats", type=int, default=20)
    ap.add_argument("--max-inner", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=1e9,
                    help="stop starting new sizes after this many seconds (meta.truncated says so)")
    ap.add_argument("--timeout-s", type=float, default=600, help="process-group timeout")
    a = ap.parse_args(argv)
    if a.backend == "nccl" and a.device != "cuda":
        ap.error("--backend nccl needs --device cuda")
    if a.dtype is None:
        a.dtype = "bf16" if a.device == "cuda" else "fp32"
    if a.factor < 2:
        ap.error("--factor must be >= 2")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:        # torchrun (or a launcher like it)
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
               int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), a)
        return 0
    import torch
    import torch.multiprocessing as mp
    if a.device == "cuda" and torch.cuda.device_count() == 0:
        print("nccl_bench: no CUDA GPU visible; for a CPU check use --backend gloo --device cpu", file=sys.stderr)
        return 2
    n = a.nproc or (torch.cuda.device_count() if a.device == "cuda" else 2)
    if n < 2:
        print(f"nccl_bench: needs at least 2 processes (got {n})", file=sys.stderr)
        return 2
    if a.device == "cuda" and n > torch.cuda.device_count():
        print(f"nccl_bench: {n} processes but {torch.cuda.device_count()} GPUs", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    mp.spawn(_spawned, args=(n, a), nprocs=n, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
