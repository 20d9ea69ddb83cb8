"""Run the CLI fuzz generator (tests/integration/test_fuzz.py) over a larger seeded corpus and
print the outcome counts: clean errors, valid results, tracebacks, hangs, silent accepts,
clobbered files (and unclean errors: a non-zero exit without the one-line message).

    python bench/fuzz_inputs.py                  # seeds 1..4 plus mutated command lines
    python bench/fuzz_inputs.py --seeds 1 --mutants 0 --show 50

Each seed rebuilds every family's cases (numeric options, model specs, cluster files, plan
files, output paths, GPU profiles, run options) with its own random choices; --mutants adds
that many random edits (drop, duplicate, corrupt or swap a token) of the generated command
lines, whose expected outcome is "a clean error or a valid result" (either).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

from test_fuzz import Case, generate, mutate_argv, run_case  # noqa: E402

KINDS = ("clean_error", "valid", "traceback", "hang", "silent_accept", "clobbered", "unclean_error")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="corpora generated with seeds 1..N")
    ap.add_argument("--mutants", type=int, default=300, help="random edits of generated command lines")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="a case running longer counts as a hang")
    ap.add_argument("--show", type=int, default=20, help="print this many failing cases")
    a = ap.parse_args()
    os.environ.setdefault("AUTOPAR_CACHE_DIR", tempfile.mkdtemp(prefix="autopar-fuzz-cache-"))
    counts: Counter = Counter()
    by_family: dict[str, Counter] = {}
    failures = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autopar-fuzz-") as tmp:
        cases: list[Case] = []
        for seed in range(1, a.seeds + 1):
            cases += generate(seed, Path(tmp) / f"seed{seed}")
        rng = random.Random(0)
        # Mutants of plan/compare lines may be valid searches: keep those to cheap commands.
        cheap = [c for c in cases if c.argv and c.argv[0] in ("inspect", "show", "evaluate")]
        cases += [Case("mutated command line", mutate_argv(rng, rng.choice(cheap).argv), "any")
                  for _ in range(a.mutants)]
        for i, case in enumerate(cases):
            o = run_case(case, a.timeout_s)
            counts[o.kind] += 1
            by_family.setdefault(case.family.split(":")[0], Counter())[o.kind] += 1
            if o.kind not in ("clean_error", "valid"):
                failures.append((case, o))
            if (i + 1) % 200 == 0:
                print(f"... {i + 1}/{len(cases)} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for p in Path(tmp).glob("seed*/read_only"):
            p.chmod(0o700)
    total = sum(counts.values())
    print(f"{total} cases ({a.seeds} seeds + {a.mutants} mutants) in {time.perf_counter() - t0:.0f} s")
    for k in KINDS:
        print(f"  {k:<14} {counts[k]:>6}")
    print("\nby family:")
    for fam, c in sorted(by_family.items()):
        print(f"  {fam:<24} " + ", ".join(f"{k} {c[k]}" for k in KINDS if c[k]))
    for case, o in failures[:a.show]:
        print(f"\n[{o.kind}] {case.family}: autopar {' '.join(map(repr, case.argv))[:300]}\n    {o.detail}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
