"""The no-skip check CI runs: `pytest --skip-report` (tests/conftest.py) records every skip
with its reason, and .ci/check_skips.py fails on any reason .ci/allowed-skips does not allow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / ".ci" / "check_skips.py"

SAMPLE = '''
import pytest
from conftest import needs_hardware

def test_runs():
    pass

def test_hardware():
    needs_hardware("a Vulkan device")

def test_missing_file():
    pytest.skip("some file not found")

@pytest.fixture
def absent():
    pytest.skip("fixture gave up")

def test_fixture_skip(absent):
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail():
    assert False
'''


def _run_sample(tmp_path: Path, *files: tuple[str, str]) -> dict:
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    for name, text in files:
        (tmp_path / name).write_text(text)
    report = tmp_path / "skips.json"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--skip-report", str(report)],
                   cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return json.loads(report.read_text())


def _check(report: dict, tmp_path: Path, allow: Path | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    argv = [sys.executable, str(CHECK), str(path), *(["--allow", str(allow)] if allow else [])]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_skip_report_records_every_skip_and_its_reason(tmp_path):
    report = _run_sample(tmp_path, ("test_sample.py", SAMPLE),
                         ("test_gone.py", "import pytest\npytest.importorskip('no_such_module_here')\n"))
    reasons = {s["test"].split("::")[-1]: s["reason"] for s in report["skipped"]}
    assert report["collected"] == 5 and report["exitstatus"] == 0
    assert reasons == {"test_hardware": "needs hardware: a Vulkan device", "test_missing_file": "some file not found",
                       "test_fixture_skip": "fixture gave up",
                       "test_gone.py": "could not import 'no_such_module_here': No module named 'no_such_module_here'"}


def test_check_skips_allows_hardware_only(tmp_path):
    hw = {"test": "t.py::a", "reason": "needs hardware: a Vulkan device"}
    other = {"test": "t.py::b", "reason": "stories260K not found in ../shared/models"}
    ok = _check({"collected": 3, "skipped": [hw]}, tmp_path)
    assert ok.returncode == 0 and "allowed: t.py::a" in ok.stderr
    bad = _check({"collected": 3, "skipped": [hw, other]}, tmp_path)
    assert bad.returncode == 1 and "NOT ALLOWED: t.py::b: stories260K not found" in bad.stderr
    assert _check({"collected": 0, "skipped": []}, tmp_path).returncode == 1  # nothing ran is no pass
    allow = tmp_path / "allow"
    allow.write_text("# comment\n\nshared/models\n")
    assert _check({"collected": 3, "skipped": [other]}, tmp_path, allow).returncode == 0
    assert _check({"collected": 3, "skipped": [hw]}, tmp_path, allow).returncode == 1
    missing = subprocess.run([sys.executable, str(CHECK), str(tmp_path / "none.json")], capture_output=True, text=True)
    assert missing.returncode == 1
