"""Operator clustering into layers (Alpa section 5.2), exact.

Split ops 0..n-1 into K contiguous non-empty groups so that
  1. every group's FLOPs <= (1 + imbalance) * total / K,
  2. the largest cut_bytes over the K-1 cut points is least (cut_bytes[i] = bytes crossing
     a cut just before op i; cut_bytes[0] is unused),
  3. ties: the largest group FLOPs is least.
If no split meets bound 1 (an op heavier than the bound, say), the bound is relaxed to the
least achievable largest group FLOPs over all splits, so the result is always the most
balanced split there is.

A group's FLOPs is P[end] - P[start] over the prefix sums P (float64), everywhere.

Both searches rest on one fact: with a set A of allowed cut points and a cap b on group
FLOPs (FLOPs >= 0), the achievable group counts are exactly [min_count, |A| + 1] when every
gap between consecutive allowed cuts fits in b (splitting a group at an unused allowed cut
never breaks the cap), and min_count comes from a greedy farthest-jump. So "is there a split
into K groups" is an O(K log n) test, monotone in both the cut threshold and the cap:
bisect the distinct cut_bytes values for (2), then bisect the cap for (3).
"""

from __future__ import annotations

import numpy as np

__all__ = ["cluster_ops"]


class _Splitter:
    def __init__(self, flops: np.ndarray, n_groups: int):
        self.n = flops.size
        self.k = n_groups
        self.prefix = np.concatenate([[0.0], np.cumsum(flops)])

    def greedy(self, cap: float, allowed: np.ndarray) -> list[int] | None:
        """Fewest-groups split using only `allowed` cut points (sorted, in 1..n-1), every
        group's FLOPs <= cap; None if some gap between allowed cuts exceeds cap or more than
        K groups are needed. Returns group starts."""
        ends = np.append(allowed, self.n)
        p_ends = self.prefix[ends]
        p = self.prefix
        starts = [0]
        pos = 0
        while True:
            q = int(np.searchsorted(p_ends, p[pos] + cap, side="right")) - 1
            # the searchsorted target rounds differently from p[end] - p[pos]: settle it
            while q + 1 < ends.size and p[ends[q + 1]] - p[pos] <= cap:
                q += 1
            while q >= 0 and p[ends[q]] - p[pos] > cap:
                q -= 1
            if q < 0 or ends[q] <= pos:
                return None
            pos = int(ends[q])
            if pos == self.n:
                return starts
            if len(starts) == self.k:
                return None
            starts.append(pos)

    def feasible(self, cap: float, allowed: np.ndarray) -> list[int] | None:
        """Fewest-groups split within cap if a K-group split exists (at most K groups here;
        `split` adds the rest), else None."""
        if allowed.size + 1 < self.k:
            return None
        return self.greedy(cap, allowed)

    def split(self, cap: float, allowed: np.ndarray) -> list[int]:
        """A split into exactly K groups within cap (which must be feasible)."""
        return self._refine(self._within(cap, allowed), allowed)

    def _within(self, cap: float, allowed: np.ndarray) -> list[int]:
        """`feasible` where the caller knows that cap is feasible."""
        starts = self.feasible(cap, allowed)
        if starts is None:
            raise ValueError(f"no split into {self.k} groups within {cap} FLOPs")
        return starts

    def _refine(self, starts: list[int], allowed: np.ndarray) -> list[int]:
        """Add unused allowed cuts until there are K groups: always split the heaviest group
        that can be split, at the allowed cut nearest its FLOPs midpoint (keeps balance)."""
        p = self.prefix
        starts = list(starts)
        while len(starts) < self.k:
            bounds = starts + [self.n]
            best = None
            for g in range(len(starts)):
                a, b = bounds[g], bounds[g + 1]
                lo_i = int(np.searchsorted(allowed, a, side="right"))
                hi_i = int(np.searchsorted(allowed, b, side="left"))
                if lo_i >= hi_i:
                    continue
                weight = p[b] - p[a]
                if best is None or weight > best[0]:
                    inner = allowed[lo_i:hi_i]
                    mid = p[a] + weight / 2
                    cut = int(inner[np.argmin(np.abs(p[inner] - mid))])
                    best = (weight, cut)
            assert best is not None, "fewer than K groups means an unused cut"
            starts.append(best[1])
            starts.sort()
        return starts

    def max_group(self, starts: list[int]) -> float:
        bounds = np.append(starts, self.n)
        return float(np.max(self.prefix[bounds[1:]] - self.prefix[bounds[:-1]]))

    def least_cap(self, allowed: np.ndarray, cap: float) -> float:
        """Least largest-group FLOPs over K-group splits using allowed cuts, given that
        `cap` is feasible. Bisection on the value where every feasible probe snaps `hi`
        down to the largest group of a real split (a fewest-groups one: splitting it further
        to K groups only lightens groups), so `hi` is always achievable."""
        hi = self.max_group(self._within(cap, allowed))
        lo = self.prefix[-1] / self.k  # the average: no split does better
        at_average = self.feasible(lo, allowed)
        if at_average is not None:
            return self.max_group(at_average)
        for _ in range(200):
            if hi - lo <= 1e-12 * abs(hi):
                break
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            starts = self.feasible(mid, allowed)
            if starts is None:
                lo = mid
            else:
                hi = self.max_group(starts)
        return hi


