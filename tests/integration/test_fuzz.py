"""Fuzzing the command line: a seeded generator of bad and edge-case inputs for every entry
point (numeric options, model specs, cluster files, plan files, output paths, GPU profiles,
`run` options), each run in-process through `autopar.cli.main`.

Every case must end in one of two ways:
* a clean error: exit code 2 and one stderr line `autopar...: error: ...`, nothing raised;
* a valid result: exit code 0, and only for inputs the generator marks as valid.
It must never raise (a traceback), hang (a per-case deadline), exit 0 on an input marked bad
(a silent accept), or change a file it was not asked to write (a clobbered file).

bench/fuzz_inputs.py runs the same generator over a larger corpus and prints the counts.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from autopar.cli import main

TINY = "gpt:hidden=64,layers=2,heads=4,seq=32,vocab=128"
CLUSTER = ["--cluster", "p3.16xlarge", "--nodes", "1", "--gpus-per-node", "2"]
EVAL_OK = ["evaluate", TINY, *CLUSTER, "--global-batch", "4", "--dp", "2", "--tp", "1", "--pp", "1",
           "--microbatch", "1"]

BAD_INTS = ["0", "-1", "-7", "lots", "", " ", "1.5", "1e400", "nan", "inf", "-inf", "0x10", "9223372036854775808",
            "1099511627776", "4849845", "1073741824", "2**10", "１２", "3 4", "None"]
BAD_FLOATS = ["nan", "inf", "-inf", "-1", "0", "1e400", "abc", "", "-0"]


@dataclass
class Case:
    family: str
    argv: list[str]
    expect: str                                   # "error" | "ok" | "any"
    protect: list[Path] = field(default_factory=list)   # files that must be left as they are
    creates: list[Path] = field(default_factory=list)   # files an "ok" run must have written


@dataclass
class Outcome:
    kind: str          # clean_error | valid | traceback | hang | silent_accept | clobbered | unclean_error
    detail: str = ""


# ---- inputs --------------------------------------------------------------------------------

class Corpus:
    """Builds the files the cases point at, once per folder."""

    def __init__(self, root: Path):
        self.root = root
        self.n = 0
        root.mkdir(parents=True, exist_ok=True)
        self.folder = root / "a_folder"
        self.folder.mkdir(exist_ok=True)
        self.readonly = root / "read_only"
        self.readonly.mkdir(exist_ok=True)
        self.readonly.chmod(0o500)
        self.existing = root / "existing.txt"
        self.existing.write_text("the user's file\n")
        self._plan: dict | None = None

    def path(self, suffix: str) -> Path:
        self.n += 1
        return self.root / f"f{self.n}{suffix}"

    def write(self, suffix: str, text: str) -> Path:
        p = self.path(suffix)
        p.write_text(text)
        return p

    def plan(self) -> dict:
        """A valid 2-stage plan of TINY on 1 x 2 GPUs (made once, by `evaluate --json`)."""
        if self._plan is None:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
                argv = ["evaluate", TINY, *CLUSTER, "--global-batch", "4", "--dp", "1", "--tp", "1", "--pp", "2",
                        "--microbatch", "1", "--json"]
                assert main(argv) == 0
            self._plan = json.loads(buf.getvalue())
        return copy.deepcopy(self._plan)


def _numeric_cases(rng: random.Random, c: Corpus) -> list[Case]:
    """A bad value for one numeric option of one command, the rest valid."""
    spots: list[tuple[list[str], str, list[str]]] = [
        (["inspect", TINY], "--batch", BAD_INTS), (["inspect", TINY], "--seq", BAD_INTS),
        (EVAL_OK, "--global-batch", BAD_INTS), (EVAL_OK, "--dp", BAD_INTS), (EVAL_OK, "--tp", BAD_INTS),
        (EVAL_OK, "--pp", BAD_INTS), (EVAL_OK, "--microbatch", BAD_INTS), (EVAL_OK, "--virtual-stages", BAD_INTS),
        (EVAL_OK, "--nodes", BAD_INTS), (EVAL_OK, "--gpus-per-node", BAD_INTS + ["3", "6"]),
        (["plan", TINY, *CLUSTER], "--global-batch", BAD_INTS), (["plan", TINY, *CLUSTER], "--microbatches", BAD_INTS),
        (["plan", TINY, *CLUSTER], "--max-stages", BAD_INTS), (["plan", TINY, *CLUSTER], "--nodes", BAD_INTS),
        (["plan", TINY, *CLUSTER], "--zero", ["4", "-1", "x", "1.0"]),
        (["compare", TINY, *CLUSTER], "--global-batch", BAD_INTS), (["compare", TINY, *CLUSTER], "--nodes", BAD_INTS),
        (["compare", TINY, *CLUSTER], "--strategies", ["warp", "dp,,bogus", "DP", "auto;dp"]),
        (["shard", TINY, *CLUSTER, "--mesh", "1x2"], "--batch", BAD_INTS),
        (["shard", TINY, *CLUSTER, "--mesh", "1x2"], "--microbatches", BAD_INTS),
        (["shard", TINY, *CLUSTER, "--mesh", "1x2"], "--time-limit", BAD_FLOATS),
        (["shard", TINY, *CLUSTER, "--mesh", "1x2"], "--layers", ["1:2:3", "5:2", "x:y", "-1:3", "0:99", "3",
                                                                   "2:2", "0:1e400"]),
        (["shard", TINY, *CLUSTER], "--mesh", ["0x4", "4x0", "2x", "x", "2x2x2", "-2x-1", "axb", "4x4", "3x1",
                                               "100000x100000", ""]),
        (["evaluate", TINY, *CLUSTER, "--dp", "2", "--tp", "1", "--pp", "1", "--global-batch", "4"], "--microbatch",
         ["3", "8", "0"]),
    ]
    out = []
    for base, flag, values in spots:
        for v in values:
            argv = list(base)
            if flag in argv:
                argv[argv.index(flag) + 1] = v
            else:
                argv += [flag, v]
            out.append(Case("numeric option", argv, "error"))
    rng.shuffle(out)
    return out


def _model_cases(rng: random.Random, c: Corpus) -> list[Case]:
    bad_specs = ["", " ", ":", "gpt:", "gpt", "warp-9b", "gpt:hidden=64", "gpt:hidden=64,layers=2,heads=3",
                 "gpt:hidden=0,layers=2,heads=4", "gpt:hidden=64,layers=0,heads=4", "gpt:hidden=64,layers=-2,heads=4",
                 "gpt:hidden=64,layers=1e400,heads=4", "gpt:hidden=64,layers=nan,heads=4",
                 "gpt:hidden=64,layers=2,heads=4,seq=0", "gpt:hidden=64,layers=2,heads=4,vocab=-5",
                 "gpt:hidden=64,layers=2,heads=4,kv_heads=8", "gpt:hidden=64,layers=2,heads=4,colour=blue",
                 "gpt:hidden=64,layers=2,heads=4,norm_eps=nan", "gpt:hidden=64,layers=2,heads=4,norm_eps=-1",
                 "gpt:hidden=64,layers=2,heads=4,tied=maybe", "gpt:hidden=64,layers=2,heads=4,experts=4",
                 "gpt:hidden=64,layers=100000,heads=4", "gpt:hidden=99999999999,layers=2,heads=1",
                 "moe:hidden=64,layers=2,heads=4,top_k=-1", "moe:hidden=64,layers=2,heads=4,experts=0",
                 "moe:hidden=64,layers=2,heads=4,top_k=0", "moe:hidden=64,layers=2,heads=4,moe_every=0",
                 "moe:hidden=64,layers=2,heads=4,capacity_factor=0", "moe:hidden=64,layers=2,heads=4,capacity_factor=inf",
                 "llama:hidden=60,layers=2,heads=4", "llama:hidden=64,layers=2,heads=4,rope_theta=-1",
                 "gpt-350m:layers=0", "gpt-350m:seq=99999999", "hf:missing.json", "missing.py:factory",
                 "file.py", "gpt:hidden=64,,layers=2,heads=4,=", "\x00", "gpt:hidden=６４,layers=2,heads=4"]
    out = [Case("model spec", ["inspect", s], "error") for s in bad_specs]
    out += [Case("model spec", ["inspect", TINY, "--seq", "33"], "error")]      # past gpt's learned positions
    factories = {
        "raises": "import torch\ndef factory():\n    raise RuntimeError('my model is broken')\n",
        "syntax": "def factory(:\n    pass\n",
        "import_error": "import not_a_module_anywhere\ndef factory():\n    pass\n",
        "wrong_return": "def factory():\n    return 42\n",
        "no_function": "x = 1\n",
        "exits": "import sys\ndef factory():\n    sys.exit(3)\n",
    }
    for name, text in factories.items():
        p = c.write(".py", text)
        func = "other" if name == "no_function" else "factory"
        out.append(Case("model factory", ["inspect", f"{p}:{func}"], "error"))
    for _ in range(6):       # valid tiny variants
        h, heads = rng.choice([(32, 2), (64, 4), (64, 2)])
        fam = rng.choice(["gpt", "llama", "moe"])
        extra = ",experts=4" if fam == "moe" else ""
        out.append(Case("model spec", ["inspect", f"{fam}:hidden={h},layers={rng.randint(1, 2)},heads={heads},"
                                                  f"seq=32,vocab=128{extra}"] + rng.choice([[], ["--json"]]), "ok"))
    return out


CLUSTER_BASE = {"name": "tiny", "nodes": 1, "gpus_per_node": 2,
                "gpu": {"name": "g", "peak_flops": {"fp16": 1.0e14, "fp32": 1.0e13}, "memory_bytes": 1.6e10,
                        "hbm_bytes_per_s": 9.0e11},
                "intra_link": {"bandwidth_bytes_per_s": 1.5e11, "latency_s": 5.0e-6},
                "inter_link": {"bandwidth_bytes_per_s": 3.0e9, "latency_s": 3.0e-5}}
NUMBER_PATHS = [("nodes",), ("gpus_per_node",), ("gpu", "memory_bytes"), ("gpu", "hbm_bytes_per_s"),
                ("gpu", "peak_flops", "fp16"), ("intra_link", "bandwidth_bytes_per_s"), ("intra_link", "latency_s"),
                ("inter_link", "bandwidth_bytes_per_s"), ("inter_link", "latency_s")]
BAD_NUMBERS = ["inf", "-inf", "nan", "-1", "0", "1e400", "10**400", "'abc'", "[]", "{}", "null", "true", "1073741824"]


def _set(d: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _cluster_text(d: dict, bad: str | None, fmt: str) -> str:
    """The mapping as JSON or YAML text, with the placeholder 1.25e-99 replaced by `bad`
    written the way that format spells it."""
    if fmt == "json":
        text = json.dumps(d)
        spell = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN", "10**400": "1" + "0" * 400,
                 "'abc'": '"abc"'}
    else:
        text = json.dumps(d)      # JSON is YAML 1.2; PyYAML reads it as flow style
        spell = {"inf": ".inf", "-inf": "-.inf", "nan": ".nan", "10**400": "1" + "0" * 400, "'abc'": "abc",
                 "1e400": "1.0e+400"}
    return text if bad is None else text.replace("1.25e-99", spell.get(bad, bad))


def _cluster_cases(rng: random.Random, c: Corpus) -> list[Case]:
    out = []
    argv_tail = ["--global-batch", "4", "--dp", "2", "--tp", "1", "--pp", "1", "--microbatch", "1"]
    for path in NUMBER_PATHS:
        for bad in BAD_NUMBERS:
            if path[-1] == "latency_s" and bad == "0":
                continue                      # a zero latency is allowed
            if bad == "1073741824" and path not in (("nodes",), ("gpus_per_node",)):
                continue                      # large but finite figures are fine elsewhere
            d = copy.deepcopy(CLUSTER_BASE)
            _set(d, path, 1.25e-99)
            fmt = rng.choice(["json", "yaml"])
            f = c.write(f".{fmt}", _cluster_text(d, bad, fmt))
            out.append(Case("cluster file", ["evaluate", TINY, "--cluster", str(f), *argv_tail], "error"))
    for profile in ["../schema/plan.schema.json", "/etc/passwd", "comm_h100_nvlink.json", "nope.json", 5, ["x"],
                    "h100_sxm", "../profiles/h100_sxm.json"]:
        d = copy.deepcopy(CLUSTER_BASE)
        d["gpu"]["profile"] = profile
        out.append(Case("cluster file", ["evaluate", TINY, "--cluster", str(c.write(".json", json.dumps(d))),
                                         *argv_tail], "error"))
    for text in ["", "[]", "- a\n- b\n", "{", "nodes: [1", "base: 5\n", "base: [p3.16xlarge]\n", "{\"gpu\": 5}",
                 json.dumps({**CLUSTER_BASE, "colour": "red"}), json.dumps({**CLUSTER_BASE, "gpu": "TPU"})]:
        out.append(Case("cluster file", ["evaluate", TINY, "--cluster", str(c.write(".yaml", text)), *argv_tail],
                        "error"))
    for spec in [str(c.folder) + ".yaml", str(c.root / "missing.yaml"), str(c.folder), "p9.64xlarge", ""]:
        out.append(Case("cluster file", ["evaluate", TINY, "--cluster", spec, *argv_tail], "error"))
    d = c.root / "dir_cluster.json"
    d.mkdir(exist_ok=True)
    out.append(Case("cluster file", ["evaluate", TINY, "--cluster", str(d), *argv_tail], "error"))
    good = c.write(".json", json.dumps(CLUSTER_BASE))
    out.append(Case("cluster file", ["evaluate", TINY, "--cluster", str(good), *argv_tail], "ok"))
    return out


def _plan_mutations(c: Corpus) -> list[tuple[str, Callable[[dict], None] | str]]:
    def stage(i: int, **kv):
        return lambda d: d["stages"][i].update(kv)
    muts: list[tuple[str, Callable[[dict], None] | str]] = [
        ("no predicted mfu", lambda d: d["predicted"].pop("mfu")),
        ("null predicted", lambda d: d.update(predicted=None)),
        ("predicted a string", lambda d: d["predicted"].update(step_time_s="fast")),
        ("negative step", lambda d: d["predicted"].update(step_time_s=-1.0)),
        ("negative memory", lambda d: d["predicted"].update(peak_memory_bytes=-5)),
        ("bubble > 1", lambda d: d["predicted"].update(bubble_fraction=3.0)),
        ("fits a string", lambda d: d["predicted"].update(fits="yes")),
        ("device 99", lambda d: d["stages"][1].update(device_ids=[99])),
        ("duplicate device", lambda d: (d["stages"][0].update(device_ids=[0, 0], submesh=[1, 2],
                                                              logical_mesh=[1, 2]))),
        ("submesh mismatch", stage(0, submesh=[2, 1])),
        ("logical mesh mismatch", stage(0, logical_mesh=[2, 2])),
        ("layers mismatch", stage(1, layers=[2, 9])),
        ("layers short", lambda d: d["model"].update(n_layers=9)),
        ("index order", lambda d: (d["stages"][0].update(index=1), d["stages"][1].update(index=0))),
        ("gb mismatch", lambda d: d["training"].update(global_batch=5)),
        ("huge microbatches", lambda d: d["training"].update(global_batch=100000, n_microbatches=100000)),
        ("zero microbatch", lambda d: d["training"].update(microbatch_size=0)),
        ("strategy bogus", lambda d: d["stages"][0]["strategies"].update(
            {next(iter(d["stages"][0]["strategies"])): "bogus"})),
        ("nan time", "NaN"),
        ("inf time", "Infinity"),
        ("negative stage time", stage(0, fwd_s=-1.0)),
        ("schema", lambda d: d.update(schema="autopar.plan/v9")),
        ("no stages", lambda d: d.update(stages=[])),
        ("dtype", lambda d: d["training"].update(dtype="fp8")),
        ("nodes huge", lambda d: d["cluster"].update(nodes=1 << 30)),
        ("stage as list", lambda d: d["stages"].__setitem__(0, [1, 2])),
        ("memory string", lambda d: d["stages"][0].update(memory={"total_bytes": "a lot"})),
        ("unknown field", lambda d: d["training"].update(colour="red")),
    ]
    return muts


def _plan_cases(rng: random.Random, c: Corpus) -> list[Case]:
    out = []
    base = c.plan()
    for name, mut in _plan_mutations(c):
        d = copy.deepcopy(base)
        if isinstance(mut, str):
            text = json.dumps(d).replace(json.dumps(d["predicted"]["step_time_s"]), mut, 1)
        else:
            mut(d)
            text = json.dumps(d)
        f = c.write(".json", text)
        out.append(Case(f"plan file: {name}", ["show", str(f)], "error"))
        if rng.random() < 0.5:
            out.append(Case(f"plan file (run): {name}", ["run", str(f), "--device", "cpu"], "error"))
    for text in ["", "{", "[]", "null", "{}", '{"schema": "autopar.plan/v1"}', "[" * 100000, "\x00\x01"]:
        out.append(Case("plan file", ["show", str(c.write(".json", text))], "error"))
    for p in [str(c.folder), str(c.root / "missing.json")]:
        out.append(Case("plan file", ["show", p], "error"))
        out.append(Case("plan file (run)", ["run", p], "error"))
    good = c.write(".json", json.dumps(base))
    out.append(Case("plan file", ["show", str(good)], "ok"))
    for flag, bad in [("--steps", "0"), ("--steps", "-3"), ("--nproc", "0"), ("--lr", "nan"), ("--timeout-s", "0"),
                      ("--tol", "-1"), ("--device", "tpu"), ("--seed", "-1"), ("--nproc", "3")]:
        out.append(Case("run option", ["run", str(good), flag, bad], "error"))
    return out


def _output_cases(rng: random.Random, c: Corpus) -> list[Case]:
    good = c.write(".json", json.dumps(c.plan()))
    out = []
    plan_argv = ["plan", TINY, *CLUSTER, "--global-batch", "4"]
    cmp_argv = ["compare", TINY, *CLUSTER, "--global-batch", "4", "--strategies", "dp"]
    bad_targets = [str(c.folder), str(c.root / "no_such_folder" / "x.json"), str(c.readonly / "x.json"), "",
                   str(c.existing / "x.json")]
    if os.geteuid() == 0:           # root writes into read-only folders
        bad_targets.remove(str(c.readonly / "x.json"))
    for target in bad_targets:
        out.append(Case("output path", [*plan_argv, "-o", target], "error"))
        out.append(Case("output path", [*cmp_argv, rng.choice(["--json", "--csv", "--plot"]), target], "error"))
        out.append(Case("output path", ["show", str(good), "--gantt", target], "error"))
    # existing files are never overwritten without --force
    for argv in ([*plan_argv, "-o"], [*cmp_argv, "--json"], [*cmp_argv, "--csv"], [*cmp_argv, "--plot"],
                 ["show", str(good), "--gantt"]):
        f = c.write(".png" if argv[-1] in ("--plot", "--gantt") else ".json", "keep me\n")
        out.append(Case("existing output", [*argv, str(f)], "error", protect=[f]))
    f = c.write(".json", "keep me\n")
    out.append(Case("two outputs one path", [*cmp_argv, "--json", str(f), "--csv", str(f), "--force"], "error",
                    protect=[f]))
    out.append(Case("image suffix", ["show", str(good), "--gantt", str(c.path(".txt"))], "error"))
    new = c.path(".png")
    out.append(Case("output path", ["show", str(good), "--gantt", str(new)], "ok", creates=[new]))
    old = c.write(".png", "old")
    out.append(Case("output path", ["show", str(good), "--gantt", str(old), "--force"], "ok", creates=[old]))
    return out


def _profile_cases(rng: random.Random, c: Corpus) -> list[Case]:
    from autopar.hardware.profiles import PROFILES_DIR
    prof = json.loads((PROFILES_DIR / "h100_sxm.json").read_text())
    out = []
    for section, key, bad in [("matmul", "time_s", "NaN"), ("matmul", "time_s", "-1"), ("attention", "fwd_s", "0"),
                              ("memory_bound", "time_s", "Infinity"), ("matmul", "time_s", '"fast"')]:
        p = copy.deepcopy(prof)
        p[section][0][key] = 1.25e-99
        f = c.write(".json", json.dumps(p).replace("1.25e-99", bad))
        out.append(Case("gpu profile", ["profile", "--merge", str(f), "--out", str(c.path(".json"))], "error"))
    existing = c.write(".json", "keep me\n")
    out.append(Case("gpu profile", ["profile", "--merge", str(PROFILES_DIR / "h100_sxm.json"), "--out",
                                    str(existing)], "error", protect=[existing]))
    out.append(Case("gpu profile", ["profile", "--merge", str(c.folder), "--out", str(c.path(".json"))], "error"))
    out.append(Case("gpu profile", ["profile", "--merge", str(c.root / "missing.json"), "--out",
                                    str(c.path(".json"))], "error"))
    out.append(Case("gpu profile", ["profile", "--out", str(c.folder)], "error"))
    new = c.path(".json")
    out.append(Case("gpu profile", ["profile", "--merge", str(PROFILES_DIR / "h100_sxm.json"), "--out", str(new)],
                    "ok", creates=[new]))
    return out


FAMILIES = [_numeric_cases, _model_cases, _cluster_cases, _plan_cases, _output_cases, _profile_cases]


def generate(seed: int, root: Path, n: int | None = None) -> list[Case]:
    """The corpus for `seed`: every family's cases (n: a seeded sample of that many)."""
    rng = random.Random(seed)
    corpus = Corpus(root)
    cases = [case for fam in FAMILIES for case in fam(rng, corpus)]
    if n is not None and n < len(cases):
        cases = rng.sample(cases, n)
    return cases


