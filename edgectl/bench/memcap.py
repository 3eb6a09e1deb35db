"""Run a child process under a cgroup v1 memory cap (for `edgectl bench --cgroup`).

`MemCap(limit_bytes)` creates /sys/fs/cgroup/memory/edgectl-<pid>-<n> with
memory.limit_in_bytes = limit (no limit when None), `preexec()` moves the child into it
(pass it as subprocess's preexec_fn), `figures()` reads what the group saw (peak charge,
failcnt, OOM kills), and `close()` removes the group. Needs root and a cgroup v1 memory
controller; `unavailable()` says why not, or None.

What the group counts (cgroup v1): anonymous memory and page-cache pages the child
faults in first. Pages already in the page cache (a warm run) stay charged to whoever
read them first, so a warm run is capped on its anonymous memory and its own new file
pages. Page cache is reclaimable: over the cap the kernel drops it before it OOM-kills.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from edgectl.util.errors import EdgectlError

ROOT = Path("/sys/fs/cgroup/memory")
_seq = itertools.count()


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a memory cgroup needs root"
    if not (ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {ROOT}"
    return None


class MemCap:
    def __init__(self, limit_bytes: int | None):
        if why := unavailable():
            raise EdgectlError(f"--cgroup: {why}")
        self.limit = limit_bytes
        self.path = ROOT / f"edgectl-{os.getpid()}-{next(_seq)}"
        try:
            self.path.mkdir()
            if limit_bytes is not None:
                (self.path / "memory.limit_in_bytes").write_text(f"{int(limit_bytes)}\n")
        except OSError as e:
            self.close()
            raise EdgectlError(f"--cgroup: cannot set up {self.path} ({e.strerror})") from e

    def preexec(self) -> None:
        """In the child, before exec: join the group."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(f"{os.getpid()}\n")

    def figures(self) -> dict:
        def num(name: str) -> int:
            return int((self.path / name).read_text().split()[0])

        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {"cgroup_limit": self.limit, "cgroup_peak": num("memory.max_usage_in_bytes"),
                "cgroup_failcnt": num("memory.failcnt"), "cgroup_oom_kills": int(oom.get("oom_kill", 0))}

    def close(self) -> None:
        """Remove the group (its remaining page-cache charges move to the parent)."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # a straggler still in it: move it out, then remove
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (ROOT / "cgroup.procs").write_text(f"{pid}\n")
                except OSError:
                    pass
            self.path.rmdir()

    def __enter__(self) -> "MemCap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
