"""Output files: checked before the work that fills them, written atomically, never clobbered.

Every file autopar writes for a user (plan JSON, compare JSON/CSV, plots, profiles) goes
through here:

* `check_output(path, force)` runs before a long search, so a typo in the folder or an
  existing file fails in a second, not after minutes of planning;
* `write_text` / `atomic_path` write a temporary file in the target folder and rename it over
  the target (`os.replace` is atomic on one file system), so a failure half-way leaves no
  partial file and the old file, if any, intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


class PathError(ValueError):
    """A path that cannot be read or written, or that would overwrite a file without --force."""


def check_output(path: str | os.PathLike, force: bool, flag: str = "output") -> Path:
    """The path, if it can be written now: its folder exists and is writable, it is not a
    folder itself, and it does not exist unless `force`."""
    p = Path(path)
    if str(path).strip() == "":
        raise PathError(f"{flag}: the file name is empty; give a path such as plan.json")
    if p.is_dir():
        raise PathError(f"{flag} {str(path)!r} is a folder; give the name of a file (inside it, if you like)")
    if p.exists() or p.is_symlink():
        if not force:
            raise PathError(f"{str(path)!r} already exists; pass --force to overwrite it, or choose another name")
        if not p.is_file():
            raise PathError(f"{flag} {str(path)!r} exists and is not a regular file; choose another name")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.exists():
        raise PathError(f"{flag} {str(path)!r}: folder {str(folder)!r} does not exist; create it first "
                          f"(mkdir -p {folder})")
    if not folder.is_dir():
        raise PathError(f"{flag} {str(path)!r}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PathError(f"{flag} {str(path)!r}: folder {str(folder)!r} is not writable; choose another folder")
    return p


def check_outputs(paths: Sequence[tuple[str, str | None]], force: bool) -> None:
    """check_output for each (flag, path) given, and no two flags naming one file."""
    seen: dict[str, str] = {}
    for flag, path in paths:
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise PathError(f"{seen[key]} and {flag} both name {path!r}; give each output its own file")
        seen[key] = flag
        check_output(path, force, flag)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool, flag: str = "output") -> Iterator[Path]:
    """A temporary path in the target's folder to write to; renamed over `path` when the block
    ends without an exception, removed otherwise."""
    p = check_output(path, force, flag)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp" + p.suffix, dir=p.parent if str(p.parent) else ".")
    os.close(fd)
    try:
        yield Path(tmp)
        # checked again: another process may have created the file meanwhile
        if not force and p.exists():
            raise PathError(f"{str(path)!r} appeared while autopar was writing it; pass --force to overwrite it")
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes it private; give it a new file's mode
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str, force: bool, flag: str = "output") -> None:
    with atomic_path(path, force, flag) as tmp:
        tmp.write_text(text)


def read_text(path: str | os.PathLike, what: str) -> str:
    """A user's input file as text, or a one-line error naming `what` it was meant to be."""
    p = Path(path)
    if not p.exists():
        raise PathError(f"{what} {str(path)!r} does not exist")
    if p.is_dir():
        raise PathError(f"{what} {str(path)!r} is a folder, not a file")
    try:
        return p.read_text()
    except PermissionError:
        raise PathError(f"{what} {str(path)!r} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise PathError(f"{what} {str(path)!r} is not a text file") from None
    except OSError as e:
        raise PathError(f"{what} {str(path)!r} cannot be read: {e.strerror or e}") from None
