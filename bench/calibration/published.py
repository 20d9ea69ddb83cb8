#!/usr/bin/env python
"""Published training runs against autopar's cost model (issue 13, part 3).

Reads `../shared/calibration/published_runs.json` (527 published, measured LLM-training runs),
maps each usable end-to-end run to a hand-made Megatron-style autopar plan (a zoo model spec, a
cluster, dp/tp/pp, microbatch, global batch, recompute, ZeRO stage, schedule), evaluates it
with autopar's evaluator, and compares the predicted throughput (tokens/s per GPU) and peak
memory with what the authors measured. Runs autopar cannot express are kept as
"skipped: <reason>". The published sources are split, whole, into a fit set and a held-out set
(`split.json`), and the report gives the error per set, GPU type and framework.

Every row also keeps the cost model's own breakdown (per stage: compute by op kind,
communication, recomputation; per step: bubble, gradient sync, optimizer) and the GEMM and
attention shapes behind it, so `fit.py` can refit the efficiency curves without re-tracing.

    python bench/calibration/published.py                 # evaluate all, report, write JSON
    python bench/calibration/published.py --only sc21,korth --workers 1
    python bench/calibration/published.py --report bench/results/published_eval_2026-11-30.json

Errors are signed, predicted / measured - 1: +20% means autopar predicts 20% more throughput
than was measured (optimistic); for memory, -20% means it predicts 20% less memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS_FILE = REPO.parent / "shared" / "calibration" / "published_runs.json"
SPLIT_FILE = HERE / "split.json"
CLUSTER_DIR = HERE / "clusters"
RESULTS_DIR = REPO / "bench" / "results"


# ---- the one place that imports autopar ------------------------------------------------------

def autopar_api() -> SimpleNamespace:
    """Everything this harness takes from autopar, from the modules `autopar evaluate` itself
    uses (cli.cmd_evaluate). The package is being restructured: when a module moves, add its
    new path at the front of the candidate list here; nothing else in this directory imports
    autopar or graphs."""
    import importlib

    def first(name: str, *modules: str):
        errors = []
        for mod in modules:
            try:
                return getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError) as e:
                errors.append(f"{mod}: {e}")
        raise ImportError(f"autopar has no {name} in any of {modules}: {errors}")

    return SimpleNamespace(
        load_cluster=first("load_cluster", "autopar.hardware.presets", "autopar.hardware", "autopar.cluster"),
        ModelSource=first("ModelSource", "autopar.model"),
        Config3D=first("Config3D", "autopar.evaluation.baselines", "autopar.baselines"),
        build_3d=first("build_3d", "autopar.evaluation.baselines", "autopar.baselines"),
        ComputeModel=first("ComputeModel", "autopar.costmodel.compute", "autopar.costmodel", "autopar.cost"),
        # a stage's costs as the evaluator keeps them (its communication beyond the ops' own:
        # ZeRO's units, FSDP2's blocks, their overlap); an autopar without it: the ops' sums
        evaluate_stage=_optional("evaluate_stage", "autopar.evaluation.evaluator"),
        # GPU name -> (e_max, half-saturation dim) of the default GEMM curve where published runs
        # refitted it; an autopar without one uses (matmul_efficiency, 64) everywhere
        fitted_curves=_optional("FITTED_DEFAULT_CURVE", "autopar.costmodel.compute") or {},
    )


def _optional(name: str, module: str):
    import importlib
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _repo_relative(path: str | Path) -> str:
    """`path` relative to the repository (results files are committed: no machine's paths)."""
    return os.path.relpath(Path(path).resolve(), REPO.resolve())


def autopar_version() -> dict:
    """Where the evaluated autopar came from (path, git commit and whether it was modified)."""
    import autopar
    root = Path(autopar.__file__).resolve().parents[1]
    out = {"path": _repo_relative(root)}
    try:
        out["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                       text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "autopar", "graphs",
                                "solvers"], capture_output=True, text=True, check=True).stdout
        out["modified"] = bool(dirty.strip())
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = None
    return out


# ---- how runs map to autopar -----------------------------------------------------------------
# GPU -> (cluster preset or file, GPUs per node when the run does not say). The A100s of the
# 2020 Megatron-LM tables do not state their memory: DGX A100 shipped with 40 GB until the
# 80 GB part (Nov. 2020), so they take the 40 GB file. Memory size changes only the `fits`
# verdict and HBM bandwidth (1555 vs 2039 GB/s); the A100 compute model is the same.
GPU_CLUSTERS = {
    "A100-80GB": ("dgx-a100", 8),
    "A100-40GB": ("dgx-a100-40gb.json", 8),
    "A100": ("dgx-a100-40gb.json", 8),
    "V100-16GB": ("p3.16xlarge", 8),
    "V100": ("dgx2-v100.json", 16),          # the 2020 tables' V100s are a DGX-2's (32 GB)
    "H100-SXM": ("dgx-h100", 8),
    "H100-96GB": ("h100-96gb.json", 8),
}
# Sources whose cluster differs from the GPU's default (substring of `source` -> cluster).
SOURCE_CLUSTERS = {
    "bigscience": "jean-zay-a100.json",       # Omni-Path, 4 x 100 Gb/s per node
    "DLPerf": "dlperf-v100.json",             # InfiniBand 100 Gb/s
}
# GPU "families" that share one compute model (and so one fitted curve).
GPU_FAMILY = {"A100-80GB": "A100", "A100-40GB": "A100", "A100": "A100", "V100-16GB": "V100",
              "V100": "V100", "H100-SXM": "H100", "H100-96GB": "H100"}

# Shapes the notes leave out but that are fixed by name. MPT: llm-foundry
# scripts/train/yamls/pretrain/mpt-<size>.yaml at 8c8dd48f7, the commit of the benchmark README
# the runs come from (GPT-2-style blocks with biases, learned positions, tied head, vocab
# 50368, ffn 4h); the traced parameter count is checked against the run's params_b.
# torchtitan's Llama flavours are Meta's published configs, which are autopar's zoo presets.
NAMED_SHAPES = {
    "mpt-125m": dict(hidden=768, layers=12, heads=12),
    "mpt-350m": dict(hidden=1024, layers=24, heads=16),
    "mpt-760m": dict(hidden=1536, layers=24, heads=12),
    "mpt-1b": dict(hidden=2048, layers=24, heads=16),
    "mpt-3b": dict(hidden=2560, layers=32, heads=20),
    "mpt-7b": dict(hidden=4096, layers=32, heads=32),
    "mpt-13b": dict(hidden=5120, layers=40, heads=40),
    "mpt-30b": dict(hidden=7168, layers=48, heads=56),
    "mpt-70b": dict(hidden=8192, layers=80, heads=64),
}
MPT_VOCAB = 50368
ZOO_BY_NAME = {"Llama 3 8B": "llama3-8b", "Llama 2 13B": "llama2-13b", "Llama 3 70B": "llama3-70b",
               "Llama 2 70B": "llama2-70b", "Llama 2 7B": "llama2-7b"}
# Megatron-DeepSpeed pads BLOOM's 250680-token vocabulary to a multiple of 128 x tp: 250880.
BLOOM_VOCAB = 250880
FSDP_ZERO = {"SHARD_GRAD_OP": 2}           # every other FSDP kind shards weights too: ZeRO-3

