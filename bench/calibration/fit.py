#!/usr/bin/env python
"""Refit parts of autopar's default (unprofiled) cost model on the published runs' fit set.

Works on the rows `published.py` wrote (bench/results/published_eval_<date>.json): each
evaluated run keeps, per pipeline stage, its forward/backward time per microbatch, its GEMM
shapes (m, n, k, batch) and attention shapes, the rest of its compute and communication, and
the step's pipeline time and tail. A candidate cost model re-prices the GEMMs and attention
of every stage, rebuilds each stage's time, scales the pipeline makespan by the change of the
schedule's closed form, and adds the unchanged tail (gradient sync + optimizer step). With the
default parameters this reproduces autopar's own prediction (checked on every row), so no run
is re-traced.

The parameters are fitted by least squares on log(predicted / measured throughput) over the
FIT set only (split.json); the held-out set is only evaluated.

    python bench/calibration/fit.py bench/results/published_eval_2026-11-30.json
    python bench/calibration/fit.py RESULTS.json --json bench/calibration/fit_result.json

Terms (named in EXPERIMENTS):
  gemm       eff(m,n,k) = e_max * prod_d d / (d + c)       (autopar.cost._default_eff's form;
             default e_max = GPU.matmul_efficiency, c = 64), per GPU family
  attn       flash attention efficiency a * {0.85 fwd, 0.75 bwd} * s / (s + 256)
             (autopar.cost._attention_eff without a profile; default a = matmul_efficiency)
  eager      runs of frameworks that predate fused (flash) attention -- Megatron-LM up to
             2022, Megatron-DeepSpeed (BLOOM), OneFlow 2021 -- pay unfused attention: the
             QK^T and PV batched GEMMs over the whole s x s score matrix (no causal halving),
             and the scale-mask-softmax + dropout kernels that stream it (9 B per score
             forward, 11 B backward, at the GPU's streaming bandwidth); `selective` recompute
             reruns exactly that core. No free parameter.
  triton     the Triton FlashAttention kernel's time per FLOP against the flash pricing, on the
             attention entries of runs that ran it (attn=triton: MPT; compute.TRITON_FLASH_SLOWDOWN)
  overhead   a fixed host/launch cost tau per kernel (1 forward + 2 backward per op)
  mb         a fixed cost per microbatch and stage (pipeline engine, p2p handshakes)
  comm       a factor on in-stage communication (TP all-reduces, ZeRO-3 gathers)
  mem        a factor on memory-bound ops (norms, elementwise, embedding, loss)
  gemm_work  the work-saturation alternative eff = e_max * w / (w + w_half), w = m*n*k
  attribution (--attribution) one scale per part of autopar's predicted step instead

FINDINGS.md discusses the results; fit_result.json holds them for the committed results file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

# one constant, one place: the fused attention kernels' slowdown is the cost model's
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from autopar.costmodel.compute import ATTENTION_KERNEL_SLOWDOWN  # noqa: E402

# Sources whose frameworks computed attention unfused (before FlashAttention reached them).
EAGER_ATTENTION_SOURCES = ("Narayanan et al., SC21", "Korthikanti et al.", "bigscience-workshop",
                           "NVIDIA/Megatron-LM images/tables.tex", "Oneflow-Inc/DLPerf",
                           "Smith et al., MT-NLG", "Zhang et al., OPT")
EAGER_FWD_BYTES = 9.0       # fused scale-mask-softmax r2 w2; dropout r2 w2 + 1-byte mask
EAGER_BWD_BYTES = 11.0      # dropout bwd r2 + mask r1, w2; softmax bwd r2 (y) r2 (dy) w2
FITTED_FAMILIES = ("A100", "V100")

# name -> (default, lower, upper, per family?)
PARAMS = {
    "e_max": (None, 0.2, 1.0, True),
    "c": (64.0, 1.0, 4096.0, True),
    "a": (None, 0.05, 1.0, True),
    "tau_s": (0.0, 0.0, 2e-4, False),
    "tau_mb_s": (0.0, 0.0, 0.2, False),
    "w_half": (1e9, 1e6, 1e13, True),
    "comm": (1.0, 0.3, 5.0, False),
    "mem": (1.0, 0.3, 5.0, True),
    # the Triton FlashAttention kernel's time per FLOP against the flash pricing (MPT's attn_impl
    # triton; autopar.costmodel.compute.TRITON_FLASH_SLOWDOWN)
    "triton": (ATTENTION_KERNEL_SLOWDOWN["triton"], 1.0, 4.0, False),
}
EXPERIMENTS = {
    "baseline": dict(free=[], eager=False),
    "gemm": dict(free=["e_max", "c"], eager=False),
    "gemm+attn": dict(free=["e_max", "c", "a"], eager=False),
    "eager": dict(free=[], eager=True),
    "eager+gemm": dict(free=["e_max", "c"], eager=True),
    "eager+gemm+attn": dict(free=["e_max", "c", "a"], eager=True),
    "eager+gemm+attn+overhead": dict(free=["e_max", "c", "a", "tau_s"], eager=True),
    "eager+gemm+attn+overhead+comm": dict(free=["e_max", "c", "a", "tau_s", "comm"], eager=True),
    "eager+gemm+mb": dict(free=["e_max", "c", "tau_mb_s"], eager=True),
    "eager+gemm_work": dict(free=["e_max", "w_half"], eager=True),
    "eager+gemm_emax": dict(free=["e_max"], eager=True),
    # the proposal: unfused attention where the framework had it, the A100 GEMM curve refitted,
    # V100 left at its defaults (its only fit source is one framework on one small cluster)
    "eager+gemm[A100]": dict(free=["e_max", "c"], eager=True, families=("A100",)),
    # MPT's Triton attention kernel with the A100 GEMM curve (FINDINGS.md section 12): the
    # curve had absorbed the kernel's slowness; fitted together on the fit set's A100 rows
    "eager+gemm+triton[A100]": dict(free=["e_max", "c", "triton"], eager=True, families=("A100",)),
    # not identifiable: the memory-bound factor runs to its bound and c grows to compensate
    "eager+gemm+mem[A100]": dict(free=["e_max", "c", "mem"], eager=True, families=("A100",)),
    # the one-line alternative: only A100's GPU.matmul_efficiency, which autopar also uses for
    # the attention efficiency of an unprofiled GPU (so a follows e_max here)
    "eager+matmul_efficiency[A100]": dict(free=["e_max"], eager=True, families=("A100",), tie_attention=True),
}


# ---- the cost model's formulas, parameterised --------------------------------------------------

def _op_s(kernel_s, gm):
    return np.maximum(kernel_s + gm["gap_s"], gm["launch_s"])


DATASHEET_HALF_DIM = 64.0


def _sat(d: np.ndarray, c: float, lo: float) -> np.ndarray:
    """d/(d+c) from the fitted range's edge `lo` up, the datasheet fall-off below it
    (autopar.costmodel.compute._default_eff)."""
    edge = lo / (lo + c) / (lo / (lo + DATASHEET_HALF_DIM)) if lo > 0 else 1.0
    return np.where(d >= lo, d / (d + c), edge * d / (d + DATASHEET_HALF_DIM))


def gemm_s(g: np.ndarray, gm: dict, e_max: float, c: float, w_half: float | None = None,
           nbytes: np.ndarray | None = None, lo: float = 0.0) -> np.ndarray:
    """g: rows (m, n, k, batch). autopar's matmul_s: 2bmnk / (peak * eff(m*b, n, k)), with
    eff = e_max prod_d d/(d+c) (autopar's form; below the fitted range `lo`, the datasheet
    fall-off), or, given w_half, the work-saturation form eff = e_max * w / (w + w_half),
    w = m*b*n*k; no faster than streaming `nbytes`."""
    m, n, k, b = g[:, 0], g[:, 1], g[:, 2], g[:, 3]
    mm = np.where(b > 1, m * b, m)
    if w_half is not None:
        w = mm * n * k
        eff = e_max * w / (w + w_half)
    else:
        eff = e_max * _sat(mm, c, lo) * _sat(n, c, lo) * _sat(k, c, lo)
    t = 2.0 * b * m * n * k / (gm["peak_flops"] * eff)
    if nbytes is not None:
        t = np.maximum(t, nbytes / gm["stream_bytes_per_s"])
    return _op_s(t, gm)


def flash_s(a: np.ndarray, gm: dict, a_eff: float) -> tuple[np.ndarray, np.ndarray]:
    """a: rows (b, h, s, d, causal). autopar's attention_s without a profile."""
    b, h, s, d, causal = (a[:, i] for i in range(5))
    flops = 4.0 * b * h * s * s * d * np.where(causal > 0, 0.5, 1.0)
    q = s / (s + 256.0)
    f = _op_s(flops / (gm["peak_flops"] * a_eff * 0.85 * q), gm)
    bw = _op_s(2.5 * flops / (gm["peak_flops"] * a_eff * 0.75 * q), gm)
    return f, bw


