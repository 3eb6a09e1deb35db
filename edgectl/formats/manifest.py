"""manifest.json: the only contract between `shard` and `run`/`bench`.

A shard set is a directory with `manifest.json`, `tokenizer.json` and one `.pte` per
(shard, precision). Shards run in `order`; the KV cache lives outside every program (the
runtime owns it: evicting a shard loses nothing).

Program interfaces, by shard kind:
- "embed": no program of its own when `table` is set: the runtime gathers rows of the
  matrix stored in the head shard's file (tied embedding stored once per precision).
  Otherwise a program `forward(tokens[1,T]) -> h[1,T,dim]`.
- "layers": `forward(h[1,T,dim], pos[T], k_0, v_0, ..., k_{n-1}, v_{n-1}) -> h` for the
  n decoder layers it holds (`layers`). The caches are the runtime's own [1, S, KV, D]
  buffers (model_args.cache_shapes; S at most max_seq_len, a run may plan fewer positions),
  passed without a copy: the program writes the T new entries at positions pos[0].. in
  place (llama::update_cache) and attends over positions < pos[0] + T only
  (llama::custom_sdpa). A sliding layer's cache is a ring of C slots instead
  (model_args.ring_len of max_seq_len and max_tokens_per_call; position p at slot p mod C),
  read under a mask of its window. See shard_build.LayersProgram.
- "head": `forward(h[1,T,dim], idx[N]) -> logits[1,N,vocab]` (final norm + output).
T and N are at most `max_tokens_per_call` (activation memory is planned per program for
the largest call): the runtime prefills, and asks for logits, in chunks of that size.

Per precision the manifest records the file, its bytes and sha256, the resident bytes
and load time measured after loading it, and the importance figures measured by
`shard` (mean KL of the next-token distribution against the all-top-precision model,
and the perplexity change, when only this shard is lowered to that precision).
`Manifest.load` checks its types and ranges and registers every file's size and sha256
(and `tokenizer_sha256`), checked before a file's first use (edgectl/formats/integrity.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgectl.util.version import __version__

from edgectl.formats import integrity
from edgectl.util.errors import EdgectlError

# 4: a sliding layer's cache is a ring of C slots (3 is still read for a model without
# sliding layers: the same programs); 3: layer programs write the caches in place; 2: read
# cache windows and returned the new entries; 1 attended over all max_seq_len positions
SCHEMA_VERSION = 4
SCHEMA_WITHOUT_RINGS = 3
MANIFEST = "manifest.json"


@dataclass
class Importance:
    kl: float  # mean KL(top || lowered) over calibration positions, nats
    ppl: float  # calibration perplexity with only this shard lowered
    ppl_delta: float  # ppl - top-precision ppl
    tokens: int  # calibration positions scored
    measured_with: str = "eager-quantized"  # or "pte"


@dataclass
class Variant:
    """One shard at one precision."""

    precision: str  # "fp32" | "int8" | "8da4w" | ...
    file: str  # relative to the shard-set directory
    bytes: int
    sha256: str
    resident_bytes: int  # RSS growth after loading program + method, measured
    load_ms: float  # program + method load, measured (warm page cache)
    importance: Importance | None = None  # None for the top precision
    extra: dict = field(default_factory=dict)  # e.g. {"table": {...}} for a shared matrix


@dataclass
class Shard:
    name: str  # "embed", "layers.0", "layers.2-3", "head"
    kind: str  # "embed" | "layers" | "head"
    layers: list[int]
    variants: dict[str, Variant]  # precision -> Variant


@dataclass
class Manifest:
    edgectl_version: str
    source: dict  # {"model": id or path, "sha256": content hash, "kind": "hf"|"gguf"|...}
    model: dict  # ModelArgs.to_dict()
    max_seq_len: int
    backend: str
    precisions: list[str]  # highest first, e.g. ["fp32", "int8", "8da4w"]
    tokenizer: str  # file name of tokenizer.json in the directory
    tokenizer_config: dict
    shards: list[Shard]  # in forward order
    calibration: dict = field(default_factory=dict)  # {"file":..., "tokens":..., "top_ppl":...}
    max_tokens_per_call: int | None = None  # T and N of one program call at most (prefill in chunks); None: max_seq_len
    tokenizer_sha256: str | None = None  # None: written before edgectl recorded it (not checked)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, directory: Path) -> None:
        self.save_as(Path(directory) / MANIFEST)

    def save_as(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    def tokenizer_text(self, directory: Path) -> str:
        """The tokenizer file's text, checked against tokenizer_sha256 when recorded."""
        path = Path(directory) / self.tokenizer
        if self.tokenizer_sha256:
            integrity.check_file(path, self.tokenizer_sha256, named_by=str(Path(directory) / MANIFEST))
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgectlError(f"{path}: cannot read the tokenizer ({e})") from e

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EdgectlError(f"{path}: cannot read the shard manifest ({e})") from e
        if not isinstance(d, dict):
            raise EdgectlError(f"{path}: malformed manifest (not a JSON object)")
        mm = d.get("model")
        sliding = isinstance(mm, dict) and "sliding_attention" in (mm.get("layer_types") or ())
        if d.get("schema_version") != SCHEMA_VERSION and (sliding or d.get("schema_version") != SCHEMA_WITHOUT_RINGS):
            raise EdgectlError(
                f"{path}: manifest schema {d.get('schema_version')} is not {SCHEMA_VERSION}",
                hint=f"re-run `edgectl shard` with edgectl {__version__}",
            )
        try:
            shards = [
                Shard(
                    s["name"], s["kind"], s["layers"],
                    {
                        p: Variant(**{**v, "importance": Importance(**v["importance"]) if v.get("importance") else None})
                        for p, v in s["variants"].items()
                    },
                )
                for s in d.pop("shards")
            ]
            m = cls(**d, shards=shards)
            check(m)
            integrity.expect(directory, m)  # every file it names is checked before first use
            return m
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise EdgectlError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e


def check(m: Manifest) -> None:
    """Types and ranges the runtime indexes with (ValueError/TypeError otherwise): a damaged
    manifest that is still JSON is an error here, not an IndexError or a crash later."""
    n = m.model["n_layers"]
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
        if not isinstance(m.model[k], int) or isinstance(m.model[k], bool) or m.model[k] < 1:
            raise ValueError(f"model.{k} is {m.model[k]!r}")
    if not isinstance(m.max_seq_len, int) or m.max_seq_len < 2 or not isinstance(m.tokenizer, str):
        raise ValueError(f"max_seq_len {m.max_seq_len!r}, tokenizer {m.tokenizer!r}")
    for s in m.shards:
        if not isinstance(s.layers, list) or any(not isinstance(i, int) or not 0 <= i < n for i in s.layers):
            raise ValueError(f"shard {s.name!r} names layers {s.layers!r} of a {n}-layer model")
        for v in s.variants.values():
            if not (isinstance(v.file, str) and isinstance(v.sha256, str) and isinstance(v.bytes, int)
                    and isinstance(v.extra, dict)):
                raise ValueError(f"shard {s.name!r}: variant {v.precision!r} has a wrong field type")
