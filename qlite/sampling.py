"""Sampling on the model's device: no host round trip until the caller reads the token.

`sample(logits [R, V], ...)` applies, in this order, the repetition penalty (tokens marked in
`seen`, a [R, V] boolean buffer that `History` keeps), temperature, top-k, top-p, and draws one
token per row. Greedy (temperature 0) is argmax. The draw is the exponential race: argmax of
p_i / E_i with E_i ~ Exp(1) picks i with probability p_i (no cumulative sums, no
normalisation, nothing read back), seeded by a torch.Generator on the logits' device.
"""
from __future__ import annotations

import torch


class History:
    """The tokens each row has seen, as a [R, V] boolean buffer on the device (allocated once;
    marking a token is an indexed write, so the history is never re-concatenated)."""

    def __init__(self, rows: int, vocab: int, device):
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)

    def reset(self, row: int, ids: torch.Tensor):
        """Row `row` has seen exactly ids [T] (a prompt)."""
        self.seen[row] = False
        self.seen[row, ids] = True

    def add(self, tokens: torch.Tensor, rows: torch.Tensor | None = None):
        """Mark tokens [R] (or tokens[i] for row rows[i])."""
        if rows is None:
            rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.seen[rows, tokens] = True


def device_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator on `device` seeded with `seed` (None: torch's default one)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           repetition_penalty: float = 1.0, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits [R, V] (float32): LongTensor [R] on logits' device.

    repetition_penalty (as in CTRL and transformers): the logits of tokens marked in seen
    [R, V] are divided by it when positive, multiplied when negative. temperature 0: greedy.
    top_k 0 and top_p 1 are off; top-p keeps the smallest prefix of the sorted distribution
    whose mass reaches top_p (the most likely token always stays)."""
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty,
                                logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        values, ids = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    else:
        values, ids = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-30)
    return ids.gather(-1, (probs / race).argmax(dim=-1, keepdim=True))[:, 0]
