"""Mixed precision by sensitivity: which layers can take fewer bits, measured rather than guessed.

A layer's sensitivity to a scheme is the KL divergence of the whole model's next-token
distribution, on a few windows of calibration text, when that layer alone is quantized that
way and every other layer stays as it is (HAWQ-style per-layer measurement, without the
Hessian: one forward pass per layer and scheme, so a few minutes for the embedded model's
211 layers). Then a budget is spent greedily: every layer starts at its cheapest scheme, and
the upgrade that removes the most KL per extra byte is taken while it fits. Summing single-layer
KLs treats the layers' errors as independent; it ranks choices well, but the summed figure is
an estimate of the combined model's KL, not a measurement of it.

This module knows nothing of schemes: `quantization.py` hands it each layer's quantized
variants and their sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.metrics import _log_probs, log_prob_divergence

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class Sensitivity:
    kl: dict[str, dict[str, float]]
    """layer -> scheme -> mean KL(model || model with that layer alone in that scheme), nats per token"""
    bytes: dict[str, dict[str, int]]
    """layer -> scheme -> bytes of its weight and quantization parameters"""
    windows: int
    tokens: int


@dataclass
class Choice:
    schemes: dict[str, str]
    """layer -> chosen scheme"""
    budget_bytes: int
    chosen_bytes: int
    weights: int
    """weights of the layers chosen for (in x out, summed)"""
    curve: list[dict[str, float]] = field(default_factory=list)
    """the greedy path: after each upgrade, bits per weight and the summed single-layer KL"""

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.chosen_bytes / self.weights


@torch.no_grad()
def measure(
    model: PreTrainedModel,
    names: list[str],
    variants: Callable[[str], Iterator[tuple[str, nn.Module, int]]],
    keep_bytes: Callable[[str], int],
    windows: list[torch.Tensor],
) -> Sensitivity:
    """KL of each (layer, scheme) that `variants(name)` yields as (scheme, quantized copy, bytes);
    `keep_bytes(name)` is the layer's size as it is (its KL is 0). The model is left as it was."""
    reference = [_log_probs(model, w) for w in windows]
    kl: dict[str, dict[str, float]] = {}
    sizes: dict[str, dict[str, int]] = {}
    with tqdm(total=len(names), desc="sensitivity", unit="layer") as bar:
        for name in names:
            original = model.get_submodule(name)
            kl[name], sizes[name] = {"keep": 0.0}, {"keep": keep_bytes(name)}
            for scheme, layer, size in variants(name):
                model.set_submodule(name, layer)
                try:
                    drift = log_prob_divergence(
                        (p, _log_probs(model, w), w[1:].cpu()) for p, w in zip(reference, windows)
                    )
                finally:
                    model.set_submodule(name, original)
                kl[name][scheme], sizes[name][scheme] = drift.kl_mean, size
            bar.update()
    return Sensitivity(kl, sizes, len(windows), sum(len(w) - 1 for w in windows))


def choose(sensitivity: Sensitivity, allowed: list[str], weights: dict[str, int], budget_bytes: int) -> Choice:
    """Per layer, one of `allowed` (schemes measured for it, `keep` included when allowed), total
    bytes within `budget_bytes`, greedily by KL removed per extra byte (see module doc)."""
    options = {
        name: sorted((s for s in allowed if s in sensitivity.bytes[name]), key=lambda s: sensitivity.bytes[name][s])
        for name in sensitivity.kl
    }
    state = {name: schemes[0] for name, schemes in options.items()}
    size = {name: sensitivity.bytes[name][s] for name, s in state.items()}
    total_weights = sum(weights[n] for n in state)
    total = sum(size.values())
    if total > budget_bytes:
        cheapest = ", ".join(sorted({s for s in state.values()}))
        raise ValueError(
            f"budget unreachable: {budget_bytes:,} bytes ({8 * budget_bytes / total_weights:.3f} bits per weight) is "
            f"below the cheapest choice, every layer in {cheapest}: {total:,} bytes "
            f"({8 * total / total_weights:.3f} bits per weight); raise the budget or allow a cheaper precision"
        )

    def estimate() -> float:
        return sum(sensitivity.kl[n][s] for n, s in state.items())

    curve = [{"bits_per_weight": 8 * total / total_weights, "kl_sum": estimate()}]
    while True:
        best: tuple[float, str, str, int] | None = None
        for name, current in state.items():
            for scheme in options[name]:
                extra = sensitivity.bytes[name][scheme] - size[name]
                gain = sensitivity.kl[name][current] - sensitivity.kl[name][scheme]
                if extra > 0 and gain > 0 and total + extra <= budget_bytes:
                    if best is None or gain / extra > best[0]:
                        best = (gain / extra, name, scheme, extra)
        if best is None:
            break
        _, name, scheme, extra = best
        state[name], size[name] = scheme, size[name] + extra
        total += extra
        curve.append({"bits_per_weight": 8 * total / total_weights, "kl_sum": estimate()})
    return Choice(state, budget_bytes, total, total_weights, curve)
