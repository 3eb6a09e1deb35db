"""`edgectl run --device`: the device's store (sent once, by sha256; resumed; verified) and the
run there, streamed back, with a stand-in for `ssh` first on PATH that runs the remote command
here (HOME a tmp dir, so the store is local); then the emulated aarch64 board (skips where it is
not built)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgectl.cli.main import main
from helpers import build_shard_set, default_sigint
from test_device_info import _stand_in

ARGS = ["-p", "Once upon a time", "-n", "16", "--temperature", "0"]


@pytest.fixture(scope="module")
def stories_shards(tmp_path_factory, stories_dir) -> Path:
    """stories260K as fp32 per-layer shards (as tests/runtime's fixture)."""
    return build_shard_set(stories_dir, tmp_path_factory.mktemp("shards") / "stories", 512, ("fp32",))


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _device(tmp_path: Path, monkeypatch, python: str = sys.executable) -> Path:
    """The stand-in for `ssh` of test_device_info (no network, no sshd), first on PATH: runs
    the remote command with /bin/sh -c here, HOME=tmp_path/home, an `edgectl` whose first line
    names `python` first on PATH. Returns that HOME (the store is under it)."""
    home, devbin = tmp_path / "home", tmp_path / "devicebin"
    for d in (home, devbin):
        d.mkdir()
    (devbin / "edgectl").write_text(f"#!{python}\nraise SystemExit('not run')\n")
    (devbin / "edgectl").chmod(0o755)
    _stand_in(tmp_path, monkeypatch, f'HOME={home} PATH={devbin}:/usr/bin:/bin exec /bin/sh -c "$last"')
    return home


def _store(home: Path) -> Path:
    return home / ".cache" / "edgectl" / "store"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_first_run_sends_second_sends_nothing(capsys, tmp_path, monkeypatch, stories_pte):
    home = _device(tmp_path, monkeypatch)
    rc, local_out, _ = _run(capsys, "run", stories_pte, *ARGS)
    assert rc == 0 and local_out.strip()
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:pi@board", *ARGS)
    assert rc == 0, err
    stored = _store(home) / f"{_sha(stories_pte)}.pte"
    assert stored.read_bytes() == stories_pte.read_bytes()
    assert "sending stories260K.pte" in err and "on device already" not in err
    assert out == local_out  # the device's text, streamed back
    assert "decode" in err  # the device's stats, on stderr
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:pi@board", *ARGS)
    assert rc == 0, err
    assert "on device already" in err and "sending" not in err and out == local_out
    assert [p.name for p in _store(home).iterdir()] == [stored.name]


def test_interrupted_send_resumes(capsys, tmp_path, monkeypatch, stories_pte):
    home = _device(tmp_path, monkeypatch)
    data = stories_pte.read_bytes()
    part = _store(home) / f"{_sha(stories_pte)}.pte.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[: len(data) // 3])
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:board", *ARGS)
    assert rc == 0, err
    left, whole = (len(data) - len(data) // 3) / 1e6, len(data) / 1e6
    assert f"({left:.1f} MB left of {whole:.1f} MB)" in err and f"resuming at {len(data) // 3 / 1e6:.1f} MB" in err
    assert not part.exists() and (_store(home) / f"{_sha(stories_pte)}.pte").read_bytes() == data


def test_damaged_part_is_detected_and_removed(capsys, tmp_path, monkeypatch, stories_pte):
    home = _device(tmp_path, monkeypatch)
    data = stories_pte.read_bytes()
    part = _store(home) / f"{_sha(stories_pte)}.pte.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 100 + data[100: len(data) // 2])  # wrong bytes, then the rest appended
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:board", *ARGS)
    assert rc == 1 and out == ""
    assert "arrived damaged on board" in err and "partial file is removed" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("edgectl: error")]) == 1
    assert list(_store(home).iterdir()) == []
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:board", *ARGS)  # afresh
    assert rc == 0 and out.strip(), err


def test_remote_exit_status_and_quoting(capsys, tmp_path, monkeypatch):
    _device(tmp_path, monkeypatch)
    pte = tmp_path / "not-a-program.pte"
    pte.write_bytes(b"not a program")
    rc, out, err = _run(capsys, "run", pte, "--device", "ssh:board", "-p", "it's \"$HOME\" `x`; 'y'", "-n", "2")
    assert rc == 1 and out == ""
    assert "edgectl: error" in err  # the device's one-line error, passed through


def test_usage_errors(capsys, tmp_path, monkeypatch, stories_pte):
    _device(tmp_path, monkeypatch)
    rc, out, err = _run(capsys, "run", tmp_path, "--device", "ssh:board", "-p", "x")
    assert rc == 2 and "not a shard set (no manifest.json)" in err
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:board", "-p", "x", "--memory-budget", "30 parsecs")
    assert rc == 2 and "--memory-budget" not in out
    for device in ("ssh:board", "adb:standin-0"):  # one check, before the adb/ssh split
        rc, out, err = _run(capsys, "run", tmp_path / "absent.pte", "--device", device, "-p", "x")
        assert rc == 2 and out == "" and "no such file" in err, device
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    assert not (tmp_path / "args.json").exists()  # no ssh at all