def mutate_argv(rng: random.Random, argv: list[str]) -> list[str]:
    """A random edit of a command line: drop, duplicate or corrupt one token (for larger corpora)."""
    a = list(argv)
    i = rng.randrange(1, len(a)) if len(a) > 1 else 0
    op = rng.choice(["drop", "dup", "junk", "swap"])
    if op == "drop":
        del a[i]
    elif op == "dup":
        a.insert(i, a[i])
    elif op == "junk":
        a[i] = rng.choice(["-", "--", "--nope", "0", "-1", "nan", "", "x" * 300, "\u00e9", "1e400"])
    else:
        j = rng.randrange(len(a))
        a[i], a[j] = a[j], a[i]
    return a


# ---- running one case ----------------------------------------------------------------------

class _Deadline(Exception):
    pass


def _alarm(signum, frame):
    raise _Deadline()


def run_case(case: Case, timeout_s: float = 20.0) -> Outcome:
    before = {p: p.read_bytes() for p in case.protect}
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(case.argv))
    except _Deadline:
        return Outcome("hang", f"over {timeout_s:.0f} s")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException as e:
        return Outcome("traceback", f"{type(e).__name__}: {e}"[:300])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    for p, data in before.items():
        if not p.exists() or p.read_bytes() != data:
            return Outcome("clobbered", str(p))
    text = err.getvalue().strip()
    if rc == 0:
        if case.expect == "error":
            return Outcome("silent_accept", out.getvalue()[-200:])
        missing = [str(p) for p in case.creates if not p.is_file()]
        return Outcome("valid") if not missing else Outcome("unclean_error", f"did not write {missing}")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    clean = (rc == 2 and len(lines) == 1 and lines[0].startswith("autopar") and "error:" in lines[0]
             and "Traceback" not in text)
    if not clean:
        return Outcome("unclean_error", f"rc={rc} {text[-300:]!r}")
    if case.expect == "ok":
        return Outcome("unclean_error", f"a valid input was refused: {text[:300]}")
    return Outcome("clean_error")


