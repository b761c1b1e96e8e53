"""Atomic writes: readers see the old file (or directory) or the new one, never half of one.

Files go to a temporary name in the same directory and are renamed over the target; directories are
built under a staging name beside the target and renamed into place.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from aios import jsonio


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the target gets normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, data) -> None:
    """Strict JSON (non-finite floats as null), written atomically."""
    atomic_write_text(path, jsonio.dumps(data, indent=2, sort_keys=True) + "\n")


def make_staging_dir(final_dir: Path) -> Path:
    """An empty directory next to `final_dir` (same filesystem, so the final rename is atomic)."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would carry over to the installed directory. os.mkdir
    # applies the umask like any other directory; the random suffix keeps concurrent writers apart.
    staging = final_dir.with_name(f".{final_dir.name}.staging-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    return staging


def install_dir(staging_dir: Path, final_dir: Path, *, replace: bool) -> bool:
    """Rename `staging_dir` to `final_dir`. Returns True if ours was installed.

    A rename onto a missing (or empty) directory is atomic. If `final_dir` already has content:
    with `replace=False` the existing one wins and ours is deleted (another process built the same
    thing first); with `replace=True` the old one is moved aside, ours renamed in, the old deleted.
    Linux has no atomic swap of two directories, so for a moment `final_dir` may be missing, but it
    is never half-written.
    """
    try:
        os.replace(staging_dir, final_dir)
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            shutil.rmtree(staging_dir, ignore_errors=True)
            raise
    if not replace:
        shutil.rmtree(staging_dir, ignore_errors=True)
        return False
    old_dir = final_dir.with_name(f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(final_dir, old_dir)
    os.replace(staging_dir, final_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    return True
