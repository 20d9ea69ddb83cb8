"""Checks of what a user hands autopar, at the edges: command-line numbers, training sizes and
plan files. Each check either passes or raises a ValueError whose one-line message says what
was wrong and how to fix it; the CLI prints it and exits 2.

The limits keep every search and simulation bounded by a number autopar chose, never by a
number the user typed (a global batch of 2^40 once ran a divisor search for hours):

* MAX_GPUS = 1024 (kept with the cluster checks, autopar.hardware.specs): the planner's time
  grows with the node count; 1024 is 16x Alpa's largest testbed.
* MAX_GLOBAL_BATCH = 16384 sequences: above every published large-model batch (GPT-3 1536,
  Megatron-LM 1T 3072, Llama 3 405B 2048 at seq 8192), and 16 per GPU at MAX_GPUS, the
  planner's default. The planner lists the divisors of the global batch.
* MAX_MICROBATCHES = MAX_GLOBAL_BATCH: a microbatch holds at least one sequence. The schedule
  simulator runs 2 ops per microbatch per stage (~12 us each), so the worst case is seconds.
* MAX_SEQ = 2^20 tokens, MAX_MICROBATCH_SIZE = MAX_GLOBAL_BATCH: token-id shapes a tracer can
  build on the meta device without overflowing int64 element counts further down.
* MAX_TIME_LIMIT_S = 3600: one ILP's time limit (`shard --time-limit`).

This module is a leaf above `autopar.hardware` and `autopar.plan` (both data), so the CLI and
the public API entries (planner, compare, runtime) share it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autopar.fileio import read_text
from autopar.hardware.specs import MAX_GPUS
from autopar.plan import Plan, PlanError
from autopar.plan import validate as validate_plan_schema

__all__ = ["MAX_GPUS", "MAX_GLOBAL_BATCH", "MAX_MICROBATCHES", "MAX_MICROBATCH_SIZE", "MAX_SEQ", "MAX_TIME_LIMIT_S",
           "InputError", "int_arg", "float_arg", "microbatches_arg", "mesh_arg", "layer_range", "check_int",
           "check_training", "load_plan", "check_plan"]
MAX_GLOBAL_BATCH = 16384
MAX_MICROBATCHES = MAX_GLOBAL_BATCH
MAX_MICROBATCH_SIZE = MAX_GLOBAL_BATCH
MAX_SEQ = 1 << 20
MAX_TIME_LIMIT_S = 3600.0


class InputError(ValueError):
    """A value a user typed is out of range or malformed; the message says the valid range."""


# ---- command-line numbers ------------------------------------------------------------------

def _as_int(text: str) -> int:
    t = text.strip().replace("_", "")
    if not t.isascii() or not (t.isdigit() or (t[:1] in ("+", "-") and t[1:].isdigit())):
        raise ValueError(text)
    return int(t)


def int_arg(flag: str, lo: int, hi: int) -> Callable[[str], int]:
    """An argparse `type` for a whole number in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            v = _as_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a whole number from {lo} to {hi:,} "
                                             f"(got {text!r})") from None
        try:
            return check_int(flag, v, lo, hi)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = flag
    return parse


def float_arg(flag: str, lo: float, hi: float, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse `type` for a finite number in [lo, hi] ((lo, hi] with lo_open)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"{flag} must be a number {'above' if lo_open else 'from'} {lo:g} "
                                             f"{'and at most' if lo_open else 'to'} {hi:g} (got {text!r})")
        return v
    parse.__name__ = flag
    return parse


def microbatches_arg(text: str) -> str | int:
    """`--microbatches`: 'auto' or a count of microbatches per step."""
    if text.strip().lower() == "auto":
        return "auto"
    return int_arg("--microbatches", 1, MAX_MICROBATCHES)(text)


