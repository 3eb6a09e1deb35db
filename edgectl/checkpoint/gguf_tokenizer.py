"""A GGUF file's tokenizer as a Hugging Face `tokenizers` JSON string and a
tokenizer_config-like dict (gguf_loader.read_gguf's tokenizer half).

`tokenizer.ggml.model` "gpt2" is byte-level BPE, with the pre-tokenizer of the family
`tokenizer.ggml.pre` names; "llama" is SentencePiece-style BPE with byte fallback.
"""

from __future__ import annotations

import logging
from functools import partial

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from edgectl.util.errors import EdgectlError

logger = logging.getLogger(__name__)

_CONTROL, _UNKNOWN, _USER_DEFINED = 3, 2, 4  # tokenizer.ggml.token_type values
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre():  # StarCoder-style: every digit its own pre-token, as in SmolLM's tokenizer.json
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _split_pre(pattern: str):
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre names -> pre-tokenizer factory, BPE ignore_merges, NFC normalizer (as llama.cpp and the
# original tokenizer.json of each family do)
_PRE_FAMILIES = [
    (("default", "gpt2"), _gpt2_pre, False, False),
    (("smollm", "starcoder", "refact"), _digits_then_gpt2_pre, False, False),
    (("llama-bpe", "llama3", "llama-v3", "smaug-bpe"), partial(_split_pre, _LLAMA3_SPLIT), True, False),
    (("qwen2", "deepseek-r1-qwen"), partial(_split_pre, _QWEN2_SPLIT), False, True),
]
_BPE_PRE = {name: spec for names, *spec in _PRE_FAMILIES for name in names}
_LLAMA3_PRE = _PRE_FAMILIES[2][0]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def _byte_level(meta: dict, tokens: list[str]) -> tuple[Tokenizer, set[str]]:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE:
        logger.warning("GGUF pre-tokenizer %r is unknown; splitting text the GPT-2 way", pre)
    pre_factory, ignore_merges, nfc = _BPE_PRE.get(pre, _BPE_PRE["default"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(spelled)}, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_factory()
    tok.decoder = decoders.ByteLevel()
    if nfc:
        tok.normalizer = normalizers.NFC()
    return tok, alphabet


def _sentencepiece(meta: dict, tokens: list[str]) -> tuple[Tokenizer, None]:
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:  # older files: every split of a token into two tokens, best-scored merged token first
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        ranked = []
        for token, score in zip(tokens, scores):
            pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
            pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
            ranked += [(score, len(a), len(b), a, b) for a, b in pairs]
        ranked.sort(key=lambda r: r[:3], reverse=True)
        merges = [(a, b) for *_, a, b in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok, None


# tokenizer.ggml.model -> (builder returning the tokenizer and its byte alphabet, if any; default add_bos)
_TOKENIZER_MODELS = {"gpt2": (_byte_level, False), "llama": (_sentencepiece, True)}


def gguf_tokenizer(meta: dict, path) -> tuple[str, dict]:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind not in _TOKENIZER_MODELS or not tokens:
        supported = ", ".join(sorted(_TOKENIZER_MODELS))
        raise EdgectlError(f"{path}: GGUF tokenizer {kind!r} is not supported (supported: {supported})")
    builder, default_bos = _TOKENIZER_MODELS[kind]
    tok, alphabet = builder(meta, tokens)
    special, plain = [], []
    for token, token_type in zip(tokens, meta.get("tokenizer.ggml.token_type") or ()):
        # a control token spelled outside the byte alphabet is a llama.cpp mislabel: adding it would grow the vocab
        if token_type in (_CONTROL, _UNKNOWN) and (alphabet is None or set(token) <= alphabet):
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == _USER_DEFINED and tok.token_to_id(token) is not None:
            plain.append(AddedToken(token, special=False, normalized=False))
    tok.add_special_tokens(special)
    tok.add_tokens(plain)

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    if kind == "gpt2" and meta.get("tokenizer.ggml.pre") in _LLAMA3_PRE:
        default_bos = True  # llama.cpp's default for these vocabularies
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        ids = {t: tok.token_to_id(t) for t in (bos if add_bos else None, eos if add_eos else None) if t}
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos, "add_eos_token": add_eos, "chat_template": meta.get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length"),
    }  # fmt: skip
    return tok.to_str(), config


# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json, text part), for GGUF
# files that do not carry tokenizer.chat_template: turns between <start_of_turn>ROLE and
# <end_of_turn>, the assistant's role called "model", a system message put before the
# first user turn.
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""
END_OF_TURN = "<end_of_turn>"  # where a Gemma chat turn ends: generation stops there too
