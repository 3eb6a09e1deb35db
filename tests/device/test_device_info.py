"""`edgectl device info TARGET`: target parsing, ssh's failures as one-line errors, and the
info script's facts, with stand-ins for `ssh` put first on PATH; then the real thing against
the emulated aarch64 board (skips, needs hardware, where it is not built)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from edgectl.cli.main import main
from edgectl.device.target import Target, parse_target
from edgectl.util.errors import UsageError
from edgectl.util.version import __version__


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("ssh:board", Target("ssh", host="board")),
    ("ssh:pi@raspberrypi.local", Target("ssh", host="raspberrypi.local", user="pi")),
    ("ssh:root@127.0.0.1:2222", Target("ssh", host="127.0.0.1", user="root", port=2222)),
    ("ssh:10.0.0.7:22", Target("ssh", host="10.0.0.7", port=22)),
    ("adb:R58M123ABC", Target("adb", serial="R58M123ABC")),
])
def test_parse_valid(text, want):
    assert parse_target(text) == want


@pytest.mark.parametrize("text", [
    "board", "ssh:", "ssh:pi@", "ssh:@host", "ssh:host:", "ssh:host:0", "ssh:host:70000",
    "ssh:host:port", "ssh:-oProxyCommand=x", "ssh:ho st", "tcp:host", "adb:", "adb:a b",
])
def test_parse_invalid(text):
    with pytest.raises(UsageError):
        parse_target(text)


def test_cli_bad_target_is_usage_error(capsys):
    rc, out, err = _run(capsys, "device", "info", "raspberrypi")
    assert rc == 2 and out == "" and "not a device target" in err


def test_adb_not_supported_yet(capsys):
    rc, out, err = _run(capsys, "device", "info", "adb:R58M123ABC")
    assert rc == 2 and out == ""
    assert "not supported yet" in err and len(err.strip().splitlines()) == 1


# -- stand-ins for ssh -----------------------------------------------------------------


def _stand_in(tmp_path: Path, monkeypatch, body: str) -> Path:
    """A stand-in for `ssh`, first on PATH: records its arguments to args.json, then `body`
    (a shell script; "$last" is the remote command ssh would have run on the device)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ssh = bindir / "ssh"
    ssh.write_text(
        "#!/bin/sh\n"
        "# stand-in for ssh (tests/device/test_device_info.py): no network, no sshd\n"
        f"{sys.executable} -c 'import json, sys; json.dump(sys.argv[2:], open(sys.argv[1], \"w\"))' "
        f"{tmp_path / 'args.json'} \"$@\" 2>/dev/null\n"
        'for a; do last=$a; done\n'
        f"cd {tmp_path}\n"
        f"{body}\n")
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


@pytest.mark.parametrize("stderr, want", [
    ("ssh: connect to host x port 22: Connection refused", "cannot reach me@x: ssh: connect to host x port 22: Connection refused"),
    ("ssh: connect to host x port 22: Connection timed out", "cannot reach me@x: "),
    ("ssh: Could not resolve hostname x: Name or service not known", "cannot reach me@x: "),
    ("me@x: Permission denied (publickey).", "authentication to me@x failed: me@x: Permission denied (publickey)."),
])
def test_ssh_failures_are_one_line(capsys, tmp_path, monkeypatch, stderr, want):
    _stand_in(tmp_path, monkeypatch, f"echo '{stderr}' >&2; exit 255")
    rc, out, err = _run(capsys, "device", "info", "ssh:me@x")
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("edgectl: error: " + want)


def _fake_edgectl(tmp_path: Path) -> Path:
    """A directory holding a fake `edgectl` console script whose first line names this
    Python, as pip writes it: the remote command must pick that Python."""
    d = tmp_path / "devicebin"
    d.mkdir()
    (d / "edgectl").write_text(f"#!{sys.executable}\nraise SystemExit('not run')\n")
    (d / "edgectl").chmod(0o755)
    return d


