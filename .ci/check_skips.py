#!/usr/bin/env python3
"""Fail a test run in which a test skipped for any reason but an allowed one.

    python .ci/check_skips.py SKIP_REPORT [--allow .ci/allowed-skips]

SKIP_REPORT is the JSON that `pytest --skip-report PATH` writes (tests/conftest.py):
the tests collected and every skipped test with its reason. Each line of the allow file
that is neither blank nor a comment is a regular expression; a skip is allowed when one
of them matches its reason (re.search). Prints every skip, marked allowed or not.
Exit 0: every skip allowed; 1: a skip that is not, or no report, or no test collected.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DEFAULT_ALLOW = Path(__file__).resolve().with_name("allowed-skips")


def allowed_patterns(path: Path) -> list[re.Pattern]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [re.compile(line) for line in lines if line and not line.startswith("#")]


def check(report: dict, patterns: list[re.Pattern]) -> list[dict]:
    """The skips no pattern allows."""
    return [s for s in report["skipped"] if not any(p.search(s["reason"]) for p in patterns)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--allow", type=Path, default=DEFAULT_ALLOW, help=f"default {DEFAULT_ALLOW}")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        patterns = allowed_patterns(args.allow)
    except (OSError, ValueError, re.error) as exc:
        print(f"check_skips: {exc}", file=sys.stderr)
        return 1
    bad = check(report, patterns)
    for s in report["skipped"]:
        mark = "NOT ALLOWED" if s in bad else "allowed"
        print(f"check_skips: {mark}: {s['test']}: {s['reason']}", file=sys.stderr)
    n = report.get("collected", 0)
    print(f"check_skips: {n} tests collected, {len(report['skipped'])} skipped, {len(bad)} not allowed",
          file=sys.stderr)
    if n == 0:
        print("check_skips: no test was collected", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
