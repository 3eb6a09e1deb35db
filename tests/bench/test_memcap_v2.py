"""bench --cgroup on cgroup v2, against a STAND-IN for a real cgroup v2 kernel.

This host (and CI) mounts cgroup v1, so the v2 code cannot run on a real unified hierarchy
here. `StandInKernel` is a directory tree laid out as the kernel lays out /sys/fs/cgroup,
whose files memcap writes through the stand-in: it makes a group's files on mkdir, moves a
pid between groups' cgroup.procs, refuses what the kernel refuses (EBUSY under the
no-internal-processes rule, rmdir of a populated group) and plays the kernel's counters
(memory.peak, memory.events) where a test says what the child did. A real v2 kernel (a
Raspberry Pi OS or current Debian host, as root) is what these tests do not replace: there
`tests/bench/test_bench_budget.py::test_memcap_kills_a_child_over_its_cap` runs on v2.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgectl.bench import memcap
from edgectl.util.errors import EdgectlError

MB = 1024 * 1024
EVENTS0 = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"


class StandInKernel:
    """A stand-in for a real cgroup v2 kernel: a tmp directory as /sys/fs/cgroup, and
    memcap's _write/_mkdir/_rmdir answered as the kernel would answer them."""

    def __init__(self, root: Path, *, peak: bool = True, swap: bool = True, ns_root: bool = False):
        self.root, self.peak, self.swap = root, peak, swap
        self.ns_root = ns_root  # a container's namespace root: not exempt from the no-internal-processes rule
        root.mkdir()
        self._files(root, "cpuset cpu io memory pids")

    def _files(self, group: Path, controllers: str) -> None:
        (group / "cgroup.procs").write_text("")
        (group / "cgroup.controllers").write_text(controllers + "\n")
        (group / "cgroup.subtree_control").write_text("\n")
        if group != self.root and "memory" in controllers.split():
            (group / "memory.max").write_text("max\n")
            (group / "memory.current").write_text("0\n")
            (group / "memory.events").write_text(EVENTS0)
            if self.peak:
                (group / "memory.peak").write_text("0\n")
            if self.swap:
                (group / "memory.swap.max").write_text("max\n")

    def group(self, rel: str, procs: tuple[int, ...] = (), subtree: str = "") -> Path:
        """Make the group `rel` (and its parents) as systemd would have: `subtree` enabled."""
        g = self.root
        for part in rel.strip("/").split("/"):
            if not (g / part).is_dir():
                self.mkdir(g / part)
            g = g / part
        if subtree:
            (g / "cgroup.subtree_control").write_text(subtree + "\n")
        (g / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs))
        return g

    def procs(self, group: Path) -> list[str]:
        return (group / "cgroup.procs").read_text().split()

    def _exempt(self, group: Path) -> bool:
        return group == self.root and not self.ns_root

    def mkdir(self, path: Path) -> None:
        path.mkdir()  # FileExistsError as the kernel's EEXIST
        self._files(path, (path.parent / "cgroup.subtree_control").read_text().strip())

    def rmdir(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if self.procs(path) or any(p.is_dir() for p in path.iterdir()):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        shutil.rmtree(path)  # the group's files go with it

    def write(self, path: Path, text: str) -> None:
        group = path.parent
        if not path.exists():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))  # cgroupfs makes no files
        if path.name == "cgroup.procs":
            if not self._exempt(group) and (group / "cgroup.subtree_control").read_text().split():
                raise OSError(errno.EBUSY, "Device or resource busy", str(path))
            pid = text.strip()
            for f in self.root.rglob("cgroup.procs"):  # a process is in exactly one group
                f.write_text("".join(f"{p}\n" for p in f.read_text().split() if p != pid))
            path.write_text(path.read_text() + f"{pid}\n")
        elif path.name == "cgroup.subtree_control":
            have = path.read_text().split()
            for word in text.split():
                ctl = word[1:]
                if ctl not in (group / "cgroup.controllers").read_text().split():
                    raise OSError(errno.ENOENT, "No such file or directory", str(path))
                if word[0] == "+" and not self._exempt(group) and self.procs(group):
                    raise OSError(errno.EBUSY, "Device or resource busy", str(path))
                have = [c for c in have if c != ctl] + ([ctl] if word[0] == "+" else [])
            path.write_text(" ".join(have) + "\n")
        else:
            path.write_text(text)

    def exited(self, pid: int) -> None:
        """The process ended: the kernel takes it out of its group."""
        for f in self.root.rglob("cgroup.procs"):
            f.write_text("".join(f"{p}\n" for p in f.read_text().split() if p != str(pid)))


