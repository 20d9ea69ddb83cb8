"""Driver of the measurement corpus: every run of configs.py in one bounded command.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
    python3 bench/truth/run_all.py --out-dir $OUT --budget-s 420 [--nccl-seconds 70]
    python3 bench/truth/run_all.py --smoke --out-dir /tmp/truth_smoke      # CPU / gloo, tiny models

Phases, each with its share of the time budget (what a phase leaves over goes to the next):
  1. bench/nccl_bench.py on the 2 GPUs (torchrun), bounded by --nccl-seconds;
  2. the 1-GPU runs, split over two workers, one per GPU (CUDA_VISIBLE_DEVICES=0 and 1), at once;
  3. the 2-GPU runs in one torchrun worker (ddp, fsdp2, tp, pp in turn, each with a deadline).
A run whose estimate (configs.est_run_s) does not fit before its deadline is recorded as
skipped. A worker that dies or stops making progress is killed (its own process group only);
its current run is recorded with the error, and a new worker takes the remaining runs.
Output: <out-dir>/truth.json (schema in README.md) and the workers' raw JSON lines.
"""

from __future__ import annotations

import os

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v

import argparse
import datetime as _dt
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import contextlib

import configs as C  # noqa: E402

PY = sys.executable


def log(msg):
    print(f"[run_all {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


BREAKDOWN_DOC = ("GPU time per region of one torch.profiler step after the timed ones (kernels tied to the "
                 "region whose CPU code launched them); exposed_comm = NCCL kernel time not overlapped by other "
                 "GPU work; host = max(0, step_s - GPU busy time of the profiled step); rank 0, for pp the last "
                 "stage (profile_per_rank holds every rank); see bench/truth/README.md")
PID_DIRS: list = []
STALL_S = 90.0


def _is_worker(pid: int) -> bool:
    try:
        return b"truth.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_pids(pid_dir: Path) -> None:
    """SIGKILL the worker processes that wrote their pid into pid_dir, and wait for them."""
    pids = []
    for f in pid_dir.glob("pid_*") if pid_dir.exists() else []:
        with contextlib.suppress(ValueError):
            pids.append(int(f.read_text()))
    pids = [pid for pid in pids if _is_worker(pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    t = time.time()
    while time.time() - t < 20 and any(Path(f"/proc/{pid}").exists() for pid in pids):
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    if pids:
        log(f"killed worker pids {pids}")


def run_worker(name: str, cmd_prefix: list[str], runs: list[dict], out: Path, env: dict,
               hard_deadline: float, device: str) -> None:
    """Run `runs` through truth.py workers until all have a row; restart after a crash or hang."""
    attempt = 0
    while True:
        done = {r["id"] for r in read_lines(out) if "id" in r and "event" not in r}
        todo = [r for r in runs if r["id"] not in done]
        if not todo:
            return
        if time.time() > hard_deadline - 5:
            with out.open("a") as f:
                for r in todo:
                    f.write(json.dumps({**{k: r[k] for k in ("id", "model", "model_spec", "family", "n_gpus",
                                                              "strategy", "microbatch", "seq", "n_microbatches",
                                                              "recompute")},
                                        "params": C.params(r["model"]), "skipped": True, "oom": False,
                                        "reason": "time budget (driver)"}) + "\n")
            return
        attempt += 1
        cfg = Path(tempfile.gettempdir()) / f"truth_{out.stem}_cfg{attempt}.json"
        cfg.write_text(json.dumps(todo))
        cmd = cmd_prefix + [str(HERE / "truth.py"), "--configs", str(cfg), "--out", str(out),
                            "--device", device]
        log(f"{name}: start worker #{attempt} with {len(todo)} runs")
        pid_dir = Path(tempfile.gettempdir()) / "truth_pids_nccl"
        p = subprocess.Popen(cmd, env=dict(env, TRUTH_PID_DIR=str(pid_dir)), start_new_session=True)
        PID_DIRS.append(pid_dir)
        last_n, last_t, current = len(read_lines(out)), time.time(), None
        killed = None
        while p.poll() is None:
            time.sleep(1.0)
            lines = read_lines(out)
            if len(lines) != last_n:
                last_n, last_t = len(lines), time.time()
                starts = [l for l in lines if l.get("event") == "start"]
                current = starts[-1]["id"] if starts else None
            cur = next((r for r in todo if r["id"] == current), None)
            stall = STALL_S + 3 * C.est_run_s(cur) if cur else 2 * STALL_S
            if time.time() - last_t > stall:
                killed = f"no progress for {stall:.0f}s (hang)"
            elif time.time() > hard_deadline:
                killed = "hard deadline of the phase"
            if killed:
                log(f"{name}: killing worker ({killed})")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                kill_pids(pid_dir)   # torchrun starts its ranks in sessions of their own
                break
        lines = read_lines(out)
        done = {r["id"] for r in lines if "id" in r and "event" not in r}
        starts = [l["id"] for l in lines if l.get("event") == "start"]
        if starts and starts[-1] not in done:
            bad = next(r for r in runs if r["id"] == starts[-1])
            why = killed or f"worker exited with {p.returncode} during the run"
            with out.open("a") as f:
                f.write(json.dumps({**{k: bad[k] for k in ("id", "model", "model_spec", "family", "n_gpus",
                                                            "strategy", "microbatch", "seq", "n_microbatches",
                                                            "recompute")},
                                    "params": C.params(bad["model"]), "oom": False,
                                    "error": f"worker died: {why}"}) + "\n")
            log(f"{name}: {bad['id']} recorded as failed ({why})")
        elif p.returncode not in (0, None) and not killed:
            log(f"{name}: worker exited with {p.returncode} between runs")
            if attempt > 3:
                return
        if killed == "hard deadline of the phase":
            continue   # the loop records the rest as skipped


def balance(runs: list[dict], k: int) -> list[list[dict]]:
    """Greedy split by estimated time, keeping each part in priority order."""
    parts = [[] for _ in range(k)]
    load = [0.0] * k
    for r in sorted(runs, key=lambda r: -C.est_run_s(r)):
        i = load.index(min(load))
        parts[i].append(r)
        load[i] += C.est_run_s(r)
    return [sorted(p, key=lambda r: (r["priority"], C.est_run_s(r))) for p in parts]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--budget-s", type=float, default=420, help="whole command, NCCL bench included")
    ap.add_argument("--nccl-seconds", type=float, default=70)
    ap.add_argument("--single-share", type=float, default=0.36, help="of the time left after NCCL")
    ap.add_argument("--smoke", action="store_true", help="CPU/gloo, tiny models")
    ap.add_argument("--only", default="", help="comma list of strategies to run (default all)")
    ap.add_argument("--skip-nccl", action="store_true")
    ap.add_argument("--stall-s", type=float, default=90, help="a worker silent this long (+3x the run's "
                    "estimate) is taken as hung and killed")
    ap.add_argument("--exclude-ids", default="", help="comma list of run ids to leave out")
    ap.add_argument("--accumulation", action="store_true",
                    help="the steps accumulating several microbatches (configs.accumulation_runs) instead of the corpus")
    ap.add_argument("--ids", default="", help="comma list of run ids: run only these (in the list's order "
                    "within each strategy)")
    ap.add_argument("--result", default="truth.json")
    ap.add_argument("--work-dir", default="", help="worker JSON lines and run lists (default <out-dir>/work)")
    a = ap.parse_args(argv)
    global STALL_S
    STALL_S = a.stall_s
    t_begin = time.time()
    deadline = t_begin + a.budget_s
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(a.work_dir) if a.work_dir else out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    device = "cpu" if a.smoke else "cuda"
    only = set(filter(None, a.only.split(",")))

    if a.smoke:
        single, dist_list = C.smoke_runs()
        dist = {}
        for r in dist_list:
            dist.setdefault(r["strategy"], []).append(r)
    else:
        single, dist = C.single_runs(), C.dist_runs()
        if a.accumulation:
            acc = C.accumulation_runs()
            single, dist = acc["single"], {k: v for k, v in acc.items() if k != "single"}
    ex = set(filter(None, a.exclude_ids.split(",")))
    ids = set(filter(None, a.ids.split(",")))
    known = {r["id"] for r in single} | {r["id"] for v in dist.values() for r in v}
    if ids - known:
        ap.error(f"--ids: unknown run ids {sorted(ids - known)}; the run list is bench/truth/configs.py")
    if ids:
        ex |= known - ids
    single = [r for r in single if r["id"] not in ex]
    dist = {k: [r for r in v if r["id"] not in ex] for k, v in dist.items()}
    dist = {k: v for k, v in dist.items() if v}
    if only:
        single = single if "single" in only else []
        dist = {k: v for k, v in dist.items() if k in only}

    # 1. NCCL
    if not a.smoke and not a.skip_nccl:
        log("nccl_bench")
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "bench" / "nccl_bench.py"), "--out", str(out_dir / "nccl_raw_h200x2.json"),
               "--max-seconds", str(a.nccl_seconds)]
        pid_dir = Path(tempfile.gettempdir()) / "truth_pids_nccl"
        p = subprocess.Popen(cmd, env=dict(env, TRUTH_PID_DIR=str(pid_dir)), start_new_session=True)
        PID_DIRS.append(pid_dir)
        try:
            p.wait(timeout=a.nccl_seconds + 50)
        except subprocess.TimeoutExpired:
            log("nccl_bench over its time: killed")
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log(f"nccl_bench exit {p.returncode}")

    # 2. single-GPU runs, two workers at once
    left = deadline - time.time()
    n_dist = sum(len(v) for v in dist.values())
    t_single_end = time.time() + (left * a.single_share if n_dist else left)
    if single:
        for r in single:
            r["deadline"] = t_single_end
        parts = balance(single, 2 if not a.smoke else 1)
        threads = []
        for i, part in enumerate(parts):
            e = dict(env)
            if not a.smoke:
                e["CUDA_VISIBLE_DEVICES"] = str(i)
            th = threading.Thread(target=run_worker, args=(f"single{i}", [PY], part,
                                                           work / f"rows_single{i}.jsonl", e,
                                                           t_single_end + 60, device))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        log("single runs done")

    # 3. 2-GPU runs
    if dist:
        left = deadline - time.time()
        weights = {"ddp": 0.8, "fsdp2": 1.6, "tp": 0.9, "pp": 1.2}
        tot = sum(weights.get(k, 1.0) for k in dist)
        t = time.time()
        all_runs = []
        for k, runs in dist.items():
            t += left * weights.get(k, 1.0) / tot
            for r in runs:
                r["deadline"] = t
            all_runs += runs
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        run_worker("dist", cmd, all_runs, work / "rows_dist.jsonl", env, deadline + 30, device)
        log("2-GPU runs done")

    for d in PID_DIRS:          # nothing of ours outlives the driver
        kill_pids(d)

    # combine
    rows, meta = [], {}
    for f in sorted(work.glob("rows_*.jsonl")):
        for r in read_lines(f):
            if r.get("event") == "meta":
                meta = meta or r
            elif "event" not in r:
                rows.append(r)
    order = {r["id"]: i for i, r in enumerate(single + [x for v in dist.values() for x in v])}
    rows.sort(key=lambda r: order.get(r["id"], 1e9))
    doc = {
        "gpu": meta.get("gpu"), "torch": meta.get("torch"), "cuda": meta.get("cuda"),
        "date": meta.get("date") or _dt.date.today().isoformat(),
        "datetime_utc": meta.get("datetime_utc"), "nccl": meta.get("nccl"),
        "gpu_memory_bytes": meta.get("gpu_memory_bytes"), "sm_count": meta.get("sm_count"),
        "python": meta.get("python"),
        "what": "issue 13 measurement corpus: plain PyTorch training steps of zoo models (bench/truth)",
        "setting": "bf16 autocast fwd/bwd, fp32 master params + grads, AdamW(fused=True) fp32 state, SDPA, "
                   "zoo cross-entropy, zero_grad(set_to_none=True), eager mode",
        "method": {
            "step_s": "CUDA events around each step, steps back to back, after 3 warm-up steps; median of "
                      "n_timed (max over ranks)",
            "host_enqueue_s": "host wall time for step() to return, started on an idle GPU, no sync inside; "
                              "median of 2 warm-up steps (max over ranks)",
            "peak_memory": "torch.cuda.max_memory_allocated / max_memory_reserved over warm-up + timed steps, "
                           "max over ranks (per-rank lists beside)",
            "breakdown_s": BREAKDOWN_DOC,
            "tokens_per_s": "global tokens per step / step_s (ddp, fsdp2: 2 x microbatch x seq; tp: microbatch x "
                            "seq; pp: n_microbatches x microbatch x seq)",
            "model_tflops_per_gpu": "(6 * params * tokens + 6 * layers * hidden * seq * tokens) / step_s / n_gpus",
        },
        "budget_s": a.budget_s, "elapsed_s": time.time() - t_begin,
        "runs": rows,
    }
    res = out_dir / a.result
    res.write_text(json.dumps(doc, indent=1))
    # a short table last: the reply carries the end of the output
    n_ok = sum(1 for r in rows if "step_s" in r)
    log(f"{len(rows)} rows ({n_ok} measured) -> {res}; {time.time() - t_begin:.0f}s")
    for r in rows:
        if "step_s" in r:
            b = r.get("breakdown_s", {})
            print(f"{r['id']:<34} {r['step_s']*1e3:8.1f}ms alloc {r['peak_allocated_bytes']/2**30:6.1f} "
                  f"resv {r['peak_reserved_bytes']/2**30:6.1f} host {r['host_enqueue_s']*1e3:6.1f} "
                  f"blk {b.get('blocks', 0)*1e3:6.1f} head {b.get('head_loss', 0)*1e3:5.1f} "
                  f"opt {b.get('optimizer', 0)*1e3:5.1f} comm {b.get('exposed_comm', 0)*1e3:5.1f} "
                  f"idle {b.get('host', 0)*1e3:5.1f}", flush=True)
        else:
            print(f"{r['id']:<34} {'OOM' if r.get('oom') else 'SKIP' if r.get('skipped') else 'ERR'} "
                  f"{(r.get('error') or r.get('reason') or '')[:110]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
