"""Crash-safe writes: a file or a whole directory appears complete or not at all.

Temporary name, fsync, rename, fsync of the parent directory. Used for the stale buffer's
checkpoints, the testbed's checkpoints and base policy, and the CPU backend's tiny-model cache.
Directories are removed by renaming them away first, so a crash mid-removal never leaves a
half-deleted directory under its real name.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def link_or_copy(source: str, destination: str) -> bool:
    """Hard-link `source` at `destination` (True), or copy it with an fsync where the filesystem
    cannot link (another device, no hard links; False). Either way `destination` is a complete file."""
    try:
        os.link(source, destination)
        return True
    except OSError:
        shutil.copyfile(source, destination)
        with open(destination, "rb+") as f:
            os.fsync(f.fileno())
        return False


# Suffixes of a directory being written (atomic_directory) or removed (remove_directory).
_LEFTOVER_SUFFIXES = (".tmp-", ".old-", ".removing-")


def remove_leftovers(final_dir: str) -> None:
    """Delete what crashed writes or removals of `final_dir` left behind."""
    for suffix in _LEFTOVER_SUFFIXES:
        for leftover in glob.glob(f"{glob.escape(final_dir)}{suffix}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def remove_directory(path: str) -> None:
    """Remove `path` so that a crash leaves it whole or gone from its name (the rest is a leftover
    that `remove_leftovers` deletes)."""
    if not os.path.exists(path):
        return
    doomed = f"{path}.removing-{os.getpid()}"
    os.replace(path, doomed)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final_dir: str):
    """Yield a fresh temporary directory; on success it replaces `final_dir` as a whole (fsynced,
    renamed), on error `final_dir` is left as it was. Leftovers of earlier crashed writes are removed."""
    os.makedirs(os.path.dirname(os.path.abspath(final_dir)), exist_ok=True)
    remove_leftovers(final_dir)
    tmp_dir = f"{final_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp_dir)
    yield tmp_dir
    fsync_dir(tmp_dir)
    if os.path.exists(final_dir):
        old = f"{final_dir}.old-{os.getpid()}"
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)
    fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
