"""Tokenizer: Hugging Face `tokenizers` JSON plus the bits of tokenizer_config we need
(BOS/EOS, add_bos_token, chat template), and an incremental decoder for streaming."""

from __future__ import annotations

from dataclasses import dataclass


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


@dataclass
class Tokenizer:
    tokenizer_json: str
    config: dict
    bos_id: int | None
    eos_ids: tuple[int, ...]
    source: str = "the tokenizer"  # its file, for messages

    def __post_init__(self):
        from tokenizers import Tokenizer as HFTokenizer

        from edgectl.util.errors import EdgectlError

        try:
            self._tok = HFTokenizer.from_str(self.tokenizer_json)
        except Exception as e:  # noqa: BLE001  the tokenizers library raises a bare Exception
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise EdgectlError(f"{self.source}: damaged: not a tokenizer ({first})",
                               hint="re-create it with `edgectl shard` or `edgectl export`") from None
        bos = _token_str(self.config.get("bos_token"))
        if bos is not None and self._tok.token_to_id(bos) is not None:
            self.bos_id = self._tok.token_to_id(bos)
        eos = _token_str(self.config.get("eos_token"))
        if eos is not None and self._tok.token_to_id(eos) is not None and self._tok.token_to_id(eos) not in self.eos_ids:
            self.eos_ids = (*self.eos_ids, self._tok.token_to_id(eos))

    @property
    def add_bos(self) -> bool:
        return bool(self.config.get("add_bos_token", False)) and self.bos_id is not None

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        from edgectl.util.errors import EdgectlError

        if not self.chat_template:
            raise EdgectlError("this model has no chat template", hint="drop --chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        tpl = env.from_string(self.chat_template)
        return tpl.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=_token_str(self.config.get("bos_token")) or "",
            eos_token=_token_str(self.config.get("eos_token")) or "",
        )

    def encode_chat(self, prompt: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = self.apply_chat_template(messages)
        # The template writes any BOS itself; never add a second one.
        return self.encode(text, bos=False)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a growing list of token ids into printable text increments.

    Decodes the whole sequence and emits the new suffix, holding back while the tail is
    an incomplete UTF-8 sequence (shown by the decoder as U+FFFD).
    """

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.printed = tok, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.printed) :] if text.startswith(self.printed) else ""
        self.printed = text
        return new
