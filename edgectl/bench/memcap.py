"""Run a child process under a memory cgroup cap (for `edgectl bench --cgroup`), cgroup v1 or v2.

`MemCap(limit_bytes)` creates a group edgectl-<pid>-<n> capped at `limit_bytes` (no limit
when None), `preexec()` moves the child into it (pass it as subprocess's preexec_fn),
`figures()` reads what the group saw (peak charge, times it hit the cap, OOM kills), and
`close()` removes the group. Needs root and a memory controller; `unavailable()` says why
not, or None. Which cgroup version is used is chosen when a MemCap is made (a small backend
object, `_V1` or `_V2`); everything else is the same for both:

- cgroup v2 (the unified hierarchy at /sys/fs/cgroup, when its cgroup.controllers lists
  "memory": Raspberry Pi OS, current Debian, Ubuntu, Fedora), preferred where present:
  memory.max = limit, memory.swap.max = 0 (where swap is accounted), the peak from
  memory.peak (Linux 5.19 or later; older kernels have none: the peak is then None and
  figures() says why in "cgroup_note"), the cap hits and OOM kills from memory.events
  ("max" and "oom_kill").
  Where the group goes: v2 lets a group with the memory controller enabled for its
  children hold no processes itself (the "no internal processes" rule; the root is
  exempt). edgectl never moves other processes to make room. It walks from its own group
  (/proc/self/cgroup's "0::" line) up to the root and uses the nearest group whose
  cgroup.subtree_control already lists memory (under systemd: the user's slice, or the
  root). If none does, it enables +memory in the nearest one that holds no processes (or
  the root) and uses that. If that fails too (a container's namespace root that holds the
  container's processes), --cgroup is refused with the command that makes a leaf for them.
- cgroup v1 (/sys/fs/cgroup/memory): memory.limit_in_bytes = limit,
  memory.memsw.limit_in_bytes = limit too (where swap is accounted: the cap covers memory
  plus swap, so it cannot be escaped to swap, as in v2), the peak from
  memory.max_usage_in_bytes, the cap hits from memory.failcnt, the OOM kills from
  memory.oom_control. The group is made at the hierarchy's root.

figures() returns the same keys for both: cgroup_limit, cgroup_peak, cgroup_failcnt (v1's
failcnt; v2's "max" events, the times the group's usage hit memory.max) and
cgroup_oom_kills.

What a group counts: anonymous memory and page-cache pages the child faults in first.
Pages already in the page cache (a warm run) stay charged to whoever read them first, so a
warm run is capped on its anonymous memory and its own new file pages. Page cache is
reclaimable: over the cap the kernel drops it before it OOM-kills.
"""

from __future__ import annotations

import errno
import itertools
import os
import platform
from pathlib import Path

from edgectl.util.errors import EdgectlError

V1_ROOT = Path("/sys/fs/cgroup/memory")  # module constants: the tests point them at a stand-in tree
V2_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
_seq = itertools.count()


# the kernel's files, through three small functions (a stand-in hierarchy in the tests replaces them)
def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mkdir(path: Path) -> None:
    path.mkdir()


def _rmdir(path: Path) -> None:
    path.rmdir()


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


