"""The embedding rows of a shard set: gathered from the tied matrix in the head's file, or run by the embed shard's program."""

from __future__ import annotations

from pathlib import Path

from edgectl.runtime.runtime import tied_table


class _Embed:
    """Embedding rows gathered from the tied matrix in the head's file (page cache), or
    from the embed shard's own program."""

    def __init__(self, directory: Path, variant):
        import torch

        spec = variant.extra.get("table")
        self.program = None
        if spec is None:
            self.path = directory / variant.file
            return
        path = directory / spec["file"]
        if "tensors" in spec:
            from edgectl.quant.quant_modules import QuantEmbedding

            self.quant = QuantEmbedding.__new__(QuantEmbedding)
            torch.nn.Module.__init__(self.quant)
            self.quant.bits, self.quant.group_size, self.quant.dim = spec["bits"], spec["group_size"], spec["dim"]
            self.table = tuple(tied_table(path, t) for t in spec["tensors"])  # codes, scales[, offsets]
            lookup = lambda tokens: self.quant.forward(tokens, self.table)  # noqa: E731
        else:
            table = tied_table(path, spec)
            self.table = (table,)
            lookup = lambda tokens: table.index_select(0, tokens.view(-1)).unsqueeze(0)  # noqa: E731

        def fn(tokens):
            self.read_ahead(tokens)
            rows = lookup(tokens)  # a copy: the mapped pages are no longer needed
            self.release()
            return rows

        self.fn = fn

    def read_ahead(self, tokens) -> None:
        """Start reading every row the lookup will touch (MADV_WILLNEED per row) before
        touching one: from a cold page cache the gather otherwise faults the rows of a
        prompt in one at a time (SmolLM2, 64 prompt tokens: ~50 ms between opening and the
        first layer's compute)."""
        import mmap

        ids = sorted(set(tokens.view(-1).tolist()))
        if len(ids) < 2:
            return
        for t in self.table:
            mm, base = getattr(t, "_edgectl_map", None), getattr(t, "_edgectl_offset", None)
            if mm is None or base is None:
                continue
            row = t.stride(0) * t.element_size()
            for i in ids:
                start = base + i * row
                page = start - start % mmap.PAGESIZE
                mm.madvise(mmap.MADV_WILLNEED, page, start + row - page)

    def release(self) -> None:
        """Unmap the table pages the lookup touched (they stay in the page cache, unmapped,
        where the kernel reclaims them easily): mapped rows piling up over a long text are
        page cache a memory cgroup charges and could not reclaim in time."""
        import mmap

        for t in self.table:
            mm = getattr(t, "_edgectl_map", None)
            if mm is not None:
                mm.madvise(mmap.MADV_DONTNEED)

