"""Put measured rows into a shipped GPU profile (issue 13).

    python bench/update_profile.py autopar/profiles/h200.json \
        --attention bench/results/attention_default_h200_2026-12-01.json \
        --eager-kinds bench/results/elementwise_sizes_h200_2026-12-02.json --force

--attention FILE: the profile's attention rows become FILE's (`autopar profile --attention-backend
default`'s rows, or any file of rows with the profile's attention keys): the kernels SDPA picks
on its own, which a training step runs, in place of the rows of a forced backend.
--eager-kinds FILE: the eager kernels `bench/elementwise_sizes.py` timed (its cases named by
KIND_OF_CASE) become the profile's memory_bound rows of those kinds
(autopar.hardware.profiles.EAGER_KERNELS), replacing any it had.

Both files must be of the profile's GPU (their "gpu" field). The profile's meta records each
file and its date. Without --force nothing is written over the profile.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from elementwise_sizes import KIND_OF_CASE  # noqa: E402

from autopar.hardware.profiles import (  # noqa: E402
    ATTENTION_KEYS,
    EAGER_KERNELS,
    dump_gpu_profile,
    validate_gpu_profile,
)


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _rows_of(path: Path, gpu: str) -> tuple[dict, list[dict]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"update_profile.py: cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise SystemExit(f"update_profile.py: {path} has no list of rows; give a bench/results file")
    if doc.get("gpu") != gpu:
        raise SystemExit(f"update_profile.py: {path} was measured on {doc.get('gpu')!r}, the profile is "
                         f"of {gpu!r}; give a file of the profile's GPU")
    return doc, doc["rows"]


def update(prof: dict, attention: Path | None, eager_kinds: Path | None) -> dict:
    """`prof` with the rows of `attention` and `eager_kinds` in place of its own (a new dict)."""
    out = dict(prof)
    meta = dict(out.get("meta") or {})
    if attention is not None:
        doc, rows = _rows_of(attention, prof["gpu"])
        lack = [i for i, r in enumerate(rows) if any(k not in r for k in ATTENTION_KEYS)]
        if lack or not rows:
            raise SystemExit(f"update_profile.py: {attention}: rows {lack[:5]} lack the attention keys "
                             f"{list(ATTENTION_KEYS)}")
        out["attention"] = [{k: r[k] for k in ATTENTION_KEYS} for r in rows]
        meta["attention_rows"] = (f"{_relative(attention)} ({doc.get('date')}, torch {doc.get('torch')}; "
                                  f"backends {doc.get('backends')}): {doc.get('command', '')}")
    if eager_kinds is not None:
        doc, rows = _rows_of(eager_kinds, prof["gpu"])
        new = [{"kernel": KIND_OF_CASE[r["case"]], "bytes": r["bytes"], "time_s": r["time_s"], "gbps": r["gbps"]}
               for r in rows if r.get("case") in KIND_OF_CASE]
        missing = set(EAGER_KERNELS) - {r["kernel"] for r in new}
        if missing:
            raise SystemExit(f"update_profile.py: {eager_kinds} has no rows of {sorted(missing)}")
        out["memory_bound"] = [r for r in out["memory_bound"] if r["kernel"] not in EAGER_KERNELS] + new
        meta["memory_bound_eager"] = (f"{', '.join(EAGER_KERNELS)}: {_relative(eager_kinds)} ({doc.get('date')}, "
                                      f"torch {doc.get('torch')}), bench/elementwise_sizes.py with the "
                                      "profile's method; bytes read + written, a broadcast table once")
    out["meta"] = meta
    validate_gpu_profile(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path, help="the GPU profile JSON to update in place")
    ap.add_argument("--attention", type=Path, help="attention rows to take (a bench/results file)")
    ap.add_argument("--eager-kinds", type=Path, help="bench/elementwise_sizes.py's results to take")
    ap.add_argument("--force", action="store_true", help="write over the profile")
    a = ap.parse_args(argv)
    if a.attention is None and a.eager_kinds is None:
        print("update_profile.py: give --attention FILE and/or --eager-kinds FILE", file=sys.stderr)
        return 2
    try:
        prof = json.loads(a.profile.read_text())
        validate_gpu_profile(prof)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        print(f"update_profile.py: {a.profile} is not a readable GPU profile: {e}", file=sys.stderr)
        return 2
    out = update(prof, a.attention, a.eager_kinds)
    if not a.force:
        print(f"update_profile.py: would write {a.profile}; pass --force to write over it", file=sys.stderr)
        return 2
    a.profile.write_text(dump_gpu_profile(out))
    print(f"wrote {a.profile}: {len(out['attention'])} attention rows, {len(out['memory_bound'])} memory-bound rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
