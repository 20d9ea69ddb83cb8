"""The eager step's kernels priced by kind (costmodel/eager.py: rotary_s, autocast_norm_s,
fp32_residual_add_s, bias_grad_sum_s, gpu_idle_s; bench/truth/README.md, sixteenth pass), in
closed form: the bytes each kernel moves, at its kind's rows of the H200 profile by size
(ComputeModel.memory_bound_s), where bench/update_profile.py put the eager kinds
bench/elementwise_sizes.py measured. Oracles for the counts: torch's own aten calls for rotary
(a dispatch count on the CPU), and the profile's kinds against the measurement file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from autopar.costmodel import eager
from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.evaluator import rotary_ops
from autopar.hardware.presets import load_cluster
from autopar.hardware.profiles import EAGER_KERNELS, load_gpu_profile_file
from autopar.model import ModelSource

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


@pytest.fixture(scope="module")
def cm() -> ComputeModel:
    return ComputeModel(load_cluster("dgx-h200", 1, 1).gpu)


def _k(cm: ComputeModel, nbytes: float, kind: str) -> float:
    return cm.memory_bound_s(nbytes, kernel=kind)


def test_the_h200_profile_holds_the_measured_eager_kinds():
    """bench/update_profile.py copied bench/elementwise_sizes.py's rows under their kinds."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    from elementwise_sizes import KIND_OF_CASE
    measured = json.loads((ROOT / "bench/results/elementwise_sizes_h200_2026-12-02.json").read_text())["rows"]
    prof = load_gpu_profile_file("h200")
    rows = {(r["kernel"], r["bytes"]): r["time_s"] for r in prof["memory_bound"] if r["kernel"] in EAGER_KERNELS}
    want = {(KIND_OF_CASE[r["case"]], r["bytes"]): r["time_s"] for r in measured if r["case"] in KIND_OF_CASE}
    assert rows == want and set(KIND_OF_CASE.values()) == set(EAGER_KERNELS)


def test_kinds_price_at_their_measured_rate(cm):
    """At a measured size the price is the row's time (plus the profile's gap): a widening cast
    runs at half the narrowing one's rate, rotary's broadcast multiply at a third of an add's."""
    prof = load_gpu_profile_file("h200")
    for r in prof["memory_bound"]:
        if r["kernel"] in EAGER_KERNELS and r["bytes"] == 256 * MIB:
            assert _k(cm, r["bytes"], r["kernel"]) == pytest.approx(cm.op_s(r["time_s"]), rel=1e-9)
    assert _k(cm, 1024 * MIB, "cast_widen") > 1.8 * _k(cm, 1024 * MIB, "cast_narrow")
    assert _k(cm, 1024 * MIB, "broadcast_mul") > 3 * _k(cm, 1024 * MIB, "add")


def test_autocast_norm_closed_form(cm):
    e = 16 * MIB
    # fp32 stream, a norm feeding q, k and v whose input comes from the embedding (no residual add)
    fwd, bwd = eager.autocast_norm_s(e, 3, cm, input_accumulate=True)
    assert fwd == pytest.approx(_k(cm, 8 * e, "layernorm") + 3 * _k(cm, 6 * e, "cast_narrow"))
    assert bwd == pytest.approx(3 * _k(cm, 6 * e, "cast_widen") + 2 * _k(cm, 12 * e, "accumulate")
                                + _k(cm, 12 * e, "layernorm_backward") + _k(cm, 12 * e, "accumulate"))
    # over bf16 weights: the input cast to fp32 and its gradient back, no fp32 residual sum
    fwd, bwd = eager.autocast_norm_s(e, 1, cm, fp32_stream=False, input_accumulate=True)
    assert fwd == pytest.approx(_k(cm, 8 * e, "layernorm") + _k(cm, 6 * e, "cast_narrow") + _k(cm, 6 * e, "cast_widen"))
    assert bwd == pytest.approx(_k(cm, 6 * e, "cast_widen") + _k(cm, 12 * e, "layernorm_backward")
                                + _k(cm, 6 * e, "cast_narrow"))
    assert eager.autocast_norm_s(0, 3, cm) == (0.0, 0.0)


def test_fp32_residual_add_closed_form(cm):
    e = 16 * MIB
    assert eager.fp32_residual_add_s(e, 6, True, cm) == pytest.approx(
        (_k(cm, 10 * e, "add"), _k(cm, 12 * e, "accumulate")))
    assert eager.fp32_residual_add_s(e, 8, False, cm) == pytest.approx((_k(cm, 12 * e, "add"), 0.0))


def test_bias_gradient_sum(cm):
    b = 32 * MIB
    assert eager.bias_grad_sum_s(b, cm) == pytest.approx(_k(cm, b, "token_sum"))
    assert eager.bias_grad_sum_s(b, cm, fused=True) == pytest.approx(_k(cm, b, "add"))
    assert eager.bias_grad_sum_s(0, cm) == 0.0