def run_corpus(cases: list[Case], timeout_s: float = 20.0) -> tuple[Counter, list[tuple[Case, Outcome]]]:
    counts: Counter = Counter()
    bad = []
    for case in cases:
        o = run_case(case, timeout_s)
        counts[o.kind] += 1
        if o.kind not in ("clean_error", "valid"):
            bad.append((case, o))
    return counts, bad


# ---- the test --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    cases = generate(seed=17, root=root)
    yield cases
    (root / "read_only").chmod(0o700)


def test_every_generated_input_gets_a_clean_error_or_a_valid_result(corpus_cases):
    t0 = time.perf_counter()
    counts, bad = run_corpus(corpus_cases, timeout_s=30.0)
    assert len(corpus_cases) >= 300
    assert counts["valid"] >= 10 and counts["clean_error"] >= 250, counts
    report = "\n".join(f"[{o.kind}] {c.family}: autopar {' '.join(map(repr, c.argv))[:200]}\n    {o.detail}"
                       for c, o in bad[:20])
    assert not bad, f"{len(bad)} of {len(corpus_cases)} cases failed ({dict(counts)}):\n{report}"
    assert time.perf_counter() - t0 < 120


def test_broken_pipe_is_not_a_traceback(corpus_cases, tmp_path):
    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    plan = next(c for c in corpus_cases if c.family == "plan file" and c.expect == "ok").argv[1]
    with contextlib.redirect_stdout(ClosedPipe()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["show", plan]) == 0
    assert "Traceback" not in err.getvalue()