# How each source computed attention (source substring -> impl, attention dropout, basis), the
# first match wins. "flash": the scores stay inside a fused kernel (the zoo's default sdpa);
# "unfused": QK^T and PV as batched GEMMs over the materialised s x s scores with softmax and
# dropout kernels streaming them (zoo spec attn=unfused, graphs/zoo/attention.py). A basis says
# what the source states; whatever it says is "inferred" is flagged on the run.
# FlashAttention appeared in May 2022 (Dao et al., arXiv 2205.14135); Megatron-LM took it up in
# Megatron-Core (2023, through Transformer Engine), after every unfused source below.
ATTENTION_BY_SOURCE: tuple[tuple[str, str, float, str], ...] = (
    # The notes say "FlashAttention + ALiBi"; the runs' scripts say which kernel: llm-foundry's
    # scripts/train/benchmarking/submit_benchmarks.py (b2a43a147, Oct. 2023, the H100 tables;
    # earlier for A100) sets attn_config.attn_impl from --attn_impl, default 'triton', which
    # sweep.sh does not override, and the pretrain yamls say attn_impl: triton too: flash-attn's
    # Triton FlashAttention on triton-pre-mlir (setup.py's gpu extra). Not ALiBi: the yamls leave
    # alibi off (learned positions; the README's NumParams grows with the sequence length by
    # d_model per position: 7b 6.659e9 at 2048, 6.919e9 at 65536).
    ("mosaicml/llm-foundry", "triton", 0.0,
     "stated: FlashAttention; its kernel, attn_impl triton, from llm-foundry's benchmark scripts"),
    ("pytorch/torchtitan", "flash", 0.0, "inferred: torchtitan's Llama calls F.scaled_dot_product_attention"),
    ("NVIDIA/NeMo", "flash", 0.0, "inferred: NeMo 24.x runs Transformer Engine's fused (flash) attention"),
    ("NVIDIA-NeMo/Megatron-Bridge", "flash", 0.0, "inferred: Megatron-Bridge runs Transformer Engine's fused attention"),
    ("Megatron-Core", "flash", 0.0, "inferred: Megatron-Core runs Transformer Engine's fused attention"),
    ("NVIDIA/Megatron-LM README, images/model_table.png", "flash", 0.0,
     "inferred: the 2024 table is Megatron-Core with Transformer Engine's fused attention"),
    ("Llama Team", "flash", 0.0, "inferred: Llama 3 training used FlashAttention"),
    # Korthikanti et al. 2022, section 4.1: the core attention keeps QK^T's softmax output (2asb
    # per token), its dropout mask (asb) and the dropped output (2asb): scores materialised, with
    # Megatron's fused scale-mask-softmax kernel and attention dropout.
    ("Korthikanti et al.", "unfused", 0.1,
     "stated: section 4.1 keeps softmax output, dropout mask and output (5as^2b); dropout p 0.1 inferred"),
    ("Narayanan et al., SC21", "unfused", 0.1,
     "inferred: Megatron-LM 2021 (pre-FlashAttention; baddbmm + fused softmax), default attention dropout 0.1"),
    ("NVIDIA/Megatron-LM images/tables.tex", "unfused", 0.1,
     "inferred: Megatron-LM 2020 (pre-FlashAttention), default attention dropout 0.1"),
    ("Oneflow-Inc/DLPerf", "unfused", 0.1,
     "inferred: Megatron-LM and OneFlow-GPT of May 2021 (pre-FlashAttention), default attention dropout 0.1"),
    # tr11-176B-ml.slurm passes no --attention-dropout, so Megatron-DeepSpeed's default 0.1 ran
    # (the Hub config's attention_dropout 0.0 describes inference, not the training run)
    ("bigscience-workshop", "unfused", 0.1,
     "inferred: Megatron-DeepSpeed of 2022 (pre-FlashAttention; fused softmax); attention dropout 0.1, "
     "Megatron's default, which tr11-176B-ml.slurm does not override"),
    ("Smith et al., MT-NLG", "unfused", 0.1, "inferred: Megatron-LM + DeepSpeed of 2021 (pre-FlashAttention)"),
    ("Zhang et al., OPT", "unfused", 0.1, "inferred: metaseq of 2021-2022 (pre-FlashAttention)"),
)


def attention_of(run: dict) -> tuple[str, float, str]:
    """(impl, attention dropout, basis) of a run's attention; flash, stated nowhere, by default."""
    for key, impl, dropout, basis in ATTENTION_BY_SOURCE:
        if key in run["source"]:
            return impl, dropout, basis
    return "flash", 0.0, "inferred: no statement; the zoo's default"


# Each source's data-parallel gradient sync: the engine whose buckets it ran
# (autopar.costmodel.collectives.GRAD_SYNC_ENGINES: "megatron-core" overlaps max(40M, 1M x dp)-
# parameter buckets with the backward, "megatron-local" all-reduces one flat buffer after it,
# "deepspeed" 5e8-element buckets after the pipeline schedule), with the basis. It matters only
# for data-parallel runs below ZeRO-2 (FSDP runs reduce-scatter per block, priced apart). A
# source not listed runs autopar's default (Megatron-Core's). Overlapped buckets came to
# Megatron-LM with Megatron-Core's DistributedDataParallel (--overlap-grad-reduce, 2023); before,
# --DDP-impl local (the default) all-reduced a flat gradient buffer in train_step, after the
# backward (megatron/model/distributed.py).
GRAD_SYNC_BY_SOURCE: tuple[tuple[str, str, str], ...] = (
    ("NVIDIA/Megatron-LM README, images/model_table.png", "megatron-core",
     "inferred: the 2024 table is Megatron-Core, whose performance configurations overlap the gradient "
     "reduce (--overlap-grad-reduce)"),
    ("Megatron-Core", "megatron-core", "inferred: Megatron-Core with --overlap-grad-reduce"),
    ("Korthikanti et al.", "megatron-local", "inferred: Megatron-LM of 2022 (--DDP-impl local, after the backward)"),
    ("Narayanan et al., SC21", "megatron-local", "inferred: Megatron-LM of 2021 (--DDP-impl local, after the backward)"),
    ("NVIDIA/Megatron-LM images/tables.tex", "megatron-local",
     "inferred: Megatron-LM of 2020 (--DDP-impl local, after the backward)"),
    ("Oneflow-Inc/DLPerf", "megatron-local",
     "inferred: DLPerf's Megatron-LM of May 2021 (--DDP-impl local, after the backward)"),
    ("bigscience-workshop", "deepspeed",
     "inferred: Megatron-DeepSpeed's pipeline engine reduces ZeRO-1's gradients after the schedule "
     "(DeepSpeed's default reduce_bucket_size 5e8)"),
    ("Smith et al., MT-NLG", "deepspeed", "inferred: Megatron-DeepSpeed's pipeline engine, after the schedule"),
)
# OneFlow-GPT (DLPerf's OneFlow columns): OneFlow's actors launch each gradient's all-reduce as
# soon as it is made, beside the backward; its fusion sizes are not stated, so Megatron-Core's
# buckets stand in.
ONEFLOW_GRAD_SYNC = ("megatron-core", "inferred: OneFlow overlaps the gradient all-reduce with the backward; "
                     "Megatron-Core's bucket size stands in")


# Each source's loss kernel (autopar.costmodel.compute.LOSS_KERNELS), source substring -> (kernel,
# basis). Megatron's GPT computes `vocab_parallel_cross_entropy(output.float(), labels)` unless
# --fp16-lm-cross-entropy (off by default, and set by none of these runs' stated configurations);
# Megatron-DeepSpeed (BLOOM, MT-NLG) keeps Megatron's model code; Megatron-Core's
# VocabParallelCrossEntropy upcasts too (its fused kernel, --cross-entropy-loss-fusion, is off by
# default). A source not listed runs autopar's default ("fused": MPT's flash-attn fused
# cross-entropy; torchtitan's and OneFlow's are not Megatron's either).
LOSS_BY_SOURCE: tuple[tuple[str, str, str], ...] = (
    ("NVIDIA/Megatron-LM README, images/model_table.png", "megatron",
     "inferred: Megatron-Core's vocab-parallel cross-entropy, unfused by default, fp32"),
    ("Megatron-Core", "megatron", "inferred: Megatron-Core's vocab-parallel cross-entropy, unfused by default, fp32"),
    ("Korthikanti et al.", "megatron", "inferred: Megatron-LM's vocab_parallel_cross_entropy(output.float())"),
    ("Narayanan et al., SC21", "megatron", "inferred: Megatron-LM's vocab_parallel_cross_entropy(output.float())"),
    ("NVIDIA/Megatron-LM images/tables.tex", "megatron",
     "inferred: Megatron-LM's vocab_parallel_cross_entropy(output.float())"),
    ("Oneflow-Inc/DLPerf", "megatron",
     "inferred: DLPerf's Megatron-LM columns, vocab_parallel_cross_entropy(output.float())"),
    ("bigscience-workshop", "megatron",
     "inferred: Megatron-DeepSpeed's vocab_parallel_cross_entropy(output.float()); tr11 sets no "
     "--fp16-lm-cross-entropy"),
    ("Smith et al., MT-NLG", "megatron", "inferred: Megatron-DeepSpeed's vocab_parallel_cross_entropy(output.float())"),
)


