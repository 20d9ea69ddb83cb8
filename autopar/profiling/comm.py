"""Communication profiles: the alpha-beta of a link, fitted to measured collectives (issue 8).

``bench/nccl_bench.py`` times all-reduce, all-gather, reduce-scatter, all-to-all and ring
send/recv over message sizes and group sizes (raw JSON, ``schema: autopar.comm_raw/v1``).
``fit(rows)`` fits, per collective, the model ``autopar.costmodel.collectives`` uses for it,

    t = a(n) * alpha + b(n) * B / bw                    (B: cost.py's ``nbytes``)

    all_reduce       a = 2(n-1)   b = 2(n-1)/n
    all_gather       a = (n-1)    b = (n-1)/n          (B: the gathered result)
    reduce_scatter   a = (n-1)    b = (n-1)/n          (B: the input)
    all_to_all       a = (n-1)    b = (n-1)/n^2        (B: the total over the group)
    p2p              a = 1        b = 1                (B: one message)

by least squares on the relative error (each row's equation divided by its measured time,
so that a 10 us and a 10 ms row weigh alike; alpha >= 0). The coefficients are read off
cost.py's own functions (`coefficients`), so the fit and the cost model cannot drift apart.
The link the cost model gets (``intra_link``) is one joint fit over all rows, each
collective weighing the same, since the cost model has one alpha-beta per link for every
collective; ``per_collective`` keeps each collective's own fit, and its ``per_group_size``
fits show how well one alpha-beta spans the group sizes.

The JSON written (``schema: autopar.comm_profile/v1``)::

    {"schema", "link": "nvlink", "gpus": 8, "gpu": "NVIDIA H200", "backend": "nccl",
     "dtype", "date", "torch", "nccl",
     "intra_link": {"bandwidth_bytes_per_s", "latency_s"},   # as a cluster file's intra_link
     "intra_link_fit": {"from": "joint", quality...},
     "per_collective": {NAME: {"alpha_s", "beta_bytes_per_s", "rows", "sizes", "group_sizes",
                               "rel_residual_median", "rel_residual_max", "rel_residual_rms",
                               "r2", "r2_log", "per_group_size": {"2": {...}, ...}}},
     "rows": [{"collective", "group_size", "bytes", "time_s", "fit_s", "link_s"}],
     "machine": {...}, "meta": {...}}

``fit_s`` is the row's collective fit, ``link_s`` what the cost model predicts with
``intra_link``. ``r2`` is on times, ``r2_log`` on log times (the one that sees small messages).

Shipped profiles live in ``autopar/profiles/comm_*.json``; a cluster preset named in
``autopar.hardware.presets.COMM_PROFILES`` takes its ``intra_link`` from its profile when that file
is shipped (``measured_link``).

CLI: ``python -m autopar.profiling.comm fit RAW.json [RAW.json ...] --out FILE`` and
``python -m autopar.profiling.comm show FILE`` (a profile, or a raw file fitted on the fly).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from autopar.costmodel import collectives
from autopar.hardware.mesh import MeshAxis
from autopar.hardware.profiles import (
    COLLECTIVES,
    COMM_SCHEMA,
    CommProfileError,
    resolve_comm_profile,
    save_comm_profile,
    validate_comm_profile,
)
from autopar.hardware.specs import Link

RAW_SCHEMA = "autopar.comm_raw/v1"
ROW_KEYS = ("collective", "group_size", "bytes", "time_s")
MIN_SIZES = 3          # distinct message sizes a collective needs: two unknowns and a residual




# ---- the model -------------------------------------------------------------------------------

def coefficients(collective: str, n: int) -> tuple[float, float]:
    """(a, b) with cost.py's time = a * latency + b * nbytes / bandwidth, read off cost.py's
    functions for a group of n."""
    if collective == "p2p":
        return collectives.p2p_s(1.0, Link(math.inf, 1.0)), collectives.p2p_s(1.0, Link(1.0, 0.0))
    fn = {"all_reduce": collectives.all_reduce_s, "all_gather": collectives.all_gather_s,
          "reduce_scatter": collectives.reduce_scatter_s, "all_to_all": collectives.all_to_all_s}.get(collective)
    if fn is None:
        raise CommProfileError(f"unknown collective {collective!r}; known: {', '.join(COLLECTIVES)}")
    return fn(1.0, MeshAxis(n, math.inf, 1.0, False)), fn(1.0, MeshAxis(n, 1.0, 0.0, False))


def predict(collective: str, n: int, nbytes: float, alpha_s: float, beta_bytes_per_s: float) -> float:
    a, b = coefficients(collective, n)
    return a * alpha_s + b * nbytes / beta_bytes_per_s


# ---- fitting ---------------------------------------------------------------------------------

def _check_rows(rows: Any) -> list[dict]:
    if not isinstance(rows, (list, tuple)) or not rows:
        raise CommProfileError("fit: no rows to fit (expected a list of {collective, group_size, bytes, time_s})")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise CommProfileError(f"fit: row {i} is not a mapping: {r!r}")
        lack = [k for k in ROW_KEYS if k not in r]
        if lack:
            raise CommProfileError(f"fit: row {i} lacks {lack}: {r!r}")
        c, n, b, t = r["collective"], r["group_size"], r["bytes"], r["time_s"]
        if c not in COLLECTIVES:
            raise CommProfileError(f"fit: row {i}: unknown collective {c!r}; known: {', '.join(COLLECTIVES)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise CommProfileError(f"fit: row {i}: group_size must be an integer >= 2 (got {n!r})")
        for k, v in (("bytes", b), ("time_s", t)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or not math.isfinite(v):
                raise CommProfileError(f"fit: row {i}: {k} must be a positive number (got {v!r})")
        out.append({"collective": c, "group_size": int(n), "bytes": float(b), "time_s": float(t)})
    return out


def _solve(rows: list[dict], weights: list[float] | None = None) -> tuple[float, float]:
    """(alpha_s, beta_bytes_per_s) minimising sum(w * ((pred - t) / t)^2), alpha >= 0."""
    A = np.empty((len(rows), 2))
    for i, r in enumerate(rows):
        a, b = coefficients(r["collective"], r["group_size"])
        A[i] = (a / r["time_s"], b * r["bytes"] / r["time_s"])
    y = np.ones(len(rows))
    if weights is not None:
        w = np.sqrt(np.asarray(weights, dtype=float))
        A, y = A * w[:, None], y * w
    (alpha, inv_bw), *_ = np.linalg.lstsq(A, y, rcond=None)
    if alpha < 0:                                   # latency cannot be negative: refit without it
        alpha = 0.0
        inv_bw = float(A[:, 1] @ y / (A[:, 1] @ A[:, 1]))
    if not inv_bw > 0:
        raise CommProfileError(
            "fit: the bandwidth term came out non-positive: the sizes never reach the bandwidth-bound "
            "regime (measure larger messages)")
    return float(alpha), float(1.0 / inv_bw)


def _quality(rows: list[dict], pred: list[float]) -> dict:
    t = np.array([r["time_s"] for r in rows])
    p = np.array(pred)
    rel = (p - t) / t

    def r2(y, f):
        ss = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float(((y - f) ** 2).sum()) / ss if ss > 0 else float("nan")

    return {"rel_residual_median": float(np.median(np.abs(rel))), "rel_residual_max": float(np.abs(rel).max()),
            "rel_residual_rms": float(np.sqrt((rel ** 2).mean())), "r2": r2(t, p),
            "r2_log": r2(np.log(t), np.log(p)) if (p > 0).all() else float("nan")}


def _fit_one(rows: list[dict], weights=None, what: str = "") -> dict:
    try:
        alpha, beta = _solve(rows, weights)
    except CommProfileError as e:
        sizes = sorted({r["bytes"] for r in rows})
        raise CommProfileError(f"{e} [{what}: {len(rows)} rows, {int(sizes[0])}..{int(sizes[-1])} bytes]") from None
    pred = [predict(r["collective"], r["group_size"], r["bytes"], alpha, beta) for r in rows]
    return {"alpha_s": alpha, "beta_bytes_per_s": beta, "rows": len(rows),
            "sizes": len({r["bytes"] for r in rows}),
            "group_sizes": sorted({r["group_size"] for r in rows}), **_quality(rows, pred)}


def fit(rows: Iterable[dict], *, intra_from: str = "joint", min_sizes: int = MIN_SIZES,
        link: str | None = None, gpus: int | None = None) -> dict:
    """Fit alpha (s per step) and beta (bytes/s) per collective, and the link for the cost
    model (``intra_from``: "joint" over all collectives, or one collective's name). Returns a
    profile (``autopar.comm_profile/v1``) without machine information; `from_raw` adds it.
    Raises CommProfileError when a collective has rows at fewer than `min_sizes` sizes."""
    rows = _check_rows(list(rows))
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["collective"], []).append(r)
    few = {c: sorted({r["bytes"] for r in rs}) for c, rs in by.items() if len({r["bytes"] for r in rs}) < min_sizes}
    if few:
        detail = "; ".join(f"{c} at {len(s)} size(s) {[int(b) for b in s]}" for c, s in few.items())
        raise CommProfileError(
            f"fit: too few message sizes to separate latency from bandwidth: {detail}. Each collective needs "
            f"rows at >= {min_sizes} distinct sizes, from latency-bound (~KB) to bandwidth-bound (~100 MB+)")
    per: dict[str, dict] = {}
    for c in (c for c in COLLECTIVES if c in by):
        rs = by[c]
        f = _fit_one(rs, what=c)
        pg = {}
        for n in f["group_sizes"]:
            sub = [r for r in rs if r["group_size"] == n]
            if len({r["bytes"] for r in sub}) < min_sizes:
                pg[str(n)] = {"skipped": f"rows at fewer than {min_sizes} sizes"}
                continue
            try:
                pg[str(n)] = _fit_one(sub, what=f"{c} n={n}")
            except CommProfileError as e:
                pg[str(n)] = {"skipped": str(e)}
        f["per_group_size"] = pg
        per[c] = f
    if intra_from == "joint":
        w = [1.0 / len(by[r["collective"]]) for r in rows]       # each collective weighs the same
        joint = _fit_one(rows, w, what="joint")
        joint["from"] = "joint fit over " + ", ".join(per) + " (each collective weighted equally)"
    elif intra_from in per:
        joint = dict(per[intra_from])
        joint.pop("per_group_size", None)
        joint["from"] = f"{intra_from} fit"
    else:
        raise CommProfileError(f"fit: intra_from must be 'joint' or a fitted collective ({', '.join(per)}); "
                               f"got {intra_from!r}")
    alpha, beta = joint["alpha_s"], joint["beta_bytes_per_s"]
    out_rows = []
    for r in rows:
        f = per[r["collective"]]
        out_rows.append({**r, "fit_s": predict(r["collective"], r["group_size"], r["bytes"],
                                               f["alpha_s"], f["beta_bytes_per_s"]),
                         "link_s": predict(r["collective"], r["group_size"], r["bytes"], alpha, beta)})
    return {"schema": COMM_SCHEMA, "link": link, "gpus": gpus,
            "intra_link": {"bandwidth_bytes_per_s": beta, "latency_s": alpha},
            "intra_link_fit": {k: v for k, v in joint.items() if k not in ("alpha_s", "beta_bytes_per_s")},
            "per_collective": per, "rows": out_rows,
            "meta": {"fit": "weighted least squares on relative error, t = a(n) alpha + b(n) B / beta with "
                            "a, b from autopar.costmodel.collectives' formulas; alpha >= 0",
                     "min_sizes": min_sizes}}


def from_raw(raws: list[dict], *, link: str | None = None, intra_from: str = "joint",
             min_bytes: float = 0, max_bytes: float = math.inf, collectives: list[str] | None = None,
             sources: list[str] | None = None) -> dict:
    """A profile from one or more raw benchmark documents (repeated runs of one machine)."""
    for i, raw in enumerate(raws):
        if not isinstance(raw, dict) or raw.get("schema") != RAW_SCHEMA:
            raise CommProfileError(f"raw file {sources[i] if sources else i}: schema is "
                                   f"{raw.get('schema') if isinstance(raw, dict) else None!r}, expected {RAW_SCHEMA!r}")
    machines = [raw.get("machine") or {} for raw in raws]
    if len({m.get("gpu") for m in machines}) > 1:
        raise CommProfileError(f"raw files are of different GPUs: {sorted({str(m.get('gpu')) for m in machines})}")
    rows = [r for raw in raws for r in raw["rows"]
            if min_bytes <= r["bytes"] <= max_bytes and (not collectives or r["collective"] in collectives)]
    m0, meta0 = machines[0], raws[0].get("meta") or {}
    world = meta0.get("world_size")
    prof = fit(rows, intra_from=intra_from, link=link or m0.get("link"), gpus=world)
    prof.update(gpu=m0.get("gpu"), backend=meta0.get("backend"), dtype=meta0.get("dtype"),
                date=max((raw.get("meta") or {}).get("date", "") for raw in raws) or _dt.date.today().isoformat(),
                torch=m0.get("torch"), nccl=m0.get("nccl"), machine=m0)
    prof["meta"].update(sources=sources or [], runs=len(raws), min_bytes=min_bytes,
                        max_bytes=None if math.isinf(max_bytes) else max_bytes,
                        bench={k: v for k, v in meta0.items() if k not in ("env_per_rank",)},
                        env_per_rank=[(raw.get("meta") or {}).get("env_per_rank") for raw in raws])
    return prof


# ---- text ------------------------------------------------------------------------------------

def _si(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v * 1e6:.2f} us" if v < 1e-3 else f"{v * 1e3:.3f} ms"
    if unit == "B":
        for k, s in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if v >= k:
                return f"{v / k:g} {s}"
        return f"{v:g} B"
    return f"{v / 1e9:.1f} GB/s"


def summarize(prof: dict, rows: bool = False) -> str:
    li = prof["intra_link"]
    q = prof.get("intra_link_fit", {})
    lines = [f"comm profile: {prof.get('gpus') or '?'}x {prof.get('gpu') or '?'}  link {prof.get('link')}  "
             f"backend {prof.get('backend')}  {prof.get('dtype') or ''}  {prof.get('date') or ''}  "
             f"torch {prof.get('torch')}  nccl {prof.get('nccl')}",
             f"intra_link: latency {_si(li['latency_s'], 's')} per step, bandwidth "
             f"{_si(li['bandwidth_bytes_per_s'], 'bw')}  ({q.get('from', '?')}; median |err| "
             f"{q.get('rel_residual_median', float('nan')):.1%}, max {q.get('rel_residual_max', float('nan')):.1%})",
             "",
             f"{'collective':15s} {'n':>5s} {'alpha':>10s} {'beta':>12s} {'rows':>5s} {'med|err|':>9s} "
             f"{'max|err|':>9s} {'R2':>7s} {'R2 log':>7s}"]
    for c, f in prof["per_collective"].items():
        def line(name, n, g):
            return (f"{name:15s} {n:>5s} {_si(g['alpha_s'], 's'):>10s} {_si(g['beta_bytes_per_s'], 'bw'):>12s} "
                    f"{g['rows']:5d} {g['rel_residual_median']:9.1%} {g['rel_residual_max']:9.1%} "
                    f"{g['r2']:7.4f} {g['r2_log']:7.4f}")
        lines.append(line(c, "all", f))
        for n, g in (f.get("per_group_size") or {}).items():
            lines.append(f"{'':15s} {n:>5s} {g['skipped']}" if "skipped" in g else line("", n, g))
    if rows:
        lines += ["", f"{'collective':15s} {'n':>3s} {'bytes':>10s} {'measured':>11s} {'fit':>11s} {'err':>7s} "
                      f"{'link':>11s} {'err':>7s}"]
        for r in sorted(prof["rows"], key=lambda r: (COLLECTIVES.index(r["collective"]), r["group_size"], r["bytes"])):
            lines.append(f"{r['collective']:15s} {r['group_size']:3d} {_si(r['bytes'], 'B'):>10s} "
                         f"{_si(r['time_s'], 's'):>11s} {_si(r['fit_s'], 's'):>11s} "
                         f"{r['fit_s'] / r['time_s'] - 1:+7.1%} {_si(r['link_s'], 's'):>11s} "
                         f"{r['link_s'] / r['time_s'] - 1:+7.1%}")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autopar.profiling.comm",
                                 description="Fit and show communication profiles (alpha-beta of a link).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit raw benchmark JSON (bench/nccl_bench.py) into a profile")
    f.add_argument("raw", nargs="+", help="raw JSON file(s) of one machine (repeated runs are pooled)")
    f.add_argument("--out", required=True, help="profile JSON to write (e.g. autopar/profiles/comm_h200_nvlink.json)")
    f.add_argument("--link", default=None, help="link name to record (default: the raw file's guess)")
    f.add_argument("--intra-from", default="joint",
                   help=f"what intra_link is fitted to: joint (default) or one of {', '.join(COLLECTIVES)}")
    f.add_argument("--min-bytes", type=float, default=0, help="leave out rows below this size")
    f.add_argument("--max-bytes", type=float, default=math.inf, help="leave out rows above this size")
    f.add_argument("--collectives", default="", help="comma list of collectives to keep (default all)")
    f.add_argument("--rows", action="store_true", help="print every row against its fit")
    s = sub.add_parser("show", help="print a profile (or a raw file, fitted on the fly)")
    s.add_argument("file")
    s.add_argument("--rows", action="store_true", help="print every row against its fit")
    a = ap.parse_args(list(argv) if argv is not None else None)
    try:
        if a.cmd == "fit":
            raws = [json.loads(Path(p).read_text()) for p in a.raw]
            prof = from_raw(raws, link=a.link, intra_from=a.intra_from, min_bytes=a.min_bytes,
                            max_bytes=a.max_bytes, sources=[str(p) for p in a.raw],
                            collectives=[c for c in a.collectives.split(",") if c] or None)
            out = save_comm_profile(prof, a.out)
            print(summarize(prof, rows=a.rows))
            print(f"wrote {out}")
            return 0
        p = resolve_comm_profile(a.file)
        if not p.exists():
            raise FileNotFoundError(f"no such file {a.file!r}")
        doc = json.loads(p.read_text())
        if isinstance(doc, dict) and doc.get("schema") == RAW_SCHEMA:
            doc = from_raw([doc], sources=[str(p)])
        else:
            validate_comm_profile(doc)
        print(summarize(doc, rows=a.rows))
        return 0
    except (CommProfileError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"autopar commprofile: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
