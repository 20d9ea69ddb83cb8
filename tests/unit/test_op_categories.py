"""bench/truth/op_categories.py: a stored profile's ops are partitioned into the categories, and
what the table leaves out is the rest of its self CUDA total (nothing counted twice or lost)."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "truth"))

import op_categories  # noqa: E402

PROFILES = sorted((ROOT / "bench" / "results" / "profiles_h200_1gpu_2026-12-01").glob("*_autopar.txt"))


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_categories_partition_the_self_cuda_total(path):
    text = path.read_text()
    total_ms = op_categories._ms(re.search(r"Self CUDA time total: (\S+)", text).group(1))
    by_cat = op_categories.measured(path, steps=2)
    assert set(by_cat) <= {*op_categories.CATEGORIES, "other"}
    # the table prints its total to 1 ms above a second, to 1 us below
    assert sum(by_cat.values()) == pytest.approx(total_ms / 2, abs=1e-6 if total_ms < 1000 else 0.5)
    # the GEMMs are the largest share of every one of these device-bound steps
    assert by_cat["gemm"] == max(by_cat.values())


def test_categories_by_name():
    assert op_categories._category("aten::mm") == "gemm"
    assert op_categories._category("aten::_cudnn_attention_backward") == "attention"
    assert op_categories._category("aten::copy_") == "casts"
    assert op_categories._category("aten::native_layer_norm_backward") == "norm"
    assert op_categories._category("aten::_fused_adam_") == "optimizer"
    assert op_categories._category("aten::mul") == "elementwise"
    assert op_categories._ms("1.5s") == 1500.0 and op_categories._ms("250us") == 0.25 and op_categories._ms("3ms") == 3.0
