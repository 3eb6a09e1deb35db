"""A content-addressed store on the device: files sent over ssh once, by sha256, resumed and
verified on arrival; a shard set becomes a directory of links into it.

    ~/.cache/edgectl/store/<sha256><ext>      every file sent (a .pte, a tokenizer, a text file)
    ~/.cache/edgectl/sets/<sha256 of manifest.json>/   a shard set: its files hard-linked
                                              from the store under their own names, its own
                                              copy of manifest.json (`shard --remeasure` on
                                              the device rewrites that copy only)

A file arrives as `<name>.part` (appended to, so an interrupted send resumes at its length),
is hashed there (sha256sum, else the device's Python) and renamed only if it matches. A set
directory is built as `<dir>.tmp` and renamed, so it is complete or absent.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgectl.device.ssh import run_ssh, ssh_argv, ssh_error
from edgectl.device.target import Target
from edgectl.formats.integrity import sha256_file
from edgectl.util import ui
from edgectl.util.errors import EdgectlError, UsageError

STORE = "$HOME/.cache/edgectl/store"  # as the device's shell expands it
SETS = "$HOME/.cache/edgectl/sets"
CHUNK = 1 << 20
LARGE = 8 << 20  # progress lines from this size on
FULL_DISK = "no space left on device"


@dataclass(frozen=True)
class Item:
    """A local file and its name in the device's store."""

    path: Path
    sha: str
    ext: str

    @property
    def remote(self) -> str:
        return remote_path(self.sha, self.ext)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def remote_path(sha: str, ext: str = ".pte") -> str:
    """The store's name for a file with this sha256, for the device's shell (no quoting needed:
    hex and a plain suffix)."""
    return f"{STORE}/{sha}{ext}"


def _ext(path: Path) -> str:
    ext = "".join(path.suffixes[-1:])
    return ext if ext[1:].isalnum() else ""


def _item(path: Path) -> Item:
    return Item(path, sha256_file(path), _ext(path))


def _check_command(items: list[Item]) -> str:
    """One line per item: `have SIZE`, or `part SIZE` (what an interrupted send left, 0 if none)."""
    lines = [f"mkdir -p {STORE} || exit 1"]
    for it in items:
        f = it.remote
        lines.append(f'f={f}; if [ -f "$f" ]; then echo "have $(wc -c < "$f")"; '
                     f'elif [ -f "$f.part" ]; then echo "part $(wc -c < "$f.part")"; else echo "part 0"; fi')
    return "\n".join(lines)


def _verify_command(items: list[Item]) -> str:
    """One line per item: `ok`, or `bad <sha256 found>` (the `.part` is removed)."""
    lines = ['h() { if command -v sha256sum >/dev/null 2>&1; then s=$(sha256sum < "$1"); else '
             's=$(python3 -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())" '
             '< "$1"); fi; echo "${s%% *}"; }']
    for it in items:
        f = it.remote
        lines.append(f'f={f}; s=$(h "$f.part"); if [ "$s" = {it.sha} ]; then mv -f "$f.part" "$f" && echo ok; '
                     'else rm -f "$f.part"; echo "bad $s"; fi')
    return "\n".join(lines)


def _answers(target: Target, r: subprocess.CompletedProcess, what: str, n: int) -> list[list[str]]:
    lines = [ln.split() for ln in r.stdout.strip().splitlines() if ln.strip()]
    if r.returncode != 0 or len(lines) < n:
        err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        raise _disk_error(target, what, r.returncode, err[-1].strip() if err else "no message")
    return lines[-n:]


def _disk_error(target: Target, what: str, rc: int, line: str) -> EdgectlError:
    if FULL_DISK in line.lower():
        return EdgectlError(f"{what} failed: the disk of {target.name} is full ({line})",
                            hint="free space there: rm -r ~/.cache/edgectl/store ~/.cache/edgectl/sets removes "
                                 "everything edgectl sent")
    return EdgectlError(f"{what} failed on {target.name} (exit {rc}): {line}",
                        hint="check the device's free disk space under ~/.cache/edgectl")


