"""`autopar run`'s CUDA allocator: expandable segments unless the user configured the allocator,
and the eager model's reserve follows what the ranks run with."""

import os

import pytest

from autopar.costmodel import eager
from autopar.runtime import launch


@pytest.mark.parametrize("user", [None, ("PYTORCH_CUDA_ALLOC_CONF", ""), ("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64"),
                                  ("PYTORCH_ALLOC_CONF", "expandable_segments:False")])
def test_cuda_alloc_conf_sets_expandable_segments_only_where_the_user_set_nothing(monkeypatch, user):
    for var in launch.ALLOC_CONF_VARS:
        monkeypatch.delenv(var, raising=False)
    if user:
        monkeypatch.setenv(*user)
    assert launch.environ_alloc_conf() == (user[1] if user else None)
    conf = launch.cuda_alloc_conf()
    if user is None:
        assert conf == eager.ALLOC_CONF and eager.expandable_segments(conf)
        # set for the ranks this process spawns (they read it as they start CUDA)
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == eager.ALLOC_CONF
    else:
        var, value = user
        assert conf == value and os.environ[var] == value       # the user's, untouched
        assert not eager.expandable_segments(conf)
        assert all(v not in os.environ for v in launch.ALLOC_CONF_VARS if v != var)


def test_eager_prediction_prices_the_reserve_of_the_ranks_allocator():
    """The same plan, as `autopar run` prices it: the reserve beyond the allocated is the
    expandable segments' fraction under ALLOC_CONF and the default segments' without it."""
    import autopar
    from autopar.hardware.presets import load_cluster
    from autopar.model import ModelSource

    cl = load_cluster("dgx-h200", 1, 1)
    # small enough that its loss segment (one fp32 logits tensor, 2 MiB) is under either fraction
    plan = autopar.plan(ModelSource("gpt:hidden=256,layers=2,heads=4,seq=128,vocab=1024"), cl, global_batch=4,
                        eager=True, workers=1)
    exp = launch._eager_prediction(plan, None, eager.ALLOC_CONF)
    default = launch._eager_prediction(plan, None, "")
    assert exp.peak_allocated_bytes == default.peak_allocated_bytes
    for p, f in ((exp, eager.RESERVE_FRACTION_EXPANDABLE), (default, eager.RESERVE_FRACTION)):
        assert p.peak_reserved_bytes == pytest.approx(p.peak_allocated_bytes * (1 + f))
