"""Shared test set-up: the trace cache goes to a per-session temporary folder (tests never read
or write the user's ~/.cache/autopar), and tests/ is importable for the hand-built graphs in
builders.py.

Layout: tests/unit/ checks one module against an oracle (brute force, closed form, a stored
measurement); tests/integration/ runs whole paths (trace -> plan -> evaluate, the CLI, the
multi-process runtime). Marks: `runtime` (multi-process torch.distributed runs on gloo; CI runs
them as a second pass), `slow` (over a minute; `-m slow`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def _trace_cache_dir(tmp_path_factory):
    old = os.environ.get("AUTOPAR_CACHE_DIR")
    os.environ["AUTOPAR_CACHE_DIR"] = str(tmp_path_factory.mktemp("autopar_cache"))
    yield
    if old is None:
        os.environ.pop("AUTOPAR_CACHE_DIR", None)
    else:
        os.environ["AUTOPAR_CACHE_DIR"] = old