def eager_s(a: np.ndarray, gm: dict, e_max: float, c: float, w_half=None,
            dropout: np.ndarray | None = None, lo: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Unfused attention as autopar prices it (ComputeModel.unfused_attention_s): QK^T
    [s,d]x[d,s] and PV [s,s]x[s,d] per (batch x head) over the full score matrix (backward dP
    like QK^T, dV, dQ, dK like PV), each no faster than streaming its operands, and the
    softmax (and, with dropout, dropout) kernels streaming the 2-byte scores
    (graphs.annotate.unfused_score_passes). `dropout`: per row; None = every row has it."""
    b, h, s, d = (a[:, i] for i in range(4))
    bh = b * h
    drop = np.ones_like(s) if dropout is None else np.asarray(dropout, float)
    e = 2.0
    scores = bh * s * s
    io = e * scores + 2 * e * (2 * bh * s * d)

    def mm(m_, n_, k_):
        return gemm_s(np.stack([m_, n_, k_, bh], axis=1), gm, e_max, c, w_half, nbytes=io, lo=lo)

    wide, narrow = mm(s, s, d), mm(s, d, s)
    stream = gm["stream_bytes_per_s"]
    fwd = wide + narrow + _op_s(2 * e * scores / stream, gm) + drop * _op_s((2 * e + 1) * scores / stream, gm)
    bwd = wide + 3 * narrow + _op_s(3 * e * scores / stream, gm) + drop * _op_s((2 * e + 1) * scores / stream, gm)
    return fwd, bwd


# ---- one run under a candidate model -----------------------------------------------------------

class RunModel:
    """A row's stages as arrays, priced under any parameter set."""

    def __init__(self, row: dict):
        self.row = row
        self.gm = row["gpu_model"]
        self.family = row["gpu_family"]
        self.eager_src = row["source"].startswith(EAGER_ATTENTION_SOURCES)
        self.stages = []
        for s in row["stages"]:
            gf = np.array([g[:4] for g in s["gemm_fwd"]], float).reshape(-1, 4)
            cf = np.array([g[4] for g in s["gemm_fwd"]], float)
            gb = np.array([g[:4] for g in s["gemm_bwd"]], float).reshape(-1, 4)
            cb = np.array([g[4] for g in s["gemm_bwd"]], float)
            # (b, h, s, d, causal[, unfused, dropout], count): results before attn=unfused
            # have no unfused entries
            at = np.array([x[:5] for x in s["attn"]], float).reshape(-1, 5)
            ca = np.array([x[-1] for x in s["attn"]], float)
            unf = np.array([x[5] if len(x) >= 8 else 0 for x in s["attn"]], float)
            drop = np.array([x[6] if len(x) >= 8 else 1 for x in s["attn"]], float)
            # [.., kernel, count] since attn=triton: a fused entry's kernel slows it as
            # ComputeModel.attention_s does (TRITON_FLASH_SLOWDOWN)
            tri = np.array([len(x) == 9 and x[7] == "triton" for x in s["attn"]], bool)
            self.stages.append(dict(s=s, gf=gf, cf=cf, gb=gb, cb=cb, at=at, ca=ca, unf=unf, drop=drop, tri=tri))
        self.base = self._parts(self.defaults(), eager=False)
        self.pipeline_s = row["predicted"]["pipeline_s"]
        self.tail_s = row["predicted"]["step_time_s"] - self.pipeline_s
        self.B = row["n_microbatches"]
        self.v = row.get("virtual_stages") or 1
        self.closed0 = self._closed([st["s"]["fwd_s"] + st["s"]["bwd_s"] for st in self.stages])
        self.tokens = row["predicted"]["tokens_per_s"] * row["predicted"]["step_time_s"]
        self.n_gpus = row["job"]["nodes"] * row["job"]["gpus_per_node"]
        self.measured = row["measured"]["tokens_per_s_per_gpu"]

    def defaults(self) -> dict:
        e = self.gm["matmul_efficiency"]
        # the GEMM curve autopar used (compute.FITTED_DEFAULT_CURVE), where the results keep it
        e_max, c, lo = (list(self.gm.get("default_curve") or (e, 64.0)) + [0.0])[:3]
        return {"e_max": e_max, "c": c, "lo": lo, "a": e, "tau_s": 0.0, "comm": 1.0, "tau_mb_s": 0.0, "w_half": None, "mem": 1.0,
                "triton": ATTENTION_KERNEL_SLOWDOWN["triton"]}

    def _parts(self, p: dict, eager: bool) -> list[dict]:
        """Per stage and microbatch: GEMM, attention (and unfused-core forward) time, the
        in-stage communication and the per-kernel overhead, under parameters p."""
        out = []
        for st in self.stages:
            s = st["s"]
            lo = p.get("lo", 0.0)
            gf = float((gemm_s(st["gf"], self.gm, p["e_max"], p["c"], p["w_half"], lo=lo) * st["cf"]).sum()) \
                if len(st["cf"]) else 0.0
            gb = float((gemm_s(st["gb"], self.gm, p["e_max"], p["c"], p["w_half"], lo=lo) * st["cb"]).sum()) \
                if len(st["cb"]) else 0.0
            af = ab = core_f = 0.0
            if len(st["ca"]):
                # entries the model already prices unfused stay unfused; "eager" prices every
                # entry of an unfused-attention source so (results from before attn=unfused)
                unf = np.maximum(st["unf"], 1.0 if (eager and self.eager_src) else 0.0)
                ef, eb = eager_s(st["at"], self.gm, p["e_max"], p["c"], p["w_half"],
                                 dropout=np.where(st["unf"] > 0, st["drop"], 1.0), lo=lo)
                ff, fb = flash_s(st["at"], self.gm, p["a"])
                slow = np.where(st["tri"], p["triton"], 1.0)
                ff, fb = ff * slow, fb * slow
                f, b = np.where(unf > 0, ef, ff), np.where(unf > 0, eb, fb)
                af, ab = float((f * st["ca"]).sum()), float((b * st["ca"]).sum())
                if eager:
                    # Korthikanti's selective recompute reruns the unfused core (autopar's
                    # evaluator does once graphs.query.attention_core finds the unfused op)
                    core_f = float((ef * unf * st["ca"]).sum())
            membound = sum(t for k, t in s["compute_by_kind_s"].items() if k not in ("matmul", "attention"))
            out.append(dict(gf=gf, gb=gb, af=af, ab=ab, core_f=core_f, comm=s["comm_s"] * p["comm"], mem=membound * p["mem"],
                            tau=p["tau_s"] * s.get("n_ops", 0)))
        return out

    def stage_times(self, p: dict, eager: bool) -> list[float]:
        """fwd + bwd per microbatch of every stage: autopar's, plus the changes of the re-priced
        terms. Communication is taken as half forward, half backward; the full-recompute
        backward reruns the forward; Korthikanti's selective recompute reruns the unfused core."""
        ts = []
        for new, old, st in zip(self._parts(p, eager), self.base, self.stages):
            s = st["s"]
            dc = (new["comm"] - old["comm"]) / 2
            dm = new["mem"] - old["mem"]      # memory-bound ops: taken as 1/3 forward, 2/3 backward
            d_f = (new["gf"] - old["gf"]) + (new["af"] - old["af"]) + dc + dm / 3 + new["tau"] + p["tau_mb_s"] / 3
            d_b = (new["gb"] - old["gb"]) + (new["ab"] - old["ab"]) + dc + 2 * dm / 3 + 2 * new["tau"] + 2 * p["tau_mb_s"] / 3
            if s["recompute"] == "full":
                d_b += d_f
            elif s["recompute"] == "selective":
                d_b += new["core_f"]
            ts.append(s["fwd_s"] + s["bwd_s"] + d_f + d_b)
        return ts

    def _closed(self, ts: list[float]) -> float:
        """The schedule's closed form (1F1B / GPipe: sum + (B-1) max; interleaved: B x the
        busiest device + (p-1) chunks); only its ratio to the default is used."""
        if self.v > 1 and len(ts) % self.v == 0:
            p = len(ts) // self.v
            dev = [sum(ts[i::p]) for i in range(p)]
            return self.B * max(dev) + (p - 1) * max(ts)
        return sum(ts) + (self.B - 1) * max(ts)

    def predict(self, p: dict, eager: bool) -> float:
        """Predicted tokens/s per GPU."""
        ts = self.stage_times(p, eager)
        pipe = self.pipeline_s * self._closed(ts) / self.closed0
        step = pipe + self.tail_s
        return self.tokens / step / self.n_gpus

    def check(self) -> float:
        """Relative difference between the default-parameter re-pricing and autopar's prediction,
        and between the re-priced GEMMs and autopar's own matmul compute."""
        pred = self.predict(self.defaults(), eager=False)
        d1 = abs(pred / self.row["predicted_tokens_per_s_per_gpu"] - 1)
        mm = sum(s["compute_by_kind_s"].get("matmul", 0.0) for s in self.row["stages"])
        mine = sum(b["gf"] + b["gb"] for b in self.base)
        return max(d1, abs(mine / mm - 1) if mm else 0.0)


# ---- fitting -----------------------------------------------------------------------------------

def nelder_mead(f, x0, step=0.3, iters=600, tol=1e-7):
    n = len(x0)
    pts = [np.array(x0, float)] + [np.array(x0, float) + step * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < tol:
            break
        c = np.mean(pts[:-1], axis=0)
        xr = c + (c - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = c + 2 * (c - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = c + 0.5 * (pts[-1] - c)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


def _keys(free: list[str], families=FITTED_FAMILIES) -> list[tuple[str, str | None]]:
    keys = []
    for name in free:
        if PARAMS[name][3]:
            keys += [(name, fam) for fam in families]
        else:
            keys.append((name, None))
    return keys


def params_for(theta: dict, model: RunModel, tie_attention: bool = False) -> dict:
    p = model.defaults()
    if any(k[0] == "w_half" for k in theta):
        p["w_half"] = 1e9
    for (name, fam), v in theta.items():
        if fam is None or fam == model.family:
            p[name] = v
            if tie_attention and name == "e_max":
                p["a"] = v
    return p


def _bounds(name):
    """Bounds in the space the optimiser works in (log for ranges over two decades)."""
    lo, hi = PARAMS[name][1], PARAMS[name][2]
    if lo > 0 and hi / lo > 100:
        return math.log(lo), math.log(hi), True
    return lo, hi, False


def _to_x(keys, theta):
    # bounded: x = logit((v - lo) / (hi - lo)), v in log space for wide ranges
    x = []
    for k in keys:
        lo, hi, logsp = _bounds(k[0])
        v = math.log(theta[k]) if logsp else theta[k]
        v = min(max(v, lo + 1e-9 * (hi - lo)), hi - 1e-9 * (hi - lo))
        x.append(math.log(v - lo) - math.log(hi - v))
    return np.array(x)


def _from_x(keys, x):
    out = {}
    for k, xi in zip(keys, x):
        lo, hi, logsp = _bounds(k[0])
        v = lo + (hi - lo) / (1 + math.exp(-xi))
        out[k] = math.exp(v) if logsp else v
    return out


def fit(models: list[RunModel], free: list[str], eager: bool, weight: str = "run",
        families=FITTED_FAMILIES, tie_attention: bool = False) -> dict:
    """Least squares on log(predicted / measured throughput) over the fit set's runs on the
    fitted GPU families; weight "source" gives every source the same total weight."""
    keys = _keys(free, families)
    fit_models = [m for m in models if m.row["set"] == "fit" and m.family in families]
    per_source = defaultdict(int)
    for m in fit_models:
        per_source[(m.row["source"], m.family)] += 1
    w = np.array([1.0 / per_source[(m.row["source"], m.family)] if weight == "source" else 1.0 for m in fit_models])
    w = w / w.sum()
    if not keys:
        return {}
    start = {}
    for k in keys:
        d = PARAMS[k[0]][0]
        if d is None:
            d = next(m.defaults()[k[0]] for m in models if m.family == k[1])
        start[k] = d if d > PARAMS[k[0]][1] else PARAMS[k[0]][1] + 0.01 * (PARAMS[k[0]][2] - PARAMS[k[0]][1])

    def loss(x):
        theta = _from_x(keys, x)
        err = np.array([math.log(m.predict(params_for(theta, m, tie_attention), eager) / m.measured)
                        for m in fit_models])
        return float((w * err * err).sum())

    best, val = nelder_mead(loss, _to_x(keys, start), step=0.5)
    best, val = nelder_mead(loss, best, step=0.1)         # restart: NM stalls on ridges
    return _from_x(keys, best)


def errors(models, theta, eager, tie_attention=False) -> list[tuple[dict, float]]:
    return [(m.row, m.predict(params_for(theta, m, tie_attention), eager) / m.measured - 1) for m in models]


def short_source(src: str) -> str:
    for key, name in (("llm-foundry", "MPT (llm-foundry)"), ("SC21", "SC21 Megatron"), ("Korthikanti", "Korthikanti"),
                      ("bigscience", "BLOOM"), ("tables.tex", "Megatron-LM 2020"), ("Megatron-LM columns", "DLPerf Megatron"),
                      ("OneFlow-GPT", "DLPerf OneFlow"), ("torchtitan", "torchtitan"), ("model_table", "Megatron-Core 2024")):
        if key in src:
            return name
    return src[:24]


def summarize(errs, by_source: bool = False) -> dict:
    groups = defaultdict(list)
    for row, e in errs:
        groups[(row["set"], row["gpu_family"])].append(e)
        groups[(row["set"], "all")].append(e)
        if by_source:
            groups[(row["set"], short_source(row["source"]))].append(e)
    out = {}
    for k, es in sorted(groups.items()):
        out[f"{k[0]}/{k[1]}"] = {"n": len(es), "median_abs": statistics.median(abs(e) for e in es),
                                 "max_abs": max(abs(e) for e in es), "median": statistics.median(es)}
    return out


def load_models(path: Path) -> tuple[list[RunModel], list[str]]:
    data = json.loads(Path(path).read_text())
    models, problems = [], []
    for row in data["rows"]:
        if not row.get("evaluated") or row["gpu_model"].get("profiled"):
            continue
        m = RunModel(row)
        bad = m.check()
        if bad > 1e-3:
            problems.append(f"{row['id']}: re-pricing differs from autopar by {bad:.2%}")
        models.append(m)
    return models, problems


# ---- attribution: which part of the predicted step must grow, and by how much ---------------------

ATTRIBUTION_PARTS = ("gemm", "attention", "memory_bound", "comm_in_stage", "tail_sync_optimizer")


def attribution(models: list[RunModel], eager: bool = False, weight: str = "run") -> dict:
    """Scale factors theta_k on the parts of autopar's own predicted step (GEMMs incl. the
    forward rerun, attention, memory-bound ops, in-stage communication, and the tail of gradient
    sync + optimizer step), fitted on the fit set's A100/V100 runs:
        T' = (sum_k theta_k busy_k) * (1 + bubble / busy) + theta_tail * tail.
    theta_k > 1: that part is under-costed. With eager=True the base is the eager-attention
    model's step (the attention part grows by the re-priced amount)."""
    rows = []
    for m in models:
        b = m.row["breakdown"]
        parts = {"gemm": b["gemm"] + b["recompute"], "attention": b["attention"], "memory_bound": b["memory_bound"],
                 "comm_in_stage": b["comm_in_stage"], "tail_sync_optimizer": b["tail_sync_optimizer"]}
        busy = sum(parts[k] for k in ATTRIBUTION_PARTS[:4])
        bub = b["bubble_p2p"] / busy if busy else 0.0
        if eager and m.eager_src:
            # the eager model's extra step time (in units of the old step), bubble share removed
            extra = m.row["predicted_tokens_per_s_per_gpu"] / m.predict(m.defaults(), eager=True) - 1
            parts["attention"] += extra / (1 + bub)
        rows.append((m, parts, bub))
    fit_rows = [r for r in rows if r[0].row["set"] == "fit" and r[0].family in FITTED_FAMILIES]
    per_source = defaultdict(int)
    for r in fit_rows:
        per_source[r[0].row["source"]] += 1
    w = np.array([1.0 / per_source[r[0].row["source"]] if weight == "source" else 1.0 for r in fit_rows])
    w = w / w.sum()

    def pred(theta, r):
        m, parts, bub = r
        busy = sum(theta[i] * parts[k] for i, k in enumerate(ATTRIBUTION_PARTS[:4]))
        t = busy * (1 + bub) + theta[4] * parts["tail_sync_optimizer"]
        return m.row["predicted_tokens_per_s_per_gpu"] / t

    def loss(x):
        theta = np.exp(x)
        e = np.array([math.log(pred(theta, r) / r[0].measured) for r in fit_rows])
        return float((w * e * e).sum())

    x, _ = nelder_mead(loss, np.zeros(len(ATTRIBUTION_PARTS)), step=0.3, iters=2000)
    x, _ = nelder_mead(loss, x, step=0.05, iters=2000)
    theta = np.exp(x)
    errs = [(r[0].row, pred(theta, r) / r[0].measured - 1) for r in rows]
    return {"theta": dict(zip(ATTRIBUTION_PARTS, theta.tolist())), "errors": summarize(errs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="bench/results/published_eval_<date>.json from published.py")
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS))
    ap.add_argument("--json", help="write the fitted parameters and error tables here")
    ap.add_argument("--by-source", action="store_true", help="also tabulate the error per source")
    ap.add_argument("--worst", type=int, default=0, help="list the N worst held-out runs per experiment")
    ap.add_argument("--attribution", action="store_true",
                    help="also fit one scale per part of the predicted step (gemm, attention, ...)")
    ap.add_argument("--weight", choices=["run", "source"], default="run",
                    help="run: every fit run counts once; source: every (source, GPU family) counts once")
    a = ap.parse_args(argv)
    models, problems = load_models(Path(a.results))
    print(f"{len(models)} runs on unprofiled GPUs ({sum(m.row['set'] == 'fit' for m in models)} fit, "
          f"{sum(m.row['set'] != 'fit' for m in models)} held out)")
    for p in problems[:10]:
        print("  check:", p)
    if problems:
        print(f"  {len(problems)} rows re-price differently from autopar (max shown above)")
    results = {}
    for name in a.experiments.split(","):
        ex = EXPERIMENTS[name]
        tie = ex.get("tie_attention", False)
        theta = fit(models, ex["free"], ex["eager"], a.weight, ex.get("families", FITTED_FAMILIES), tie)
        summ = summarize(errors(models, theta, ex["eager"], tie), by_source=a.by_source)
        results[name] = {"params": {f"{k}[{f}]" if f else k: v for (k, f), v in theta.items()}, "errors": summ}
        print(f"\n== {name}: " + (", ".join(f"{k}={v:.4g}" for k, v in results[name]["params"].items()) or "defaults"))
        print(f"   {'set/family':<16} {'n':>4} {'med|err|':>9} {'max|err|':>9} {'med err':>8}")
        for k, s in summ.items():
            print(f"   {k:<16} {s['n']:>4} {s['median_abs']:>9.1%} {s['max_abs']:>9.1%} {s['median']:>+8.1%}")
        if a.worst:
            errs = sorted(errors(models, theta, ex["eager"], tie), key=lambda t: -abs(t[1]))
            print(f"   worst {a.worst} held out:")
            for row, e in [t for t in errs if t[0]["set"] != "fit"][:a.worst]:
                print(f"     {e:+7.1%} {row['id']} ({row['gpu']}, {row['plan']})")
    if a.attribution:
        for eager in (False, True):
            att = attribution(models, eager=eager, weight=a.weight)
            name = "attribution" + ("+eager" if eager else "")
            results[name] = att
            print(f"\n== {name}: scale per part of the predicted step: "
                  + ", ".join(f"{k} x{v:.2f}" for k, v in att["theta"].items()))
            for k, s_ in att["errors"].items():
                print(f"   {k:<16} {s_['n']:>4} {s_['median_abs']:>9.1%} {s_['max_abs']:>9.1%} {s_['median']:>+8.1%}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
