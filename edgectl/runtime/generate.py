"""Text generation over any runtime `Model`: prefill, decode one token, decode n tokens
(gpt-fast's split), with a callback that streams each token as it is produced."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from edgectl.util.errors import EdgectlError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # prompt in -> first new token out
    prefill_s: float
    decode_s: float  # all decode steps after the first token
    stopped: str  # "eos", "length", "max_seq_len"
    tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.new_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "ttft_ms": self.ttft_s * 1e3,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "stopped": self.stopped,
        }


def sample(logits, cfg: SamplingConfig, rng=None) -> int:
    """The next token from a logits row (numpy): argmax at temperature 0, else a draw from
    the softmax at `temperature`, cut to the top_p nucleus, with `rng` (numpy's Generator)."""
    import numpy as np

    logits = np.asarray(logits).reshape(-1)
    if cfg.temperature <= 0:
        return int(np.argmax(logits))
    return draw(probabilities(logits, cfg), rng)


def probabilities(logits, cfg: SamplingConfig):
    """The distribution `sample` draws from at temperature > 0 (float64 numpy): the softmax
    of a logits row at `temperature`, cut to the top_p nucleus and renormalised."""
    import numpy as np

    logits = np.asarray(logits).reshape(-1)
    z = logits.astype(np.float64) / cfg.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        keep = np.cumsum(sorted_p) - sorted_p < cfg.top_p
        probs = np.zeros_like(probs)
        probs[order[keep]] = sorted_p[keep]
        probs /= probs.sum()
    return probs


def draw(probs, rng=None) -> int:
    """One token drawn from the distribution `probs` with `rng` (numpy's Generator)."""
    import numpy as np

    rng = rng if rng is not None else np.random.default_rng()
    return int(min(np.searchsorted(np.cumsum(probs), rng.random(), side="right"), len(probs) - 1))


def generate(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_ids: tuple[int, ...] = (),
    sampling: SamplingConfig = SamplingConfig(),
    on_token: Callable[[int], None] | None = None,
) -> GenerationStats:
    """Prefill `prompt_ids`, then decode until EOS, `max_new_tokens` or max_seq_len;
    `on_token` sees each token as it is produced."""
    run = Generation(model, prompt_ids, max_new_tokens, eos_ids, sampling)
    for tok in run:
        if on_token:
            on_token(tok)
    return run.stats


class Generation:
    """One generation as an iterator of token ids, produced one at a time (the Python
    API's `generate` streams from it); `stats` is set once it is exhausted. Time the
    consumer spends between tokens counts as decode time, as a streaming user sees it."""

    def __init__(self, model, prompt_ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...] = (),
                 sampling: SamplingConfig = SamplingConfig()):
        if not prompt_ids:
            raise EdgectlError("the prompt is empty")
        if len(prompt_ids) >= model.max_seq_len:
            raise EdgectlError(
                f"the prompt has {len(prompt_ids)} tokens; this artifact holds at most {model.max_seq_len - 1} before generating",
                hint="shorten the prompt or export with a larger --max-seq-len",
            )
        self.model, self.prompt_ids, self.max_new_tokens = model, list(prompt_ids), max_new_tokens
        self.eos_ids, self.sampling = tuple(eos_ids), sampling
        self.stats: GenerationStats | None = None

    def __iter__(self) -> Iterator[int]:
        import numpy as np

        model, sampling, eos_ids = self.model, self.sampling, self.eos_ids
        gen = np.random.default_rng(sampling.seed) if sampling.temperature > 0 else None
        model.reset()
        t0 = time.perf_counter()
        logits = model.forward(self.prompt_ids, 0)[-1]
        t_prefill = time.perf_counter()
        tok = sample(logits, sampling, gen)
        ttft = time.perf_counter() - t0
        out, pos, stopped = [tok], len(self.prompt_ids), "length"
        yield tok
        t_dec = time.perf_counter()
        while True:
            if tok in eos_ids:
                stopped = "eos"
                break
            if len(out) >= self.max_new_tokens:
                break
            if pos >= model.max_seq_len:
                stopped = "max_seq_len"
                break
            logits = model.forward([tok], pos)[-1]
            pos += 1
            tok = sample(logits, sampling, gen)
            out.append(tok)
            yield tok
        decode_s = time.perf_counter() - t_dec
        self.stats = GenerationStats(len(self.prompt_ids), len(out), ttft, t_prefill - t0, decode_s, stopped, out)
