"""Quality numbers of a model on text: perplexity now, the one every compression step is judged by."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    window: int = 512,
    max_windows: int | None = 16,
) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the concatenated texts.

    The same texts, window and count give the same token set for any model that shares the
    tokenizer, so values before and after compression compare directly."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) > 1][: max_windows or None]
    if not windows:
        raise ValueError("evaluation text is too short for a perplexity")
    device = model.get_input_embeddings().weight.device
    total_loss, total_tokens = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            w = w.to(device).unsqueeze(0)
            loss = model(input_ids=w, labels=w, use_cache=False).loss.float().item()
            total_loss += loss * (w.shape[1] - 1)
            total_tokens += w.shape[1] - 1
    return math.exp(total_loss / total_tokens)
