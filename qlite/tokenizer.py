"""Tokenizer, chat template and UTF-8-safe streaming detokenization.

The chat template comes from tokenizer_config.json and is rendered by Jinja2 in a sandbox (a
template is untrusted input, as in transformers). Without one, ChatML is used.
"""
from __future__ import annotations

import json
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from qlite.errors import QliteError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _raise(message):
    raise TemplateError(message)


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise QliteError(f"{file}: not valid JSON ({e})") from None


def _token_text(tok):
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None,
                 eos_ids: list[int] = (), source: str = "tokenizer.json"):
        self.tok = tokenizer
        self.source = source
        self.chat_template = chat_template or CHATML
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(self.chat_template)
        except TemplateError as e:
            raise QliteError(f"{source}: chat template does not parse ({e})") from None
        stops = [self.tok.token_to_id(t) for t in STOP_TOKENS]
        self.stop_ids = sorted({i for i in [*eos_ids, *stops] if i is not None})

    @classmethod
    def from_dir(cls, model_dir: Path) -> "Tokenizer":
        file = Path(model_dir) / "tokenizer.json"
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise QliteError(f"{file}: cannot read tokenizer ({e})") from None
        cfg = _read_json(file.with_name("tokenizer_config.json"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"),
                            template[0]["template"] if template else None)
        eos = []
        for name in (_token_text(cfg.get("eos_token")),):
            if name and tok.token_to_id(name) is not None:
                eos.append(tok.token_to_id(name))
        gen = _read_json(file.with_name("generation_config.json")).get("eos_token_id")
        eos += [gen] if isinstance(gen, int) else list(gen or [])
        return cls(tok, template, eos, str(file))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids for raw text; special tokens written in the text are recognised."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise QliteError(f"{self.source}: chat template failed: {e}") from None

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, never emitting half a character.

    Byte-level BPE splits Chinese characters and emoji across tokens; decoding such a prefix
    yields U+FFFD, so text is held back until it decodes cleanly. Only a short window of recent
    tokens is re-decoded each step (the same idea as vLLM's incremental detokenizer)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window re-decoded for context
        self.read = 0    # tokens before this index have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self.prefix:self.read])
        text = decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """What is left at the end (a truncated character comes out as U+FFFD)."""
        emitted = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(emitted):]