def loss_of(run: dict) -> tuple[str | None, str]:
    """(kernel, basis) of a run's loss; None: autopar's default (fused)."""
    if framework_of(run) == "OneFlow":
        return None, "inferred: OneFlow's own loss kernel; autopar's default"
    for key, kernel, basis in LOSS_BY_SOURCE:
        if key in run["source"]:
            return kernel, basis
    return None, "inferred: no statement; autopar's default"


# Full recomputation with or without torch's early stop (evaluate's checkpoint_early_stop): the
# non-reentrant checkpoint of torch >= 2.1 stops rerunning a block once its backward's last saved
# tensor is saved again, so a block's output projection and residual add are not rerun
# (autopar.sharding.stage_problem.block_rerun). torchtitan wraps its blocks in torch's
# checkpoint_wrapper, non-reentrant. Megatron-LM, Megatron-Core, NeMo and Megatron-DeepSpeed
# rerun a layer's whole forward in their CheckpointFunction (a reentrant autograd Function);
# llm-foundry's benchmark runs used torch 1.13 images (submit_benchmarks.py's default), before
# torch 2.1 made early stop the default; OneFlow has its own checkpointing.
EARLY_STOP_BY_SOURCE: tuple[tuple[str, str], ...] = (
    ("pytorch/torchtitan", "inferred: torchtitan's checkpoint_wrapper is torch's non-reentrant checkpoint, early stop"),
)


def early_stop_of(run: dict) -> tuple[bool, str]:
    """(whether its full recomputation stops early, basis) of a run (EARLY_STOP_BY_SOURCE)."""
    for key, basis in EARLY_STOP_BY_SOURCE:
        if key in run["source"]:
            return True, basis
    return False, "inferred: the whole block's forward rerun (Megatron's CheckpointFunction, or torch before 2.1)"


SELECTIVE_LAYER_AC_FREQ = 2     # torchtitan's selective_ac_option default (config_manager.py)

# SC21's ZeRO-3 rows (Table 2, "Megatron-LM+ZeRO-3") ran DeepSpeed's ZeRO-3, which gathers
# each submodule's parameters at its hook: autopar prices that engine's ZeRO-2/3 per tensor
# (collectives.zero_gathers_per_unit), where FSDP's gather one flat unit per block.
ZERO3_ENGINE_BY_FRAMEWORK = {"Megatron-LM+ZeRO-3": ("deepspeed", "stated: Megatron-LM + DeepSpeed ZeRO-3 (the runs' "
                                                               "framework), parameters fetched per submodule")}


def grad_sync_of(run: dict) -> tuple[str | None, str]:
    """(engine, basis) of a run's gradient sync (and, under ZeRO-2/3, of its gathers); None:
    autopar's default."""
    if framework_of(run) == "OneFlow":
        return ONEFLOW_GRAD_SYNC
    if framework_of(run) in ZERO3_ENGINE_BY_FRAMEWORK:
        return ZERO3_ENGINE_BY_FRAMEWORK[framework_of(run)]
    for key, engine, basis in GRAD_SYNC_BY_SOURCE:
        if key in run["source"]:
            return engine, basis
    return None, "inferred: no statement; autopar's default"


@dataclass
class Job:
    """One run as an autopar evaluation."""

    id: str
    model: str                  # zoo spec
    seq: int
    dtype: str
    cluster: str                # preset name or cluster file path
    nodes: int
    gpus_per_node: int
    dp: int
    tp: int
    pp: int
    microbatch: int
    global_batch: int
    recompute: str
    schedule: str
    vp: int
    zero: int
    params_b: float | None = None
    grad_sync: str | None = None   # the engine of the data-parallel gradient sync (GRAD_SYNC_BY_SOURCE)
    loss: str | None = None        # the loss kernel (LOSS_BY_SOURCE); None: autopar's default
    checkpoint_early_stop: bool = False  # full recomputation as torch >= 2.1 runs it (EARLY_STOP_BY_SOURCE)
    tp_comm_overlap: bool = False  # Megatron-Core's --tp-comm-overlap, where the run states it
    recompute_every: int | None = None   # recompute "full" of every n-th block only (None: all)
    sequence_parallel: bool = False
    flags: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)   # tokens_per_s_per_gpu, basis, memory_gib


def _clean_framework(fw: str | None) -> str:
    fw = (fw or "?").split(" (")[0]
    return fw.replace("Megatron-LM + DeepSpeed ZeRO-3", "Megatron-LM+ZeRO-3")


def framework_of(run: dict) -> str:
    if "OneFlow" in run["source"]:
        return "OneFlow"
    return _clean_framework(run.get("framework"))


def _flops_per_token(basis: str, l: int, h: int, s: int, V: int) -> tuple[float, str] | None:
    """FLOPs per trained token by the formula a source's TFLOP/s or MFU is computed with."""
    b = (basis or "").lower()
    core = 24.0 * l * h * h
    if "megatron-hw" in b or "megatron-style" in b:          # Narayanan et al. eq. 3, counts recompute
        return 4 * core * (1 + s / (6 * h) + V / (16 * l * h)), "96·l·h²(1+s/6h+V/16lh)"
    if "72blsh" in b or ("model" in b and "mfu vs 989" in b):
        return 3 * core * (1 + s / (6 * h) + V / (12 * l * h)), "72·l·h²(1+s/6h+V/12hl)"
    return None


def measured_throughput(run: dict, seq: int, shape: dict) -> tuple[float, str, list[str]] | None:
    """(tokens/s per GPU, what it was computed from, flags) from the most direct printed value."""
    me, p, n = run["measured"], run["parallel"], run["n_gpus"]
    flags = []
    if me.get("tokens_per_s_per_gpu"):
        return float(me["tokens_per_s_per_gpu"]), "tokens/s/GPU", flags
    if me.get("step_time_s") and p.get("global_batch") and "measured.step_time_s" not in run.get("derived_fields", []):
        return p["global_batch"] * seq / me["step_time_s"] / n, "step time", flags
    if me.get("samples_per_s"):
        return me["samples_per_s"] * seq / n, "samples/s", flags
    l, h, V = shape.get("layers"), shape.get("hidden"), shape.get("vocab")
    if not (l and h and V):
        return None
    if me.get("tflops_per_gpu"):
        f = _flops_per_token(me.get("tflops_basis"), l, h, seq, V)
        if f:
            flags.append(f"throughput from TFLOP/s by {f[1]}")
            return me["tflops_per_gpu"] * 1e12 / f[0], "TFLOP/s", flags
    if me.get("mfu"):
        f = _flops_per_token(me.get("tflops_basis"), l, h, seq, V)
        peak = 312e12 if run["gpu"].startswith("A100") else (989e12 if run["gpu"].startswith("H100") else None)
        if f and peak:
            flags.append(f"throughput from MFU by {f[1]}, peak {peak / 1e12:g} TFLOP/s")
            return me["mfu"] * peak / f[0], "MFU", flags
    return None


def _recompute_from_tflops(run: dict, tokens_per_gpu: float, shape: dict, seq: int) -> tuple[str, float] | None:
    """Megatron's TFLOP/s counts 3 or 4 passes (4 with activation checkpointing): with both a
    throughput and a TFLOP/s printed, their ratio says which."""
    me = run["measured"]
    basis = (me.get("tflops_basis") or "").lower()
    if "Megatron-LM images/tables.tex" in run["source"]:
        basis = "megatron"          # Megatron-LM's own log line (see map_run)
    if not me.get("tflops_per_gpu") or "megatron" not in basis:
        return None
    l, h, V = shape["layers"], shape["hidden"], shape["vocab"]
    passes = me["tflops_per_gpu"] * 1e12 / (tokens_per_gpu * 8 * l * h * h * 3 * (1 + seq / (6 * h) + V / (16 * l * h)))
    if abs(passes - 4) < 0.1:
        return "full", passes
    if abs(passes - 3) < 0.1:
        return "none", passes
    return None


