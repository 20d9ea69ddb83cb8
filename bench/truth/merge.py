"""Merge the truth.json files of several run_all.py calls into one corpus file.

    python3 bench/truth/merge.py OUT.json call1/truth.json[:call1/work] call2/truth2.json[:call2/work] ...
    python3 bench/truth/merge.py --onto CORPUS.json "NOTE" new1.json new2.json ...   # re-measured rows

A run id that appears in several calls keeps the row of the LAST call given (later calls re-ran
what an earlier call lost or measured badly). Each row gets "call" (1, 2, ...) and
"measured_utc" (the start time of that call's workers).

Rows written by an older truth.py (before the fixes listed below) are brought up to the current
definitions, so that every row of the file means the same:
  * breakdown_s.host: now max(0, step_s - gpu_busy_s) per rank (the GPU's wait for the CPU in
    an unprofiled step); the old value, the idle time inside the profiled step, moves to
    gpu_idle_profiled_s.
  * alloc_retries_per_rank: now this run's count; the old rows held the worker process's
    running total, turned into per-run deltas from the worker's JSON lines (give the work/
    folder after ':').
  * breakdown_host_s: in the old rows, labels other than the nine buckets were summed into
    "other" (that includes bwd_launch, the main thread blocked in loss.backward());
    breakdown_host_labels says "merged" there and "raw" in the new rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _deltas(work: Path) -> dict:
    """run id -> per-rank alloc retries of that run, from cumulative per-process counters."""
    out = {}
    for f in sorted(work.glob("rows_*.jsonl")):
        prev = None
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("event") == "meta":
                prev = None                       # a new worker process
                continue
            cum = r.get("alloc_retries_per_rank")
            if cum is None or "event" in r:
                continue
            if prev is None:
                prev = [0] * len(cum)
            out[r["id"]] = [c - p for c, p in zip(cum, prev)]
            prev = cum
    return out


def upgrade(row: dict, deltas: dict) -> dict:
    if "step_s" not in row:
        return row
    old = "gpu_idle_profiled_s" not in row
    if not old:
        row["breakdown_host_labels"] = "raw"
        return row
    row["breakdown_host_labels"] = "merged"
    steps = row.get("step_s_per_rank") or [row["step_s"]]
    per = row.get("profile_per_rank")
    if per:
        for s, p in zip(steps, per):
            if "breakdown_s" in p:
                p["gpu_idle_profiled_s"] = p["breakdown_s"]["host"]
                p["breakdown_s"]["host"] = max(0.0, s - p["gpu_busy_s"])
    if "breakdown_s" in row:
        pr = row.get("breakdown_rank", 0)
        row["gpu_idle_profiled_s"] = row["breakdown_s"]["host"]
        row["breakdown_s"]["host"] = max(0.0, steps[pr] - row["gpu_busy_s"])
    if row["id"] in deltas:
        row["alloc_retries_per_rank"] = deltas[row["id"]]
    return row


def onto(corpus_path: Path, srcs: list[str], note: str) -> int:
    """Fold re-measured rows into an existing corpus: one new call (numbered after the corpus's
    last) made of the given run_all results, in order. A row of the same id replaces the
    corpus's, which moves to "superseded_runs"; within the new call a later file's row of an id
    replaces an earlier file's, which is kept there too."""
    doc = json.loads(corpus_path.read_text())
    call = max(c["call"] for c in doc["calls"]) + 1
    new: dict = {}
    first_utc = None
    for src in srcs:
        part = json.loads(Path(src).read_text())
        first_utc = first_utc or part.get("datetime_utc")
        for r in part["runs"]:
            r = upgrade(r, {})
            r["call"], r["measured_utc"] = call, part.get("datetime_utc")
            if r["id"] in new:
                doc["superseded_runs"].append(dict(new[r["id"]], superseded_by=f"call {call}: {src}"))
            new[r["id"]] = r
    runs = []
    for r in doc["runs"]:
        if r["id"] in new:
            doc["superseded_runs"].append(dict(r, superseded_by=f"call {call}: re-measured ({note})"))
            runs.append(new.pop(r["id"]))
        else:
            runs.append(r)
    runs += new.values()
    doc["runs"] = runs
    doc["calls"].append({"call": call, "measured_utc": first_utc, "rows": len(srcs), "note": note})
    corpus_path.write_text(json.dumps(doc, indent=1))
    print(f"{corpus_path}: call {call} replaced or added rows from {len(srcs)} file(s); {len(runs)} rows")
    return 0


def main(argv=None) -> int:
    argv = argv or sys.argv[1:]
    if argv and argv[0] == "--onto":
        # merge.py --onto CORPUS.json NOTE new1.json new2.json ...
        return onto(Path(argv[1]), argv[3:], argv[2])
    out, srcs = Path(argv[0]), argv[1:]
    rows: dict = {}
    order: list = []
    head = None
    calls = []
    for i, src in enumerate(srcs, 1):
        path, _, work = src.partition(":")
        doc = json.loads(Path(path).read_text())
        deltas = _deltas(Path(work)) if work else {}
        head = head or doc
        calls.append({"call": i, "measured_utc": doc.get("datetime_utc"), "elapsed_s": doc.get("elapsed_s"),
                      "budget_s": doc.get("budget_s"), "rows": len(doc["runs"])})
        for r in doc["runs"]:
            r = upgrade(r, deltas)
            r["call"] = i
            r["measured_utc"] = doc.get("datetime_utc")
            if r["id"] not in rows:
                order.append(r["id"])
            rows[r["id"]] = r
    strat = ["single", "ddp", "fsdp2", "tp", "pp"]
    runs = sorted((rows[i] for i in order), key=lambda r: (strat.index(r["strategy"]), order.index(r["id"])))
    doc = {k: v for k, v in head.items() if k not in ("runs", "elapsed_s", "budget_s", "datetime_utc")}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_all import BREAKDOWN_DOC
    doc.setdefault("method", {})["breakdown_s"] = BREAKDOWN_DOC     # the current definition
    doc["calls"] = calls
    doc["runs"] = runs
    out.write_text(json.dumps(doc, indent=1))
    n = {s: sum(1 for r in runs if r["strategy"] == s) for s in strat}
    ok = {s: sum(1 for r in runs if r["strategy"] == s and "step_s" in r) for s in strat}
    print(f"{out}: {len(runs)} rows; per strategy {n}; measured {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