class _Progress:
    """`sent X of Y MB` lines on stderr for large sends (a line per quarter when not a terminal)."""

    def __init__(self, total: int):
        self.total, self.sent, self.shown = total, 0, 0
        self.tty = ui.err.is_terminal

    def add(self, n: int) -> None:
        self.sent += n
        if self.total >= LARGE and (self.sent - self.shown >= (CHUNK * 4 if self.tty else self.total // 4)
                                    or self.sent == self.total):
            ui.err.print(f"sent {self.sent / 1e6:.1f} of {self.total / 1e6:.1f} MB", end="\r" if self.tty else "\n")
            self.shown = self.sent

    def done(self) -> None:
        if self.tty and self.total >= LARGE:
            ui.err.print()


def _upload(target: Target, it: Item, offset: int, progress: _Progress) -> None:
    """Append the file's bytes from `offset` to the device's `.part` file through one ssh."""
    proc = subprocess.Popen(ssh_argv(target, f'cat >> "{it.remote}.part"'), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with open(it.path, "rb") as src:
            src.seek(offset)
            while chunk := src.read(CHUNK):
                proc.stdin.write(chunk)
                progress.add(len(chunk))
        proc.stdin.close()
    except BrokenPipeError:
        pass
    except KeyboardInterrupt:
        proc.kill()  # the `.part` keeps what arrived: the next run resumes from there
        raise
    err = proc.stderr.read().decode(errors="replace")
    rc = proc.wait()
    if rc == 255:
        raise ssh_error(target, err)
    if rc != 0:
        last = err.strip().splitlines()[-1] if err.strip() else "no message"
        if FULL_DISK in last.lower():
            raise _disk_error(target, f"sending {it.path.name}", rc, last)
        raise EdgectlError(f"sending {it.path.name} to {target.name} failed (exit {rc}): {last}",
                           hint="run again to resume; check the device's free disk space")


def _send_items(target: Target, items: list[Item]) -> None:
    """Make sure the store holds every item: check all in one ssh, send what is missing (or
    resume its `.part`), verify all that arrived in one ssh."""
    items = list({it.remote: it for it in items}.values())
    answers = _answers(target, run_ssh(target, _check_command(items)), "checking the store", len(items))
    todo: list[tuple[Item, int]] = []
    restart = []
    for it, (kind, n) in zip(items, (a[:2] for a in answers)):
        size, n = it.size, int(n)
        if kind == "have" and n == size:
            continue
        if kind != "part" or n > size:  # a file of the wrong size under the name, or a longer .part
            restart.append(it)
            n = 0
        todo.append((it, n))
    if not todo:
        ui.info(f"on device already: {_where(items)}")
        return
    if restart:
        run_ssh(target, "rm -f " + " ".join(f'"{it.remote}" "{it.remote}.part"' for it in restart))
    total = sum(it.size - off for it, off in todo)
    resumed = sum(off for _, off in todo)
    names = todo[0][0].path.name if len(todo) == 1 else f"{len(todo)} files"
    size = f"{total / 1e6:.1f} MB" + (f" left of {(total + resumed) / 1e6:.1f} MB" if resumed else "")
    ui.info(f"sending {names} ({size}) to {target.name}: {_where([it for it, _ in todo])}"
            + (f", resuming at {resumed / 1e6:.1f} MB already there" if resumed else ""))
    progress = _Progress(total)
    for it, off in todo:
        if off < it.size:
            _upload(target, it, off, progress)
    progress.done()
    sent = [it for it, _ in todo]
    for it, words in zip(sent, _answers(target, run_ssh(target, _verify_command(sent)), "verifying the sent files",
                                        len(sent))):
        if words[0] != "ok":
            found = words[-1][:12] if len(words) > 1 else "?"
            raise EdgectlError(f"{it.path.name} arrived damaged on {target.name}: sha256 {found}…, "
                               f"expected {it.sha[:12]}… (the partial file is removed)", hint="run again to send it afresh")


def _where(items: list[Item]) -> str:
    it = items[0]
    return f"~/.cache/edgectl/store/{it.sha[:12]}…{it.ext}" + (f" (+{len(items) - 1} more)" if len(items) > 1 else "")


def clean(target: Target, dry_run: bool = False) -> dict:
    """Empty what edgectl sent to the device (the store and the shard-set directories; a run in
    progress keeps the files it has open): {files, sets, bytes, removed}. `dry_run`: count only."""
    r = run_ssh(target, f'n=$(find "{STORE}" -type f 2>/dev/null | wc -l); m=$(ls "{SETS}" 2>/dev/null | wc -l); '
                        f'k=$(du -skc "{STORE}" "{SETS}" 2>/dev/null | tail -n 1 | cut -f 1); echo "$n $m ${{k:-0}}"'
                        + ("" if dry_run else f' && rm -rf "{STORE}" "{SETS}"'))
    return clean_result(target, r.returncode, r.stdout, r.stderr, dry_run)


def clean_result(target: Target, rc: int, out: str, err: str, dry_run: bool) -> dict:
    """The counts line a clean command printed, as clean()'s dict."""
    words = out.strip().splitlines()[-1].split() if out.strip() else []
    if rc != 0 or len(words) != 3 or not all(w.isdigit() for w in words):
        last = (err or out).strip().splitlines()
        raise EdgectlError(f"cleaning edgectl's files on {target.name} failed (exit {rc}): {last[-1] if last else 'no message'}")
    return {"device": target.name, "files": int(words[0]), "sets": int(words[1]), "bytes": int(words[2]) * 1024,
            "removed": not dry_run}


def _need_ssh() -> None:
    if shutil.which("ssh") is None:
        raise EdgectlError("no ssh client on this machine", hint="install OpenSSH's client (apt install openssh-client)")


def send(target: Target, path: Path) -> str:
    """Make sure the device's store holds the file `path`; returns its remote path (for the
    device's shell). Sends nothing when it is there; resumes a `.part` left by an interrupted send."""
    if path.is_dir():
        raise UsageError(f"{path}: a directory", hint="send_set sends shard sets")
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    _need_ssh()
    it = _item(path)
    _send_items(target, [it])
    return it.remote


def set_files(directory: Path) -> list[Path]:
    """The files of a shard set that go to the device: every regular file but hidden ones and
    leftovers of an interrupted write."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts)
                  and not p.name.endswith((".tmp", ".part")))


def send_set(target: Target, directory: Path) -> str:
    """Make sure the device holds the shard set `directory`; returns its remote directory (for
    the device's shell). Its files go to the store (what is there already is not sent again);
    the set directory is built from links to them, with its own manifest.json."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        raise UsageError(f"{directory}: not a shard set (no manifest.json)", hint="make one with `edgectl shard`")
    _need_ssh()
    msha = sha256_file(manifest)
    remote_dir = f"{SETS}/{msha}"
    r = run_ssh(target, f'[ -f "{remote_dir}/.complete" ] && echo have || echo none')
    if r.stdout.strip().endswith("have"):
        ui.info(f"on device already: ~/.cache/edgectl/sets/{msha[:12]}… ({directory.name})")
        return remote_dir
    files = set_files(directory)
    ui.info(f"hashing {len(files)} files of {directory.name}")
    items = {p: _item(p) for p in files}
    _send_items(target, list(items.values()))
    lines = [f'd={remote_dir}; rm -rf "$d.tmp"; mkdir -p "$d.tmp" || exit 1']
    for p, it in items.items():
        rel = p.relative_to(directory).as_posix()
        dst = '"$d.tmp"/' + shlex.quote(rel)
        if "/" in rel:
            lines.append(f'mkdir -p "$(dirname {dst})" || exit 1')
        if rel == "manifest.json":  # its own copy: `--remeasure` there rewrites it
            lines.append(f'cp "{it.remote}" {dst} || exit 1')
        else:
            lines.append(f'ln -f "{it.remote}" {dst} 2>/dev/null || cp "{it.remote}" {dst} || exit 1')
    lines.append('touch "$d.tmp/.complete" && rm -rf "$d" && mv "$d.tmp" "$d" && echo ok')
    _answers(target, run_ssh(target, "\n".join(lines)), f"assembling {directory.name}", 1)
    return remote_dir

