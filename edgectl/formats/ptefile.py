"""Read pieces of a `.pte` without the runtime: named-data blobs and constant methods.

Used for two things:
- metadata (`edgectl_meta`, `edgectl_tokenizer`) in ~1 ms, where executing the constant
  method through the Python binding copies slowly (~12 ms for 2 MB);
- the tied embedding: XNNPACK keeps the output head's weight in the program's named data
  (key = sha256 of its bytes); the runtime maps that blob read-only and passes it to the
  program as the embedding table, so the matrix is stored once (see export.py).

Parses the flatbuffer with the readers generated inside the executorch wheel. A file a
loaded manifest names is checked against its sha256 first (integrity.ensure), and a header
that cannot be parsed is a one-line error naming the file, never a Python exception from
the reader."""

from __future__ import annotations

import importlib
import mmap
import os
import pkgutil
from functools import lru_cache
from pathlib import Path

from edgectl.util.errors import EdgectlError

# integrity registers its `ensure` here when imported (it is, wherever a manifest is loaded):
# a file a loaded manifest names is checked before its header is read.
BEFORE_READ: list = []

_FB = "executorch.exir._serialize.generated.executorch_flatbuffer"


@lru_cache(maxsize=1)
def _flatbuffer_classes():
    from edgectl.util.env import quiet_import_logs

    quiet_import_logs()  # importing executorch imports torchao
    pkg = importlib.import_module(_FB)
    mods = {n: importlib.import_module(f"{_FB}.{n}") for _, n, _ in pkgutil.iter_modules(pkg.__path__)}
    # executorch 1.4.1: generated modules name sibling tables by bare name, which the
    # package __init__ binds to the *modules*; rebind them to the classes.
    for m in mods.values():
        for name, other in mods.items():
            if hasattr(other, name):
                setattr(m, name, getattr(other, name))
    return mods["Program"].Program, mods["Tensor"].Tensor, mods["KernelTypes"].KernelTypes.Tensor


def _program(path: Path):
    for check in BEFORE_READ:
        check(path)
    Program, _, _ = _flatbuffer_classes()
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 32 or head[4:8] != b"ET12" or head[8:12] != b"eh00":
            raise EdgectlError(f"{path}: not an ExecuTorch program with segments")
        size = int.from_bytes(head[16:24], "little")
        seg_base = int.from_bytes(head[24:32], "little")
        f.seek(0)
        buf = f.read(size)
    if len(buf) < size:
        raise EdgectlError(f"{path}: truncated: {os.path.getsize(path)} bytes, its header needs {size} for the program alone")
    return Program.GetRootAs(buf, 0), seg_base


def _readable(fn):
    """Turn whatever the flatbuffer reader raises on a damaged header into one EdgectlError."""

    def wrapper(path, *args):
        try:
            return fn(path, *args)
        except (EdgectlError, OSError):
            raise
        except Exception as e:  # noqa: BLE001  struct.error, IndexError, AttributeError on None, ...
            raise EdgectlError(f"{path}: damaged: its program header cannot be read ({type(e).__name__})",
                               hint="re-export it, or copy it again") from e

    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


@_readable
def program_end(path: Path) -> int:
    """Bytes the program occupies: its header says where the last segment ends."""
    p, seg_base = _program(path)
    return max([seg_base + p.Segments(i).Offset() + p.Segments(i).Size() for i in range(p.SegmentsLength())]
               or [seg_base])


@_readable
def named_data(path: Path) -> dict[str, tuple[int, int]]:
    """{key: (file offset, size)} of every named-data blob."""
    p, seg_base = _program(path)
    out = {}
    for i in range(p.NamedDataLength()):
        nd = p.NamedData(i)
        seg = p.Segments(nd.SegmentIndex())
        out[nd.Key().decode()] = (seg_base + seg.Offset(), seg.Size())
    return out


def map_blob(path: Path, key: str) -> tuple[memoryview, int]:
    """A read-only, zero-copy view of one named blob (backed by the page cache), and where
    it starts in the file (and in the view's `.obj`, the whole file's mmap)."""
    table = named_data(path)
    if key not in table:
        raise EdgectlError(f"{path}: named data {key[:12]}… is missing; the file is damaged or not from this edgectl")
    off, size = table[key]
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return memoryview(mm)[off : off + size], off


@_readable
def constant_bytes(path: Path, method: str) -> bytes:
    """The bytes of a constant method returning a uint8 tensor."""
    _, Tensor, KT_TENSOR = _flatbuffer_classes()
    p, seg_base = _program(path)
    for i in range(p.ExecutionPlanLength()):
        plan = p.ExecutionPlan(i)
        if plan.Name().decode() != method:
            continue
        ev = plan.Values(plan.Outputs(0))
        if ev.ValType() != KT_TENSOR:
            break
        t, tab = Tensor(), ev.Val()
        t.Init(tab.Bytes, tab.Pos)
        numel = 1
        for j in range(t.SizesLength()):
            numel *= t.Sizes(j)
        cs = p.ConstantSegment()
        seg = p.Segments(cs.SegmentIndex())
        with open(path, "rb") as f:
            f.seek(seg_base + seg.Offset() + cs.Offsets(t.DataBufferIdx()))
            return f.read(numel)
    raise EdgectlError(f"{path}: no constant method {method!r}", hint="is it an edgectl .pte?")


