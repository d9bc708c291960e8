"""Crash-safe writes: a file or a whole directory appears complete or not at all.

Temporary name, fsync, rename, fsync of the parent directory. Used for the stale buffer's
checkpoints, the testbed's checkpoints and base policy, and the CPU backend's tiny-model cache.
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


@contextlib.contextmanager
def atomic_directory(final_dir: str):
    """Yield a fresh temporary directory; on success it replaces `final_dir` as a whole (fsynced,
    renamed), on error `final_dir` is left as it was. Leftovers of earlier crashed writes are removed."""
    os.makedirs(os.path.dirname(os.path.abspath(final_dir)), exist_ok=True)
    for leftover in glob.glob(f"{glob.escape(final_dir)}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
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
