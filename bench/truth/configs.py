"""The run list of the measurement corpus (issue 13), and a rough cost estimate per run.

Every run is a dict: id, model (short name), model_spec (a spec string `autopar evaluate` and
`graphs.load` accept), family, strategy (single|ddp|fsdp2|tp|pp), n_gpus, microbatch, seq,
n_microbatches (pp; 1 otherwise), recompute (none|full), priority (lower runs first).

The model specs are written out in full (no preset names) so that the row says exactly which
architecture ran; llama3-8b is the preset's architecture with the run's seq.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

GPT = "gpt:hidden={h},layers={l},heads={a},seq={s},vocab=51200"
LLAMA = "llama:hidden={h},layers={l},heads={a},kv_heads={kv},ffn={f},vocab=128256,seq={s},rope_theta=500000"

# short name -> (family, shape); params counted from the shape below
MODELS = {
    "gpt-1.3b": ("gpt", dict(h=2048, l=24, a=32)),
    "gpt-2.6b": ("gpt", dict(h=2560, l=32, a=32)),
    "gpt-6.7b": ("gpt", dict(h=4096, l=32, a=32)),
    "llama-1b": ("llama", dict(h=2048, l=16, a=32, kv=8, f=8192)),       # Llama-3.2-1B shape, untied
    "llama-3b": ("llama", dict(h=3072, l=28, a=24, kv=8, f=8192)),       # Llama-3.2-3B shape, untied
    "llama3-8b": ("llama", dict(h=4096, l=32, a=32, kv=8, f=14336)),     # = preset llama3-8b
    # CPU smoke models
    "gpt-tiny": ("gpt", dict(h=64, l=4, a=4, vocab=512)),
    "llama-tiny": ("llama", dict(h=64, l=4, a=4, kv=2, f=128, vocab=512)),
}


def spec(model: str, seq: int) -> str:
    fam, shp = MODELS[model]
    s = (GPT if fam == "gpt" else LLAMA).format(s=seq, **shp)
    if "vocab" in shp:
        s = s.replace("vocab=51200", f"vocab={shp['vocab']}").replace("vocab=128256", f"vocab={shp['vocab']}")
    return s


@functools.cache
def params(model: str) -> int:
    """Parameter count of the zoo module (built on the meta device), at seq 1024 for GPT."""
    from graphs.zoo import build_module, get_config
    m = build_module(get_config(spec(model, 1024)), device="meta")
    return sum(p.numel() for p in m.parameters())


def est_step_s(run: dict) -> float:
    """Rough step time on one H200 share (used only to skip what cannot fit the time budget)."""
    fam, shp = MODELS[run["model"]]
    p = params(run["model"])
    toks = run["microbatch"] * run["seq"] * run.get("n_microbatches", 1)
    fl = 6 * p * toks + 6 * shp["l"] * shp["h"] * run["seq"] * toks
    if run["recompute"] == "full":
        fl *= 4 / 3
    n = run["n_gpus"]
    if run["strategy"] in ("tp", "pp"):
        fl /= n
    opt = 16 * p * 2 / 4.0e12 / (n if run["strategy"] in ("fsdp2", "tp", "pp") else 1)
    host = 0.0012 * shp["l"] * (run.get("n_microbatches", 1) if run["strategy"] == "pp" else 1)
    return max(fl / 4.0e14, host) + opt + 0.01


def n_timed(step_est: float) -> int:
    """Timed steps per run (truth.py uses the same rule on its measured warm-up step)."""
    return int(min(8, max(3, 1.5 / max(step_est, 1e-3))))


def est_run_s(run: dict) -> float:
    """3 warm-ups + timed steps + 1 profiled step, plus model build, optimizer state and parse."""
    st = est_step_s(run)
    return (4 + n_timed(st)) * st + 2.5 + params(run["model"]) / 3e9


def _r(model, strategy, mb, seq, recompute="none", nmb=1, prio=5):
    fam = MODELS[model][0]
    n = 1 if strategy == "single" else 2
    rid = f"{strategy}-{model}-s{seq}-mb{mb}" + (f"-nmb{nmb}" if strategy == "pp" or nmb > 1 else "") + \
          ("-rc" if recompute == "full" else "")
    return dict(id=rid, model=model, model_spec=spec(model, seq), family=fam, strategy=strategy,
                n_gpus=n, microbatch=mb, seq=seq, n_microbatches=nmb, recompute=recompute,
                priority=prio)


def single_runs() -> list[dict]:
    R = [_r("gpt-1.3b", "single", mb, 1024, prio=1) for mb in (1, 2, 4, 8, 16)]
    R += [_r("gpt-1.3b", "single", mb, 2048, prio=2) for mb in (2, 8)]
    R += [_r("gpt-1.3b", "single", 16, 1024, "full", prio=2)]
    R += [_r("gpt-2.6b", "single", mb, 1024, prio=3) for mb in (1, 4, 8)]
    R += [_r("gpt-2.6b", "single", 4, 2048, prio=4), _r("gpt-2.6b", "single", 8, 1024, "full", prio=4)]
    R += [_r("gpt-6.7b", "single", mb, 1024, prio=2) for mb in (1, 2, 4, 8)]     # mb 8: OOM edge
    R += [_r("gpt-6.7b", "single", 8, 1024, "full", prio=3), _r("gpt-6.7b", "single", 2, 2048, prio=4)]
    R += [_r("llama-1b", "single", mb, 2048, prio=1) for mb in (1, 4, 8)]
    R += [_r("llama-1b", "single", 2, 4096, prio=2)]
    R += [_r("llama-1b", "single", mb, 8192, prio=2) for mb in (1, 2, 4)]
    R += [_r("llama-1b", "single", 4, 8192, "full", prio=3)]
    R += [_r("llama-3b", "single", mb, 2048, prio=2) for mb in (1, 4)]
    R += [_r("llama-3b", "single", 2, 4096, prio=3), _r("llama-3b", "single", 1, 8192, prio=3),
          _r("llama-3b", "single", 2, 8192, "full", prio=4)]
    R += [_r("llama3-8b", "single", 1, 2048, prio=4), _r("llama3-8b", "single", 1, 2048, "full", prio=4),
          _r("llama3-8b", "single", 1, 8192, "full", prio=5)]
    return R


def dist_runs() -> dict[str, list[dict]]:
    """Per strategy, in the order they run (the likely OOMs last)."""
    ddp = [_r("gpt-1.3b", "ddp", mb, 1024, prio=1) for mb in (1, 4, 8)]
    ddp += [_r("llama-3b", "ddp", mb, 4096, prio=2) for mb in (1, 2)]
    ddp += [_r("gpt-6.7b", "ddp", 1, 1024, prio=4)]                       # DDP's buckets: OOM edge
    fsdp = [_r("gpt-1.3b", "fsdp2", mb, 1024, prio=1) for mb in (1, 8)]
    fsdp += [_r("gpt-6.7b", "fsdp2", mb, 1024, prio=1) for mb in (1, 4, 8)]
    fsdp += [_r("llama-3b", "fsdp2", mb, 4096, prio=2) for mb in (1, 4)]
    fsdp += [_r("llama3-8b", "fsdp2", mb, 4096, prio=2) for mb in (1, 2)]
    fsdp += [_r("llama3-8b", "fsdp2", 2, 8192, "full", prio=3)]
    tp = [_r("gpt-1.3b", "tp", mb, 1024, prio=1) for mb in (1, 8)]
    tp += [_r("gpt-6.7b", "tp", mb, 1024, prio=1) for mb in (1, 4)]
    tp += [_r("llama-3b", "tp", mb, 4096, prio=2) for mb in (1, 2)]
    tp += [_r("llama3-8b", "tp", 1, 4096, prio=2)]
    pp = [_r("gpt-1.3b", "pp", 1, 1024, nmb=4, prio=1), _r("gpt-1.3b", "pp", 1, 1024, nmb=8, prio=1),
          _r("gpt-1.3b", "pp", 4, 1024, nmb=8, prio=1)]
    pp += [_r("gpt-6.7b", "pp", mb, 1024, nmb=8, prio=2) for mb in (1, 2)]
    pp += [_r("llama-3b", "pp", 1, 4096, nmb=8, prio=2), _r("llama3-8b", "pp", 1, 4096, nmb=8, prio=3)]
    # The memory terms of 2026-11-30 (autopar/costmodel/eager.py) on models they were not fitted
    # on: DDP's second gradient copy, FSDP2's unsharded root (a 128K-vocabulary embedding and head)
    # and block buffers.
    ddp += [_r("gpt-2.6b", "ddp", 4, 1024, prio=6)]
    fsdp += [_r("gpt-2.6b", "fsdp2", 4, 1024, prio=6), _r("llama-1b", "fsdp2", 1, 8192, prio=6),
             _r("llama-1b", "fsdp2", 4, 4096, prio=6)]
    return {"ddp": ddp, "fsdp2": fsdp, "tp": tp, "pp": pp}


def accumulation_runs() -> dict[str, list[dict]]:
    """Steps that accumulate several microbatches before the optimizer (DDP's no_sync, FSDP2's
    set_requires_gradient_sync), as `autopar run` trains: measured apart from the fitted corpus
    (bench/results/truth_h200_accum_2026-11-30.json)."""
    single = [_r("gpt-1.3b", "single", 1, 1024, nmb=4, prio=7)]
    ddp = [_r("gpt-1.3b", "ddp", 1, 1024, nmb=k, prio=7) for k in (2, 4)]
    ddp += [_r("gpt-1.3b", "ddp", 4, 1024, nmb=4, prio=7), _r("llama-1b", "ddp", 1, 2048, nmb=4, prio=7)]
    fsdp = [_r("gpt-1.3b", "fsdp2", 1, 1024, nmb=4, prio=7), _r("gpt-6.7b", "fsdp2", 4, 1024, nmb=2, prio=7)]
    return {"single": single, "ddp": ddp, "fsdp2": fsdp}


def smoke_runs() -> tuple[list[dict], list[dict]]:
    """Tiny models for the CPU/gloo smoke mode: every code path, a few seconds each."""
    single = [_r("gpt-tiny", "single", 2, 64), _r("llama-tiny", "single", 2, 64),
              _r("gpt-tiny", "single", 2, 64, "full"), _r("llama-tiny", "single", 2, 64, "full")]
    dist = []
    for m in ("gpt-tiny", "llama-tiny"):
        dist += [_r(m, "ddp", 2, 64), _r(m, "fsdp2", 2, 64), _r(m, "tp", 2, 64),
                 _r(m, "pp", 1, 64, nmb=2), _r(m, "fsdp2", 2, 64, "full"), _r(m, "tp", 2, 64, "full")]
    return single, dist