def mesh_arg(text: str) -> tuple[int, int]:
    """`--mesh 2x4`: a logical mesh of two positive sizes."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--mesh must look like 2x4: two whole numbers joined by x (got {text!r})")
    d0, d1 = (int(p) for p in parts)
    if d0 < 1 or d1 < 1 or d0 * d1 > MAX_GPUS:
        raise argparse.ArgumentTypeError(f"--mesh sizes must be >= 1 and their product at most {MAX_GPUS} "
                                         f"(got {text!r})")
    return d0, d1


def layer_range(text: str, n_layers: int) -> tuple[int, int]:
    """`--layers i:j` (either end may be left out) inside a model of n_layers layers."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        i = _as_int(parts[0]) if parts[0].strip() else 0
        j = _as_int(parts[1]) if parts[1].strip() else n_layers
    except ValueError:
        raise InputError(f"--layers must look like 3:7 (start:end, either may be left out; got {text!r})") from None
    if not 0 <= i < j <= n_layers:
        raise InputError(f"--layers {text}: need 0 <= start < end <= {n_layers}, the model has layers "
                         f"0..{n_layers - 1}")
    return i, j


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi], or an InputError naming the limit."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be a whole number from {lo} to {hi:,} (got {value!r})")
    if value < lo:
        raise InputError(f"{name} must be at least {lo} (got {_short(value)})")
    if value > hi:
        raise InputError(f"{name} {_short(value)} is over autopar's limit of {hi:,}; use at most {hi:,}")
    return value


def _short(n: int) -> str:
    """A whole number for a message: digits up to 12 of them, else powers of ten."""
    return f"{n:,}" if abs(n) < 10**12 else f"{float(n):.3g}" if abs(n) < 10**300 else "a number with "\
        f"{len(str(abs(n)))} digits"


# ---- training sizes (CLI and public API) ---------------------------------------------------

def check_training(global_batch: int | None, n_gpus: int, microbatches: str | int = "auto") -> None:
    """Bounds on the numbers that size the search: the global batch (None: the default is
    used), the microbatch count and the cluster's GPU count."""
    check_int("the cluster's GPU count (nodes x gpus per node)", n_gpus, 1, MAX_GPUS)
    if global_batch is not None:
        check_int("global batch", global_batch, 1, MAX_GLOBAL_BATCH)
    if microbatches != "auto":
        if isinstance(microbatches, str):
            try:
                microbatches = _as_int(microbatches)
            except ValueError:
                raise InputError(f"microbatches must be 'auto' or a whole number (got {microbatches!r})") from None
        check_int("microbatches", microbatches, 1, MAX_MICROBATCHES)


# ---- plan files ----------------------------------------------------------------------------

def _reject_constant(name: str) -> float:
    raise PlanError(f"plan JSON holds {name}; times and sizes must be finite numbers")


def load_plan(text_or_path: str | Path):
    """A Plan from a path or JSON text, checked (`check_plan`) before anything uses it."""
    s = str(text_or_path)
    text = s if s.lstrip().startswith("{") else read_text(s, "plan file")
    try:
        d = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise PlanError(f"plan is not valid JSON: {e}") from None
    except RecursionError:
        raise PlanError("plan JSON is nested too deeply to be a plan") from None
    check_plan(d)
    return Plan.from_dict(d)


def _number(where: str, v: Any, lo: float = 0.0, hi: float = math.inf, none_ok: bool = True) -> None:
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        rng = f"from {lo:g} to {hi:g}" if math.isfinite(hi) else f">= {lo:g}" if math.isfinite(lo) else ""
        raise PlanError(f"plan {where} must be a finite number{' ' + rng if rng else ''} (got {v!r}); re-create the plan with "
                        "autopar plan or autopar evaluate")


