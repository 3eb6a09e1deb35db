"""Read pieces of a `.pte` without the runtime: named-data blobs and constant methods.

Used for two things:
- metadata (`edgectl_meta`, `edgectl_tokenizer`) in ~1 ms, where executing the constant
  method through the Python binding copies slowly (~12 ms for 2 MB);
- the tied embedding: XNNPACK keeps the output head's weight in the program's named data
  (key = sha256 of its bytes); the runtime maps that blob read-only and passes it to the
  program as the embedding table, so the matrix is stored once (see export.py).

Parses the flatbuffer itself (`struct` over the program's bytes, the few tables and fields
of executorch/schema/program.fbs it needs), so reading metadata imports neither executorch
nor torch. A file a loaded manifest names is checked against its sha256 first
(integrity.ensure), and a header that cannot be parsed is a one-line error naming the file,
never a Python exception from the reader: every offset is checked against the buffer."""

from __future__ import annotations

import mmap
import os
import struct
from functools import cached_property
from pathlib import Path

from edgectl.util.errors import EdgectlError

# integrity registers its `ensure` here when imported (it is, wherever a manifest is loaded):
# a file a loaded manifest names is checked before its header is read.
BEFORE_READ: list = []

_U8, _U16, _I32, _U32, _U64 = (struct.Struct("<" + c) for c in "BHiIQ")
KERNEL_TYPE_TENSOR = 5  # KernelTypes: NONE, Null, Int, Bool, Double, Tensor, ...

# Field slots (program.fbs, no deprecated fields: slot i's vtable entry is at 4 + 2*i; a
# union takes two, its type then its value). Read as 0 and 1 below: DataSegment (offset,
# size), SubsegmentOffsets (segment_index, offsets), NamedData (key, segment_index),
# BackendDelegate (id).
PROGRAM_EXECUTION_PLAN, PROGRAM_SEGMENTS, PROGRAM_CONSTANT_SEGMENT, PROGRAM_NAMED_DATA = 1, 4, 5, 7
PLAN_NAME, PLAN_VALUES, PLAN_OUTPUTS, PLAN_DELEGATES = 0, 2, 4, 7
EVALUE_TYPE, EVALUE_VAL = 0, 1
TENSOR_SIZES, TENSOR_DATA_BUFFER_IDX = 2, 5


class _Damaged(ValueError):
    """An offset or length that leaves the program's bytes."""


def _get(buf, s: struct.Struct, at: int):
    # Past the end, unpack_from raises struct.error; a negative offset it would count from
    # the end, but the one offset found by subtraction (a table's vtable) is checked in _Table.
    return s.unpack_from(buf, at)[0]


class _Table:
    """One flatbuffer table at `pos`: its fields by slot, each read checked against the buffer."""

    __slots__ = ("buf", "pos", "vt", "vt_size")

    def __init__(self, buf, pos: int):
        self.buf, self.pos = buf, pos
        self.vt = pos - _get(buf, _I32, pos)
        if self.vt < 0:
            raise _Damaged(f"the table at {pos} has its vtable at {self.vt}")
        self.vt_size = _get(buf, _U16, self.vt)

    def _field(self, slot: int) -> int | None:
        entry = 4 + 2 * slot
        rel = _get(self.buf, _U16, self.vt + entry) if entry + 2 <= self.vt_size else 0
        return self.pos + rel if rel else None

    def scalar(self, slot: int, s: struct.Struct = _U32, default: int = 0) -> int:
        at = self._field(slot)
        return default if at is None else _get(self.buf, s, at)

    def _target(self, slot: int) -> int | None:
        """Where the table, vector or string a field's offset names starts."""
        at = self._field(slot)
        return None if at is None else at + _get(self.buf, _U32, at)

    def _vector(self, slot: int, item: int) -> tuple[int, int]:
        """(first element, length) of a vector of `item`-byte elements; (0, 0) when absent."""
        at = self._target(slot)
        if at is None:
            return 0, 0
        n = _get(self.buf, _U32, at)
        if at + 4 + n * item > len(self.buf):
            raise _Damaged(f"a vector of {n} at {at} is outside {len(self.buf)} bytes")
        return at + 4, n

    def table(self, slot: int) -> _Table | None:
        at = self._target(slot)
        return None if at is None else _Table(self.buf, at)

    def string(self, slot: int) -> str | None:
        at, n = self._vector(slot, 1)
        return None if not at else self.buf[at : at + n].decode()

    def scalars(self, slot: int, s: struct.Struct) -> list[int]:
        at, n = self._vector(slot, s.size)
        return [v for (v,) in s.iter_unpack(self.buf[at : at + n * s.size])] if n else []

    def tables(self, slot: int) -> list[_Table]:
        at, n = self._vector(slot, 4)
        return [_Table(self.buf, p + _get(self.buf, _U32, p)) for p in range(at, at + 4 * n, 4)]

    def index(self, slot: int, i: int) -> _Table:
        """Element `i` of a vector of tables, without reading the others."""
        at, n = self._vector(slot, 4)
        if not 0 <= i < n:
            raise _Damaged(f"index {i} of a vector of {n}")
        p = at + 4 * i
        return _Table(self.buf, p + _get(self.buf, _U32, p))


