"""Next-token choice: greedy, or sampled through transformers' own logits warpers."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_NO_IDS = torch.empty((1, 0), dtype=torch.long)


class Sampler:
    def __init__(self, *, temperature: float, top_p: float, top_k: int, seed: int | None, device: torch.device):
        self.greedy = temperature == 0.0
        self.warpers = LogitsProcessorList()
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_k > 0:
                self.warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))
        # A generator per request: a seed reproduces a reply even while other requests sample.
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """`logits` is (1, vocab) for the last position."""
        if self.greedy:
            return int(logits.argmax(dim=-1))
        # These warpers look only at the scores; the ids argument is part of their interface.
        scores = self.warpers(_NO_IDS, logits.float())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))