def _fake_python(tmp_path: Path, version_answer: str) -> str:
    """A device `python` whose edgectl version probe answers with `version_answer` (a shell
    fragment) and which otherwise fails loudly (the run must not start)."""
    fake = tmp_path / "fakepy"
    fake.mkdir()
    (fake / "python").write_text(f'#!/bin/sh\ncase "$2" in *importlib.metadata*) {version_answer} ;; esac\n'
                                 'echo "the run started" >&2; exit 3\n')
    (fake / "python").chmod(0o755)
    return str(fake / "python")


def test_version_mismatch_is_one_line(capsys, tmp_path, monkeypatch, stories_pte):
    from edgectl.util.version import __version__

    _device(tmp_path, monkeypatch, python=_fake_python(tmp_path, "echo 0.0.1; exit 0"))
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:pi@board", *ARGS)
    assert rc == 1 and out == ""
    errors = [ln for ln in err.splitlines() if ln.startswith("edgectl: error")]
    assert len(errors) == 1
    assert errors[0].startswith(f"edgectl: error: pi@board has edgectl 0.0.1, this machine {__version__}: the two must match")
    assert "the run started" not in err and f"pip install edgectl=={__version__}" in err


def test_no_edgectl_on_the_device(capsys, tmp_path, monkeypatch, stories_pte):
    _device(tmp_path, monkeypatch, python=_fake_python(tmp_path, "echo 'No module named edgectl' >&2; exit 1"))
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:board", *ARGS)
    assert rc == 1 and "edgectl: error: edgectl is not installed on board" in err
    assert "pip install edgectl" in err and "the run started" not in err


def test_full_disk_is_one_line(capsys, tmp_path, monkeypatch, stories_pte):
    """The device's `cat` fails as a full disk makes it fail."""
    home = _device(tmp_path, monkeypatch)
    (tmp_path / "devicebin" / "cat").write_text('#!/bin/sh\necho "cat: write error: No space left on device" >&2\n'
                                               'exit 1\n')
    (tmp_path / "devicebin" / "cat").chmod(0o755)
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:board", *ARGS)
    assert rc == 1 and out == ""
    errors = [ln for ln in err.splitlines() if ln.startswith("edgectl: error")]
    assert len(errors) == 1 and "the disk of board is full" in errors[0], err
    assert not (_store(home) / f"{_sha(stories_pte)}.pte").exists()


def test_shard_set_sent_once_and_remeasured_once(capsys, tmp_path, monkeypatch, stories_shards):
    """A shard set: its files to the store, a set directory of links with its own manifest;
    a budgeted run re-measures the set on the device once, and prints what the local run prints."""
    home = _device(tmp_path, monkeypatch)
    budget = ["--memory-budget", "400MB"]
    rc, local_out, _ = _run(capsys, "run", stories_shards, *ARGS)
    assert rc == 0 and local_out.strip()
    rc, out, err = _run(capsys, "run", stories_shards, "--device", "ssh:board", *ARGS, *budget)
    assert rc == 0, err
    assert out == local_out and "sending" in err and "measuring stories on board" in err
    sets = home / ".cache" / "edgectl" / "sets"
    (set_dir,) = sets.iterdir()
    assert set_dir.name == _sha(stories_shards / "manifest.json")
    assert (set_dir / ".remeasured").is_file()
    for f in stories_shards.iterdir():
        if f.name != "manifest.json" and f.is_file():
            assert (set_dir / f.name).samefile(_store(home) / f"{_sha(f)}{f.suffix}")  # a link, not a copy
    rc, out, err = _run(capsys, "run", stories_shards, "--device", "ssh:board", *ARGS, *budget)
    assert rc == 0 and out == local_out, err
    assert "on device already" in err and "sending" not in err and "measuring" not in err
    rc, out, err = _run(capsys, "run", stories_shards, "--device", "ssh:board", "--plan", "--json", *budget)
    assert rc == 0, err
    import json

    assert json.loads(out)["budget_bytes"] == 400_000_000


def test_draft_over_ssh(capsys, tmp_path, monkeypatch, stories_pte, stories_shards):
    """--draft runs on the device as here: lookup goes as it is; a draft artifact (here the
    fp32 shard set drafting for the .pte) goes to the device first; the greedy text is the
    local one (the target alone's); a bad spec is refused before anything is sent."""
    home = _device(tmp_path, monkeypatch)
    rc, local_out, _ = _run(capsys, "run", stories_pte, *ARGS)
    assert rc == 0
    for spec in (["--draft", "lookup:2"], ["--draft", stories_shards, "--draft-tokens", "3"]):
        rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:board", *ARGS, *spec)
        assert rc == 0, err
        assert out == local_out and "accepted" in err, spec
    assert (home / ".cache" / "edgectl" / "sets" / _sha(stories_shards / "manifest.json")).is_dir()
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:board", *ARGS, "--draft", "int3")
    assert rc == 2 and "--draft int3" in err and "sending" not in err
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "adb:phone", *ARGS, "--draft", "lookup")
    assert rc == 2 and "--draft is not supported with adb" in err and err.strip().count("\n") == 0


