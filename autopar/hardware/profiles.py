"""Measured hardware profiles shipped in autopar/profiles/: one loader for both kinds.

* GPU profiles (``autopar.gpu_profile/v1``, written by ``autopar profile``): matmul,
  attention and memory-bound kernel timings and launch overhead; the compute model reads them.
* Communication profiles (``autopar.comm_profile/v1``, written by
  ``python -m autopar.profiling.comm fit``): the alpha-beta of a link fitted to NCCL timings;
  a cluster preset named in ``hardware.presets.COMM_PROFILES`` takes its intra-node link from
  its profile when that file is shipped.

This module is the leaf of ``autopar.hardware``: it reads files and returns plain data.
"""

from __future__ import annotations

import json
import math
import os
from functools import cache
from pathlib import Path
from typing import Any

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"

# ---- GPU profiles ----------------------------------------------------------------------------

GPU_SCHEMA = "autopar.gpu_profile/v1"
GPU_TOP_KEYS = ("schema", "gpu", "memory_bytes", "sm_count", "torch", "cuda", "date",
            "matmul", "attention", "memory_bound", "launch_overhead_s")
MATMUL_KEYS = ("dtype", "m", "n", "k", "time_s", "tflops")
ATTENTION_KEYS = ("dtype", "batch", "heads", "seq", "head_dim", "causal", "fwd_s", "bwd_s")
MEMORY_BOUND_KEYS = ("kernel", "bytes", "time_s", "gbps")
MATMUL_DTYPES = ("bf16", "fp16", "fp32", "tf32")
# the kernels a profile's memory_bound rows time (autopar/profiling/gpu.py); the cost model
# prices each memory-bound op on its kind's rows (costmodel/compute.py memory_bound_s), a
# backward on its "_backward" rows where the profile has them
MEMORY_BOUND_KERNELS = ("copy", "add", "gelu", "layernorm", "softmax", "gelu_backward", "layernorm_backward")
# the eager recipe's kernels a profile may also hold (bench/elementwise_sizes.py times them with
# the profile's method; bench/update_profile.py puts its rows in a profile): bf16 -> fp32 and
# fp32 -> bf16 casts, an fp32 add_ (gradient accumulation), a bf16 view times an fp32
# [seq, head_dim] table (rotary), a bf16 sum over the tokens (a bias gradient). The eager terms
# (costmodel/eager.py) price on them; a profile without them prices on `add`'s rows.
EAGER_KERNELS = ("cast_widen", "cast_narrow", "accumulate", "broadcast_mul", "token_sum")
TIME_KEYS = {"matmul": ("time_s",), "attention": ("fwd_s", "bwd_s"), "memory_bound": ("time_s",)}


def validate_gpu_profile(prof: dict) -> None:
    """Raise ValueError if ``prof`` does not follow ``autopar.gpu_profile/v1``."""
    if not isinstance(prof, dict):
        raise ValueError("profile must be a JSON object")
    missing = [k for k in GPU_TOP_KEYS if k not in prof]
    if missing:
        raise ValueError(f"profile lacks keys {missing}")
    if prof["schema"] != GPU_SCHEMA:
        raise ValueError(f"profile schema is {prof['schema']!r}, expected {GPU_SCHEMA!r}")
    for name, keys in (("matmul", MATMUL_KEYS), ("attention", ATTENTION_KEYS),
                       ("memory_bound", MEMORY_BOUND_KEYS)):
        rows = prof[name]
        if not isinstance(rows, list):
            raise ValueError(f"profile[{name!r}] must be a list")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"profile[{name!r}][{i}] must be an object with keys {list(keys)}")
            lack = [k for k in keys if k not in row]
            if lack:
                raise ValueError(f"profile[{name!r}][{i}] lacks keys {lack}")
            for k in TIME_KEYS[name]:
                if not _positive(row[k]):
                    raise ValueError(f"profile[{name!r}][{i}].{k} must be a finite time > 0 (got {row[k]!r}); "
                                     "re-measure with autopar profile")
    lo = prof["launch_overhead_s"]
    if not _positive(lo):
        raise ValueError(f"launch_overhead_s must be a finite time > 0 (got {lo!r})")