def cluster_ops(flops: np.ndarray, cut_bytes: np.ndarray, n_layers: int,
                imbalance: float = 0.5) -> list[int]:
    """Start index of each of n_layers contiguous groups of ops (first is 0); see module
    docstring for the objective and how the FLOPs bound relaxes when it cannot be met."""
    flops = np.asarray(flops, dtype=np.float64)
    cut_bytes = np.asarray(cut_bytes, dtype=np.float64)
    if flops.ndim != 1 or flops.size == 0:
        raise ValueError(f"flops must be a non-empty 1-D array, got shape {flops.shape}")
    if cut_bytes.shape != flops.shape:
        raise ValueError(f"cut_bytes must have the same shape as flops {flops.shape} "
                         f"(cut_bytes[i] = bytes crossing a cut before op i), "
                         f"got {cut_bytes.shape}")
    if not np.isfinite(flops).all() or (flops < 0).any():
        raise ValueError("flops must be finite and >= 0")
    if np.isnan(cut_bytes[1:]).any():
        raise ValueError("cut_bytes contains NaN")
    if isinstance(n_layers, bool) or int(n_layers) != n_layers or not 1 <= n_layers <= flops.size:
        raise ValueError(f"n_layers must be an int in [1, {flops.size}] (the number of ops), "
                         f"got {n_layers!r}")
    if not (imbalance >= 0):
        raise ValueError(f"imbalance must be >= 0, got {imbalance!r}")
    n, k = flops.size, int(n_layers)
    if k == 1:
        return [0]
    sp = _Splitter(flops, k)
    every_cut = np.arange(1, n)
    cap = (1.0 + imbalance) * float(sp.prefix[-1]) / k
    if sp.feasible(cap, every_cut) is None:
        # The bound cannot be met: use the most balanced split there is instead.
        cap = sp.least_cap(every_cut, float(sp.prefix[-1]))

    # (2) least threshold on cut bytes that still admits a split within cap
    values = np.unique(cut_bytes[1:])
    lo, hi = 0, values.size - 1  # values[hi] admits one (every cut allowed)
    while lo < hi:
        mid = (lo + hi) // 2
        if sp.feasible(cap, every_cut[cut_bytes[1:] <= values[mid]]) is None:
            lo = mid + 1
        else:
            hi = mid
    allowed = every_cut[cut_bytes[1:] <= values[lo]]

    # (3) among those, the least largest group
    best_cap = sp.least_cap(allowed, cap)
    starts = sp.split(best_cap, allowed)
    return [int(s) for s in starts]