def _gpt_params(shape: dict, tied: bool) -> float:
    """Parameters of the zoo's GPT block stack (biases, LayerNorms, learned positions)."""
    h, L, s, V = shape["hidden"], shape["layers"], shape["seq"], shape["vocab"]
    f = shape.get("ffn") or 4 * h
    block = 4 * h * h + 2 * h * f + 9 * h + f
    return L * block + V * h + s * h + 2 * h + (0 if tied else V * h)


def _untied_matches(shape: dict, params_b: float) -> bool:
    """True when the printed parameter count says the output layer is not tied to the
    embedding (Megatron's --untie-embeddings-and-output-weights): the tied count is more than
    3% off and the untied one is closer."""
    tied, untied = (_gpt_params(shape, t) / 1e9 for t in (True, False))
    return abs(tied / params_b - 1) > 0.03 and abs(untied - params_b) < abs(tied - params_b)


def map_run(run: dict, attention: bool = True, grad_sync: bool = True, loss: bool = True,
            tp_comm_overlap: bool = True) -> Job | str:
    """A Job, or the reason the run cannot be evaluated ("skipped: <reason>"). attention=False
    evaluates every run with the zoo's default (flash) attention, as before ATTENTION_BY_SOURCE;
    grad_sync=False every run with autopar's default gradient sync (GRAD_SYNC_BY_SOURCE);
    loss=False every run with autopar's default loss kernel (LOSS_BY_SOURCE); tp_comm_overlap=False
    every run with its tensor-parallel collectives exposed, those that state --tp-comm-overlap too."""
    p, m, me = run["parallel"], run["model"], run["measured"]
    flags: list[str] = []
    if run["status"] != "ok":
        return f"status {run['status']}"
    if run["scope"] != "end_to_end":
        return "per-layer measurement"
    if run.get("precision") == "fp8":
        return "fp8 (autopar models bf16/fp16 only)"
    if run["gpu"] not in GPU_CLUSTERS:
        return f"GPU {run['gpu']} has no autopar preset"
    if run.get("task") == "lora":
        return "LoRA (frozen weights)"
    if (p.get("cp") or 1) > 1:
        return "context parallelism"
    tp, pp = p.get("tp") or 1, p.get("pp") or 1
    fsdp = p.get("fsdp")
    if fsdp and tp > 1:
        return "FSDP across TP"
    if not run.get("n_gpus"):
        return "n_gpus not stated"
    n = run["n_gpus"]
    dp = p.get("dp")
    if dp is None or dp * tp * pp != n:
        return "degrees do not multiply to n_gpus"

    # -- shape
    name = m.get("name") or ""
    family = m.get("family")
    shape = {k: m.get(k) for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "seq", "vocab")}
    seq = m.get("seq")
    if family == "mpt":
        if name not in NAMED_SHAPES:
            return f"unknown shape: {name}"
        shape.update(NAMED_SHAPES[name], vocab=MPT_VOCAB)
        flags.append("shape from llm-foundry yaml")
        family = "gpt"
    elif name in ZOO_BY_NAME and not shape["hidden"]:
        flags.append(f"shape = zoo {ZOO_BY_NAME[name]}")
    elif family == "bloom":
        if shape["vocab"] is None or shape["vocab"] == 250680:
            shape["vocab"] = BLOOM_VOCAB
            flags.append("vocab 250880 (BLOOM's, padded)")
        family = "gpt"
    if "Megatron-LM images/tables.tex" in run["source"] and seq is None:
        # The 2020 README trained GPT-2-style models at seq 1024 with the GPT-2 vocabulary
        # padded to 51200: with those, the printed TFLOP/s equal Megatron's 96·B·s·l·h²(...)
        # formula divided by the printed step time within 0.1% on all 12 rows
        # (_recompute_from_tflops finds 4.00 passes, i.e. this formula, on each).
        seq, shape["vocab"] = 1024, 51200
        flags.append("seq 1024, vocab 51200 inferred from TFLOP/s x step time")
    if "DLPerf" in run["source"] and not shape["heads"]:
        # Attention FLOPs (4·b·s²·hidden) and the default A100/V100 attention efficiency do
        # not depend on the head count, so this choice does not change the prediction.
        shape["heads"] = 16
        flags.append("heads 16 assumed (cost-neutral)")
    if name in ZOO_BY_NAME and not shape["hidden"]:
        if seq is None:
            return "unknown shape: seq"
        spec = f"{ZOO_BY_NAME[name]}:seq={seq}"
    else:
        missing = [k for k in ("hidden", "layers", "heads", "vocab") if not shape[k]]
        if seq is None:
            missing.append("seq")
        if family not in ("gpt", "llama"):
            return f"unknown shape: family {family}"
        if missing:
            return "unknown shape: " + ",".join(missing)
        shape["seq"] = seq
        keys = ["hidden", "layers", "heads", "seq", "vocab"]
        if family == "llama":
            keys[3:3] = ["kv_heads", "ffn"]
            if not (shape["kv_heads"] and shape["ffn"]):
                return "unknown shape: kv_heads/ffn"
        elif shape["ffn"] and shape["ffn"] != 4 * shape["hidden"]:
            keys.append("ffn")
        spec = f"{family}:" + ",".join(f"{k}={shape[k]}" for k in keys)
        if family == "gpt" and m.get("params_b") and _untied_matches(shape, m["params_b"]):
            spec += ",tied=false"
            flags.append("untied head (matches params_b)")

    impl, attn_dropout, attn_basis = attention_of(run) if attention else ("flash", 0.0, "stated: --attention flash")
    if impl == "unfused":
        spec += ",attn=unfused" + (f",attn_dropout={attn_dropout:g}" if attn_dropout else "")
    elif impl == "triton":
        spec += ",attn=triton"
    if "inferred" in attn_basis:
        flags.append(f"attention {impl} ({attn_basis})")

    # -- measurement
    meas_shape = dict(shape, seq=seq)
    got = measured_throughput(run, seq, meas_shape)
    if got is None:
        return "no throughput measurement autopar can compare"
    tokens_per_gpu, basis, mflags = got
    flags += mflags

    # -- the plan
    gb = p.get("global_batch")
    mb = p.get("microbatch")
    if mb is None and p.get("batch_per_dp_rank"):
        mb = p["batch_per_dp_rank"] // (p.get("grad_accum") or 1)
    if gb is None and p.get("batch_per_dp_rank"):
        gb = dp * p["batch_per_dp_rank"]
        flags.append("global batch = dp x local batch")
    if gb is None:
        return "global batch not stated"
    if mb is None:
        if pp > 1:
            return "microbatch not stated (pipeline run)"
        mb = gb // dp
        flags.append("microbatch = global/dp assumed")
    recompute = p.get("recompute")
    if recompute is None:
        inferred = _recompute_from_tflops(run, tokens_per_gpu, meas_shape, seq) if shape.get("layers") else None
        if inferred:
            recompute = inferred[0]
            flags.append(f"recompute {recompute} inferred (TFLOP/s count {inferred[1]:.2f} passes)")
        else:
            recompute = "none"
            flags.append("recompute not stated: none assumed")
    rc_layers = None
    if p.get("recompute_detail") == "selective-layer" and pp == 1:
        # torchtitan's layer-level selective AC checkpoints every ac_freq-th block whole (its
        # checkpoint_wrapper on blocks with count % ac_freq == 0); selective_ac_option's
        # default is "2". Which blocks does not change a one-stage step's cost.
        recompute, rc_layers = "full", SELECTIVE_LAYER_AC_FREQ
        flags.append(f"selective-layer AC as full recompute of every {SELECTIVE_LAYER_AC_FREQ}nd block "
                     "(inferred: torchtitan's default selective_ac_option)")
    elif p.get("recompute_detail") == "selective-layer":
        flags.append("selective-layer AC evaluated as selective")
    vp = p.get("vp") or 1
    sched = (p.get("pp_schedule") or "").lower()
    schedule = "interleaved" if (vp > 1 or "interleaved" in sched) and pp > 1 else "1f1b"
    if schedule == "interleaved" and vp == 1:
        return "interleaved schedule with unstated virtual stages"
    zero = p.get("zero_stage") or 0
    if fsdp:
        zero = FSDP_ZERO.get(fsdp, 3)
        flags.append(f"FSDP {fsdp} as ZeRO-{zero}")
    notes = run.get("notes") or ""
    # Megatron's --tp-comm-overlap asserts --sequence-parallel, and --overlap-param-gather
    # needs --use-distributed-optimizer (ZeRO-1): flags a run states imply them.
    tp_overlap = tp > 1 and "--tp-comm-overlap" in notes
    sp = bool(p.get("sp")) or tp_overlap
    if sp:
        flags.append("sequence parallel" + ("" if p.get("sp") else " (implied by --tp-comm-overlap)"))
    if tp_overlap and tp_comm_overlap:
        flags.append("tensor-parallel collectives overlapped with the linears' GEMMs (stated: --tp-comm-overlap)")
    if zero == 0 and dp > 1 and any(f in notes for f in ("--overlap-param-gather", "--use-distributed-optimizer")):
        zero = 1
        flags.append("ZeRO-1 (Megatron's distributed optimizer, implied by --overlap-param-gather)")
    precision = run.get("precision")
    dtype = "fp16" if precision == "fp16" or run["gpu"].startswith("V100") else "bf16"

    cluster, gpn_default = GPU_CLUSTERS[run["gpu"]]
    for key, c in SOURCE_CLUSTERS.items():
        if key in run["source"]:
            cluster = c
    gpn = run.get("gpus_per_node") or gpn_default
    if n < gpn:
        gpn = n
    if gpn & (gpn - 1) or n % gpn:
        return f"{n} GPUs do not fill nodes of {gpn}"
    if tp > gpn:
        return "TP spans nodes (autopar keeps TP inside a node)"
    if run["gpu"] == "A100":
        flags.append("A100 memory not stated: 40 GB")
    for f in run.get("uncertain_fields", []):
        if f.startswith(("model.", "parallel.", "precision")):
            flags.append(f"uncertain {f}")
    engine, sync_basis = grad_sync_of(run) if grad_sync else (None, "stated: --grad-sync default")
    if engine and dp > 1 and (zero <= 1 or engine == "deepspeed"):
        flags.append(f"{'grad sync' if zero <= 1 else f'ZeRO-{zero}'} {engine} ({sync_basis})")
    loss_kernel, loss_basis = loss_of(run) if loss else (None, "stated: --loss fused")
    if loss_kernel:
        flags.append(f"loss {loss_kernel} ({loss_basis})")
    early_stop, early_stop_basis = early_stop_of(run)
    if recompute == "full" and early_stop:
        flags.append(f"recompute with early stop ({early_stop_basis})")
    job = Job(id=run["id"], model=spec, seq=seq, dtype=dtype, cluster=cluster, nodes=n // gpn, gpus_per_node=gpn,
              dp=dp, tp=tp, pp=pp, microbatch=mb, global_batch=gb, recompute=recompute, schedule=schedule, vp=vp,
              zero=zero, params_b=m.get("params_b"), grad_sync=engine, loss=loss_kernel, checkpoint_early_stop=early_stop,
              tp_comm_overlap=tp_overlap and tp_comm_overlap, recompute_every=rc_layers, sequence_parallel=sp, flags=flags,
              measured={"tokens_per_s_per_gpu": tokens_per_gpu, "basis": basis, "memory_gib": me.get("memory_gib")})
    return job


