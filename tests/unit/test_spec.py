"""The layout type (autopar/sharding/spec.py): its encodings convert into each other, and
resharding issues the collectives its docstring names, priced by the ring closed forms."""

from __future__ import annotations

import itertools

import pytest

from autopar.costmodel.collectives import ALL_GATHER, ALL_TO_ALL
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.presets import load_cluster
from autopar.sharding.rules import strategy_name
from autopar.sharding.spec import (
    S0,
    S01,
    S1,
    R,
    axes_mask,
    axes_of,
    axes_str,
    is_valid,
    mesh_dims,
    parse_spec,
    parts_of,
    reshard_backward_s,
    reshard_collectives,
    reshard_s,
    shard_factor,
    spec_from_mesh_dims,
    spec_str,
    split_per_part,
    used_mask,
)

P3 = load_cluster("p3.16xlarge", 1)
MESH = Mesh(P3, Submesh(1, 8), (2, 4))


def test_text_round_trip_over_every_3d_spec():
    for spec in itertools.product((R, S0, S1, S01), repeat=3):
        assert parse_spec(spec_str(spec)) == spec
    assert spec_str((S0, R, S1)) == "S0RS1" and spec_str(()) == "scalar" and parse_spec("scalar") == ()
    with pytest.raises(ValueError, match="bad sharding spec"):
        parse_spec("S2R")


def test_strategy_suffix_is_the_mask():
    assert [axes_str(m) for m in (1, 2, 3)] == ["0", "1", "01"]
    assert all(axes_mask(axes_str(m)) == m for m in (1, 2, 3))
    assert strategy_name({"b": S0, "n": S1}) == "b@0,n@1" and strategy_name({"h": S01}) == "h@01"
    assert strategy_name({}) == "R"


def test_mesh_dims_are_dtensor_placements():
    assert mesh_dims((S0, R, S1)) == (0, 2)          # Shard(0) on mesh dim 0, Shard(2) on mesh dim 1
    assert mesh_dims((R, S01)) == (1, 1)
    assert mesh_dims((R, R)) == (None, None)
    for spec in itertools.product((R, S0, S1), repeat=2):
        if spec.count(S0) <= 1 and spec.count(S1) <= 1:
            assert spec_from_mesh_dims(mesh_dims(spec), 2) == spec
    with pytest.raises(ValueError, match="splits two tensor dims over mesh axis 0"):
        mesh_dims((S0, S0))


def _ring(nbytes, n, factor):
    link = P3.intra_link
    return (n - 1) * link.latency_s + factor * (n - 1) / n * nbytes / link.bandwidth_bytes_per_s


def test_reshard_gather_and_all_to_all_closed_forms():
    shape, eb = (8, 16, 32), 2
    full = 8 * 16 * 32 * eb
    gather = reshard_collectives(shape, eb, (S1, R, R), (R, R, R), MESH)
    assert [(c.kind, c.mask, c.nbytes) for c in gather] == [(ALL_GATHER, 2, full)]
    assert reshard_s(shape, eb, (S1, R, R), (R, R, R), MESH) == pytest.approx(_ring(full, 4, 1), rel=1e-12)
    # moving axis 1's split from dim 0 to dim 2 with axis 0 still splitting dim 1
    move = reshard_collectives(shape, eb, (S1, S0, R), (R, S0, S1), MESH)
    assert [(c.kind, c.mask, c.nbytes) for c in move] == [(ALL_TO_ALL, 2, full / 2)]
    assert move[0].time_s == pytest.approx(_ring(full / 2, 4, 1 / 4), rel=1e-12)
    # S01 -> S1 on one dim: axis 0's split is gathered, axis 1's kept
    both = reshard_collectives(shape, eb, (S01, R, R), (S1, R, R), MESH)
    assert [(c.kind, c.mask, c.nbytes) for c in both] == [(ALL_GATHER, 1, full / 4)]
    assert sum(c.time_s for c in both) == reshard_s(shape, eb, (S01, R, R), (S1, R, R), MESH)
    assert reshard_collectives(shape, eb, (R, R, R), (S0, R, S1), MESH) == ()          # slicing is free


