"""Atomic, durable writes: readers see the old file (or directory) or the new one, never half of one, and
what was written survives a crash or power loss once the call returns.

Files go to a temporary name in the same directory, are flushed to disk (fsync), renamed over the target,
and the directory entry is flushed too. Directories are built under a staging name beside the target and
renamed into place; `exchange_dirs` swaps two directories in one step where the OS can.
"""

from __future__ import annotations

import ctypes
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


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (created, renamed, removed names) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # e.g. a platform without directory file descriptors: nothing more can be done
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories; their renames are what they are
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """Flush every file of a directory tree, then the directories themselves (deepest first)."""
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, flush it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the target gets normal permissions
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

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


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the OS or the
    filesystem cannot; then nothing was changed."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(a))


def install_dir(staging_dir: Path, final_dir: Path, *, replace: bool) -> bool:
    """Rename `staging_dir` to `final_dir`. Returns True if ours was installed.

    A rename onto a missing (or empty) directory is atomic. If `final_dir` already has content:
    with `replace=False` the existing one wins and ours is deleted (another process built the same
    thing first); with `replace=True` the two are swapped in one step and the old one deleted (where the
    OS cannot swap, the old one is moved aside first: for a moment `final_dir` is missing, never half-written).
    """
    try:
        os.replace(staging_dir, final_dir)
        fsync_dir(final_dir.parent)
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            shutil.rmtree(staging_dir, ignore_errors=True)
            raise
    if not replace:
        shutil.rmtree(staging_dir, ignore_errors=True)
        return False
    if exchange_dirs(staging_dir, final_dir):
        fsync_dir(final_dir.parent)
        shutil.rmtree(staging_dir, ignore_errors=True)  # now the old content
        return True
    old_dir = final_dir.with_name(f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(final_dir, old_dir)
    os.replace(staging_dir, final_dir)
    fsync_dir(final_dir.parent)
    shutil.rmtree(old_dir, ignore_errors=True)
    return True