def test_large_send_shows_progress(capsys, tmp_path, monkeypatch):
    """Off a TTY: a few `sent X of Y MB` lines; the device's `python` here only says done."""
    fake = tmp_path / "fake"
    fake.mkdir()
    from edgectl.util.version import __version__

    (fake / "python").write_text(f'#!/bin/sh\ncase "$2" in *importlib.metadata*) echo {__version__}; exit 0 ;; esac\n'
                                 "echo done\n")
    (fake / "python").chmod(0o755)
    home = _device(tmp_path, monkeypatch, python=str(fake / "python"))
    pte = tmp_path / "big.pte"
    pte.write_bytes(os.urandom(20_000_000))
    rc, out, err = _run(capsys, "run", pte, "--device", "ssh:board", "-p", "x")
    assert rc == 0 and out == "done\n", err
    assert "sent 20.0 of 20.0 MB" in err and 2 <= err.count("sent ") <= 6
    assert _sha(_store(home) / f"{_sha(pte)}.pte") == _sha(pte)


def test_ctrl_c_stops_the_remote_run(tmp_path, monkeypatch):
    """SIGINT to the local edgectl: it exits 130 and the device's run (here a `python` that
    sleeps, recording its pid) is gone."""
    slow = tmp_path / "slow"
    slow.mkdir()
    from edgectl.util.version import __version__

    (slow / "python").write_text(f'#!/bin/sh\ncase "$2" in *importlib.metadata*) echo {__version__}; exit 0 ;; esac\n'
                                 f"echo $$ > {tmp_path}/remote.pid\necho started\nexec sleep 60\n")
    (slow / "python").chmod(0o755)
    _device(tmp_path, monkeypatch, python=str(slow / "python"))
    pte = tmp_path / "m.pte"
    pte.write_bytes(b"x" * 1000)
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from edgectl.cli.main import main; sys.exit(main())",
                             "run", str(pte), "--device", "ssh:board", "-p", "x"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy(),
                            preexec_fn=default_sigint)
    assert proc.stdout.readline() == b"started\n"
    pid = int((tmp_path / "remote.pid").read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except (FileNotFoundError, ProcessLookupError):
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the remote run (pid {pid}) is still running")


# -- the emulated aarch64 board ----------------------------------------------------------

from test_arm64_board import BOARD, board  # noqa: E402,F401  (the fixture: starts/stops the board)


@pytest.mark.arm64
def test_board_run(capsys, board, tmp_path, monkeypatch, stories_pte):  # noqa: F811
    port = (BOARD / "port").read_text().strip()
    config = tmp_path / "ssh_config"
    config.write_text((BOARD / "ssh_config").read_text().replace("Host board\n", "Host board 127.0.0.1\n", 1))
    monkeypatch.setenv("EDGECTL_SSH_OPTS", f"-F {config}")
    sha = _sha(stories_pte)
    board(f"rm -f ~/.cache/edgectl/store/{sha}.pte ~/.cache/edgectl/store/{sha}.pte.part")
    rc, local_out, _ = _run(capsys, "run", stories_pte, *ARGS)
    assert rc == 0
    rc, out, err = _run(capsys, "run", stories_pte, "--device", f"ssh:root@127.0.0.1:{port}", *ARGS)
    assert rc == 0, err
    sys.__stderr__.write(f"\nfirst run stderr:\n{err}")
    assert "sending stories260K.pte" in err and out == local_out
    assert board(f"sha256sum ~/.cache/edgectl/store/{sha}.pte").split()[0] == sha
    rc, out, err = _run(capsys, "run", stories_pte, "--device", f"ssh:root@127.0.0.1:{port}", *ARGS)
    assert rc == 0, err
    sys.__stderr__.write(f"second run stderr:\n{err}")
    assert "on device already" in err and "sending" not in err and out == local_out


def test_device_clean_empties_the_store(capsys, tmp_path, monkeypatch, stories_pte):
    """`device clean` counts (--dry-run) and removes what runs sent; the next run sends again."""
    home = _device(tmp_path, monkeypatch)
    assert _run(capsys, "run", stories_pte, "--device", "ssh:board", *ARGS)[0] == 0
    rc, out, err = _run(capsys, "device", "clean", "ssh:board", "--dry-run", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["files"] == 1 and res["bytes"] >= stories_pte.stat().st_size and res["removed"] is False
    assert _store(home).is_dir()
    rc, out, err = _run(capsys, "device", "clean", "ssh:board")
    assert rc == 0 and out.startswith("removed ") and "1 files" in out, err
    assert not _store(home).exists()
    rc, out, err = _run(capsys, "run", stories_pte, "--device", "ssh:board", *ARGS)
    assert rc == 0 and f"sending {stories_pte.name}" in err