# ---- per-part splits (a fused projection's output) -------------------------------------------

def test_per_part_split_round_trips_and_validates_each_part():
    mask = split_per_part(S1, (64, 16, 16))
    assert parts_of(mask) == (64, 16, 16) and axes_of(mask) == S1 and parts_of(S1) == ()
    spec = (R, S0, mask)
    assert spec_str(spec) == "RS0S1[64,16,16]" and parse_spec("RS0S1[64,16,16]") == spec
    assert shard_factor(spec, MESH) == 8 and used_mask(spec) == 3
    assert is_valid(spec, (8, 16, 96), MESH)
    assert not is_valid(spec, (8, 16, 100), MESH)                       # parts must add up to the dim
    assert not is_valid((R, R, split_per_part(S1, (64, 18, 14))), (8, 16, 96), MESH)   # 18 % 4
    with pytest.raises(ValueError, match="per-part split needs"):
        split_per_part(S1, (96,))


def test_per_part_split_converted_to_any_other_layout_gathers_first():
    shape, eb = (8, 16, 96), 2
    full = 8 * 16 * 96 * eb
    per_part = (R, R, split_per_part(S1, (64, 16, 16)))
    to_plain = reshard_collectives(shape, eb, per_part, (R, R, S1), MESH)     # gather, then a free slice
    assert [(c.kind, c.mask, c.nbytes) for c in to_plain] == [(ALL_GATHER, 2, full)]
    assert reshard_s(shape, eb, per_part, (R, R, R), MESH) == pytest.approx(_ring(full, 4, 1), rel=1e-12)
    assert reshard_s(shape, eb, (R, R, R), per_part, MESH) == 0.0            # slicing each part is free
    assert reshard_s(shape, eb, per_part, per_part, MESH) == 0.0


def test_backward_of_a_reshard_sends_the_gradient_back_and_redoes_the_conversion():
    """A free slice's backward all-gathers the gradient; a gather's backward slices the gradient
    (free) and gathers the stashed input again; an all-to-all's moves both back and forth;
    token ids carry no gradient, only the conversion is redone."""
    shape, eb = (8, 16, 32), 2
    full = 8 * 16 * 32 * eb
    gather = _ring(full, 4, 1)
    assert reshard_backward_s(shape, eb, (R, R, R), (S1, R, R), MESH) == pytest.approx(gather, rel=1e-12)
    assert reshard_backward_s(shape, eb, (S1, R, R), (R, R, R), MESH) == pytest.approx(gather, rel=1e-12)
    move = reshard_s(shape, eb, (S1, S0, R), (R, S0, S1), MESH)
    assert reshard_backward_s(shape, eb, (S1, S0, R), (R, S0, S1), MESH) == pytest.approx(2 * move, rel=1e-12)
    assert reshard_backward_s(shape, eb, (R, R, R), (S1, R, R), MESH, grad=False) == 0.0
    assert reshard_backward_s(shape, eb, (S1, S0, R), (R, S0, S1), MESH, grad=False) == move


def test_sequence_split_layouts_round_trip():
    """Context parallelism needs no token of its own: the sequence dim is split like any other
    and maps to DTensor Shard placements."""
    from autopar.sharding.spec import mesh_dims, parse_spec, spec_from_mesh_dims, spec_str
    for text, dims in (("RS0S1", (1, 2)), ("RS1S0R", (2, 1)), ("RS01R", (1, 1)), ("S0S1R", (0, 1))):
        spec = parse_spec(text)
        assert spec_str(spec) == text
        assert mesh_dims(spec) == dims
        assert spec_from_mesh_dims(dims, len(spec)) == spec