def dump_gpu_profile(prof: dict) -> str:
    """A profile as JSON text, one row of the measured sections per line (readable diffs)."""
    parts = []
    for key, value in prof.items():
        if key in TIME_KEYS and isinstance(value, list):
            body = ",\n".join("  " + json.dumps(row) for row in value)
            parts.append(f" {json.dumps(key)}: [\n{body}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1).replace("\n", "\n "))
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def list_gpu_profiles() -> list[str]:
    """Names of the shipped profiles (file stems in autopar/profiles)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json") if not p.stem.startswith("comm_"))


def load_gpu_profile_file(name_or_path: str | os.PathLike) -> dict:
    """Load a shipped profile by name (``"h100_sxm"``) or any profile JSON by path."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = PROFILES_DIR / f"{name_or_path}.json"
    with open(p) as f:
        prof = json.load(f)
    validate_gpu_profile(prof)
    return prof



@cache
def load_gpu_profile(file_name: str) -> dict | None:
    """A shipped GPU profile (autopar/profiles/NAME), or None if it is not shipped. Only a plain
    file name inside the profiles folder resolves: a cluster file's `gpu.profile` must not
    reach other files ("../schema/plan.schema.json"). A shipped file that is not a valid GPU
    profile is a ValueError naming it."""
    path = (PROFILES_DIR / file_name).resolve()
    if Path(file_name).name != file_name or path.parent != PROFILES_DIR or path.suffix != ".json":
        return None
    try:
        text = path.read_text()
    except (FileNotFoundError, OSError, UnicodeDecodeError):
        return None
    try:
        prof = json.loads(text)
        validate_gpu_profile(prof)
    except ValueError as e:
        raise ValueError(f"autopar/profiles/{file_name} is not a GPU profile: {' '.join(str(e).split())}") from None
    return prof



# ---- communication profiles -----------------------------------------------------------------

COMM_SCHEMA = "autopar.comm_profile/v1"
RAW_SCHEMA = "autopar.comm_raw/v1"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
ROW_KEYS = ("collective", "group_size", "bytes", "time_s")
COMM_TOP_KEYS = ("schema", "link", "gpus", "intra_link", "per_collective", "rows")


class CommProfileError(ValueError):
    """Rows that cannot be fitted, or a profile that does not follow the schema."""


def validate_comm_profile(prof: Any) -> None:
    if not isinstance(prof, dict):
        raise CommProfileError("comm profile must be a JSON object")
    missing = [k for k in COMM_TOP_KEYS if k not in prof]
    if missing:
        raise CommProfileError(f"comm profile lacks keys {missing}")
    if prof["schema"] != COMM_SCHEMA:
        raise CommProfileError(f"comm profile schema is {prof['schema']!r}, expected {COMM_SCHEMA!r}")
    link = prof["intra_link"]
    if not isinstance(link, dict) or set(link) != {"bandwidth_bytes_per_s", "latency_s"}:
        raise CommProfileError(f"comm profile intra_link must be {{bandwidth_bytes_per_s, latency_s}} (got {link!r})")
    bw, lat = link["bandwidth_bytes_per_s"], link["latency_s"]
    if not (isinstance(bw, (int, float)) and bw > 0 and math.isfinite(bw)):
        raise CommProfileError(f"comm profile intra_link.bandwidth_bytes_per_s must be > 0 (got {bw!r})")
    if not (isinstance(lat, (int, float)) and lat >= 0 and math.isfinite(lat)):
        raise CommProfileError(f"comm profile intra_link.latency_s must be >= 0 (got {lat!r})")
    per = prof["per_collective"]
    if not isinstance(per, dict):
        raise CommProfileError("comm profile per_collective must be an object of fits by collective")
    for c, f in per.items():
        if c not in COLLECTIVES or not isinstance(f, dict) or not {"alpha_s", "beta_bytes_per_s"} <= set(f):
            raise CommProfileError(f"comm profile per_collective[{c!r}] is not a fit of a known collective")
        a, b = f["alpha_s"], f["beta_bytes_per_s"]
        if not (_positive(b) and (_positive(a) or a == 0)):
            raise CommProfileError(f"comm profile per_collective[{c!r}]: alpha_s must be finite >= 0 and "
                                   f"beta_bytes_per_s finite > 0 (got {a!r}, {b!r})")


def save_comm_profile(profile: dict, path: str | os.PathLike) -> Path:
    validate_comm_profile(profile)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1) + "\n")
    os.replace(tmp, p)
    return p


def resolve_comm_profile(name: str | os.PathLike) -> Path:
    p = Path(name)
    if p.exists():
        return p
    q = PROFILES_DIR / p.name
    if not q.suffix:
        q = q.with_suffix(".json")
    return q


def list_comm_profiles() -> list[str]:
    """Stems of the shipped comm profiles (autopar/profiles/comm_*.json)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("comm_*.json"))


def load_comm_profile(name: str | os.PathLike) -> dict:
    """A comm profile by path, or by name under autopar/profiles ("comm_h200_nvlink" or with .json)."""
    p = resolve_comm_profile(name)
    if not p.exists():
        raise FileNotFoundError(f"no comm profile {str(name)!r} (looked for {p}); shipped: "
                                f"{', '.join(list_comm_profiles()) or 'none'}")
    prof = json.loads(p.read_text())
    validate_comm_profile(prof)
    return prof


_LINK_CACHE: dict[tuple[str, int], tuple[float, float, str]] = {}


def measured_link(file_name: str) -> tuple[float, float, str] | None:
    """(bandwidth_bytes_per_s, latency_s, note) of the intra-node link in the shipped profile
    autopar/profiles/`file_name`, or None when that file is not shipped (the cluster preset
    hook: a missing file changes nothing)."""
    p = PROFILES_DIR / file_name
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        return None
    key = (str(p), mtime)
    if key not in _LINK_CACHE:
        prof = load_comm_profile(p)
        li = prof["intra_link"]
        bandwidth, latency = float(li["bandwidth_bytes_per_s"]), float(li["latency_s"])
        q = prof.get("intra_link_fit") or {}
        note = (f"intra_link measured: {latency * 1e6:.2f} us per step, "
                f"{bandwidth / 1e9:.0f} GB/s, fitted to {len(prof['rows'])} timings of "
                f"{', '.join(prof['per_collective'])} ({prof.get('backend') or '?'}, {prof.get('gpus') or '?'}x "
                f"{prof.get('gpu') or '?'}, {prof.get('date') or '?'}; median error "
                f"{q.get('rel_residual_median', float('nan')):.0%}) in autopar/profiles/{file_name}")
        _LINK_CACHE[key] = (bandwidth, latency, note)
    return _LINK_CACHE[key]


