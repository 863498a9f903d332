"""Generation: chat prompt -> prefill into the static KV cache -> sampled decode, streamed as text.

`Generation` is what `model.generate(...)` returns: iterate it for text pieces (UTF-8 safe,
user stop strings removed); afterwards `.stats` holds token counts and speeds.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from qlite.config import PREFILL_CHUNK
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

    def summary(self) -> str:
        reused = f" ({self.reused_tokens} from cache)" if self.reused_tokens else ""
        return (f"prompt {self.prompt_tokens} tokens{reused}, "
                f"generated {self.generated_tokens} tokens, "
                f"prefill {self.prefill_tokens_per_s:.1f} tok/s, "
                f"decode {self.decode_tokens_per_s:.1f} tok/s")


def sample(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None,
           generator: torch.Generator | None) -> int:
    """Pick the next token from logits [vocab] (fp32)."""
    if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
        # As in CTRL and transformers: shrink the logits of tokens already in the context.
        prev = logits[seen]
        logits[seen] = torch.where(prev > 0, prev / p.repetition_penalty,
                                   prev * p.repetition_penalty)
    if p.temperature <= 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
        probs = probs.scatter(0, idx[drop], 0.0)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


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


class Generation:
    """An iterator of text pieces for one reply; `.stats` is complete once it is exhausted."""

    def __init__(self, model, prompt_ids: list[int], params: SamplingParams,
                 cancel: threading.Event | None = None, dropped: int = 0):
        self.model, self.params, self.cancel = model, params, cancel
        self.prompt_ids = prompt_ids
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids), dropped_messages=dropped)
        self._pieces = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def text(self) -> str:
        """Run to the end and return the whole reply."""
        return "".join(self)

    def _run(self):
        model, p = self.model, self.params
        tok = model.tokenizer
        context = model.max_context
        n = len(self.prompt_ids)
        if n == 0:
            raise QliteError("the prompt is empty")
        if n >= context:
            raise QliteError(f"the prompt has {n} tokens; the context window is {context}")
        budget = min(p.max_new_tokens, context - n)
        device = model.model.norm.weight.device
        need = n + budget
        if model.cache_len < need:
            model.setup_cache(1, min(context, -(-need // 256) * 256))
        # A chat's next turn starts with the last one's tokens: their keys/values are still in
        # the cache, so prefill only from where the prompts part (the last token at least).
        reuse = _common_prefix(model.cached_ids, self.prompt_ids, limit=n - 1)
        fed = list(self.prompt_ids)  # what the cache will hold once this reply is done
        generator = None
        if p.seed is not None:
            generator = torch.Generator().manual_seed(p.seed)
        seen = torch.tensor(self.prompt_ids, device=device)
        stream = tok.stream_decoder()
        stop_ids = set(tok.stop_ids)
        text, sent = "", 0  # everything decoded so far / how much of it went out
        hold = max((len(s) for s in p.stop), default=1) - 1
        stats = self.stats
        stats.reused_tokens = reuse
        prompt = torch.tensor([self.prompt_ids], device=device)
        offload = getattr(model, "offload", None)
        chunk = offload.plan.prefill_chunk if offload else PREFILL_CHUNK
        t0 = time.perf_counter()
        with torch.inference_mode():
            # Prefill in chunks: activation memory stays bounded however long the prompt.
            for pos in range(reuse, n, chunk):
                logits = model(prompt[:, pos:pos + chunk], start=pos, last_only=True)
            pos = n
            while True:
                logits = logits[0, -1].float()
                token = sample(logits, p, seen, generator)
                now = time.perf_counter()
                if stats.generated_tokens == 0:
                    stats.prefill_seconds = now - t0
                else:
                    stats.decode_seconds = now - t0 - stats.prefill_seconds
                if token in stop_ids:
                    stats.finish_reason = "stop"
                    break
                stats.generated_tokens += 1
                stats.token_ids.append(token)
                text += stream.push(token)
                cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    stats.finish_reason = "stop_string"
                    break
                if len(text) - hold > sent:  # keep back what could start a stop string
                    yield text[sent:len(text) - hold]
                    sent = len(text) - hold
                if self.cancel is not None and self.cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                if stats.generated_tokens >= budget:
                    stats.finish_reason = "length"
                    break
                seen = torch.cat([seen, torch.tensor([token], device=device)])
                logits = model(torch.tensor([[token]], device=device), start=pos)
                fed.append(token)
                pos += 1
        model.cached_ids = fed
        if stats.finish_reason != "stop_string":
            text += stream.flush()
        if len(text) > sent:
            yield text[sent:]


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of a and b, at most limit."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return max(n, 0)


def sampling_params(**sampling) -> SamplingParams:
    """SamplingParams from keyword arguments; an unknown name is a QliteError too."""
    names = SamplingParams.__dataclass_fields__
    for name in sampling:
        if name not in names:
            raise QliteError(f"{name}: not a sampling parameter (they are {', '.join(names)})")
    return SamplingParams(**sampling)


def generate(model, prompt, *, raw: bool = False, cancel: threading.Event | None = None,
             **sampling) -> Generation:
    """Stream a reply. `prompt` is a list of chat messages ({"role", "content"}), or a string
    sent as one user turn through the chat template (as it is with raw=True)."""
    tok = model.tokenizer
    if tok is None:
        raise QliteError(f"{model.model_dir}: no tokenizer.json, cannot generate text")
    params = sampling_params(**sampling)
    if raw:
        return Generation(model, tok.encode(prompt), params, cancel)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    reserve = min(params.max_new_tokens, model.max_context // 4)
    ids, dropped = fit_chat(tok, messages, model.max_context, reserve)
    return Generation(model, ids, params, cancel, dropped)
