"""A plan's serial start: `autopar.cli` does not import the runtime (torch._dynamo and
torch.distributed's FSDP, about 1.3 s), which only `autopar run` needs. Oracle: a fresh
interpreter's sys.modules after the import; `autopar run` still reaches the runtime."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_imports_no_runtime():
    code = ("import sys, autopar.cli; "
            "print(sorted(m for m in ('autopar.runtime.launch', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_still_reaches_the_runtime(capsys):
    from autopar.cli import main

    assert main(["run", "--help"]) == 0
    assert "usage" in capsys.readouterr().out.lower()