# ---- evaluation (in worker processes) --------------------------------------------------------

def _strategy_letters(name: str) -> dict[str, int]:
    """"b@0,n@1+rs:..." -> {"b": 1, "n": 2}: letter -> mesh-axis mask (1 axis 0, 2 axis 1, 3 both)."""
    base = name.split("+")[0]
    if base in ("R", "follow", ""):
        return {}
    out = {}
    for item in base.split(","):
        c, _, ax = item.partition("@")
        out[c] = 3 if ax == "01" else int(ax) + 1
    return out


def _gemms_of(node, strategy: str, mesh: tuple[int, int]):
    """The local GEMMs of a matmul op under a strategy, as autopar's einsum rule forms them:
    forward [m,k]x[k,n] and the two backward GEMMs, each (m, n, k, batch)."""
    lhs, out = node.attrs["equation"].replace(" ", "").split("->")
    ins = lhs.split(",")
    sizes = {}
    for term, o in zip(ins, node.operands):
        for ch, d in zip(term, o.shape):
            sizes[ch] = d
    letters = _strategy_letters(strategy)
    factor = {1: mesh[0], 2: mesh[1], 3: mesh[0] * mesh[1]}
    loc = {c: sizes[c] / factor[letters[c]] if letters.get(c) else sizes[c] for c in sizes}
    a, b = ins[0], ins[1]
    prod = lambda xs: math.prod(xs) if xs else 1
    batch = prod([loc[c] for c in dict.fromkeys(a) if c in b and c in out])
    m = prod([loc[c] for c in dict.fromkeys(a) if c in out and c not in b])
    n = prod([loc[c] for c in dict.fromkeys(b) if c in out and c not in a])
    k = prod([loc[c] for c in dict.fromkeys(lhs) if c not in out and c != ","])
    fwd = [(m, n, k, batch)]
    bwd = []
    for i in range(2):
        dt = node.operands[i].dtype
        if dt.startswith("int") or dt == "bool":
            continue
        bwd.append((m, k, n, batch) if i == 0 else (k, n, m, batch))
    return [tuple(int(x) for x in g) for g in fwd], [tuple(int(x) for x in g) for g in bwd]


def _stage_breakdown(stage: dict, graph, cm, fit_shapes: bool, comm_s: float | None = None) -> dict:
    """Per-microbatch compute by op kind, communication and recompute of one stage, plus (for
    GPUs without a measured profile) the GEMM and attention shapes behind the compute.
    comm_s: the stage's communication as the evaluator prices it (exposed, plus the compute's
    slowdown beside the hidden part); None: the sum of its ops' own collectives."""
    by_kind: Counter = Counter()
    n_ops = 0
    comm = 0.0
    gemm_f: Counter = Counter()
    gemm_b: Counter = Counter()
    attn: Counter = Counter()
    mm_recon = mm_model = 0.0
    d0, d1 = stage["logical_mesh"]
    for op in stage["ops"]:
        by_kind[op["kind"]] += op["compute_s"]
        n_ops += op["compute_s"] > 0
        comm += op["comm_s"]
        if not fit_shapes:
            continue
        node = graph.node(op["name"])
        if op["kind"] == "matmul" and "equation" in node.attrs and len(node.operands) >= 2:
            f, b = _gemms_of(node, op["strategy"], (d0, d1))
            for g in f:
                gemm_f[g] += 1
            for g in b:
                gemm_b[g] += 1
            mm_model += op["compute_s"]
            mm_recon += sum(cm.matmul_s(g[0], g[1], g[2], g[3]) for g in f + b)
        elif op["kind"] == "attention" and len(node.operands[0].shape) == 4:
            bq, hq, s, dh = node.operands[0].shape
            lt = _strategy_letters(op["strategy"])
            fac = {0: 1, 1: d0, 2: d1, 3: d0 * d1}
            # (b, h, s, d, causal, unfused, dropout, kernel): fit.py re-prices unfused entries as
            # ComputeModel.unfused_attention_s does, fused ones as attention_s on their kernel
            attn[(bq // fac[lt.get("b", 0)], hq // fac[lt.get("h", 0)], s, dh,
                  bool(node.attrs.get("is_causal", False)), node.attrs.get("impl") == "unfused",
                  float(node.attrs.get("dropout_p", 0.0) or 0.0) > 0.0,
                  "triton" if node.attrs.get("impl") == "triton" else "flash")] += 1
    if comm_s is not None:
        comm = comm_s
    ops_total = sum(by_kind.values()) + comm
    out = {"layers": stage["layers"], "mesh": [d0, d1], "recompute": stage.get("recompute", "none"),
           "fwd_s": stage["fwd_s"], "bwd_s": stage["bwd_s"], "compute_by_kind_s": dict(by_kind), "comm_s": comm,
           "n_ops": n_ops,                     # ops that launch a kernel (forward)
           # forward rerun (full recompute) and what the shared-gradient discount takes off
           "recompute_extra_s": stage["fwd_s"] + stage["bwd_s"] - ops_total,
           "memory_bytes": stage.get("memory", {}).get("total_bytes")}
    if fit_shapes:
        out["gemm_fwd"] = [list(g) + [c] for g, c in sorted(gemm_f.items())]
        out["gemm_bwd"] = [list(g) + [c] for g, c in sorted(gemm_b.items())]
        out["attn"] = [list(a) + [c] for a, c in sorted(attn.items())]
        out["matmul_recon_rel_err"] = abs(mm_recon - mm_model) / mm_model if mm_model else 0.0
    return out


