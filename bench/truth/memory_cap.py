"""Does a step fit in a cap a little above its peak allocated memory? (issue 13, memory safety)

The corpus's peak reserved memory exceeds its peak allocated by up to 15% (more with
recomputation), which the cost model covers with an envelope (costmodel/eager.py
RESERVE_FRACTION). But a peak reserved measured on a GPU with room to spare overstates what a
step needs: under a cap the caching allocator frees its cached blocks and retries before it
gives up. This runs corpus rows (bench/truth/configs.py ids) again with the allocator capped
(torch.cuda.set_per_process_memory_fraction) at (1 + f) x the row's stored peak allocated, for
each f given, and records whether the step ran, its peaks and the allocator's retries. Run it
under each allocator setting (PYTORCH_CUDA_ALLOC_CONF unset, or expandable_segments:True).

    python bench/truth/memory_cap.py --ids single-llama3-8b-s2048-mb1,... --over 0.03,0.08 --out caps.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import configs as C  # noqa: E402

CORPUS = [ROOT / "bench/results/truth_h200_2026-11-30.json", ROOT / "bench/results/truth_h200_accum_2026-11-30.json"]


def stored_allocated_bytes() -> dict[str, int]:
    """Each stored single-GPU row's peak allocated bytes, by id."""
    out = {}
    for path in CORPUS:
        for r in json.loads(path.read_text()).get("runs", []):
            if r.get("n_gpus") == 1 and not r.get("oom") and r.get("peak_allocated_bytes"):
                out[r["id"]] = r["peak_allocated_bytes"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", required=True, help="comma list of single-GPU run ids of bench/truth/configs.py")
    ap.add_argument("--over", default="0.03", help="comma list of f: cap = (1 + f) x the row's stored peak allocated")
    ap.add_argument("--out", required=True, help="JSON lines, appended")
    a = ap.parse_args(argv)
    try:
        overs = [float(x) for x in a.over.split(",") if x]
    except ValueError:
        ap.error(f"--over takes comma-separated fractions such as 0.03,0.08, not {a.over!r}")
    if not overs or min(overs) < 0:
        ap.error("--over needs at least one fraction, each 0 or more")
    runs = {r["id"]: r for r in C.single_runs()}
    stored = stored_allocated_bytes()
    ids = [x for x in a.ids.split(",") if x]
    unknown = [x for x in ids if x not in runs or x not in stored]
    if unknown:
        ap.error(f"--ids: no stored single-GPU row for {unknown}; choose among {sorted(set(runs) & set(stored))}")
    todo = [dict(runs[i], memory_cap_bytes=int(stored[i] * (1 + f)), cap_over_allocated=f) for i in ids for f in overs]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(todo, f)
    print(f"memory_cap: {len(todo)} runs, PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}",
          flush=True)
    try:
        return subprocess.call([sys.executable, str(HERE / "truth.py"), "--configs", f.name, "--out", a.out])
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    sys.exit(main())
