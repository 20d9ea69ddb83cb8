"""Operator clustering against brute force over every set of cut points."""

import itertools

import numpy as np
import pytest

from solvers.clustering import cluster_ops


def _objective(flops, cuts, starts):
    p = np.concatenate([[0.0], np.cumsum(flops)])
    bounds = list(starts) + [len(flops)]
    biggest = max(p[bounds[i + 1]] - p[bounds[i]] for i in range(len(starts)))
    worst_cut = max([cuts[s] for s in starts[1:]], default=-np.inf)
    return worst_cut, biggest


def _brute(flops, cuts, k, imbalance):
    n = len(flops)
    p = np.concatenate([[0.0], np.cumsum(flops)])
    splits = [[0, *c] for c in itertools.combinations(range(1, n), k - 1)]
    objs = [_objective(flops, cuts, s) for s in splits]
    cap = (1 + imbalance) * p[-1] / k
    if not any(g <= cap for _, g in objs):
        cap = min(g for _, g in objs)  # the documented relaxation
    return min((c, g) for c, g in objs if g <= cap)


@pytest.mark.parametrize("seed", range(5))
def test_clustering_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        n = int(rng.integers(1, 11))
        k = int(rng.integers(1, n + 1))
        if rng.random() < 0.5:
            flops = rng.integers(0, 10, n).astype(float)
        else:
            flops = rng.random(n) * rng.choice([1.0, 1e12])
        if rng.random() < 0.2:
            flops[rng.integers(0, n)] *= 10  # one heavy op: the bound may need relaxing
        cuts = rng.integers(0, 6, n).astype(float) if rng.random() < 0.6 else rng.random(n) * 1e9
        imbalance = float(rng.choice([0.0, 0.1, 0.5, 2.0]))
        starts = cluster_ops(flops, cuts, k, imbalance)
        assert starts[0] == 0 and len(starts) == k and starts[-1] < n
        assert all(a < b for a, b in zip(starts, starts[1:]))
        got = _objective(flops, cuts, starts)
        want = _brute(flops, cuts, k, imbalance)
        assert got[0] == want[0]
        assert got[1] == pytest.approx(want[1], rel=1e-12, abs=0)


def test_blocks_are_cut_at_their_thin_boundaries():
    # 8 identical blocks of 5 ops; only block boundaries carry a small tensor
    flops = np.tile([1.0, 4.0, 4.0, 1.0, 2.0], 8)
    cuts = np.tile([10.0, 500.0, 800.0, 500.0, 300.0], 8)
    assert cluster_ops(flops, cuts, 4) == [0, 10, 20, 30]
    assert cluster_ops(flops, cuts, 8) == [0, 5, 10, 15, 20, 25, 30, 35]


def test_heavy_op_relaxes_the_bound():
    flops = np.array([1.0, 1.0, 10.0, 1.0])
    starts = cluster_ops(flops, np.zeros(4), 2, imbalance=0.0)
    assert _objective(flops, np.zeros(4), starts)[1] == 11.0  # best achievable split


def test_large_input_is_fast():
    rng = np.random.default_rng(0)
    flops = np.tile(rng.random(30) * 1e9, 100)
    cuts = np.tile(np.r_[1e6, rng.random(29) * 1e8 + 2e6], 100)
    assert cluster_ops(flops, cuts, 100) == list(range(0, 3000, 30))


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="same shape"):
        cluster_ops(np.ones(3), np.ones(2), 2)
    with pytest.raises(ValueError, match="n_layers"):
        cluster_ops(np.ones(3), np.ones(3), 4)
    with pytest.raises(ValueError, match=">= 0"):
        cluster_ops(np.array([1.0, -1.0]), np.ones(2), 1)
