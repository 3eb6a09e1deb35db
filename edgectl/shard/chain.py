"""A minimal resident chain over a shard set: every chosen variant loaded, run in order.

This is what `shard` itself uses to check its figures through the exported programs
(and the tests use to check the chain against the monolithic `.pte`); `run`/`bench` go
through `edgectl.runtime.shards_runtime.ShardModel`, which adds budgets and streaming.

`embed_rows(tables, spec, tokens)` is the runtime's embedding gather (shards_embed) for a
shard set whose embed shard reads the head's matrix (manifest `extra["table"]`), in torch.
"""

from __future__ import annotations

from pathlib import Path

from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError
from edgectl.formats.manifest import Manifest


def table_tensors(directory: Path, spec: dict) -> list:
    """Zero-copy maps (runtime.Table) of the blob(s) a `table` spec names, in the file it names."""
    from edgectl.runtime.runtime import tied_table

    path = Path(directory) / spec["file"]
    return [tied_table(path, t) for t in spec.get("tensors", [spec])]


def embed_rows(tables: list, spec: dict, tokens, scale: float | None = None):
    """Rows for `tokens` [1,T] (a torch tensor) from the mapped tables, times `scale` if
    given, as the runtime gathers them (shards_embed.embed_rows): [1, T, dim] fp32."""
    import torch

    from edgectl.runtime.shards_embed import embed_rows as rows

    return torch.from_numpy(rows(tables, spec, tokens.reshape(-1).numpy(), scale))


class ShardChain:
    """forward(tokens, start, all_logits) -> logits [N, vocab], like runtime.PteModel."""

    def __init__(self, directory: str | Path, choice: dict[str, str] | None = None,
                 manifest: Manifest | None = None):
        import torch

        from edgectl.model import ModelArgs, empty_caches, ring_len
        from edgectl.model_args import ring_track
        from edgectl.runtime.methods import _load_runtime
        from edgectl.util.native import native_stderr_captured

        self.dir = Path(directory)
        self.manifest = manifest or Manifest.load(self.dir)
        top = self.manifest.precisions[0]
        choice = choice or {}
        rt = _load_runtime()
        self.steps = []  # (kind, program method or table, variant)
        with native_stderr_captured():
            for shard in self.manifest.shards:
                p = choice.get(shard.name, top)
                if p not in shard.variants:
                    raise EdgectlError(f"shard {shard.name} has no {p} variant")
                var = shard.variants[p]
                table = var.extra.get("table")
                if table is not None:
                    self.steps.append((shard, "table", (table_tensors(self.dir, table), table)))
                    continue
                integrity.ensure(self.dir / var.file)
                prog = rt.load_program(str(self.dir / var.file))
                self.steps.append((shard, "program", (prog, prog.load_method("forward"))))
        self.args = ModelArgs.from_dict(self.manifest.model)
        self.max_seq_len = self.manifest.max_seq_len
        self.meta = {"model": self.manifest.model, "max_seq_len": self.max_seq_len,
                     "tokenizer_config": self.manifest.tokenizer_config}
        self.chunk = self.manifest.max_tokens_per_call or self.max_seq_len
        self.ring = ring_len(self.args, self.max_seq_len, self.chunk)  # a sliding layer's slots (None: none)
        self.k, self.v = empty_caches(self.args, self.max_seq_len, self.args.n_layers, self.chunk)
        self.track = ring_track(self.args, self.max_seq_len, self.chunk)  # how far back a call may go (None: any)
        self._torch = torch

    def reset(self) -> None:
        for t in self.k + self.v:
            t.zero_()
        if self.track:
            self.track.reset()

    def forward(self, tokens: list[int], start: int, all_logits: bool = False):
        """Logits [N, vocab] of the last token (or of all), in calls of at most
        `max_tokens_per_call` tokens that never wrap a sliding layer's ring (call_spans)."""
        from edgectl.model_args import call_spans

        T = len(tokens)
        if start + T > self.max_seq_len:
            raise EdgectlError(f"sequence of {start + T} tokens exceeds max_seq_len {self.max_seq_len}")
        if self.track:
            self.track.check(start, T)
        outs = []
        for a, n in call_spans(start, T, self.chunk, self.ring):
            last = a + n >= T
            if all_logits or last:
                outs.append(self._call(tokens[a : a + n], start + a, all_logits))
            else:
                self._call(tokens[a : a + n], start + a, False)
        return self._torch.cat(outs) if len(outs) > 1 else outs[0]

    def _call(self, tokens: list[int], start: int, all_logits: bool):
        from edgectl.util.native import native_stderr_captured

        torch = self._torch
        T = len(tokens)
        tok = torch.tensor([tokens])
        pos = torch.arange(start, start + T)
        idx = torch.arange(T) if all_logits else torch.tensor([T - 1])
        h = None
        for shard, how, obj in self.steps:
            if shard.kind == "embed":
                h = embed_rows(*obj, tok, self.args.embed_scale) if how == "table" else obj[1].execute([tok])[0]
            elif shard.kind == "layers":  # writes its layers' new entries into the caches
                with native_stderr_captured():  # custom_sdpa's "No temp allocator provided", every call
                    h = obj[1].execute([h, pos, *[t for i in shard.layers for t in (self.k[i], self.v[i])]])[0]
            else:
                return obj[1].execute([h, idx])[0][0]
        raise EdgectlError("the shard set has no head shard")

    def close(self) -> None:
        self.steps = []