def test_info_runs_the_script_with_edgectls_python(capsys, tmp_path, monkeypatch):
    d = _fake_edgectl(tmp_path)
    _stand_in(tmp_path, monkeypatch, f'PATH={d}:/usr/bin:/bin exec /bin/sh -c "$last"')
    monkeypatch.setenv("EDGECTL_SSH_OPTS", "-F /dev/null -o LogLevel=ERROR")
    rc, out, err = _run(capsys, "device", "info", "ssh:me@x:2200", "--json")
    assert rc == 0, err
    facts = json.loads(out)
    assert set(facts) >= {"machine", "cpu", "cores", "mem_total_mb", "mem_available_mb", "disk_free_gb",
                          "python", "edgectl", "executorch", "native_shim", "native_why_not"}
    assert facts["edgectl"] == __version__ and facts["python_path"] == sys.executable
    assert isinstance(facts["native_shim"], bool) and facts["cores"] >= 1
    assert "warning" not in err
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[:4] == ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    assert args[4:8] == ["-F", "/dev/null", "-o", "LogLevel=ERROR"]
    assert args[8:14] == ["-p", "2200", "-l", "me", "--", "x"]


def test_facts_without_the_shim(tmp_path, monkeypatch):
    """bench's row labels ask for the facts only: the script then leaves the runtime library alone."""
    from edgectl.device.info import device_info
    from edgectl.device.target import parse_target

    d = _fake_edgectl(tmp_path)
    _stand_in(tmp_path, monkeypatch, f'PATH={d}:/usr/bin:/bin exec /bin/sh -c "$last"')
    monkeypatch.setenv("EDGECTL_SSH_OPTS", "-F /dev/null")
    full, facts = device_info(parse_target("ssh:x")), device_info(parse_target("ssh:x"), shim=False)
    assert full["native_shim"] is True and "native_shim_prebuilt" in full  # this checkout's shim loads here
    assert facts["native_shim"] is False and facts["native_why_not"] is None and "native_shim_prebuilt" not in facts
    assert {k: v for k, v in full.items() if not k.startswith(("native", "mem_available", "disk_free"))} == \
        {k: v for k, v in facts.items() if not k.startswith(("native", "mem_available", "disk_free"))}


def test_info_human_output_and_version_warning(capsys, tmp_path, monkeypatch):
    _stand_in(tmp_path, monkeypatch, f"exec {sys.executable} -")
    monkeypatch.setattr("edgectl.util.version.__version__", "0.0.0-local")
    rc, out, err = _run(capsys, "device", "info", "ssh:x")
    assert rc == 0, err
    keys = [line.split(":", 1)[0] for line in out.splitlines()]
    assert keys == ["device", "machine", "cpu", "memory", "disk free", "python", "edgectl", "executorch", "native shim"]
    assert f"edgectl:     {__version__}" in out
    assert "warning:" in err and "0.0.0-local" in err and len(err.strip().splitlines()) == 1


def test_no_edgectl_on_device(capsys, tmp_path, monkeypatch):
    # -S: no site-packages, so neither edgectl nor executorch is installed for this Python
    _stand_in(tmp_path, monkeypatch, f"exec {sys.executable} -S -")
    rc, out, err = _run(capsys, "device", "info", "ssh:pi@x")
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "edgectl is not installed on pi@x" in err and "pip install edgectl" in err and "arm64-board.sh wheel" in err


def test_no_python_on_device(capsys, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    _stand_in(tmp_path, monkeypatch, f'PATH={empty} exec /bin/sh -c "$last"')
    rc, out, err = _run(capsys, "device", "info", "ssh:x")
    assert rc == 1 and out == ""
    assert err.startswith("edgectl: error: no python3 on x") and len(err.strip().splitlines()) == 1


# -- the emulated aarch64 board ----------------------------------------------------------

from test_arm64_board import BOARD, board  # noqa: E402,F401  (the fixture: starts/stops the board)


@pytest.mark.arm64
def test_board_device_info(capsys, board, tmp_path, monkeypatch):  # noqa: F811
    """Through the board's own ssh settings, given for 127.0.0.1 as well as for its alias."""
    port = (BOARD / "port").read_text().strip()
    config = tmp_path / "ssh_config"
    config.write_text((BOARD / "ssh_config").read_text().replace("Host board\n", "Host board 127.0.0.1\n", 1))
    monkeypatch.setenv("EDGECTL_SSH_OPTS", f"-F {config}")
    rc, out, err = _run(capsys, "device", "info", f"ssh:root@127.0.0.1:{port}", "--json")
    assert rc == 0, err
    facts = json.loads(out)
    assert facts["machine"] == "aarch64"
    assert facts["executorch"] and facts["edgectl"]
    # the board installs edgectl from its own linux_aarch64 wheel (arm64-board.sh wheel): the shim ships in it
    assert facts["native_shim"] and facts["native_shim_prebuilt"], facts
