"""Files written whole or not at all (write_atomic, replace_dir) and page-cache advice (advise)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, data_writer: Callable[[object], None]) -> int:
    """Write through a temporary file in the same directory and rename it into place, so
    `path` is either the old file, the complete new one, or absent, even on Ctrl-C."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            data_writer(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished temporary directory into place; an older `out_dir` is swapped out
    first and removed after, so `out_dir` is always either complete or the old one."""
    import shutil

    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def advise(path: Path, advice: int) -> bool:
    """posix_fadvise(advice) over the whole of `path` (os.POSIX_FADV_WILLNEED: read it
    ahead in the background; DONTNEED: drop its unmapped pages). False if it cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, advice)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
