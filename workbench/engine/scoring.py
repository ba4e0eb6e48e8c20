"""How likely the model finds a prompt, token by token: the completions API's echoed logprobs.

Evaluation harnesses (lm-evaluation-harness's loglikelihood requests) score a context and a
continuation by asking for the prompt's own logprobs with no reply. That is one forward over
each prompt, no KV cache, no sampling: each token's logprob is read from the logits at the
position before it, so the first token has none. Prompts are right-padded into one batch:
under a causal mask the padding after a prompt cannot change the positions before it, so no
attention mask or position shift is needed.

The forward keeps every position's logits, (rows, width, vocab) floats, so prompts are
batched only while that stays under `LOGITS_BUDGET_BYTES`; a longer prompt runs alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

LOGITS_BUDGET_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class PromptLogprobs:
    """One prompt's tokens and, for each, its logprob given the tokens before it."""

    token_ids: list[int]
    logprobs: list[float | None]
    """None for the first token: nothing comes before it."""
    top: list[tuple[tuple[int, float], ...] | None]
    """Per position, the (token id, logprob) of the `top` likeliest tokens, best first; None
    for the first token."""


def score_prompts(
    model: PreTrainedModel, prompts: list[list[int]], *, top: int, pad_id: int, device: torch.device
) -> list[PromptLogprobs]:
    """Every prompt's per-token logprobs (and `top` alternatives per position), in order."""
    vocab = int(model.config.get_text_config().vocab_size)
    scored: list[PromptLogprobs] = []
    for group in _groups(prompts, vocab):
        scored += _score_group(model, group, top, pad_id, device)
    return scored


def _groups(prompts: list[list[int]], vocab: int) -> list[list[list[int]]]:
    """Consecutive prompts, batched while their (rows, width, vocab) float32 logits fit the budget."""
    groups: list[list[list[int]]] = []
    for ids in prompts:
        if groups:
            group = groups[-1]
            width = max(len(ids), *(len(p) for p in group))
            if (len(group) + 1) * width * vocab * 4 <= LOGITS_BUDGET_BYTES:
                group.append(ids)
                continue
        groups.append([ids])
    return groups


def _score_group(
    model: PreTrainedModel, prompts: list[list[int]], top: int, pad_id: int, device: torch.device
) -> list[PromptLogprobs]:
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits
        out = []
        for row, ids in enumerate(prompts):
            # position i predicts token i + 1
            logprobs = torch.log_softmax(logits[row, : len(ids) - 1].float(), dim=-1)
            nexts = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device)
            chosen = logprobs.gather(-1, nexts.unsqueeze(-1)).squeeze(-1).tolist()
            tops: list[tuple[tuple[int, float], ...] | None] = [None]
            if top > 0 and len(ids) > 1:
                values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
                tops += [tuple(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
            else:
                tops += [()] * (len(ids) - 1)
            out.append(PromptLogprobs(token_ids=list(ids), logprobs=[None, *chosen], top=tops))
    return out
