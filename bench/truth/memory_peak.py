"""Where a training step's peak memory goes: the tensors alive at the moment of the peak,
grouped by where they were allocated (issue 13: find the missing memory term by measurement).

    from memory_peak import record_peak
    text = record_peak(lambda: step(batch), device)      # one step under the CUDA allocator's history

The CUDA caching allocator records every allocation and free with its Python stack
(`torch.cuda.memory._record_memory_history`). Replaying those events gives the allocated
bytes over time; the peak is the largest, and the blocks alive at that event are what a cost
model has to hold. Memory allocated before the step (weights, optimizer state, anything the
previous step left) is the baseline, reported as one figure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

# Frames from these files say which part of the recipe allocated a block; the innermost of them
# names the group. torch's own frames are kept as the detail (which engine, which op).
OWN_FILES = ("/autopar/", "/graphs/", "/bench/")


def _frame_text(f: dict) -> str:
    path = f.get("filename", "?")
    tail = "/".join(path.split("/")[-2:])
    return f"{tail}:{f.get('line', 0)} {f.get('name', '?')}"


def group_key(frames: list[dict]) -> str:
    """The block's origin: the innermost frame of our own code, then the innermost torch frame
    (frames run innermost first, as the allocator records them): "ours -> torch's"."""
    own = next((f for f in frames if any(s in f.get("filename", "") for s in OWN_FILES)), None)
    torch_frame = next((f for f in frames if "/torch/" in f.get("filename", "")
                        and "/torch/cuda/memory" not in f.get("filename", "")), None)
    parts = [_frame_text(x) for x in (own, torch_frame) if x is not None]
    return " -> ".join(parts) if parts else "(no Python frame)"


def live_at_peak(events: list[dict]) -> tuple[int, int, list[dict]]:
    """(peak bytes above the start, index of the peak event, the alloc events alive then).
    A block counts as allocated from its `alloc` to its `free_completed` (the allocator's own
    accounting: a block freed on one stream but in use on another stays allocated until the
    recorded events complete)."""
    free_action = "free_completed" if any(e["action"] == "free_completed" for e in events) else "free_requested"
    cur = peak = 0
    peak_i = -1
    sizes: dict[int, int] = {}
    for i, ev in enumerate(events):
        if ev["action"] == "alloc":
            sizes[ev["addr"]] = ev["size"]
            cur += ev["size"]
            if cur > peak:
                peak, peak_i = cur, i
        elif ev["action"] == free_action and ev["addr"] in sizes:
            cur -= sizes.pop(ev["addr"])
    live: dict[int, dict] = {}
    for ev in events[:peak_i + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == free_action:
            live.pop(ev["addr"], None)
    return peak, peak_i, list(live.values())


def breakdown(events: list[dict], baseline_bytes: int, top: int = 25) -> str:
    peak, peak_i, live = live_at_peak(events)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ev in live:
        g = groups[group_key(ev.get("frames", []))]
        g[0] += ev["size"]
        g[1] += 1
    lines = [f"baseline (allocated before the step) {baseline_bytes / 2**30:.3f} GiB; step peak above it "
             f"{peak / 2**30:.3f} GiB at event {peak_i} of {len(events)}; peak {(baseline_bytes + peak) / 2**30:.3f} GiB",
             f"{'GiB':>8} {'blocks':>7}  allocated at (our frame -> torch frame)"]
    for key, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / 2**30:8.3f} {count:7d}  {key}")
    rest = sum(s for s, _ in sorted(groups.values(), key=lambda v: -v[0])[top:])
    if rest:
        lines.append(f"{rest / 2**30:8.3f} {'':7}  (other groups)")
    return "\n".join(lines)


def record_peak(run: Callable[[], Any], device: Any, top: int = 25) -> str:
    """Run `run` once with the allocator's history on, and describe its peak."""
    import torch
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        run()
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    events = snap["device_traces"][index]
    text = breakdown(events, baseline, top)
    return (f"max_memory_allocated {torch.cuda.max_memory_allocated(device) / 2**30:.3f} GiB, "
            f"max_memory_reserved {torch.cuda.max_memory_reserved(device) / 2**30:.3f} GiB\n" + text)
