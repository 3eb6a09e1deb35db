"""`edgectl bench --prompt-file FILE`: the prompts a bench's generation runs use instead of
the built-in text (util/scoring.prompt_ids).

FILE is a `.jsonl` in MT-Bench's format (one JSON object a line, with "turns": [first turn,
...]; the prompts are the first turns), or any other file as one prompt: the whole file,
as it is (UTF-8). Run i of every row (0-based, over --repeat) uses prompt i mod n, so all
rows, the no-draft rows beside draft rows included, run the same prompts in the same order.
With `chat` (default: on for a .jsonl, off for a text file) each prompt goes through the
model's chat template as `edgectl run --chat` does (runtime/run.prompt_token_ids).

The prompts are encoded here, in `edgectl bench`'s process, once per tokenizer, and written
as int32 ids files (bench_worker.write_ids) that each worker reads (Job.prompt_ids_file):
the measured process pays no tokenizer work, and a prompt that does not fit an artifact
(prompt + new tokens beyond its max_seq_len, or beyond --ctx-size) is a usage error before
anything is measured. A shard set's KV cache is planned for the longest prompt of the
bench + new tokens (or --ctx-size), the same for every run of a row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgectl.util.errors import EdgectlError, UsageError


@dataclass(frozen=True)
class PromptFile:
    path: Path
    texts: tuple[str, ...]
    sha256: str
    format: str  # "jsonl" or "text"
    chat: bool

    def to_dict(self) -> dict:
        """The report's settings.prompt_file entry (bench/report.py's schema)."""
        return {"path": str(self.path), "sha256": self.sha256, "format": self.format, "prompts": len(self.texts),
                "chat": self.chat}


def read_prompt_file(path: Path, chat: bool | None = None) -> PromptFile:
    """The prompts of `path` (see the module); `chat` None: on for a .jsonl, off otherwise."""
    path = Path(path).resolve()
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise EdgectlError(f"--prompt-file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise EdgectlError(f"--prompt-file {path}: not UTF-8 text") from None
    jsonl = path.suffix.lower() == ".jsonl"
    texts = _first_turns(path, text) if jsonl else [text]
    if not all(t.strip() for t in texts):
        raise EdgectlError(f"--prompt-file {path}: {'an empty first turn' if jsonl else 'empty'}")
    return PromptFile(path, tuple(texts), hashlib.sha256(data).hexdigest(), "jsonl" if jsonl else "text",
                      jsonl if chat is None else chat)


def _first_turns(path: Path, text: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            turns = json.loads(line).get("turns")
        except (ValueError, AttributeError):
            turns = None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise EdgectlError(f"--prompt-file {path}:{n}: expected a JSON object with \"turns\": [first turn, ...] "
                               "(MT-Bench's format)")
        out.append(turns[0])
    if not out:
        raise EdgectlError(f"--prompt-file {path}: no prompts")
    return out


def max_seq_len(artifact: Path) -> int:
    """The KV cache length of a `.pte` or a shard set, read from its metadata."""
    if artifact.is_dir():
        from edgectl.formats.manifest import Manifest

        return Manifest.load(artifact).max_seq_len
    from edgectl.formats.ptefile import constant_bytes

    return json.loads(constant_bytes(artifact, "edgectl_meta"))["max_seq_len"]


class BenchPrompts:
    """The prompts of `runs` runs, encoded per tokenizer into `tmp`; `job(artifact, i)` is
    what run i's bench_worker.Job takes from them."""

    def __init__(self, prompts: PromptFile, runs: int, new_tokens: int, ctx_size: int | None, tmp: Path):
        self.prompts, self.new_tokens, self.ctx_size, self.tmp = prompts, new_tokens, ctx_size, Path(tmp)
        self.used = min(runs, len(prompts.texts))  # prompt indices 0 .. used-1
        self.encoded: dict[str, list[tuple[Path, int]]] = {}  # tokenizer key -> (ids file, length) per prompt
        self.cases: dict[Path, tuple[str, int]] = {}  # artifact -> (tokenizer key, context)

    def prepare(self, artifact: Path) -> None:
        """Encode the prompts for `artifact` (once per tokenizer) and check they fit it."""
        from edgectl.bench.bench_worker import write_ids
        from edgectl.runtime.run import artifact_tokenizer, prompt_token_ids

        if artifact in self.cases:
            return
        tok = artifact_tokenizer(artifact)
        key = hashlib.sha256((tok.tokenizer_json + json.dumps(tok.config, sort_keys=True)).encode()).hexdigest()[:16]
        if key not in self.encoded:
            if self.prompts.chat and not tok.chat_template:
                raise UsageError(f"{artifact.name} has no chat template, which --chat applies "
                                 f"({'the default for a .jsonl' if self.prompts.format == 'jsonl' else 'given'})",
                                 hint="add --no-chat")
            files = []
            for i, text in enumerate(self.prompts.texts[: self.used]):
                ids = prompt_token_ids(tok, text, self.prompts.chat)
                files.append((self.tmp / f"{key}-{i}.ids", len(ids)))
                write_ids(ids, files[-1][0])
            self.encoded[key] = files
        limit, what = max_seq_len(artifact), "max_seq_len"
        if self.ctx_size is not None and self.ctx_size < limit:
            limit, what = self.ctx_size, "--ctx-size"
        for i, (_, n) in enumerate(self.encoded[key]):
            if n + self.new_tokens > limit:
                which = f"question {i} (0-based)" if self.prompts.format == "jsonl" else "the prompt"
                raise UsageError(f"--prompt-file {self.prompts.path.name}: {which} is {n} tokens; + {self.new_tokens} "
                                 f"new tokens = {n + self.new_tokens} > {artifact.name}'s {what} {limit}",
                                 hint="lower --new-tokens, or give shorter prompts")
        longest = max(n for _, n in self.encoded[key])
        self.cases[artifact] = key, self.ctx_size or longest + self.new_tokens

    def index(self, i: int) -> int:
        return i % len(self.prompts.texts)

    def job(self, artifact: Path, i: int) -> dict:
        """Run i's Job fields: the ids file of prompt i mod n, and the context to plan for."""
        self.prepare(artifact)
        key, context = self.cases[artifact]
        return {"prompt_ids_file": str(self.encoded[key][self.index(i)][0]), "ctx_size": context}
