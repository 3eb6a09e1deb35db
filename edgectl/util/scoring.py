"""Perplexity scoring shared by bench, quantize and shard: the built-in prompt text (and its first n tokens), non-overlapping windows, and float64 log-probs a few rows at a time."""

from __future__ import annotations


# An original paragraph, so the prompt is real text wherever edgectl is installed.
PROMPT_TEXT = (
    "The harbour town woke slowly on winter mornings. Before the sun cleared the hills, the "
    "baker had already lit his ovens, and the smell of warm bread drifted down the narrow "
    "streets towards the water. Fishermen checked their nets by lamplight, talking quietly "
    "about the weather and the price of fuel. A girl named Mira walked along the quay with her "
    "grandfather every day before school. He told her the names of the boats, which families "
    "owned them, and which ones had survived the great storm forty years ago. Mira liked the "
    "small blue boat best, because its paint was peeling in the shape of a bird. One morning "
    "the blue boat was gone. Her grandfather frowned at the empty mooring and said nothing for "
    "a long time. Then he took her hand, turned away from the school, and led her up the hill "
    "to the old lighthouse, where the keeper kept a book of every ship that came and went. "
    "They climbed the spiral stairs together, counting the steps out loud, and at the top the "
    "keeper opened the heavy book on a table by the window and ran his finger down the page. "
)


def prompt_ids(tok, n: int) -> list[int]:
    """The first `n` tokens of PROMPT_TEXT (repeated as needed) in the artifact's tokenizer,
    with its BOS if it adds one: bench's fixed prompt, here and on a phone."""
    text = PROMPT_TEXT
    ids = tok.encode(text)
    while len(ids) < n:
        text += PROMPT_TEXT
        ids = tok.encode(text)
    return ids[:n]


def ppl_windows(ids: list[int], max_seq_len: int, bos_id: int | None) -> list[list[int]]:
    """Split a token stream into non-overlapping windows of at most `max_seq_len` tokens.

    With a BOS id (tokenizers that add BOS), each window is BOS + the next max_seq_len - 1
    text tokens, and every text token is scored once. Without, each window is max_seq_len
    text tokens and the first token of each window is context only. A last, shorter window
    is kept if it scores at least one token. Position 0 of a window is never scored.
    """
    step = max_seq_len - 1 if bos_id is not None else max_seq_len
    wins = []
    for i in range(0, len(ids), step):
        w = ids[i : i + step]
        if bos_id is not None:
            w = [bos_id, *w]
        if len(w) >= 2:
            wins.append(w)
    return wins


SCORE_ROWS = 8  # positions scored at once: float64 log-probs of 8 x 49152 are 3.1 MB


def as_numpy(x):
    """A logits matrix as a numpy array: numpy as is, a torch tensor shared (no copy)."""
    import numpy as np

    return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


def log_prob_chunks(logits, rows: int = SCORE_ROWS, n: int | None = None):
    """(start, float64 log_softmax of logits[start:start + rows]) over the scored rows
    logits[:n] (default logits[:-1]), a chunk at a time: a whole window in float64 (513 x 49152 x 8 bytes, plus
    copies) is what got a memory-capped worker killed. log_softmax is per row, so each
    row's values are those of the whole-window computation.

    numpy arrays (a torch tensor is read in place). The chunks live in two buffers reused
    for every chunk (fresh chunk-sized arrays each time leave glibc holding several of them
    resident), so a yielded chunk is valid until the next one, and the caller may overwrite it."""
    import numpy as np

    logits = as_numpy(logits)
    n = logits.shape[0] - 1 if n is None else n
    if n < 1:
        return
    src = np.empty((min(rows, n), logits.shape[1]), dtype=np.float64)
    out = np.empty_like(src)
    for a in range(0, n, rows):
        k = min(rows, n - a)
        x, y = src[:k], out[:k]
        np.copyto(x, logits[a : a + k])
        np.subtract(x, x.max(axis=1, keepdims=True), out=x)
        np.exp(x, out=y)
        np.subtract(x, np.log(y.sum(axis=1, keepdims=True)), out=y)
        yield a, y


def target_log_probs(logits, window: list[int]):
    """log p(window[t] | window[:t]) for t = 1..T-1 as float64 [T-1, 1], given logits [T, vocab]."""
    return picked_log_probs(logits, window[1:])


def picked_log_probs(logits, targets: list[int]):
    """log_softmax(logits[i])[targets[i]] for i < len(targets), float64 [len(targets), 1] (numpy)."""
    import numpy as np

    target = np.asarray(targets, dtype=np.int64)
    out = np.empty((len(targets), 1), dtype=np.float64)
    for a, lp in log_prob_chunks(logits, n=len(targets)):
        out[a : a + len(lp), 0] = lp[np.arange(len(lp)), target[a : a + len(lp)]]
    return out


def nll_sum(logits, window: list[int]) -> float:
    """Sum of -log p(window[t] | window[:t]) for t = 1..T-1, given logits [T, vocab].
    Scored in chunks of SCORE_ROWS positions; the picked log-probs are summed in one
    reduction, as when the whole window was one tensor (same result to the bit)."""
    return float(-target_log_probs(logits, window).sum())
