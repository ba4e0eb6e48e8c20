"""Next-token choice: repetition penalties over the whole batch, then greedy, or sampled
through transformers' own logits warpers.

The penalties follow the two conventions clients expect, and default to off (OpenAI's
defaults):

- `frequency_penalty` / `presence_penalty` (OpenAI): subtract `frequency * count` and
  `presence * (count > 0)` from the logit of every token *generated so far*;
- `repetition_penalty` (vLLM / transformers): every token seen in the prompt *or* the reply
  so far has a positive logit divided by it and a negative one multiplied by it (> 1
  discourages repeats, 1 is off).

They run batched over the rows of a batch, each row with its own values (a request that
asks for none pays nothing), before temperature; `min_p` then filters per row after
temperature, as transformers orders its warpers. Penalties apply to greedy decoding too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_NO_IDS = cast(torch.LongTensor, torch.empty((1, 0), dtype=torch.long))


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Penalised copy of (rows, vocab) `logits`. `counts` (rows, vocab) counts each row's
    generated tokens; `seen` (rows, vocab, bool) marks its prompt and generated tokens;
    `frequency`, `presence`, `repetition` are (rows,), one value per row. vLLM's formula."""
    rep = repetition.to(logits.dtype)[:, None]
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    out = torch.where(seen, scaled, logits)
    return out - frequency.to(logits.dtype)[:, None] * counts - presence.to(logits.dtype)[:, None] * (counts > 0)


def penalize(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """The batch's (rows, vocab) logits with each row's penalties applied; row i belongs to
    `samplers[i]`. Returns `logits` itself when no row asks for a penalty."""
    rows = [i for i, s in enumerate(samplers) if s.penalised]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    active = [samplers[i] for i in rows]
    for s in active:
        s.start_counting(vocab, logits.device)
    index = torch.tensor(rows, device=logits.device)
    out = logits.float().clone()
    out[index] = apply_penalties(
        out[index],
        torch.stack([cast(torch.Tensor, s.counts) for s in active]),  # set by start_counting above
        torch.stack([cast(torch.Tensor, s.seen) for s in active]),
        torch.tensor([s.frequency_penalty for s in active], device=logits.device),
        torch.tensor([s.presence_penalty for s in active], device=logits.device),
        torch.tensor([s.repetition_penalty for s in active], device=logits.device),
    )
    return out


class Sampler:
    """One request's sampling: its warpers, its own random generator, and (when it asks for
    penalties) the counts of the tokens it has produced so far. Its arguments are
    SamplingParams' knobs by name, already within their bounds: all of them but max_tokens."""

    def __init__(
        self,
        *,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        device: torch.device,
        min_p: float = 0.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        prompt_ids: Sequence[int] = (),
    ):
        self.greedy = temperature == 0.0
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_k > 0:
                self.warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))
            if min_p > 0.0:
                self.warpers.append(MinPLogitsWarper(min_p))
        self.frequency_penalty = frequency_penalty
        self.presence_penalty = presence_penalty
        self.repetition_penalty = repetition_penalty
        self.penalised = frequency_penalty != 0.0 or presence_penalty != 0.0 or repetition_penalty != 1.0
        self._prompt_ids = list(prompt_ids)
        self._pending: list[int] = []
        self.counts: torch.Tensor | None = None
        """(vocab,) float: how often each token was generated; built at the first penalised step."""
        self.seen: torch.Tensor | None = None
        """(vocab,) bool: tokens of the prompt or the reply so far (repetition_penalty's set)."""
        # A generator per request: a seed reproduces a reply even while other requests sample.
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def start_counting(self, vocab: int, device: torch.device) -> None:
        """Build the counts once the vocabulary size (the logits' width) is known."""
        if self.counts is None:
            self.counts = torch.zeros(vocab, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor([i for i in self._prompt_ids if i < vocab], dtype=torch.long, device=device)
            self.seen[ids] = True
        for token in self._pending:
            self._count(token)
        self._pending.clear()

    def _count(self, token: int) -> None:
        assert self.counts is not None and self.seen is not None, "counted before start_counting()"
        self.counts[token] += 1
        self.seen[token] = True

    def __call__(self, logits: torch.Tensor) -> int:
        """`logits` is (1, vocab) for the last position, penalties already applied."""
        if self.greedy:
            token = int(logits.argmax(dim=-1))
        else:
            # These warpers look only at the scores; the ids argument is part of their interface.
            scores = self.warpers(_NO_IDS, logits.float())
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=self.generator))
        if self.penalised:
            if self.counts is None:
                self._pending.append(token)
            else:
                self._count(token)
        return token
