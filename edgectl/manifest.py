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
  buffers (model.cache_shapes; S at most max_seq_len, a run may plan fewer positions),
  passed without a copy: the program writes the T new entries at positions pos[0].. in
  place (llama::update_cache) and attends over positions < pos[0] + T only
  (llama::custom_sdpa). See shard_build.LayersProgram.
- "head": `forward(h[1,T,dim], idx[N]) -> logits[1,N,vocab]` (final norm + output).
T and N are at most `max_tokens_per_call` (activation memory is planned per program for
the largest call): the runtime prefills, and asks for logits, in chunks of that size.

Per precision the manifest records the file, its bytes and sha256, the resident bytes
and load time measured after loading it, and the importance figures measured by
`shard` (mean KL of the next-token distribution against the all-top-precision model,
and the perplexity change, when only this shard is lowered to that precision).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgectl import __version__
from edgectl.errors import EdgectlError

# 3: layer programs write the caches in place; 2: read cache windows and returned the new
# entries; 1 attended over all max_seq_len positions
SCHEMA_VERSION = 3
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
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, directory: Path) -> None:
        self.save_as(Path(directory) / MANIFEST)

    def save_as(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EdgectlError(f"{path}: cannot read the shard manifest ({e})") from e
        if d.get("schema_version") != SCHEMA_VERSION:
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
            return cls(**d, shards=shards)
        except (KeyError, TypeError) as e:
            raise EdgectlError(f"{path}: malformed manifest ({e})") from e