WHAT_IF_KEYS = {
    "latency": "multiply both links' latency_s",
    "intra_bw": "multiply the intra-node (NVLink) bandwidth",
    "inter_bw": "multiply the inter-node bandwidth",
    "matmul_efficiency": "set GPU.matmul_efficiency (large-GEMM efficiency) of unprofiled GPUs",
    "memory_efficiency": "set GPU.memory_efficiency (fraction of HBM bandwidth a streaming kernel gets)",
}


def cluster_path(cluster: str) -> str:
    """A job's cluster: a preset name, or a file of bench/calibration/clusters, which jobs name by
    its file name only, since results files outlive the checkout that wrote them (older results
    hold absolute paths: their file name is used the same way)."""
    return str(CLUSTER_DIR / Path(cluster).name) if cluster.endswith(".json") else cluster


def what_if_cluster(api, cluster, what_if: dict):
    """The cluster with some figures changed, through the cluster file format (to_dict ->
    JSON -> load_cluster), for sensitivity experiments; nothing in autopar is patched."""
    import tempfile
    d = cluster.to_dict()
    for key, v in what_if.items():
        if key == "latency":
            d["intra_link"]["latency_s"] *= v
            d["inter_link"]["latency_s"] *= v
        elif key in ("intra_bw", "inter_bw"):
            d[f"{key[:5]}_link"]["bandwidth_bytes_per_s"] *= v
        elif key in ("matmul_efficiency", "memory_efficiency"):
            if key == "memory_efficiency" or not d["gpu"].get("profile"):
                d["gpu"][key] = v
        else:
            raise ValueError(f"unknown what-if {key!r}; known: {', '.join(WHAT_IF_KEYS)}")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(d, f)
    try:
        return api.load_cluster(f.name)
    finally:
        os.unlink(f.name)


def evaluate_group(task: tuple[str, int, str, list[dict]]) -> list[dict]:
    """Evaluate jobs that share one model (spec, seq, dtype): its traces are reused."""
    spec, seq, dtype, jobs = task
    api = autopar_api()
    out = []
    try:
        src = api.ModelSource(spec, seq=seq, dtype=dtype)
    except Exception as e:          # a spec the zoo rejects: every run of it is skipped
        return [{"id": j["id"], "skip": f"autopar: {type(e).__name__}: {e}"} for j in jobs]
    for j in jobs:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            cl = api.load_cluster(cluster_path(j["cluster"]), j["nodes"], j["gpus_per_node"])
            if j.get("what_if"):
                cl = what_if_cluster(api, cl, j["what_if"])
            cfg = api.Config3D(j["dp"], j["tp"], j["pp"], j["microbatch"], j["recompute"], j["schedule"],
                               j["vp"] if j["schedule"] == "interleaved" else 1, j["zero"],
                               recompute_num_layers=(len(src.graph(j["microbatch"] * j["dp"]).layers) - 2)
                               // j["recompute_every"] if j.get("recompute_every") else None,
                               sequence_parallel=j.get("sequence_parallel", False))
            # eager None: autopar's default; True/False: the eager recipe's terms on/off
            kw = {} if j.get("eager") is None else {"eager": j["eager"]}
            if j.get("grad_sync"):
                kw["grad_sync"] = j["grad_sync"]
            if j.get("loss") and not j.get("eager"):     # the eager recipe prices its own loss
                kw["loss"] = j["loss"]
            kw["checkpoint_early_stop"] = bool(j.get("checkpoint_early_stop", False))
            if j.get("tp_comm_overlap"):
                kw["tp_comm_overlap"] = True
            plan = api.build_3d(src, cl, j["global_batch"], cfg, dtype, **kw)
            d = plan.to_dict()
            graph = src.graph(j["microbatch"] * j["dp"])
            cm = api.ComputeModel(cl.gpu, dtype)
            fit_shapes = cl.gpu.profile is None
            comms: list[float | None] = [None] * len(d["stages"])
            if api.evaluate_stage is not None:
                res = [api.evaluate_stage(graph, cl, s, plan.training, cm, **kw) for s in plan.stages]
                comms = [r.op_comm_s + r.comm_overlap_s for r in res]
            stages = [_stage_breakdown(s, graph, cm, fit_shapes, c) for s, c in zip(d["stages"], comms)]
        except Exception as e:
            out.append({"id": j["id"], "skip": f"autopar: {type(e).__name__}: {str(e)[:200]}"})
            continue
        pr = d["predicted"]
        out.append({"id": j["id"], "predicted": {k: pr[k] for k in (
            "step_time_s", "tokens_per_s", "pipeline_s", "bubble_fraction", "grad_sync_s", "optimizer_s", "p2p_s",
            "peak_memory_bytes", "fits", "mfu", "tflops_per_gpu")},
            "params": d["model"]["params"], "n_microbatches": d["training"]["n_microbatches"],
            "virtual_stages": d["training"].get("virtual_stages", 1),
            "gpu_model": {"name": cl.gpu.name, "peak_flops": cl.gpu.peak(dtype), "profiled": not fit_shapes,
                          "matmul_efficiency": cl.gpu.matmul_efficiency, "gap_s": cm.gap_s,
                          "default_curve": api.fitted_curves.get(cl.gpu.name),
                          "launch_s": cm.launch_s, "stream_bytes_per_s": cm.stream_bytes_per_s},
            "stages": stages, "eval_s": time.perf_counter() - t0, "eval_cpu_s": time.process_time() - c0})
    return out


# ---- orchestration ---------------------------------------------------------------------------

def load_runs(path: Path) -> list[dict]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != "autopar.calibration/v1":
        raise ValueError(f"{path}: expected schema autopar.calibration/v1, got {data.get('schema')!r}")
    return data["runs"]


def load_split(path: Path = SPLIT_FILE) -> dict:
    return json.loads(Path(path).read_text())


def set_of(run: dict, split: dict) -> str:
    if run["source"] in split["fit"]:
        return "fit"
    return "held_out"


def _row_base(run: dict, split: dict) -> dict:
    return {"id": run["id"], "source": run["source"], "section": run["section"], "framework": framework_of(run),
            "gpu": run["gpu"], "gpu_family": GPU_FAMILY.get(run["gpu"], run["gpu"]), "n_gpus": run["n_gpus"],
            "set": set_of(run, split), "status": run["status"]}


def finish_row(row: dict, job: Job, res: dict) -> dict:
    """Measured vs predicted, signed errors, and the step-time breakdown of the busiest device."""
    if "skip" in res:
        row.update(evaluated=False, skip=res["skip"])
        return row
    meas = job.measured
    pred = res["predicted"]
    n = job.nodes * job.gpus_per_node
    pt = pred["tokens_per_s"] / n
    row.update(evaluated=True, model=job.model, cluster=Path(job.cluster).stem, plan=_plan_label(job),
               flags=job.flags, measured=meas, predicted=pred, params=res["params"],
               n_microbatches=res["n_microbatches"], virtual_stages=res["virtual_stages"],
               gpu_model=res["gpu_model"], stages=res["stages"], eval_s=res["eval_s"], eval_cpu_s=res["eval_cpu_s"],
               job=asdict(job))
    row["predicted_tokens_per_s_per_gpu"] = pt
    row["error"] = pt / meas["tokens_per_s_per_gpu"] - 1
    if meas.get("memory_gib"):
        row["memory_error"] = pred["peak_memory_bytes"] / 2**30 / meas["memory_gib"] - 1
    if job.params_b:
        row["params_rel_diff"] = res["params"] / (job.params_b * 1e9) - 1
        if abs(row["params_rel_diff"]) > 0.02:
            row["flags"] = row["flags"] + [f"traced params {row['params_rel_diff']:+.1%} vs params_b"]
    if not pred["fits"]:
        row["flags"] = row["flags"] + ["predicted not to fit, but it ran"]
    row["breakdown"] = step_breakdown(row)
    return row