def test_rotary_kernels_are_torchs():
    """Oracle: the aten calls of the zoo's apply_rope forward and backward under autocast, on the
    CPU (the same dispatch as on the GPU for these ops), against rotary_s's kernel list: forward
    neg, cat, two table multiplies, their add, the cast of the sum to bf16; backward the cast
    back, two multiplies and their casts, neg, two slices' gradients (a zero fill and a copy)
    and the paths' sum."""
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    from graphs.zoo.llama import apply_rope

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: Counter[tuple[str, str]] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func._overloadpacket.__name__
            if name not in ("slice", "detach"):              # views: no kernel
                self.calls[(name, str(out.dtype).removeprefix("torch."))] += 1
            return out

    x = torch.randn(2, 4, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = torch.randn(16, 8), torch.randn(16, 8)            # fp32 tables, as under autocast
    with Count() as fwd:
        y = apply_rope(x, cos, sin).to(torch.bfloat16)           # SDPA's cast of the fp32 sum
    grad = torch.randn_like(y)
    with Count() as bwd:
        y.backward(grad)
    assert dict(fwd.calls) == {("neg", "bfloat16"): 1, ("cat", "bfloat16"): 1, ("mul", "float32"): 2,
                               ("add", "float32"): 1, ("_to_copy", "bfloat16"): 1}
    # slice_backward: a zero fill and a copy of the half into it, each
    assert dict(bwd.calls) == {("_to_copy", "float32"): 1, ("mul", "float32"): 2, ("_to_copy", "bfloat16"): 2,
                               ("neg", "bfloat16"): 1, ("slice_backward", "bfloat16"): 2, ("add", "bfloat16"): 2}


def test_rotary_ops_are_found_per_tensor():
    graph = ModelSource("llama:hidden=256,layers=2,heads=4,kv_heads=2,seq=128,vocab=1024,ffn=512").graph(2)
    found = [rotary_ops(graph, n) for li in range(len(graph.layers)) for n in graph.layers[li].nodes
             if graph.node(n).op == "cat"]
    assert found == [["neg", "cat", "mul", "mul_1", "add"], ["neg_1", "cat_1", "mul_2", "mul_3", "add_1"],
                     ["neg_2", "cat_2", "mul_5", "mul_6", "add_4"], ["neg_3", "cat_3", "mul_7", "mul_8", "add_5"]]
    gpt = ModelSource("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1024").graph(2)
    assert not any(gpt.node(n).op == "cat" for layer in gpt.layers for n in layer.nodes)


def test_rotary_closed_form(cm):
    e = 16 * MIB
    fwd, bwd = eager.rotary_s(e, cm)
    assert fwd == pytest.approx(_k(cm, 2 * e, "copy") + _k(cm, 4 * e, "copy") + 2 * _k(cm, 6 * e, "broadcast_mul")
                                + _k(cm, 12 * e, "add") + _k(cm, 6 * e, "cast_narrow"))
    assert bwd == pytest.approx(_k(cm, 6 * e, "cast_widen") + 2 * _k(cm, 8 * e, "broadcast_mul")
                                + 2 * _k(cm, 6 * e, "cast_narrow") + 5 * _k(cm, 2 * e, "copy") + 2 * _k(cm, 6 * e, "add"))


def test_gpu_idle_per_block():
    f, b = eager.gpu_idle_s(10)
    assert f + b == pytest.approx(10 * eager.GPU_IDLE_S_PER_BLOCK)
    assert eager.gpu_idle_s(0) == (0.0, 0.0)


def _update_profile_module():
    import importlib.util
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("update_profile", ROOT / "bench/update_profile.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_update_profile_takes_rows_of_the_profiles_gpu_only(tmp_path):
    up = _update_profile_module()
    shipped = ROOT / "autopar/profiles/h200.json"
    prof = tmp_path / "h200.json"
    prof.write_text(shipped.read_text())
    sizes = ROOT / "bench/results/elementwise_sizes_h200_2026-12-02.json"
    # it rebuilds the shipped profile from the two measurement files, to the row
    assert up.main([str(prof), "--attention", str(ROOT / "bench/results/attention_default_h200_2026-12-01.json"),
                    "--eager-kinds", str(sizes), "--force"]) == 0
    assert json.loads(prof.read_text()) == json.loads(shipped.read_text())
    # nothing written without --force
    before = prof.read_text()
    assert up.main([str(prof), "--eager-kinds", str(sizes)]) == 2
    assert prof.read_text() == before
    # a file of another GPU is refused, with what to do
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(sizes.read_text()), "gpu": "NVIDIA H100 80GB HBM3"}))
    with pytest.raises(SystemExit, match="measured on 'NVIDIA H100 80GB HBM3'.*give a file of the profile's GPU"):
        up.main([str(prof), "--eager-kinds", str(other), "--force"])
    assert prof.read_text() == before