class Plan:
    """One execution plan (a method): its name, the backend ids its delegates name, and its
    table (values and outputs are read on demand: a model's plan holds thousands)."""

    __slots__ = ("name", "delegates", "table")

    def __init__(self, table: _Table):
        self.name: str = table.string(PLAN_NAME) or ""
        self.delegates: tuple[str, ...] = tuple(d.string(0) or "" for d in table.tables(PLAN_DELEGATES))
        self.table = table


class Program:
    """What edgectl reads of a program's header. Its plans are read at once (delegate_ids,
    outside this module, then meets no parse error); the rest when first used, inside the
    readers below, which turn a parse error into EdgectlError. Segment offsets count from
    the segment base."""

    def __init__(self, buf):
        self._root = _Table(buf, _get(buf, _U32, 0))
        self.plans = tuple(Plan(p) for p in self._root.tables(PROGRAM_EXECUTION_PLAN))

    @cached_property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """(offset, size) of every segment."""
        return tuple((s.scalar(0, _U64), s.scalar(1, _U64)) for s in self._root.tables(PROGRAM_SEGMENTS))

    def segment(self, i: int) -> tuple[int, int]:
        s = self._root.index(PROGRAM_SEGMENTS, i)
        return s.scalar(0, _U64), s.scalar(1, _U64)

    @cached_property
    def named_data(self) -> tuple[tuple[str, int], ...]:
        """(key, segment index) of every named blob."""
        return tuple((nd.string(0) or "", nd.scalar(1)) for nd in self._root.tables(PROGRAM_NAMED_DATA))

    @cached_property
    def constant_segment(self) -> tuple[int, tuple[int, ...]] | None:
        """(segment index, offset of each constant in it), or None for a program without one."""
        cs = self._root.table(PROGRAM_CONSTANT_SEGMENT)
        return None if cs is None else (cs.scalar(0), tuple(cs.scalars(1, _U64)))


def _readable(fn):
    """Turn whatever the flatbuffer reader raises on a damaged header into one EdgectlError."""

    def wrapper(path, *args):
        try:
            return fn(path, *args)
        except (EdgectlError, OSError):
            raise
        except Exception as e:  # noqa: BLE001  _Damaged, UnicodeDecodeError, OverflowError, ...
            raise EdgectlError(f"{path}: damaged: its program header cannot be read ({type(e).__name__})",
                               hint="re-export it, or copy it again") from e

    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


@_readable
def _program(path: Path) -> tuple[Program, int]:
    """The program's header, parsed, and the file offset its segments' offsets count from."""
    for check in BEFORE_READ:
        check(path)
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 32 or head[4:8] != b"ET12" or head[8:12] != b"eh00":
            raise EdgectlError(f"{path}: not an ExecuTorch program with segments")
        size = int.from_bytes(head[16:24], "little")
        seg_base = int.from_bytes(head[24:32], "little")
        have = os.fstat(f.fileno()).st_size
        if have < size:
            raise EdgectlError(f"{path}: truncated: {have} bytes, its header needs {size} for the program alone")
        f.seek(0)
        buf = f.read(size)
    return Program(buf), seg_base


@_readable
def program_end(path: Path) -> int:
    """Bytes the program occupies: its header says where the last segment ends."""
    p, seg_base = _program(path)
    return max([seg_base + off + size for off, size in p.segments] or [seg_base])


@_readable
def named_data(path: Path) -> dict[str, tuple[int, int]]:
    """{key: (file offset, size)} of every named-data blob."""
    p, seg_base = _program(path)
    segments = p.segments
    out = {}
    for key, index in p.named_data:
        if not 0 <= index < len(segments):
            raise _Damaged(f"named data {key[:12]} is in segment {index} of {len(segments)}")
        off, size = segments[index]
        out[key] = (seg_base + off, size)
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
    p, seg_base = _program(path)
    for plan in p.plans:
        if plan.name != method:
            continue
        outputs = plan.table.scalars(PLAN_OUTPUTS, _I32)
        if not outputs:
            raise _Damaged(f"method {method!r} has no outputs")
        ev = plan.table.index(PLAN_VALUES, outputs[0])
        if ev.scalar(EVALUE_TYPE, _U8) != KERNEL_TYPE_TENSOR:
            break
        val = ev.table(EVALUE_VAL)
        if val is None:
            raise _Damaged(f"method {method!r} returns a tensor without a table")
        numel = 1
        for d in val.scalars(TENSOR_SIZES, _I32):
            numel *= d
        if p.constant_segment is None:
            raise _Damaged("no constant segment")
        index, offsets = p.constant_segment
        buffer_idx = val.scalar(TENSOR_DATA_BUFFER_IDX)
        if not 0 <= buffer_idx < len(offsets) or numel < 0:
            raise _Damaged(f"constant {buffer_idx} of {len(offsets)}, {numel} elements")
        start = seg_base + p.segment(index)[0] + offsets[buffer_idx]
        with open(path, "rb") as f:
            n = min(numel, os.fstat(f.fileno()).st_size - start)  # what is there of it, as read() gives
            if n <= 0:
                return b""
            f.seek(start)
            return f.read(n)
    raise EdgectlError(f"{path}: no constant method {method!r}", hint="is it an edgectl .pte?")