def _plan_label(j: Job) -> str:
    s = f"dp{j.dp} tp{j.tp} pp{j.pp} mb{j.microbatch} gb{j.global_batch}"
    if j.recompute != "none":
        s += f" rc:{j.recompute}"
    if j.schedule == "interleaved":
        s += f" vp{j.vp}"
    if j.zero:
        s += f" zero{j.zero}"
    return s


def step_breakdown(row: dict) -> dict:
    """Fractions of the predicted step on the busiest device: GEMMs, attention, memory-bound
    ops, in-stage communication (TP, ZeRO-3 gathers, resharding), forward rerun, pipeline
    bubble (+ p2p), and the tail (gradient sync + optimizer step). The stage costs are per
    microbatch; `busy` scales them to the step (makespan / (1 + bubble))."""
    pred = row["predicted"]
    step = pred["step_time_s"]
    v = row["virtual_stages"] or 1
    stages = row["stages"]
    n_dev = len(stages) // v if len(stages) % v == 0 else len(stages)
    dev: dict[int, list] = defaultdict(list)
    for i, s in enumerate(stages):
        dev[i % n_dev].append(s)
    crit = max(dev.values(), key=lambda ss: sum(s["fwd_s"] + s["bwd_s"] for s in ss))
    parts = Counter()
    for s in crit:
        ck = s["compute_by_kind_s"]
        parts["gemm"] += ck.get("matmul", 0.0)
        parts["attention"] += ck.get("attention", 0.0)
        parts["memory_bound"] += sum(t for k, t in ck.items() if k not in ("matmul", "attention"))
        parts["comm_in_stage"] += s["comm_s"]
        parts["recompute"] += s["recompute_extra_s"]
    per_mb = sum(parts.values())
    busy = pred["pipeline_s"] / (1 + pred["bubble_fraction"])
    out = {k: (t / per_mb * busy / step if per_mb else 0.0) for k, t in parts.items()}
    out["bubble_p2p"] = (pred["pipeline_s"] - busy) / step
    out["tail_sync_optimizer"] = (step - pred["pipeline_s"]) / step
    out["grad_sync_s"] = pred["grad_sync_s"]
    out["optimizer_s"] = pred["optimizer_s"]
    return out


