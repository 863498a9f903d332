"""Tokenizer, chat template and UTF-8-safe streaming detokenization.

The chat template comes from tokenizer_config.json and is rendered by Jinja2 in a sandbox (a
template is untrusted input, as in transformers), bounded in time and size: a render that runs
past RENDER_SECONDS (checked on every line of template code, by a trace function) or writes
more than RENDER_CHARS, or a template operation that would make a string or number that big, is
an error naming tokenizer_config.json. Without a template, ChatML is used.

A chat is encoded in two kinds of pieces: the template's own markup, whose special tokens
(`<|im_start|>`) are parsed as such, and the messages' contents, where the same text stays
plain characters, so a user cannot forge a turn by typing one.
"""
from __future__ import annotations

import functools
import json
import math
import re
import secrets
import sys
import threading
import time
from pathlib import Path

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from qlite.errors import QliteError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
RENDER_SECONDS = 2.0          # an ordinary template renders a long chat in milliseconds
RENDER_CHARS = 32 * 2 ** 20   # rendered text (and any one string or list made on the way)


def _raise(message):
    raise TemplateError(message)


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise QliteError(f"{file}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise QliteError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise QliteError(f"{file}: not a JSON object (found a {type(raw).__name__})")
    return raw


def _token_text(tok):
    return tok.get("content") if isinstance(tok, dict) else tok


def clean_text(text: str) -> str:
    """`text` with every lone surrogate (bytes that were not UTF-8, as Python reads them from
    argv, files or stdin with errors="surrogateescape") replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return re.sub("[\ud800-\udfff]", "\ufffd", text)


def _too_big(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and abs(n) > RENDER_CHARS


class _Bounded(ImmutableSandboxedEnvironment):
    """The sandbox, also refusing to make a huge string, list or number in one step."""
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            if (isinstance(left, (int, float)) and isinstance(right, (int, float))
                    and abs(left) > 1 and right * math.log2(abs(left)) > 1024):
                raise SecurityError(f"{left} ** {right} is too big")
        elif isinstance(left, int) and isinstance(right, int):
            pass
        elif (isinstance(left, int) and hasattr(right, "__len__")
              and len(right) * left > RENDER_CHARS
              or isinstance(right, int) and hasattr(left, "__len__")
              and len(left) * right > RENDER_CHARS):
            raise SecurityError(f"repeating a sequence past {RENDER_CHARS} items")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        if any(_too_big(a) for a in (*args, *kwargs.values())):
            raise SecurityError(f"an argument over {RENDER_CHARS}")
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_filter(f):
    @functools.wraps(f)
    def run(*args, **kwargs):
        if any(_too_big(a) for a in (*args, *kwargs.values())):
            raise SecurityError(f"an argument over {RENDER_CHARS}")
        return f(*args, **kwargs)
    return run


class _Limit(TemplateError):
    """A render went past RENDER_SECONDS or RENDER_CHARS."""


def render_bounded(template, **context) -> str:
    """Render a Jinja template in at most RENDER_SECONDS and RENDER_CHARS."""
    deadline = time.monotonic() + RENDER_SECONDS

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Limit(f"stopped after {RENDER_SECONDS:g} s (the limit of a render)")
        return trace if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        out, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > RENDER_CHARS:
                raise _Limit(f"stopped at {RENDER_CHARS} characters (the limit of a render)")
            out.append(piece)
        return "".join(out)
    finally:
        sys.settrace(previous)


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None,
                 eos_ids: list[int] = (), source: str = "tokenizer.json",
                 template_source: str | None = None):
        self.tok = tokenizer
        self.source = source
        # where the template came from, for its errors
        self.template_source = template_source or (
            "the built-in ChatML template" if chat_template is None
            else str(Path(source).with_name("tokenizer_config.json")))
        if chat_template is not None and not isinstance(chat_template, str):
            raise QliteError(f"{self.template_source}: chat_template must be text (found "
                             f"{type(chat_template).__name__})")
        self.chat_template = chat_template or CHATML
        env = _Bounded(trim_blocks=True, lstrip_blocks=True)
        env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(self.chat_template)
        except Exception as e:  # TemplateSyntaxError, and anything else a bad template raises
            raise QliteError(f"{self.template_source}: chat template does not parse "
                             f"({_one_line(e)})") from None
        stops = [self.tok.token_to_id(t) for t in STOP_TOKENS]
        self.stop_ids = sorted({i for i in [*eos_ids, *stops] if i is not None})
        added = self.tok.get_added_tokens_decoder()
        self.special_ids = sorted(i for i, t in added.items() if t.special)
        specials = sorted((added[i].content for i in self.special_ids), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._lock = threading.Lock()  # see encode_plain

    @classmethod
    def from_dir(cls, model_dir: Path) -> "Tokenizer":
        file = Path(model_dir) / "tokenizer.json"
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise QliteError(f"{file}: cannot read tokenizer ({e})") from None
        config_file = file.with_name("tokenizer_config.json")
        cfg = _read_json(config_file)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if not named:
                raise QliteError(f"{config_file}: chat_template is a list without templates")
            template = named.get("default", next(iter(named.values())))
        eos = []
        for name in (_token_text(cfg.get("eos_token")),):
            if isinstance(name, str) and tok.token_to_id(name) is not None:
                eos.append(tok.token_to_id(name))
        gen = _read_json(file.with_name("generation_config.json")).get("eos_token_id")
        eos += [gen] if isinstance(gen, int) else [i for i in (gen or []) if isinstance(i, int)]
        return cls(tok, template, eos, str(file), str(config_file))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids for raw text; special tokens written in the text are recognised."""
        with self._lock:
            return self.tok.encode(clean_text(text), add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids for text in which special-token strings are ordinary characters."""
        with self._lock:  # the switch is the tokenizer's state: no encode may run meanwhile
            self.tok.encode_special_tokens = True
            try:
                return self.tok.encode(clean_text(text), add_special_tokens=False).ids
            finally:
                self.tok.encode_special_tokens = False

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as the template writes it (special tokens as text)."""
        messages = [_checked(m, i) for i, m in enumerate(messages)]
        try:
            return render_bounded(self.template, messages=messages,
                                  add_generation_prompt=add_generation_prompt)
        except Exception as e:  # Jinja's errors, a template's own (1/0, recursion), the bounds
            raise QliteError(f"{self.template_source}: chat template failed: "
                             f"{_one_line(e)}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat: the template's markup with its special tokens, the messages'
        contents with special-token text kept as plain text.

        Each special-token string inside a content is swapped for a marker (a random private
        string) before rendering, so the template still sees one text per message (and may trim
        or split it); after rendering the markers are encoded as the plain text they stand for."""
        if self._special_re is None:
            return self.encode(self.render_chat(messages, add_generation_prompt))
        nonce = "\ue000" + secrets.token_hex(6)
        found: list[str] = []

        def mark(m):
            found.append(m.group())
            return f"{nonce}{len(found) - 1}{nonce}"

        masked = []
        for i, m in enumerate(messages):
            m = _checked(m, i)
            if isinstance(m.get("content"), str):
                m = dict(m, content=self._special_re.sub(mark, clean_text(m["content"])))
            masked.append(m)
        text = self.render_chat(masked, add_generation_prompt)
        if not found:
            return self.encode(text)
        ids = []
        pieces = re.split(f"{nonce}(\\d+){nonce}", text)
        for k, piece in enumerate(pieces):
            if k % 2:
                ids += self.encode_plain(found[int(piece)])
            elif piece:
                ids += self.encode(piece)
        return ids

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


def _checked(message, i: int) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise QliteError(f"messages[{i}]: a chat message is a dict with a 'role' string and a "
                         "'content'")
    return message


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if not isinstance(e, TemplateError) else text


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
