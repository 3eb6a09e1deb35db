"""The embedding rows of a shard set, gathered (numpy) from the tied matrix mapped from the head's file."""

from __future__ import annotations

from pathlib import Path

from edgectl.runtime.runtime import Table, tied_table


def embed_rows(tables: list[Table], spec: dict, idx, scale: float | None = None) -> "np.ndarray":  # noqa: F821
    """Rows for token ids `idx` (int64 [T]) from the mapped tables, as [1, T, dim] float32,
    times `scale` when given (ModelArgs.embed_scale, Gemma's sqrt(dim), as model.Embedding)."""
    import numpy as np

    rows = _rows(tables, spec, idx)
    return rows if scale is None else rows * np.float32(scale)


def _rows(tables: list[Table], spec: dict, idx) -> "np.ndarray":  # noqa: F821
    """fp32 rows as they are; int8 rows times their row scale; int4 rows (two codes a byte,
    low nibble = even column, code - 8) times their group's scale, plus the group's offset
    when there is a third table (4-bit asymmetric, as quant_modules.QuantEmbedding)."""
    import numpy as np

    if "tensors" not in spec:
        return tables[0].rows(idx)[None]
    codes, scales, *offsets = tables
    rows, s = codes.array[idx], scales.rows(idx)
    if spec["bits"] == 8:
        return (rows.astype(np.float32) * s.reshape(len(idx), -1))[None]
    r = rows.view(np.uint8) if rows.dtype != np.uint8 else rows
    q = np.stack([r & 15, r >> 4], axis=-1).astype(np.float32) - 8.0  # [T, D/2, 2]
    gs = spec["group_size"]
    e = q.reshape(len(idx), -1, gs) * s.reshape(len(idx), -1, 1)
    if offsets:
        e = e + offsets[0].rows(idx).reshape(len(idx), -1, 1)
    return e.reshape(1, len(idx), -1)


class _Embed:
    """Embedding rows gathered from the tied matrix in the head's file (page cache)."""

    def __init__(self, directory: Path, variant, scale: float | None = None):
        spec = variant.extra["table"]
        path = directory / spec["file"]
        self.spec, self.scale = spec, scale
        self.table = [tied_table(path, t) for t in spec.get("tensors", [spec])]  # codes, scales[, offsets] or the matrix

    def fn(self, tokens: list[int]):
        """[1, T, dim] float32 rows for `tokens` (a copy: the mapped pages are released)."""
        import numpy as np

        idx = np.asarray(tokens, dtype=np.int64).reshape(-1)
        self.read_ahead(idx)
        rows = np.ascontiguousarray(embed_rows(self.table, self.spec, idx, self.scale), dtype=np.float32)
        self.release()
        return rows

    def read_ahead(self, idx) -> None:
        """Start reading every row the lookup will touch (MADV_WILLNEED per row) before
        touching one: from a cold page cache the gather otherwise faults the rows of a
        prompt in one at a time (SmolLM2, 64 prompt tokens: ~50 ms between opening and the
        first layer's compute)."""
        import mmap

        ids = sorted(set(int(i) for i in idx))
        if len(ids) < 2:
            return
        for t in self.table:
            row = t.array.strides[0]
            for i in ids:
                start = t.offset + i * row
                page = start - start % mmap.PAGESIZE
                t.map.madvise(mmap.MADV_WILLNEED, page, start + row - page)

    def release(self) -> None:
        """Unmap the table pages the lookup touched (they stay in the page cache, unmapped,
        where the kernel reclaims them easily): mapped rows piling up over a long text are
        page cache a memory cgroup charges and could not reclaim in time."""
        import mmap

        for t in self.table:
            t.map.madvise(mmap.MADV_DONTNEED)
