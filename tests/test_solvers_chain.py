"""Chain composition of identical layers against brute force."""

import itertools
import math

import numpy as np
import pytest

from solvers.chain import chain_min_plus, min_plus


def _brute(first, layer, k):
    best, best_path = math.inf, []
    p = first.size
    for path in itertools.product(range(p), repeat=k + 1):
        cost = first[path[0]] + sum(layer[a, b] for a, b in zip(path, path[1:]))
        if cost < best:
            best, best_path = cost, list(path)
    return best, best_path


def _path_cost(first, layer, path):
    return first[path[0]] + sum(layer[a, b] for a, b in zip(path, path[1:]))


@pytest.mark.parametrize("seed", range(4))
def test_chain_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        p = int(rng.integers(1, 5))
        k = int(rng.integers(0, 6))
        first = rng.random(p)
        layer = rng.random((p, p))
        first[rng.random(p) < 0.2] = np.inf
        layer[rng.random((p, p)) < 0.3] = np.inf
        if rng.random() < 0.3:  # ties
            layer = np.round(layer * 3) / 3
        cost, path = chain_min_plus(first, layer, k)
        want, _ = _brute(first, layer, k)
        if math.isinf(want):
            assert cost == math.inf and path == []
            continue
        assert math.isclose(cost, want, rel_tol=1e-12, abs_tol=1e-12)
        assert len(path) == k + 1
        assert math.isclose(_path_cost(first, layer, path), cost, rel_tol=1e-12, abs_tol=1e-12)


def test_long_chain_is_fast_and_consistent():
    rng = np.random.default_rng(0)
    first, layer = rng.random(16), rng.random((16, 16))
    cost, path = chain_min_plus(first, layer, 100)
    assert len(path) == 101
    assert math.isclose(_path_cost(first, layer, path), cost, rel_tol=1e-12)
    # same value by repeated min-plus products
    vec = first.copy()
    for _ in range(100):
        vec = min_plus(vec, layer)
    assert math.isclose(float(vec.min()), cost, rel_tol=1e-12)


def test_min_plus_shapes_and_values():
    rng = np.random.default_rng(1)
    a, b = rng.random((3, 4)), rng.random((4, 5))
    a[0, 1] = np.inf
    out = min_plus(a, b)
    want = np.array([[min(a[i, j] + b[j, q] for j in range(4)) for q in range(5)]
                     for i in range(3)])
    assert out.shape == (3, 5) and np.allclose(out, want)
    assert np.allclose(min_plus(a[1], b), want[1])
    assert np.allclose(min_plus(a, b[:, 2]), want[:, 2])
    assert math.isclose(float(min_plus(a[1], b[:, 2])), want[1, 2])
    with pytest.raises(ValueError, match="inner"):
        min_plus(a, a)


def test_chain_errors():
    with pytest.raises(ValueError, match="layer must be"):
        chain_min_plus(np.zeros(3), np.zeros((3, 2)), 2)
    with pytest.raises(ValueError, match="k must be"):
        chain_min_plus(np.zeros(2), np.zeros((2, 2)), -1)
    with pytest.raises(ValueError, match="NaN"):
        chain_min_plus(np.array([np.nan]), np.zeros((1, 1)), 1)
