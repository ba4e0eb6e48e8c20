"""Quality numbers of a model on text: perplexity, the one every compression step is judged by,
and the divergence of a compressed model's next-token distributions from the original's."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def token_windows(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], *, window: int, max_windows: int | None
) -> list[torch.Tensor]:
    """Non-overlapping windows of the concatenated texts' tokens, the first `max_windows` of them
    (all when None); a last window of one token predicts nothing and is dropped."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window)]
    windows = [w for w in windows if len(w) > 1][: max_windows or None]
    if not windows:
        raise ValueError("evaluation text is too short for a perplexity")
    return windows


def input_device(model: PreTrainedModel) -> torch.device:
    """Where the model takes its token ids: its embedding table's device (a model spread over
    devices with a device map starts there)."""
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight.device


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
    windows = token_windows(tokenizer, texts, window=window, max_windows=max_windows)
    device = input_device(model)
    total_loss, total_tokens = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            w = w.to(device).unsqueeze(0)
            loss = model(input_ids=w, labels=w, use_cache=False).loss.float().item()
            total_loss += loss * (w.shape[1] - 1)
            total_tokens += w.shape[1] - 1
    return math.exp(total_loss / total_tokens)


@dataclass(frozen=True)
class Divergence:
    """How far a compressed model's next-token distributions are from the original's, on the
    same tokens; KL figures in nats per token, as llama.cpp's `perplexity --kl-divergence`
    reports them ("Mean KLD", "Median KLD", "99.0% KLD", "Maximum KLD", "Same top p")."""

    kl_mean: float
    """KL(original || compressed) of the full next-token distribution, averaged over every scored position"""
    kl_median: float
    kl_p99: float
    """the 99th percentile of the per-token KL: the tail a mean hides"""
    kl_max: float
    top1_agreement: float
    """share of positions where both models' most likely next token is the same (llama.cpp's "Same top p")"""
    tokens: int
    """scored positions: each window's tokens less one"""
    windows: int
    original_perplexity: float
    compressed_perplexity: float


def _log_probs(model: PreTrainedModel, window: torch.Tensor) -> torch.Tensor:
    """log-softmax of the next-token logits at every position but the last, on the CPU in float32."""
    logits = model(input_ids=window.to(input_device(model)).unsqueeze(0), use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.to("cpu", torch.float32), dim=-1)


def divergence(
    original: PreTrainedModel,
    compressed: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    window: int = 512,
    max_windows: int | None = 16,
) -> Divergence:
    """KL(original || compressed) per token, top-1 agreement and both perplexities, from one
    forward of each model per window: the windows `perplexity` scores for the same arguments.

    At each position the KL is sum_v p(v) (log p(v) - log q(v)) over the whole vocabulary, p the
    original's next-token distribution and q the compressed model's; the figures summarise it
    over all scored positions. Unlike llama.cpp, which scores only the second half of each
    context, every position of a window is scored, as `perplexity` does. The models may sit on
    different devices in different dtypes: their logits are compared on the CPU in float32."""
    windows = token_windows(tokenizer, texts, window=window, max_windows=max_windows)
    with torch.inference_mode():
        return log_prob_divergence((_log_probs(original, w), _log_probs(compressed, w), w[1:]) for w in windows)


def log_prob_divergence(windows: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Divergence:
    """`divergence`'s figures from next-token log-probabilities computed elsewhere (by a runtime
    that is not a transformers model, such as llama.cpp): one (log_p, log_q, targets) per window,
    log_p the original's and log_q the compared model's log-softmax at each scored position
    ([positions, vocab], float32 on the CPU) and targets the next tokens ([positions]). Taken one
    window at a time, so a generator keeps one window's log-probs in memory."""
    kls, agreements, count = [], 0, 0
    nll_original, nll_compressed = 0.0, 0.0
    for log_p, log_q, targets in windows:
        if log_p.shape[-1] != log_q.shape[-1]:
            raise ValueError(
                f"the models' vocabularies differ: the original scores {log_p.shape[-1]} tokens, the "
                f"compressed model {log_q.shape[-1]}; KL divergence needs the same next-token set"
            )
        kls.append((log_p.exp() * (log_p - log_q)).sum(dim=-1))
        agreements += int((log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).sum())
        targets = targets.unsqueeze(-1)
        nll_original -= float(log_p.gather(-1, targets).double().sum())
        nll_compressed -= float(log_q.gather(-1, targets).double().sum())
        count += 1
    if not kls:
        raise ValueError("no windows to compare")
    kl = torch.cat(kls).double()
    tokens = kl.numel()
    return Divergence(
        kl_mean=float(kl.mean()),
        kl_median=float(kl.median()),
        kl_p99=float(torch.quantile(kl, 0.99)),
        kl_max=float(kl.max()),
        top1_agreement=agreements / tokens,
        tokens=tokens,
        windows=count,
        original_perplexity=math.exp(nll_original / tokens),
        compressed_perplexity=math.exp(nll_compressed / tokens),
    )
