"""Exact composition of a chain of identical layers joined by one boundary tensor.

A transformer stage of k identical layers costs
    min over boundary layouts p0..pk of first[p0] + sum_i layer[p_{i-1}, p_i],
a shortest path through k copies of the same P x P layer matrix, found by a k-step
vectorised DP (k up to a few hundred, P up to a few dozen: microseconds per step).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["min_plus", "chain_min_plus"]


def _check_costs(a: np.ndarray, what: str) -> None:
    if np.isnan(a).any():
        raise ValueError(f"{what} contains NaN")
    if (a == -np.inf).any():
        raise ValueError(f"{what} contains -inf")


def min_plus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Min-plus product: out[i, k] = min_j a[i, j] + b[j, k].

    A 1-D `a` is a row vector (result 1-D over b's columns); a 1-D `b` is a column vector
    (result 1-D over a's rows). inf entries mean "impossible" and stay inf.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim not in (1, 2) or b.ndim not in (1, 2):
        raise ValueError(f"min_plus takes 1-D or 2-D arrays, got shapes {a.shape}, {b.shape}")
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    if a2.shape[1] != b2.shape[0]:
        raise ValueError(f"min_plus: inner dimensions differ: {a.shape} x {b.shape}")
    if a2.shape[1] == 0:
        raise ValueError("min_plus: inner dimension is empty")
    out = (a2[:, :, None] + b2[None, :, :]).min(axis=1)
    if a.ndim == 1:
        out = out[0]
    if b.ndim == 1:
        out = out[..., 0] if a.ndim == 2 else out[0]
    return out


def chain_min_plus(first: np.ndarray, layer: np.ndarray, k: int) -> tuple[float, list[int]]:
    """Least cost of k identical layers after an entry cost vector.

    first[p]: cost of reaching boundary layout p; layer[p, q]: one layer entered in p and
    left in q (inf = impossible). Returns (cost, [p0, ..., pk]) minimising
    first[p0] + sum_{i=1..k} layer[p_{i-1}, p_i]; the final layout is free. Ties go to the
    lowest layout index, latest boundary first. If no finite path exists: (inf, []).
    """
    first = np.asarray(first, dtype=np.float64)
    layer = np.asarray(layer, dtype=np.float64)
    if first.ndim != 1 or first.size == 0:
        raise ValueError(f"first must be a non-empty 1-D vector, got shape {first.shape}")
    p = first.size
    if layer.shape != (p, p):
        raise ValueError(f"layer must be {p} x {p} to match first, got shape {layer.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    _check_costs(first, "first")
    _check_costs(layer, "layer")
    k = int(k)
    cur = first.copy()
    back = np.empty((k, p), dtype=np.int64)  # back[i, q]: best p_i given p_{i+1} = q
    for i in range(k):
        total = cur[:, None] + layer
        back[i] = np.argmin(total, axis=0)
        cur = total[back[i], np.arange(p)]
    end = int(np.argmin(cur))
    best = float(cur[end])
    if not math.isfinite(best):
        return math.inf, []
    path = [end]
    for i in range(k - 1, -1, -1):
        path.append(int(back[i, path[-1]]))
    path.reverse()
    return best, path