def check_plan(d: Any) -> None:
    """A plan mapping (`autopar.plan/v1`, as in the file or from `Plan.to_dict()`) that is
    consistent with itself, its cluster and its model: raises PlanError saying where not."""
    validate_plan_schema(d)
    model, cluster, training, stages = d["model"], d["cluster"], d["training"], d["stages"]
    nodes, gpn = cluster["nodes"], cluster["gpus_per_node"]
    if nodes * gpn > MAX_GPUS:
        raise PlanError(f"plan cluster/nodes: {nodes} x {gpn} GPUs is over autopar's limit of {MAX_GPUS}")
    n_gpus = nodes * gpn
    gb, mb, m = training["global_batch"], training["microbatch_size"], training["n_microbatches"]
    if gb > MAX_GLOBAL_BATCH:
        raise PlanError(f"plan training/global_batch {gb:,} is over autopar's limit of {MAX_GLOBAL_BATCH:,}")
    if gb != mb * m:
        raise PlanError(f"plan training: global_batch {gb} != microbatch_size {mb} x n_microbatches {m}")
    v = training.get("virtual_stages", 1) if training["schedule"] == "interleaved" else 1
    ranks = len(stages) // v
    if training["schedule"] == "interleaved" and m % ranks:
        raise PlanError(f"plan training/n_microbatches: the interleaved schedule needs a multiple of the "
                        f"{ranks} pipeline ranks (got {m})")
    n_layers = model["n_layers"]
    for i, s in enumerate(stages):
        where = f"stages/{i}"
        if s["index"] != i:
            raise PlanError(f"plan {where}/index is {s['index']}; stages must be numbered 0, 1, 2, ... in order")
        ids = s["device_ids"]
        if len(set(ids)) != len(ids):
            dup = sorted({x for x in ids if ids.count(x) > 1})
            raise PlanError(f"plan {where}/device_ids: device(s) {dup} appear more than once")
        outside = [x for x in ids if x >= n_gpus]
        if outside:
            raise PlanError(f"plan {where}/device_ids: device(s) {outside[:5]} are outside the plan's cluster of "
                            f"{nodes} x {gpn} = {n_gpus} GPUs (ids 0..{n_gpus - 1})")
        a, b = s["submesh"]
        if a * b != len(ids):
            raise PlanError(f"plan {where}/submesh {a}x{b} does not match its {len(ids)} device_ids")
        hosts = sorted({x // gpn for x in ids})
        if a == 1 and (b > gpn or len(hosts) != 1):
            raise PlanError(f"plan {where}: submesh 1x{b} must lie inside one node of {gpn} GPUs, but device_ids "
                            f"span nodes {hosts}")
        if a > 1 and (b != gpn or len(hosts) != a):
            raise PlanError(f"plan {where}: submesh {a}x{b} must be {a} whole nodes of {gpn} GPUs, but device_ids "
                            f"span nodes {hosts}")
        ops = {o["name"]: o for o in s.get("ops") or []}
        for op, name in s["strategies"].items() if ops else ():
            if op not in ops or ops[op].get("strategy") != name:
                have = ops[op].get("strategy") if op in ops else "no entry"
                raise PlanError(f"plan {where}/strategies/{op} is {name!r} but the stage's ops list says {have!r}; "
                                "the plan was edited by hand: re-create it with autopar plan or autopar evaluate")
        lo, hi = s["layers"]
        if hi > n_layers:
            raise PlanError(f"plan {where}/layers [{lo}, {hi}) goes past the model's {n_layers} layers")
        for key in ("t_intra_s", "fwd_s", "bwd_s"):
            _number(f"{where}/{key}", s.get(key))
        for key, val in (s.get("memory") or {}).items():
            _number(f"{where}/memory/{key}", val)
    if stages[0]["layers"][0] != 0 or stages[-1]["layers"][1] != n_layers:
        raise PlanError(f"plan stages cover layers [{stages[0]['layers'][0]}, {stages[-1]['layers'][1]}) but the "
                        f"model has {n_layers} layers (model/n_layers); the plan was made for another model")
    predicted = d.get("predicted") or {}
    if "fits" in predicted and not isinstance(predicted["fits"], bool):
        raise PlanError(f"plan predicted/fits must be true or false (got {predicted['fits']!r})")
    for key, val in predicted.items():
        if key in ("breakdown_s", "memory_breakdown_bytes") and isinstance(val, dict):   # parts, by name
            for part, x in val.items():
                # a part of a decomposition may be a small negative residual; it must be a number
                _number(f"predicted/{key}/{part}", x, -math.inf)
        elif key != "fits":
            _number(f"predicted/{key}", val, 0.0, 1.0 if key == "bubble_fraction" else math.inf)
