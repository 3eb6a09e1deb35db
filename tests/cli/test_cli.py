"""The command line as a user meets it: help, exit codes, one-line errors, no debris."""

from __future__ import annotations

import pytest

from edgectl.cli.main import main


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_commands(capsys):
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0
    for cmd in ("export", "run"):
        assert cmd in out


def test_export_help_shows_install_commands_whole(capsys, monkeypatch):
    """Square brackets in help text are rich markup unless escaped: the OpenVINO extra's
    install command must survive."""
    monkeypatch.setenv("COLUMNS", "400")
    rc, out, _ = _run(capsys, "export", "--help")
    assert rc == 0 and "pip install 'edgectl[openvino]'" in out


def test_version(capsys):
    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and out.startswith("edgectl ")


def test_usage_error_exits_2(capsys):
    rc, _, err = _run(capsys, "run")  # missing ARTIFACT and --prompt
    assert rc == 2 and "Missing" in err


def test_bad_output_suffix_is_usage_error(capsys, tmp_path):
    rc, _, err = _run(capsys, "export", "x", "-o", str(tmp_path / "model.bin"))
    assert rc == 2 and "expected a .pte" in err


def test_missing_model_is_one_line_exit_1(capsys, tmp_path):
    out_file = tmp_path / "m.pte"
    rc, out, err = _run(capsys, "export", "./does-not-exist", "-o", str(out_file))
    assert rc == 1
    assert err.strip().count("\n") == 0 and "does-not-exist" in err
    assert "Traceback" not in err
    assert not out_file.exists()


def test_offline_unknown_hub_id(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path))
    rc, _, err = _run(capsys, "export", "someorg/some-model", "-o", str(tmp_path / "m.pte"))
    assert rc == 1 and "someorg/some-model" in err and err.strip().count("\n") == 0


def test_debug_shows_traceback(capsys):
    from edgectl.util.errors import EdgectlError

    with pytest.raises(EdgectlError):
        main(["export", "./does-not-exist", "-o", "x.pte", "--debug"])


def test_not_a_pte(capsys, tmp_path):
    f = tmp_path / "junk.pte"
    f.write_bytes(b"not a program" * 10)
    rc, _, err = _run(capsys, "run", str(f), "-p", "hi")
    assert rc == 1 and "junk.pte" in err and "Traceback" not in err


def test_the_old_console_script_target_still_runs():
    """Venvs installed before the CLI became a package run `from edgectl.cli import entry`."""
    import subprocess
    import sys

    code = "import sys\nsys.argv = ['edgectl', '--version']\nfrom edgectl.cli import entry\nentry()"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("edgectl ")