def run_all(runs: list[dict], split: dict, workers: int, only: list[str] | None = None,
            log=print, what_if: dict | None = None, eager: bool | None = None,
            attention: bool = True, grad_sync: bool = True, loss: bool = True,
            tp_comm_overlap: bool = True) -> list[dict]:
    rows: dict[str, dict] = {}
    jobs: dict[str, Job] = {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    oom_jobs = []
    for run in runs:
        if only and not any(o.lower() in (run["id"] + " " + run["source"]).lower() for o in only):
            continue
        row = _row_base(run, split)
        mapped = map_run(run, attention, grad_sync, loss, tp_comm_overlap)
        if run["status"] == "oom":
            # OOM runs are not compared for speed, but autopar should not call them a fit.
            mapped = map_run({**run, "status": "ok", "measured": {"step_time_s": 1.0}}, attention, grad_sync, loss,
                             tp_comm_overlap)
            if isinstance(mapped, Job):
                oom_jobs.append(mapped.id)
                row["oom_check"] = True
            else:
                row.update(evaluated=False, skip=f"status oom ({mapped})")
                rows[run["id"]] = row
                continue
        if isinstance(mapped, str):
            row.update(evaluated=False, skip=mapped)
            rows[run["id"]] = row
            continue
        rows[run["id"]] = row
        jobs[mapped.id] = mapped
        groups[(mapped.model, mapped.seq, mapped.dtype)].append(dict(asdict(mapped), what_if=what_if or {},
                                                                     eager=eager))
    # Biggest models first (tracing dominates), so the two workers finish together.
    tasks = sorted(((k[0], k[1], k[2], v) for k, v in groups.items()),
                   key=lambda t: -(_size_hint(t[0]) * len({(j["microbatch"] * j["dp"]) for j in t[3]})))
    log(f"evaluating {len(jobs)} runs in {len(tasks)} model groups on {workers} worker(s)")
    results: list[dict] = []
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            for i, res in enumerate(pool.imap_unordered(evaluate_group, tasks)):
                results += res
                if (i + 1) % 20 == 0:
                    log(f"  {i + 1}/{len(tasks)} groups")
    else:
        for t in tasks:
            results += evaluate_group(t)
    for res in results:
        row = rows[res["id"]]
        job = jobs[res["id"]]
        if row.get("oom_check"):
            row.update(evaluated=False, skip="status oom (checked: does autopar predict it fits?)",
                       model=job.model, plan=_plan_label(job),
                       predicted_fits=None if "skip" in res else res["predicted"]["fits"],
                       predicted_peak_gib=None if "skip" in res else res["predicted"]["peak_memory_bytes"] / 2**30)
            continue
        finish_row(row, job, res)
    return [rows[r["id"]] for r in runs if r["id"] in rows]


def _size_hint(spec: str) -> float:
    kv = dict(x.split("=") for x in spec.split(":", 1)[1].split(",") if "=" in x) if ":" in spec else {}
    try:
        return float(kv.get("layers", 32)) * float(kv.get("hidden", 4096)) ** 0.5
    except ValueError:
        return 1.0


# ---- report ----------------------------------------------------------------------------------

def _stats(errs: list[float]) -> tuple[int, float, float, float]:
    if not errs:
        return 0, float("nan"), float("nan"), float("nan")
    return len(errs), statistics.median(abs(e) for e in errs), max(abs(e) for e in errs), statistics.median(errs)


def _table(title: str, groups: dict[str, list[float]]) -> list[str]:
    w = max([32] + [len(str(k)) for k in groups])
    lines = [f"{title:<{w + 2}} {'n':>4} {'med|err|':>9} {'max|err|':>9} {'med err':>8}"]
    for key in sorted(groups):
        n, med, mx, sgn = _stats(groups[key])
        lines.append(f"  {key:<{w}} {n:>4} {med:>9.1%} {mx:>9.1%} {sgn:>+8.1%}")
    return lines


def report(rows: list[dict], err_key: str = "error", worst: int = 10) -> str:
    ev = [r for r in rows if r.get("evaluated")]
    out = []
    skipped = Counter(r["skip"].split(" (")[0] if r["skip"].startswith(("autopar", "status oom")) else r["skip"]
                      for r in rows if not r.get("evaluated"))
    out.append(f"{len(rows)} runs: {len(ev)} evaluated, {len(rows) - len(ev)} skipped")
    for why, c in skipped.most_common():
        out.append(f"  skipped {c:>4}: {why}")
    flagged = Counter(f.split(" (")[0] for r in ev for f in r.get("flags", []))
    if flagged:
        out.append("flags on evaluated runs (count):")
        for f, c in flagged.most_common():
            out.append(f"  {c:>4}  {f}")
    out.append("")
    out.append("throughput error = predicted tokens/s/GPU / measured - 1 (+ = autopar optimistic)")
    for set_name in ("fit", "held_out", "all"):
        sel = [r for r in ev if set_name == "all" or r["set"] == set_name]
        out += _table(f"[{set_name}] by GPU", _group(sel, "gpu", err_key))
        out += _table(f"[{set_name}] by GPU family", _group(sel, "gpu_family", err_key))
        out += _table(f"[{set_name}] by framework", _group(sel, "framework", err_key))
        out.append("")
    mem = [r for r in ev if "memory_error" in r]
    if mem:
        out.append("peak memory error = predicted / measured - 1 (- = autopar predicts less than measured)")
        out += _table("[memory] by set", {s: [r["memory_error"] for r in mem if r["set"] == s]
                                          for s in ("fit", "held_out") if any(r["set"] == s for r in mem)})
        out.append("")
    ooms = [r for r in rows if r.get("oom_check")]
    if ooms:
        wrong = [r for r in ooms if r.get("predicted_fits")]
        out.append(f"OOM runs: {len(ooms)}; autopar says {len(wrong)} of them fit"
                   + (": " + ", ".join(f"{r['id']} ({r['predicted_peak_gib']:.0f} GiB)" for r in wrong) if wrong else ""))
        out.append("")
    out.append(f"worst {worst} by |error|:")
    for r in sorted(ev, key=lambda r: -abs(r[err_key]))[:worst]:
        b = r["breakdown"]
        out.append(f"  {r[err_key]:+7.1%} {r['id']} [{r['set']}, {r['gpu']}, {r['framework']}]")
        out.append(f"           {r['model']} on {r['cluster']} x{r['n_gpus']}: {r['plan']}; measured "
                   f"{r['measured']['tokens_per_s_per_gpu']:.0f} ({r['measured']['basis']}), predicted "
                   f"{r['predicted_tokens_per_s_per_gpu']:.0f} tok/s/GPU")
        out.append("           step: " + ", ".join(f"{k} {b[k]:.0%}" for k in (
            "gemm", "attention", "memory_bound", "comm_in_stage", "recompute", "bubble_p2p", "tail_sync_optimizer")))
        if r.get("flags"):
            out.append("           flags: " + "; ".join(r["flags"]))
    return "\n".join(out)


def _group(rows, key, err_key):
    g = defaultdict(list)
    for r in rows:
        g[r[key]].append(r[err_key])
    return g


# Keys a residual table can be grouped by besides a row's own fields (set, gpu, gpu_family,
# framework, source, cluster, ...): the job's plan (dp, tp, pp, microbatch, zero, recompute,
# grad_sync, loss, ...) and the traced attention's head dimension and its residue mod 8 (the
# 16-byte alignment of half-precision operands).
ROW_DERIVED_KEYS = ("head_dim", "head_dim_mod8")


def row_key(row: dict, key: str):
    """A row's value of `key`: its own field, else its job's, else a ROW_DERIVED_KEYS value."""
    if key in row:
        return row[key]
    if key in row.get("job", {}):
        return row["job"][key]
    if key in ROW_DERIVED_KEYS:
        # the traced attention's (stored for unprofiled GPUs), else the spec's hidden / heads
        dims = {a[3] for s in row.get("stages", []) for a in s.get("attn") or []}
        if not dims:
            kv = dict(x.split("=", 1) for x in row.get("model", "").partition(":")[2].split(",") if "=" in x)
            if "hidden" in kv and "heads" in kv:
                dims = {int(kv["hidden"]) // int(kv["heads"])}
        if len(dims) != 1:
            return None
        d = dims.pop()
        return d if key == "head_dim" else d % 8
    raise KeyError(f"rows have no {key!r}; a row's fields, its job's ({', '.join(row.get('job', {}))}) "
                   f"or {', '.join(ROW_DERIVED_KEYS)}")


def residual_table(rows: list[dict], keys: list[str], err_key: str = "error") -> list[str]:
    """The evaluated rows' errors grouped by the combination of `keys` (row_key), one line per
    group: n, median and max |error|, median signed error."""
    g = defaultdict(list)
    for r in rows:
        if r.get("evaluated") and err_key in r:
            g[" ".join(f"{k}={row_key(r, k)}" for k in keys)].append(r[err_key])
    return _table("by " + ",".join(keys), g)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(RUNS_FILE), help="published_runs.json")
    ap.add_argument("--split", default=str(SPLIT_FILE))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", help="comma-separated substrings of run ids or sources")
    ap.add_argument("--out", help="results JSON (default bench/results/published_eval_<date>.json)")
    ap.add_argument("--report", help="print the report of an existing results JSON; evaluate nothing")
    ap.add_argument("--worst", type=int, default=10)
    ap.add_argument("--group-by", metavar="KEYS",
                    help="with --report: the errors grouped by these comma-separated keys (row_key: a row's "
                         "fields, its job's plan fields such as tp, dp, pp, microbatch, or head_dim, head_dim_mod8)")
    ap.add_argument("--set", choices=("fit", "held_out"), help="with --group-by: only this side of the split")
    ap.add_argument("--label", help="what autopar was evaluated (e.g. the commit of a snapshot), kept in the JSON")
    ap.add_argument("--what-if", action="append", default=[], metavar="KEY=VALUE",
                    help="sensitivity experiment: " + "; ".join(f"{k}: {v}" for k, v in WHAT_IF_KEYS.items()))
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=None,
                    help="evaluate with (--eager) or without (--no-eager) the eager PyTorch recipe's terms "
                         "(autopar/costmodel/eager.py); default: autopar's default")
    ap.add_argument("--attention", choices=("by-source", "flash"), default="by-source",
                    help="each run's attention as its source computed it (ATTENTION_BY_SOURCE), or every run "
                         "with the zoo's default flash attention (the model before attn=unfused)")
    ap.add_argument("--grad-sync", choices=("by-source", "default"), default="by-source",
                    help="each run's data-parallel gradient sync as its engine ran it (GRAD_SYNC_BY_SOURCE), or "
                         "every run with autopar's default (Megatron-Core's overlapped buckets)")
    ap.add_argument("--loss", choices=("by-source", "fused"), default="by-source",
                    help="each run's loss kernel as its framework ran it (LOSS_BY_SOURCE), or every run with "
                         "autopar's default fused loss (the model before loss=megatron)")
    ap.add_argument("--tp-comm-overlap", choices=("by-source", "off"), default="by-source",
                    help="overlap the tensor-parallel collectives with the linears' GEMMs where a run states "
                         "--tp-comm-overlap (evaluate's tp_comm_overlap), or run every run's exposed (the model before)")
    a = ap.parse_args(argv)
    if a.report:
        data = json.loads(Path(a.report).read_text())
        if a.group_by:
            rows = [r for r in data["rows"] if a.set is None or r["set"] == a.set]
            print("\n".join(residual_table(rows, a.group_by.split(","))))
            return 0
        print(report(data["rows"], worst=a.worst))
        return 0
    t0 = time.perf_counter()
    runs = load_runs(Path(a.runs))
    split = load_split(Path(a.split))
    what_if = {k: float(v) for k, _, v in (w.partition("=") for w in a.what_if)}
    rows = run_all(runs, split, a.workers, a.only.split(",") if a.only else None, log=lambda s: print(s, flush=True),
                   what_if=what_if, eager=a.eager, attention=a.attention == "by-source",
                   grad_sync=a.grad_sync == "by-source", loss=a.loss == "by-source",
                   tp_comm_overlap=a.tp_comm_overlap == "by-source")
    elapsed = time.perf_counter() - t0
    text = report(rows, worst=a.worst)
    print(text)
    cpu = time.process_time() + sum(r.get("eval_cpu_s", 0.0) for r in rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nharness wall time {elapsed:.0f} s with {a.workers} worker(s) on {os.cpu_count()} CPUs; CPU time "
          f"{cpu:.0f} s (main process + evaluations, tracing included); load average at the end {load:.1f}")
    out = Path(a.out) if a.out else RESULTS_DIR / f"published_eval_{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/calibration/published.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    payload = {"schema": "autopar.published_eval/v1", "date": datetime.date.today().isoformat(), "command": command.strip(),
               "runs_file": _repo_relative(a.runs), "split_file": _repo_relative(a.split), "autopar": dict(autopar_version(), label=a.label),
               "what_if": what_if, "eager": a.eager, "attention": a.attention, "grad_sync": a.grad_sync, "loss": a.loss, "tp_comm_overlap": a.tp_comm_overlap, "wall_time_s": elapsed, "cpu_time_s": cpu, "load_average_end": load,
               "workers": a.workers, "cpu_count": os.cpu_count(), "rows": rows}
    write_results(out, payload)
    print(f"wrote {out}")
    return 0


def write_results(path: Path, payload: dict) -> None:
    """The header indented, then one row per line: readable diffs, a third of the indented size."""
    rows = payload.pop("rows")
    head = json.dumps(payload, indent=1, default=_json_default)[:-2]
    body = ",\n".join(json.dumps(r, separators=(",", ":"), default=_json_default) for r in rows)
    Path(path).write_text(head + ',\n "rows": [\n' + body + "\n]}\n")
    payload["rows"] = rows


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"cannot serialise {type(x).__name__}")


if __name__ == "__main__":
    sys.exit(main())
