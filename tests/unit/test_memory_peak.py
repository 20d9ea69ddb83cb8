"""bench/truth/memory_peak.py: the peak and the blocks alive at it, against brute force over
every prefix of a random allocator trace."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "truth"))

from memory_peak import breakdown, group_key, live_at_peak  # noqa: E402


def _trace(seed: int, n: int = 300) -> list[dict]:
    rng = random.Random(seed)
    events, live, addr = [], [], 0
    for _ in range(n):
        if live and rng.random() < 0.45:
            a = live.pop(rng.randrange(len(live)))
            events.append({"action": "free_requested", "addr": a, "size": 0})
            events.append({"action": "free_completed", "addr": a, "size": 0})
        else:
            addr += 512
            size = rng.choice([512, 1024, 4096, 1 << 20])
            name = rng.choice(["forward", "backward", "step"])
            events.append({"action": "alloc", "addr": addr, "size": size,
                           "frames": [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
                                      {"filename": "/r/autopar/runtime/engines.py", "line": 7, "name": name}]})
            live.append(addr)
    return events


def _brute(events: list[dict]) -> tuple[int, set[int]]:
    best, best_live = 0, set()
    for k in range(len(events) + 1):
        sizes: dict[int, int] = {}
        for ev in events[:k]:
            if ev["action"] == "alloc":
                sizes[ev["addr"]] = ev["size"]
            elif ev["action"] == "free_completed":
                sizes.pop(ev["addr"], None)
        total = sum(sizes.values())
        if total > best:
            best, best_live = total, set(sizes)
    return best, best_live


def test_peak_and_live_set_match_brute_force():
    for seed in range(5):
        events = _trace(seed)
        peak, _, live = live_at_peak(events)
        want_peak, want_live = _brute(events)
        assert peak == want_peak
        assert {e["addr"] for e in live} == want_live
        assert sum(e["size"] for e in live) == peak


def test_groups_name_our_frame_and_the_torch_frame():
    key = group_key(_trace(0, 1)[0]["frames"])
    assert key.startswith("runtime/engines.py:7 ") and key.endswith("nn/functional.py:1 linear")
    text = breakdown(_trace(1), baseline_bytes=2**30)
    assert "baseline (allocated before the step) 1.000 GiB" in text
    assert "runtime/engines.py" in text