@pytest.fixture
def v2(tmp_path, monkeypatch):
    """Point memcap at a stand-in cgroup v2 kernel; returns a function making it (options:
    StandInKernel's) with this process in group `own` (as /proc/self/cgroup says)."""

    def make(own: str = "/", **options) -> StandInKernel:
        kernel = StandInKernel(tmp_path / "cgroup", **options)
        self_cgroup = tmp_path / "self-cgroup"
        self_cgroup.write_text(f"0::{own}\n")
        monkeypatch.setattr(memcap, "V2_ROOT", kernel.root)
        monkeypatch.setattr(memcap, "V1_ROOT", tmp_path / "no-v1")
        monkeypatch.setattr(memcap, "PROC_SELF_CGROUP", self_cgroup)
        monkeypatch.setattr(memcap, "_write", kernel.write)
        monkeypatch.setattr(memcap, "_mkdir", kernel.mkdir)
        monkeypatch.setattr(memcap, "_rmdir", kernel.rmdir)
        monkeypatch.setattr(memcap.os, "geteuid", lambda: 0)
        return kernel

    return make


def _systemd_session(kernel: StandInKernel) -> Path:
    """A login session as systemd lays it out: memory enabled down to the user's slice, this
    process in its session scope (a leaf)."""
    kernel.group("/", subtree="cpu io memory pids")
    kernel.group("/user.slice", subtree="cpu memory pids")
    kernel.group("/user.slice/user-0.slice", subtree="memory pids")
    return kernel.group("/user.slice/user-0.slice/session-1.scope", procs=(1234, os.getpid()))


def test_stand_in_v2_caps_a_child_under_the_users_slice(v2):
    """Stand-in for a real cgroup v2 kernel: the group goes under the nearest parent with
    memory enabled for its children (nothing enabled, nothing moved), memory.max = the cap,
    memory.swap.max = 0, the child joins it, and figures() reads memory.peak and
    memory.events into the keys v1 gives."""
    kernel = v2("/user.slice/user-0.slice/session-1.scope")
    scope = _systemd_session(kernel)
    before = {p: p.read_text() for p in kernel.root.rglob("cgroup.subtree_control")}
    assert memcap.unavailable() is None
    with memcap.MemCap(64 * MB) as cap:
        assert cap.version == "v2"
        assert cap.path.parent == kernel.root / "user.slice" / "user-0.slice"
        assert cap.path.name.startswith(f"edgectl-{os.getpid()}-")
        assert (cap.path / "memory.max").read_text() == f"{64 * MB}\n"
        assert (cap.path / "memory.swap.max").read_text() == "0\n"
        p = subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=cap.preexec)
        assert p.wait() == 0 and kernel.procs(cap.path) == [str(p.pid)]  # it ran in the group
        kernel.exited(p.pid)
        (cap.path / "memory.peak").write_text(f"{60 * MB}\n")  # what the kernel counted
        (cap.path / "memory.events").write_text(EVENTS0.replace("max 0", "max 17").replace("oom_kill 0", "oom_kill 1"))
        assert cap.figures() == {"cgroup_limit": 64 * MB, "cgroup_peak": 60 * MB, "cgroup_failcnt": 17, "cgroup_oom_kills": 1}
    assert not cap.path.exists()
    assert {p: p.read_text() for p in kernel.root.rglob("cgroup.subtree_control")} == before
    assert kernel.procs(scope) == ["1234", str(os.getpid())]


