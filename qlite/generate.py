"""Generation in two layers, as mlx-lm has them.

`Tokens`: the token-level iterator. It prefills the prompt into cache row 0 (only past the
prefix the cache already holds), then samples on the device and runs decode steps, stopping at
a stop id, at the token budget, or when `cancel` is set; the sampled token is read back once a
step. `Generation` (what `model.generate(...)` returns) is the text layer on top: UTF-8 safe
streaming, user stop strings removed, statistics in `.stats` once it is exhausted.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from qlite.sampling import History, device_generator, sample
from qlite.errors import QliteError


@dataclass
class SamplingParams:
    """Defaults are the ones Qwen2.5 publishes in its generation_config.json. Every value is
    checked when the object is made (before any model work): a QliteError names the parameter."""
    max_new_tokens: int = 512
    temperature: float = 0.7      # 0 = greedy
    top_k: int = 20               # 0 = off
    top_p: float = 0.8            # 1 = off
    repetition_penalty: float = 1.05
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

        def bad(name, rule):  # the parameter first: the CLI writes its flag there
            raise QliteError(f"{name} {getattr(self, name)!r}: {rule}")

        def number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not (integer(self.max_new_tokens) and self.max_new_tokens >= 1):
            bad("max_new_tokens", "must be an integer >= 1")
        if not (number(self.temperature) and self.temperature >= 0):
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not (integer(self.top_k) and self.top_k >= 0):
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", "must be a number in (0, 1] (1 = off)")
        if not (number(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if self.seed is not None and not integer(self.seed):
            bad("seed", "must be an integer")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise QliteError(f"stop {s!r}: a stop string must be non-empty text")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""       # "stop", "length", "stop_string" or "cancelled"
    dropped_messages: int = 0     # oldest chat turns left out to fit the context window
    reused_tokens: int = 0        # prompt tokens already in the KV cache from the last reply
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        computed = self.prompt_tokens - self.reused_tokens
        return computed / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.generated_tokens - 1  # the first token comes out of the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0

    @property
    def decode_rate(self) -> str:
        """"N.N tok/s", or "–" when no decode step ran (one token comes out of the prefill)."""
        return f"{self.decode_tokens_per_s:,.1f} tok/s" if self.generated_tokens > 1 else "–"

    def summary(self) -> str:
        reused = f" ({self.reused_tokens} from cache)" if self.reused_tokens else ""
        return (f"prompt {self.prompt_tokens} tokens{reused}, "
                f"generated {self.generated_tokens} tokens, "
                f"prefill {self.prefill_tokens_per_s:.1f} tok/s, "
                f"decode {self.decode_rate}")


def fit_chat(tokenizer, messages: list[dict], context: int, reserve: int):
    """Token ids of the chat prompt, dropping the oldest turns (never the system prompt or the
    last message) until prompt + `reserve` new tokens fit in `context`. Returns (ids, dropped)."""
    messages = list(messages)
    dropped = 0
    while True:
        ids = tokenizer.encode_chat(messages)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(ids) + reserve <= context or len(messages) - first <= 1:
            return ids, dropped
        del messages[first]
        dropped += 1


class Tokens:
    """The token ids of one reply, as an iterator (stop ids are not yielded). `stats` fills in
    as it runs; the cache's record of row 0 says what it holds once the iterator is done or
    closed. progress(stage, done, total) hears of a prefill longer than one chunk."""

    def __init__(self, model, prompt_ids: list[int], params: SamplingParams,
                 cancel: threading.Event | None = None, stats: GenerationStats | None = None,
                 progress=None):
        self.model, self.params, self.cancel, self.progress = model, params, cancel, progress
        self.prompt_ids = prompt_ids
        self.stats = stats or GenerationStats(prompt_tokens=len(prompt_ids))
        self._ids = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._ids)

    def close(self):
        self._ids.close()

    def _run(self):
        model, p, stats = self.model, self.params, self.stats
        context = model.max_context
        n = len(self.prompt_ids)
        if n == 0:
            raise QliteError("the prompt is empty")
        if n >= context:
            raise QliteError(f"the prompt has {n} tokens; the context window is {context}")
        budget = min(p.max_new_tokens, context - n)
        device = model.model.norm.weight.device
        need = n + budget
        if model.cache.batch != 1 or model.cache.max_len < need:
            # Powers of two: a compiled decode step sees few cache shapes.
            model.setup_cache(1, min(context, max(256, 1 << (need - 1).bit_length())))
        # A chat's next turn starts with the last one's tokens: their keys/values are still in
        # the cache, so prefill only from where the prompts part (the last token at least).
        reuse = _common_prefix(model.cache.held[0], self.prompt_ids, limit=n - 1)
        stats.reused_tokens = reuse
        fed = list(self.prompt_ids)  # what the cache will hold once this reply is done
        generator = device_generator(p.seed, device)
        vocab = model.config.vocab_size
        history = History(1, vocab, device)
        history.reset(0, torch.tensor(self.prompt_ids, device=device))
        stop_ids = set(model.tokenizer.stop_ids) if model.tokenizer is not None else set()
        show = None
        if self.progress is not None and n - reuse > model.prefill_chunk:
            show = lambda done, total: self.progress("prefill", done, total)  # noqa: E731
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = model.prefill_row(0, torch.tensor(self.prompt_ids[reuse:], device=device),
                                           start=reuse, progress=show)[None]
                position = torch.tensor([n], device=device)
                while True:
                    step = sample(logits, p.temperature, p.top_k, p.top_p,
                                  p.repetition_penalty, history.seen, generator)
                    token = int(step[0])  # the one read back of a step
                    now = time.perf_counter()
                    if stats.generated_tokens == 0:
                        stats.prefill_seconds = now - t0
                    else:
                        stats.decode_seconds = now - t0 - stats.prefill_seconds
                    if token in stop_ids:
                        stats.finish_reason = "stop"
                        return
                    stats.generated_tokens += 1
                    stats.token_ids.append(token)
                    yield token
                    if self.cancel is not None and self.cancel.is_set():
                        stats.finish_reason = "cancelled"
                        return
                    if stats.generated_tokens >= budget:
                        stats.finish_reason = "length"
                        return
                    history.add(step)
                    compiling = self.progress is not None and model.will_compile(len(fed) + 1)
                    if compiling:
                        self.progress("compiling the decode step", 0, 1)
                    logits = model.decode_step(step, position, len(fed) + 1)
                    if compiling:
                        self.progress("compiling the decode step", 1, 1)
                    position += 1
                    fed.append(token)
        finally:
            model.cache.held[0] = fed


class TextStream:
    """Token ids -> text pieces of one reply: UTF-8 safe (the tokenizer's stream decoder), and
    ended by the first stop string, whose text is left out. What could be the start of a stop
    string is held back until it cannot be."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text, self.sent = "", 0  # everything decoded so far / how much of it went out
        self.stopped = False          # a stop string showed up: the reply ends there

    def push(self, token: int) -> str:
        """The text ready to go out once `token` is added ("" once stopped: flush() has
        the rest)."""
        self.text += self.decoder.push(token)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return ""
        return self._take(len(self.text) - self.hold)

    def flush(self) -> str:
        """The rest of the reply (up to the stop string, if one ended it)."""
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece


class Generation:
    """An iterator of text pieces for one reply; `.stats` is complete once it is exhausted."""

    def __init__(self, model, prompt_ids: list[int], params: SamplingParams,
                 cancel: threading.Event | None = None, dropped: int = 0, progress=None):
        self.model, self.params = model, params
        self.prompt_ids = prompt_ids
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids), dropped_messages=dropped)
        self.tokens = Tokens(model, prompt_ids, params, cancel, self.stats, progress)
        self._pieces = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def text(self) -> str:
        """Run to the end and return the whole reply."""
        return "".join(self)

    def _run(self):
        out = TextStream(self.model.tokenizer, self.params.stop)
        for token in self.tokens:
            piece = out.push(token)
            if out.stopped:
                self.stats.finish_reason = "stop_string"
                self.tokens.close()
                break
            if piece:
                yield piece
        rest = out.flush()
        if rest:
            yield rest


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most limit."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return max(n, 0)


def sampling_params(**options) -> SamplingParams:
    """SamplingParams from keyword arguments; an unknown name is a QliteError too."""
    names = SamplingParams.__dataclass_fields__
    for name in options:
        if name not in names:
            raise QliteError(f"{name}: not a sampling parameter (they are {', '.join(names)})")
    return SamplingParams(**options)


def generate(model, prompt, *, raw: bool = False, cancel: threading.Event | None = None,
             progress=None, **options) -> Generation:
    """Stream a reply. `prompt` is a list of chat messages ({"role", "content"}), or a string
    sent as one user turn through the chat template (as it is with raw=True).
    progress(stage, done, total) hears of a long prefill."""
    tok = model.tokenizer
    if tok is None:
        raise QliteError(f"{model.model_dir}: no tokenizer.json, cannot generate text")
    params = sampling_params(**options)
    if raw:
        return Generation(model, tok.encode(prompt), params, cancel, progress=progress)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    reserve = min(params.max_new_tokens, model.max_context // 4)
    ids, dropped = fit_chat(tok, messages, model.max_context, reserve)
    return Generation(model, ids, params, cancel, dropped, progress)
