"""Compute cost: a roofline per op with efficiencies from a measured GPU profile, or a
documented default curve where none is shipped. Times in seconds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from graphs.annotate import unfused_score_passes

from ..hardware.presets import GPUS
from ..hardware.profiles import load_gpu_profile
from ..hardware.specs import GPU


@dataclass(frozen=True)
class ComputeModel:
    """Roofline per op: max(flops / (peak * eff), bytes / (hbm_bw * mem_eff)), plus the gap
    between back-to-back kernels, and never less than the host's dispatch time of one op:
    op_s = max(kernel_s + gap_s, launch_s). A GPU-bound stream runs ahead of the host, so a
    long kernel pays only the gap (~1 us, CUDA-graph launch); a tiny one waits on dispatch.

    With a measured profile, matmul efficiency comes from the nearest measured shapes (in
    log2 space, inverse-distance weighted), a memory-bound op's bandwidth from the measured rows
    of its own kind (add, copy, gelu, layernorm, softmax and the backwards of gelu and layernorm)
    at its size, and launch overhead from the measured kernels. Without one (V100, A100 here),
    efficiency follows a documented default curve: eff = e_max * prod_d (d / (d + c)) over the
    GEMM's m, n, k (e_max = matmul_efficiency and c = 64, or the published-run refit of
    FITTED_DEFAULT_CURVE) — a large
    GEMM reaches the published large-GEMM efficiency, a skinny one falls off as its smallest
    dimension under-fills the tensor-core tiles.
    """

    gpu: GPU
    dtype: str = "bf16"

    @property
    def profile(self) -> dict | None:
        return load_gpu_profile(self.gpu.profile) if self.gpu.profile else None

    # The profile-derived constants are read per op priced; they are worked out once per GPU
    # (the median over the profile's rows cost the rules more than the roofline itself).
    @property
    def launch_s(self) -> float:
        return _launch_s(self.gpu)

    @property
    def gap_s(self) -> float:
        """Kernel-to-kernel gap on a busy stream (the profile's launch inside a CUDA graph)."""
        return _gap_s(self.gpu)

    def op_s(self, kernel_s: float) -> float:
        """Time of one launched op whose kernel runs `kernel_s` (see the class doc)."""
        return max(kernel_s + self.gap_s, self.launch_s)

    @property
    def stream_bytes_per_s(self) -> float:
        """HBM bandwidth of a large streaming kernel (_stream_bytes_per_s)."""
        return _stream_bytes_per_s(self.gpu)

    def matmul_efficiency(self, m: int, n: int, k: int) -> float:
        return _matmul_eff(self.gpu, self.dtype, int(m), int(n), int(k))

    def matmul_s(self, m: int, n: int, k: int, batch: int = 1, nbytes: float = 0.0) -> float:
        if m <= 0 or n <= 0 or k <= 0:
            return 0.0
        flops = 2.0 * batch * m * n * k
        eff = self.matmul_efficiency(m * batch, n, k) if batch > 1 else self.matmul_efficiency(m, n, k)
        t = flops / (self.gpu.peak(self.dtype) * eff)
        return self.op_s(max(t, nbytes / self.stream_bytes_per_s))

    def attention_s(self, batch: int, heads: int, seq: int, head_dim: int, causal: bool,
                    backward: bool = False, kernel: str = "flash") -> float:
        """Fused attention (flash): 4*b*h*s^2*d FLOPs forward (half with a causal mask),
        2.5x that backward, at the measured attention efficiency. `kernel` "triton" (the
        ATTENTION op's attrs["impl"], zoo attn=triton) is the same work on the Triton
        FlashAttention kernel, TRITON_FLASH_SLOWDOWN times slower."""
        if batch <= 0 or heads <= 0:
            return 0.0
        if kernel not in ATTENTION_KERNEL_SLOWDOWN:
            raise ValueError(f"unknown fused attention kernel {kernel!r}; known: {', '.join(ATTENTION_KERNEL_SLOWDOWN)}")
        flops = 4.0 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
        if backward:
            flops *= 2.5
        eff = _attention_eff(self.gpu, self.dtype, seq, head_dim, causal, backward, batch * heads)
        return self.op_s(flops / (self.gpu.peak(self.dtype) * eff) * ATTENTION_KERNEL_SLOWDOWN[kernel])

    def unfused_attention_s(self, batch: int, heads: int, seq: int, head_dim: int, dropout: bool,
                            backward: bool = False, elem_bytes: int = 2) -> float:
        """Attention with the scores materialised (graphs/zoo/attention.py): batched GEMMs over
        every (batch, head) on the GEMM curve, each no faster than streaming its operands, and the
        memory-bound passes over the b*h*s^2 scores (graphs.annotate.unfused_score_passes) at
        streaming bandwidth, one launched kernel each. The whole score matrix is computed: a
        causal mask is applied, not skipped. Forward QK^T [s,d]x[d,s] and PV [s,s]x[s,d];
        backward dP = dO V^T [s,d]x[d,s], dV = P^T dO, dQ = dS K and dK = dS^T Q, each [s,s]x[s,d]."""
        if batch <= 0 or heads <= 0 or seq <= 0:
            return 0.0
        bh, s, d, e = batch * heads, seq, head_dim, elem_bytes
        scores_bytes = float(bh) * s * s * e
        qkv_bytes = float(bh) * s * d * e
        # [s,d]x[d,s] -> [s,s]: reads two [s,d] operands, writes the scores
        wide = self.matmul_s(s, s, d, batch=bh, nbytes=2 * qkv_bytes + scores_bytes)
        # [s,s]x[s,d] -> [s,d] (or its transposes): reads the scores and one [s,d], writes one
        narrow = self.matmul_s(s, d, s, batch=bh, nbytes=scores_bytes + 2 * qkv_bytes)
        fwd_passes, bwd_passes, _ = unfused_score_passes(e, dropout)
        passes = bwd_passes if backward else fwd_passes
        gemm_s = wide + 3 * narrow if backward else wide + narrow
        return gemm_s + sum(self.memory_bound_s(p * scores_bytes / e) for p in passes)

    def memory_bound_s(self, nbytes: float, flops: float = 0.0, kernel: str = "add") -> float:
        """One memory-bound op moving `nbytes` (read + written). With a measured profile the
        bandwidth is that of the profile's `kernel` rows (hardware.profiles.MEMORY_BOUND_KERNELS)
        at this size: a GELU or a norm does not stream at an `add`'s rate, and a small kernel of
        any kind reaches a fraction of the large one's bandwidth."""
        if nbytes <= 0 and flops <= 0:
            return 0.0
        bw = _kernel_bytes_per_s(self.gpu, kernel, float(nbytes)) if nbytes > 0 else self.stream_bytes_per_s
        return self.op_s(max(nbytes / bw, flops / self.gpu.peak("fp32")))


    def vocab_parallel_cross_entropy_s(self, logits: float) -> tuple[float, float]:
        """(forward, backward) seconds of Megatron's vocab-parallel cross-entropy over `logits`
        elements of this GPU's vocab shard, one launched kernel per pass (MEGATRON_CE_*_PASSES);
        its three all-reduces across tp are the loss op's collectives (rules/follow.follow_loss)."""
        if logits <= 0:
            return 0.0, 0.0
        return (sum(self.memory_bound_s(b * logits) for b in MEGATRON_CE_FWD_PASSES_BYTES_PER_LOGIT),
                sum(self.memory_bound_s(b * logits) for b in MEGATRON_CE_BWD_PASSES_BYTES_PER_LOGIT))


# Megatron's loss as Megatron runs it (GPTModel: `vocab_parallel_cross_entropy(output.float(),
# labels)` unless --fp16-lm-cross-entropy, which neither Megatron-LM nor BigScience's
# Megatron-DeepSpeed sets by default; tensor_parallel/cross_entropy.py). Every pass is a separate
# kernel over the whole [tokens, vocab/tp] tensor (GBs: no reuse in L2), bytes per logit:
# forward: .float() reads bf16, writes fp32 (2 + 4); max over the vocab (4); subtract the max
# (4 + 4); exp in place (4 + 4); sum (4); divide by the sum, the softmax it saves (4 + 4): 38 B.
# backward: the target logit's -1 (one element per row, nothing); multiply by the loss's
# gradient in place (4 + 4); .float()'s backward casts it to bf16 (4 + 2): 14 B. The loss op's
# own pricing (one pass over the bf16 logits each way) is the floor this replaces.
MEGATRON_CE_FWD_PASSES_BYTES_PER_LOGIT = (6, 4, 8, 8, 4, 8)
MEGATRON_CE_BWD_PASSES_BYTES_PER_LOGIT = (8, 6)
# The loss kernels the default model prices (evaluator.evaluate's `loss`): "fused", one pass over
# the logits each way (a fused cross-entropy kernel: the loss op's own pricing; the planner's);
# "megatron", Megatron's fp32 vocab-parallel passes above.
LOSS_KERNELS = ("fused", "megatron")

# The Triton FlashAttention kernel (flash-attn's flash_attn_triton.py on the pre-MLIR Triton
# compiler; llm-foundry's attn_impl: triton, which every MPT benchmark of bench/calibration ran:
# scripts/train/benchmarking/submit_benchmarks.py --attn_impl default 'triton', yamls
# attn_config.attn_impl: triton) against the FlashAttention-2-class kernel that the measured
# profiles (torch sdpa's flash backend) and the A100 default stand for: time per FLOP, forward
# and backward alike. Fitted on the fit set only: bench/calibration/fit.py's
# "eager+gemm+triton[A100]" on the fit set's 151 A100 rows (139 MPT) gives 1.922 (with the GEMM
# curve free: 0.809, 304); independently, MPT's H100 rows (70, measured profile, nothing refitted)
# regressed on their predicted attention share give 1.78 (FINDINGS.md section 12). The
# FlashAttention-2 paper (Dao 2023, arXiv 2307.08691, section 4.1) measures FlashAttention-2
# 1.3-2.5x faster than FlashAttention in Triton.
TRITON_FLASH_SLOWDOWN = 1.92
ATTENTION_KERNEL_SLOWDOWN = {"flash": 1.0, "triton": TRITON_FLASH_SLOWDOWN}

# The default curve's (large-GEMM efficiency, half-saturation dimension) where published runs
# refit it: A100 on the fit sources of bench/calibration (MPT, SC21, DLPerf Megatron; held out:
# BLOOM, Korthikanti, Megatron 2020, DLPerf OneFlow, torchtitan, Megatron-Core), its "gemm"
# experiment (bench/calibration/FINDINGS.md, section 4): held-out A100 median |error| of
# throughput 24.5% -> 10.2%. Effective values: they also absorb per-layer memory-bound work the
# model lacks. V100 keeps the datasheet default (its one fit source makes held-out V100 worse).
# Only GEMMs: unprofiled attention keeps gpu.matmul_efficiency.
# The third value is the smallest GEMM dimension the fit saw (every m, n, k of the fit set's A100
# GEMMs is >= 768: MPT-125M's hidden size). Below it the fit says nothing, and its large
# half-saturation dimension would price a k = 128 GEMM (unfused attention's QK^T) at a quarter of
# the large-GEMM efficiency where measured H100/H200 profiles give about half; so below that
# dimension a GEMM falls off as the datasheet curve does (DATASHEET_HALF_DIM), from the fitted
# curve's value at the edge, as a profiled GPU's efficiency does outside its measured grid
# (FINDINGS.md, section 9).
FITTED_DEFAULT_CURVE = {"A100-SXM4-80GB": (0.798, 396.0, 768.0), "A100-SXM4-40GB": (0.798, 396.0, 768.0)}
DATASHEET_HALF_DIM = 64.0


def _default_eff(gpu: GPU, m: int, n: int, k: int) -> float:
    e_max, half_dim, fitted_from = FITTED_DEFAULT_CURVE.get(gpu.name, (gpu.matmul_efficiency, DATASHEET_HALF_DIM, 0.0))
    sat = 1.0
    for d in (m, n, k):
        if d >= fitted_from:
            sat *= d / (d + half_dim)
        else:
            edge = fitted_from
            sat *= edge / (edge + half_dim) * (d / (d + DATASHEET_HALF_DIM)) / (edge / (edge + DATASHEET_HALF_DIM))
    return e_max * sat


@lru_cache(maxsize=200_000)
def _matmul_eff(gpu: GPU, dtype: str, m: int, n: int, k: int) -> float:
    prof = load_gpu_profile(gpu.profile) if gpu.profile else None
    rows = _profile_matmul(gpu.profile, dtype) if prof else None
    if rows is None:
        return _default_eff(gpu, m, n, k)
    pts, effs = rows
    q = np.log2([m, n, k])
    d = np.sqrt(((pts - q) ** 2).sum(axis=1))
    idx = np.argsort(d)[:4]
    if d[idx[0]] < 1e-9:
        return float(effs[idx[0]])
    w = 1.0 / d[idx]
    eff = float((effs[idx] * w).sum() / w.sum())
    # Outside the measured grid, shrink toward the default curve's fall-off for tiny dims.
    lo = pts.min(axis=0)
    if (q < lo - 0.5).any():
        eff *= _default_eff(gpu, m, n, k) / _default_eff(gpu, *(2 ** np.maximum(q, lo)))
    return max(eff, 1e-3)


@cache
def _profile_matmul(profile_name: str, dtype: str):
    prof = load_gpu_profile(profile_name) or {}
    peak_key = "bf16" if dtype in ("bf16", "fp16") else dtype
    rows = [r for r in prof.get("matmul", []) if r["dtype"] == dtype] or \
           [r for r in prof.get("matmul", []) if r["dtype"] == peak_key]
    if not rows:
        return None
    peak = _peak_for_profile(prof, dtype)
    pts = np.log2(np.array([[r["m"], r["n"], r["k"]] for r in rows], dtype=float))
    effs = np.array([min(r["tflops"] * 1e12 / peak, 1.0) for r in rows])
    return pts, effs


def _peak_for_profile(prof: dict, dtype: str) -> float:
    name = prof.get("gpu", "")
    gpu = next((g for g in GPUS.values() if g.name.split("-")[0] in name), None)
    if gpu is None:
        raise ValueError(f"profile for {name!r} matches no known GPU; known: {sorted(GPUS)}")
    return gpu.peak(dtype)


@lru_cache(maxsize=10_000)
def _attention_eff(gpu: GPU, dtype: str, seq: int, head_dim: int, causal: bool, backward: bool,
                   batch_heads: int = 1) -> float:
    """Efficiency of the measured attention row nearest in log2 (seq, head_dim, batch x heads):
    batch x heads is how many thread blocks fill the GPU, worth 2x between 16 and 128 heads
    at seq 2048."""
    prof = load_gpu_profile(gpu.profile) if gpu.profile else None
    rows = [r for r in (prof or {}).get("attention", []) if r["dtype"] == dtype and r["causal"] == causal]
    if not rows:
        # Flash attention reaches about 2/3 of the large-GEMM efficiency forward and a bit less
        # backward (FlashAttention-2 paper, A100: ~70% and ~60% of peak at long sequences).
        return gpu.matmul_efficiency * (0.85 if not backward else 0.75) * seq / (seq + 256.0)
    peak = gpu.peak(dtype)
    best, best_d = None, math.inf
    for r in rows:
        dist = (abs(math.log2(r["seq"]) - math.log2(seq)) + abs(math.log2(r["head_dim"]) - math.log2(head_dim))
                + abs(math.log2(r["batch"] * r["heads"]) - math.log2(max(1, batch_heads))))
        if dist < best_d:
            best, best_d = r, dist
    r = best
    assert r is not None        # rows is not empty
    flops = 4.0 * r["batch"] * r["heads"] * r["seq"] ** 2 * r["head_dim"] * (0.5 if causal else 1.0)
    t = r["bwd_s"] if backward else r["fwd_s"]
    if backward:
        flops *= 2.5
    return max(min(flops / t / peak, 1.0), 1e-3)


@cache
def _launch_s(gpu: GPU) -> float:
    p = load_gpu_profile(gpu.profile) if gpu.profile else None
    return float(p["launch_overhead_s"]) if p and "launch_overhead_s" in p else 5e-6


@cache
def _gap_s(gpu: GPU) -> float:
    p = load_gpu_profile(gpu.profile) if gpu.profile else None
    g = (p or {}).get("meta", {}).get("launch_in_graph_s") if p else None
    return float(g) if g is not None else 1e-6


@cache
def _kernel_curve(gpu: GPU, kernel: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(log2 bytes, bytes/s) of the profile's rows of `kernel`, by size; None without them."""
    p = load_gpu_profile(gpu.profile) if gpu.profile else None
    rows = sorted((r["bytes"], r["gbps"]) for r in (p or {}).get("memory_bound", []) if r["kernel"] == kernel)
    if not rows:
        return None
    return np.log2([b for b, _ in rows]), np.array([g * 1e9 for _, g in rows])


def _kernel_bytes_per_s(gpu: GPU, kernel: str, nbytes: float) -> float:
    """Bandwidth of `kernel` (hardware.profiles.MEMORY_BOUND_KERNELS) moving `nbytes`,
    interpolated in log2 size between the profile's rows (the end rows' beyond them). A
    profile without the kernel's rows prices a backward on its forward's rows and any kernel
    on `add`'s; without rows at all, the streaming bandwidth."""
    curve = (_kernel_curve(gpu, kernel) or _kernel_curve(gpu, kernel.removesuffix("_backward"))
             or _kernel_curve(gpu, "add"))
    if curve is None:
        return _stream_bytes_per_s(gpu)
    return float(np.interp(np.log2(max(nbytes, 1.0)), curve[0], curve[1]))


@cache
def _stream_bytes_per_s(gpu: GPU) -> float:
    """HBM bandwidth of a large streaming kernel. Measured from the out-of-place `add` rows
    (read two tensors, write one, as the graph's elementwise ops do): `copy` (Tensor.copy_)
    falls from ~3.0 to ~2.4 TB/s at 1 GiB and above on H100 (2.7 of 4.4 on H200) while `add`
    holds the HBM ceiling, so `copy` rows are used only without `add`."""
    p = load_gpu_profile(gpu.profile) if gpu.profile else None
    if p and p.get("memory_bound"):
        for kernel in ("add", "copy"):
            big = [r["gbps"] for r in p["memory_bound"] if r["kernel"] == kernel and r["bytes"] >= 2**28]
            if big:
                return float(np.median(big)) * 1e9
    return gpu.hbm_bytes_per_s * gpu.memory_efficiency