def test_stand_in_v2_uncapped_group_only_measures(v2):
    """Stand-in for a real cgroup v2 kernel: MemCap(None) leaves memory.max and
    memory.swap.max at the kernel's "max" and still reads the peak."""
    kernel = v2("/user.slice/user-0.slice/session-1.scope")
    _systemd_session(kernel)
    with memcap.MemCap(None) as cap:
        assert (cap.path / "memory.max").read_text() == "max\n"
        assert (cap.path / "memory.swap.max").read_text() == "max\n"
        (cap.path / "memory.peak").write_text(f"{300 * MB}\n")
        assert cap.figures() == {"cgroup_limit": None, "cgroup_peak": 300 * MB, "cgroup_failcnt": 0, "cgroup_oom_kills": 0}


def test_stand_in_v2_enables_memory_at_the_root_when_no_parent_has_it(v2):
    """Stand-in for a real cgroup v2 kernel: no group on the way up has memory enabled for
    its children and the ones holding processes may not enable it: the root (exempt from
    the no-internal-processes rule) gets +memory, and the group goes there. No swap
    accounting: memory.swap.max is absent and left alone."""
    kernel = v2("/system.slice/edgectl.service", swap=False)
    kernel.group("/", procs=(1,), subtree="cpu pids")
    kernel.group("/system.slice", subtree="cpu pids")
    kernel.group("/system.slice/edgectl.service", procs=(os.getpid(),))
    with memcap.MemCap(32 * MB) as cap:
        assert cap.path.parent == kernel.root
        assert (kernel.root / "cgroup.subtree_control").read_text().split() == ["cpu", "pids", "memory"]
        assert (cap.path / "memory.max").read_text() == f"{32 * MB}\n" and not (cap.path / "memory.swap.max").exists()


def test_stand_in_v2_container_root_holding_processes_is_refused(v2):
    """Stand-in for a real cgroup v2 kernel: a container's own namespace root ("0::/")
    holding the container's processes cannot enable the memory controller for children
    (EBUSY): --cgroup says so and gives the command that makes a leaf for them; edgectl
    moves nobody itself."""
    kernel = v2("/", ns_root=True)
    kernel.group("/", procs=(1, os.getpid()))
    with pytest.raises(EdgectlError) as e:
        memcap.MemCap(32 * MB)
    assert "no-internal-processes" in str(e.value) and "Device or resource busy" in str(e.value)
    assert f"mkdir {kernel.root}/init" in e.value.hint
    assert kernel.procs(kernel.root) == ["1", str(os.getpid())]
    assert [p for p in kernel.root.iterdir() if p.is_dir()] == []


def test_stand_in_v2_without_memory_peak_says_why(v2):
    """Stand-in for a real cgroup v2 kernel older than 5.19 (no memory.peak): the peak is
    None, and a note says why."""
    kernel = v2("/user.slice/user-0.slice/session-1.scope", peak=False)
    _systemd_session(kernel)
    with memcap.MemCap(64 * MB) as cap:
        fig = cap.figures()
    assert fig["cgroup_peak"] is None and "memory.peak needs Linux 5.19" in fig["cgroup_note"]
    assert fig["cgroup_failcnt"] == fig["cgroup_oom_kills"] == 0


def test_stand_in_v2_close_moves_a_straggler_back(v2):
    """Stand-in for a real cgroup v2 kernel: a process still in the group at close() (a
    child's child that outlived it) goes back to this process's own group, then the group
    is removed."""
    kernel = v2("/user.slice/user-0.slice/session-1.scope")
    scope = _systemd_session(kernel)
    cap = memcap.MemCap(64 * MB)
    kernel.write(cap.path / "cgroup.procs", "4242\n")
    cap.close()
    assert not cap.path.exists() and "4242" in kernel.procs(scope)


def test_stand_in_v2_hierarchy_without_memory_controller(v2, tmp_path):
    """Stand-in for a real cgroup v2 kernel whose hierarchy lacks the memory controller
    (and no v1 one): unavailable() says so."""
    kernel = v2("/")
    (kernel.root / "cgroup.controllers").write_text("cpu io pids\n")
    assert "no memory controller in the cgroup v2 hierarchy" in memcap.unavailable()
    with pytest.raises(EdgectlError, match="--cgroup: no memory controller"):
        memcap.MemCap(None)
