"""ptefile's own flatbuffer reader: the same answers as ExecuTorch's generated readers on a
real program, no torch imported to read metadata, and a damaged header is one EdgectlError."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgectl.backends.registry import delegate_ids
from edgectl.formats import ptefile
from edgectl.util.errors import EdgectlError

pytestmark = pytest.mark.real_model

HEAVY = ("torch", "torchao", "transformers", "executorch")


def _generated_program(path: Path):
    """The program through the readers generated inside the executorch wheel (imports torch)."""
    fb = "executorch.exir._serialize.generated.executorch_flatbuffer"
    pkg = importlib.import_module(fb)
    mods = {n: importlib.import_module(f"{fb}.{n}") for _, n, _ in pkgutil.iter_modules(pkg.__path__)}
    for m in mods.values():  # executorch 1.4.1 binds sibling tables to their modules: rebind to the classes
        for name, other in mods.items():
            if hasattr(other, name):
                setattr(m, name, getattr(other, name))
    buf = path.read_bytes()
    return mods, mods["Program"].Program.GetRootAs(buf, 0), int.from_bytes(buf[24:32], "little")


def _generated_constant(mods, p, seg_base: int, path: Path, plan) -> bytes | None:
    ev = plan.Values(plan.Outputs(0))
    if ev.ValType() != mods["KernelTypes"].KernelTypes.Tensor:
        return None
    t, tab = mods["Tensor"].Tensor(), ev.Val()
    t.Init(tab.Bytes, tab.Pos)
    numel = 1
    for j in range(t.SizesLength()):
        numel *= t.Sizes(j)
    cs = p.ConstantSegment()
    start = seg_base + p.Segments(cs.SegmentIndex()).Offset() + cs.Offsets(t.DataBufferIdx())
    return path.read_bytes()[start : start + numel]


def test_the_reader_agrees_with_executorchs_generated_readers(stories_pte):
    mods, p, seg_base = _generated_program(stories_pte)
    segs = [p.Segments(i) for i in range(p.SegmentsLength())]

    want = {}
    for i in range(p.NamedDataLength()):
        nd = p.NamedData(i)
        want[nd.Key().decode()] = (seg_base + segs[nd.SegmentIndex()].Offset(), segs[nd.SegmentIndex()].Size())
    assert want and ptefile.named_data(stories_pte) == want

    assert ptefile.program_end(stories_pte) == max(seg_base + s.Offset() + s.Size() for s in segs)

    plans = [p.ExecutionPlan(i) for i in range(p.ExecutionPlanLength())]
    ids = {plan.Delegates(j).Id().decode() for plan in plans for j in range(plan.DelegatesLength())}
    assert ids == delegate_ids(stories_pte) == {"XnnpackBackend"}

    constants = 0
    for plan in plans:
        name, expected = plan.Name().decode(), _generated_constant(mods, p, seg_base, stories_pte, plan)
        if expected is None:
            with pytest.raises(EdgectlError, match="no constant method"):
                ptefile.constant_bytes(stories_pte, name)
        else:
            assert ptefile.constant_bytes(stories_pte, name) == expected, name
            constants += 1
    assert constants >= 2  # edgectl_meta and edgectl_tokenizer at least
    assert json.loads(ptefile.constant_bytes(stories_pte, "edgectl_meta"))["format"] == "edgectl-pte/1"
    blob, off = ptefile.map_blob(stories_pte, next(iter(want)))
    assert (off, len(blob)) == next(iter(want.values()))


def test_reading_metadata_imports_no_torch(stories_pte):
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from edgectl.formats import ptefile\n"
        f"p = Path({str(stories_pte)!r})\n"
        "json.loads(ptefile.constant_bytes(p, 'edgectl_meta'))\n"
        "ptefile.constant_bytes(p, 'edgectl_tokenizer'); ptefile.named_data(p); ptefile.program_end(p)\n"
        "ptefile.map_blob(p, next(iter(ptefile.named_data(p))))\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


def _reads(path: Path) -> None:
    """Every reader on `path`: what it returns does not matter, only what it raises."""
    ptefile.program_end(path)
    ptefile.named_data(path)
    ptefile.constant_bytes(path, "edgectl_meta")
    delegate_ids(path)


def _one_line_error(path: Path) -> str:
    with pytest.raises(EdgectlError) as e:
        _reads(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


@pytest.fixture
def copy(stories_pte, tmp_path) -> Path:
    return Path(shutil.copy(stories_pte, tmp_path / "m.pte"))


def _program_size(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:24], "little")


def test_a_truncated_program_is_one_error(copy):
    full, size = copy.read_bytes(), _program_size(copy)
    for keep in (0, 20, 40, size // 2, size - 1):
        copy.write_bytes(full[:keep])
        msg = _one_line_error(copy)
        assert ("truncated" if keep >= 32 else "not an ExecuTorch program") in msg, (keep, msg)
    copy.write_bytes(full[: len(full) // 2])  # the header whole, segments cut: it still says where they end
    assert ptefile.program_end(copy) == len(full)


def test_damaged_header_bytes_give_one_error_never_an_exception(copy):
    full = bytearray(copy.read_bytes())
    size = _program_size(copy)
    root = int.from_bytes(full[:4], "little")
    cases = [(o, 0xFF) for o in range(0, size, 7)]
    cases += [(o, v) for o in (0, 1, 2, 3, root, root + 1, root + 2, root + 3) for v in (0x01, 0x7F, 0x80, 0xFF)]
    errors = 0
    fd = os.open(copy, os.O_RDWR)
    try:
        for off, xor in cases:
            os.pwrite(fd, bytes([full[off] ^ xor]), off)
            try:
                _reads(copy)
            except EdgectlError as e:
                assert str(copy) in str(e) and "\n" not in str(e), (off, str(e))
                errors += 1
            os.pwrite(fd, bytes([full[off]]), off)
    finally:
        os.close(fd)
    assert errors > len(cases) // 10, errors  # the sweep reaches the parser, not only harmless bytes
    for off in (3, root + 2, root + 3):  # the root offset, the root table's vtable offset: far outside
        damaged = bytearray(full)
        damaged[off] ^= 0x80
        copy.write_bytes(bytes(damaged))
        _one_line_error(copy)
