#!/usr/bin/env bash
# The built wheel, not the source tree: build it from a copy of this checkout (the files a
# clone holds; a platform wheel with the native shim compiled in), install it (not
# editable) into a fresh venv, and from outside any checkout load the shipped shim (no
# compiler run), list the shipped recipes, export
# stories260K (from the edgectl cache, scripts/fetch_models.py) and generate from it, once with edgectl's interface and
# once through the shipped smollm2-135m-android recipe (ExecuTorch's stock interface).
# Prints each step's seconds on stderr; exits non-zero on the first failure.
#   bash scripts/wheel_smoke.sh [WORKDIR]     (default: a temporary directory, removed after)
# pip's cache is used as usual, so a second run downloads nothing. $PYTHON picks the
# interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
if [ $# -ge 1 ]; then
  WORK=$1; mkdir -p "$WORK"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgectl-wheel.XXXXXX"); trap 'rm -rf "$WORK"' EXIT
fi
WORK=$(cd "$WORK" && pwd)
STORIES=$("$PY" scripts/fetch_models.py --model stories260K)  # the cache's copy (before EDGECTL_CACHE is set below)
T0=$SECONDS; LAST=$SECONDS
step() { echo "wheel_smoke: $1 ($((SECONDS - LAST)) s)" >&2; LAST=$SECONDS; }

# 1. the wheel, from the files a clone would hold (no stale build/ of this checkout)
rm -rf "$WORK/src" "$WORK/dist" "$WORK/venv" "$WORK/run"
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) \
    | while IFS= read -r -d '' f; do if [ -e "$ROOT/$f" ]; then printf '%s\0' "$f"; fi; done \
    | tar -C "$ROOT" --null -T - -cf - | tar -C "$WORK/src" -xf -
else  # a copy without .git (.ci/run's): everything but what a build or a run leaves
  tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=.pytest_cache -cf - . | tar -C "$WORK/src" -xf -
fi
EDGECTL_REQUIRE_SHIM=1 "$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"  # no shim: an error
WHEEL=$(ls "$WORK"/dist/edgectl-*.whl)
"$PY" - "$WHEEL" "$ROOT" <<'PY'
import sys, zipfile
from pathlib import Path
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
root = Path(sys.argv[2])
want = {p.relative_to(root).as_posix() for p in [*root.glob("edgectl/runtime/_native/*.cpp"), *root.glob("edgectl/recipes/*.toml")]}
want |= {p.relative_to(root).as_posix() for p in root.glob("edgectl/**/*.py")}
want |= {"edgectl/runtime/_native/etshim.so", "edgectl/runtime/_native/etshim.json"}  # the shim, its stamp
missing = sorted(want - names)
if missing or not any(n.endswith(".toml") for n in want):
    sys.exit(f"wheel_smoke: the wheel lacks {missing}")
tag = Path(sys.argv[1]).stem.split("-")[-1]
if not tag.startswith(("linux_", "manylinux")):
    sys.exit(f"wheel_smoke: {Path(sys.argv[1]).name} is not a Linux platform wheel")
PY
step "built and checked $(basename "$WHEEL")"

# 2. a fresh venv with the wheel and its dependencies
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"
step "installed into a fresh venv"

# 3. from outside any checkout: the installed package, not the source
mkdir -p "$WORK/run"; cd "$WORK/run"
export EDGECTL_CACHE="$WORK/cache"   # empty: a shim compiled on first use would land here
BIN=$WORK/venv/bin
SHIM=$("$BIN/python" -c 'import sysconfig; print(sysconfig.get_path("platlib"))')/edgectl/runtime/_native/etshim.so
"$BIN/python" -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$SHIM"  # alone: its rpath finds the runtime
"$BIN/python" - "$WORK/venv" "$SHIM" <<'PY'
import importlib, os, sys
from pathlib import Path
import edgectl
from edgectl.runtime import _native
where = Path(edgectl.__file__).resolve()
assert where.is_relative_to(Path(sys.argv[1]).resolve()), f"edgectl imported from {where}, not the venv"
assert _native.load() is not None, f"native shim: {_native.why_not()}"
so, why = importlib.import_module("edgectl.runtime._native.build").prebuilt()
assert so is not None and so.resolve() == Path(sys.argv[2]).resolve(), f"the shipped shim is not used: {why}"
assert not (Path(os.environ["EDGECTL_CACHE"]) / "native").exists(), "the shim was compiled, not taken from the wheel"
PY
step "imported from the venv, the wheel's native shim loaded"
n_recipes=$("$BIN/edgectl" recipes | wc -l)
[ "$n_recipes" -eq "$(ls "$ROOT"/edgectl/recipes/*.toml | wc -l)" ] || { echo "wheel_smoke: edgectl recipes listed $n_recipes" >&2; exit 1; }
step "edgectl recipes: $n_recipes"

check_lily() {  # greedy stories260K continues "Once upon a time" with a girl named Lily
  "$BIN/python" -c 'import json, sys; d = json.load(open(sys.argv[1])); t = d["text"]
assert "Lily" in t and d["stats"]["new_tokens"] == 24, t; print("wheel_smoke:  ", repr(t), file=sys.stderr)' "$1"
}
"$BIN/edgectl" export "$STORIES" -o s.pte --max-seq-len 128 >/dev/null
"$BIN/edgectl" run s.pte -p "Once upon a time" -n 24 --json > s.json
check_lily s.json
step "export + run (edgectl interface)"
"$BIN/edgectl" export "$STORIES" --recipe smollm2-135m-android -o a.pte >/dev/null
ls a.tokenizer.* >/dev/null   # the tokenizer file stock runners take, beside the .pte
"$BIN/python" -c 'import json, sys; from pathlib import Path; from edgectl.formats.ptefile import constant_bytes
meta = json.loads(constant_bytes(Path(sys.argv[1]), "edgectl_meta")); assert meta["interface"] == "stock", meta' a.pte
"$BIN/edgectl" run a.pte -p "Once upon a time" -n 24 --json > a.json
check_lily a.json
step "export --recipe smollm2-135m-android + run (stock interface)"
echo "wheel_smoke: ok in $((SECONDS - T0)) s" >&2