class _V1:
    """cgroup v1: groups at the memory hierarchy's root."""

    version = "v1"

    def __init__(self, root: Path):
        self.root = self.home = root  # home: where close() moves a group's stragglers

    def parent(self) -> Path:
        return self.root

    def set_limit(self, path: Path, limit: int) -> None:
        _write(path / "memory.limit_in_bytes", f"{limit}\n")
        if (path / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no escaping to swap
            _write(path / "memory.memsw.limit_in_bytes", f"{limit}\n")

    def figures(self, path: Path) -> dict:
        def num(name: str) -> int:
            return int((path / name).read_text().split()[0])

        oom = dict(line.split() for line in (path / "memory.oom_control").read_text().splitlines())
        return {"cgroup_peak": num("memory.max_usage_in_bytes"), "cgroup_failcnt": num("memory.failcnt"),
                "cgroup_oom_kills": int(oom.get("oom_kill", 0))}


class _V2:
    """cgroup v2: a group under the nearest group (this process's own, or a parent of it)
    that may have memory-controlled children (see the module's docstring)."""

    version = "v2"

    def __init__(self, root: Path, self_cgroup: Path):
        self.root = root
        self.home = self._own_group(self_cgroup)  # where this process is (and its children start)

    def _own_group(self, self_cgroup: Path) -> Path:
        try:
            lines = self_cgroup.read_text().splitlines()
        except OSError:
            return self.root
        for line in lines:
            if line.startswith("0::"):
                group = self.root / line[3:].strip().removesuffix(" (deleted)").lstrip("/")
                return group if group.is_dir() else self.root
        return self.root

    def parent(self) -> Path:
        chain = [self.home]
        while chain[-1] != self.root and self.root in chain[-1].parents:
            chain.append(chain[-1].parent)
        if chain[-1] != self.root:
            chain = [self.root]
        for group in chain:
            if "memory" in _words(group / "cgroup.subtree_control"):
                return group
        refused = []
        for group in chain:
            if "memory" not in _words(group / "cgroup.controllers"):
                continue
            if group != self.root and _words(group / "cgroup.procs"):
                continue  # it holds processes: enabling a controller for its children is refused
            try:
                _write(group / "cgroup.subtree_control", "+memory\n")
                return group
            except OSError as e:
                refused.append(f"{group} ({e.strerror})")
        why = f"enabling the memory controller was refused in {', '.join(refused)}" if refused else \
            f"{self.home} and its parents hold processes or lack the memory controller"
        raise EdgectlError(
            f"--cgroup: no cgroup v2 group under {self.root} can hold a memory-capped child: {why} "
            "(cgroup v2's no-internal-processes rule)",
            hint=f"move the processes of {self.root} into a leaf group first (as container init scripts do): "
                 f"mkdir {self.root}/init; for p in $(cat {self.root}/cgroup.procs); do echo $p > {self.root}/init/cgroup.procs; done")

    def set_limit(self, path: Path, limit: int) -> None:
        _write(path / "memory.max", f"{limit}\n")
        if (path / "memory.swap.max").exists():  # only where swap is accounted
            _write(path / "memory.swap.max", "0\n")

    def figures(self, path: Path) -> dict:
        events = dict(line.split() for line in (path / "memory.events").read_text().splitlines() if line.strip())
        out = {"cgroup_failcnt": int(events.get("max", 0)), "cgroup_oom_kills": int(events.get("oom_kill", 0))}
        peak = path / "memory.peak"
        if peak.exists():
            out["cgroup_peak"] = int(peak.read_text().split()[0])
        else:
            out["cgroup_peak"] = None
            out["cgroup_note"] = (f"no cgroup peak: memory.peak needs Linux 5.19 or later "
                                  f"(this kernel: {platform.release()})")
        return out


def _backend() -> _V1 | _V2 | str:
    """The backend this host supports, or why there is none."""
    if os.geteuid() != 0:
        return "a memory cgroup needs root"
    if "memory" in _words(V2_ROOT / "cgroup.controllers"):
        return _V2(V2_ROOT, PROC_SELF_CGROUP)
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        return _V1(V1_ROOT)
    if (V2_ROOT / "cgroup.controllers").exists():
        return f"no memory controller in the cgroup v2 hierarchy at {V2_ROOT} (nor a cgroup v1 one at {V1_ROOT})"
    return f"no cgroup v2 memory controller at {V2_ROOT} nor a cgroup v1 one at {V1_ROOT}"


def unavailable() -> str | None:
    b = _backend()
    return b if isinstance(b, str) else None


class MemCap:
    def __init__(self, limit_bytes: int | None):
        backend = _backend()
        if isinstance(backend, str):
            raise EdgectlError(f"--cgroup: {backend}")
        self.backend = backend
        self.version = backend.version
        self.limit = limit_bytes
        self.path = backend.parent() / f"edgectl-{os.getpid()}-{next(_seq)}"
        try:
            _mkdir(self.path)
            if limit_bytes is not None:
                backend.set_limit(self.path, int(limit_bytes))
        except OSError as e:
            self.close()
            raise EdgectlError(f"--cgroup: cannot set up {self.path} ({e.strerror})") from e

    def preexec(self) -> None:
        """In the child, before exec: join the group."""
        _write(self.path / "cgroup.procs", f"{os.getpid()}\n")

    def figures(self) -> dict:
        return {"cgroup_limit": self.limit, **self.backend.figures(self.path)}

    def close(self) -> None:
        """Remove the group (its remaining page-cache charges move to the parent)."""
        try:
            _rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:  # a straggler still in it: move it back where it came from, then remove
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            for pid in _words(self.path / "cgroup.procs"):
                try:
                    _write(self.backend.home / "cgroup.procs", f"{pid}\n")
                except OSError:
                    pass
            _rmdir(self.path)

    def __enter__(self) -> "MemCap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
