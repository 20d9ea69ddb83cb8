"""spec_str keeps the text of a tuple layout (spec._spec_text_kept); the reference is the text
computed afresh (spec._spec_text, the previous spec_str): equal on random layouts of plain and
per-part masks, asked twice (the kept text the second time), for tuples, lists and numpy ints,
and parse_spec reads each back."""

from __future__ import annotations

import numpy as np

from autopar.sharding import spec as S


def test_kept_text_equals_the_text_computed_afresh():
    rng = np.random.default_rng(10)
    seen = 0
    for _ in range(3000):
        n = int(rng.integers(0, 5))
        masks = []
        for _ in range(n):
            axes = int(rng.integers(0, 4))
            if axes and rng.random() < 0.3:
                masks.append(S.split_per_part(axes, tuple(int(x) for x in rng.integers(1, 5000, int(rng.integers(2, 4))))))
            else:
                masks.append(axes)
        spec = tuple(masks)
        want = S._spec_text(spec)
        for form in (spec, list(spec), tuple(np.int64(m) if m < 2**62 else m for m in spec)):
            assert S.spec_str(form) == want
            assert S.spec_str(form) == want
        assert S.parse_spec(want) == spec
        seen += bool(n)
    assert seen > 2000 and S._spec_text_kept.cache_info().hits > 3000
