"""Training-free compensation after head pruning: refit each pruned layer's o_proj.

Removing a KV group deletes its query heads' share of the attention output, so the layer's
output drifts from what the rest of the network expects. The kept heads' outputs still carry
much of the same information, so a new o_proj fitted by least squares on calibration text,
mapping the kept heads' outputs to the *unpruned* layer's o_proj output, closes a good part of
the gap in seconds and without any gradient step (the idea of FLAP and SliceGPT's training-
free repair, here as an exact ridge regression per layer).

The statistics are accumulated in float64 as X^T X and X^T Y (X: o_proj inputs of all heads,
Y: the unpruned o_proj output, both taken from the unpruned model on the same tokens), so memory does not grow with the calibration text and the
kept heads' sub-problem is a slice of X^T X. The ridge term, relative to X^T X's mean
diagonal, keeps the solve stable when kept heads are nearly collinear and stops the fit from
overshooting on the calibration text.

A fit can still hurt: fitted on too few tokens it learns their noise, and each layer is fitted
on the unpruned model's inputs, not on what the pruned layers below it pass up. So the fit is
checked on held-out calibration texts (statistics of other texts, never fitted): per layer on
the o_proj output error, where `auto` also chooses the ridge, and for the whole model on the
loss (pruning.py), and it is kept only where it lowers them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from workbench.models.anatomy import Attention
from workbench.step_options import COMPENSATE_RIDGES


def query_index(attn: Attention, groups: Sequence[int]) -> torch.Tensor:
    """o_proj input columns (query-head channels) that belong to the given KV groups."""
    hd, gs = attn.head_dim, attn.num_key_value_groups
    return torch.tensor([g * gs * hd + i for g in groups for i in range(gs * hd)], dtype=torch.long)


class OProjStatistics:
    """X^T X, X^T Y and Y^T Y of one o_proj, summed over every token it sees while attached.
    A bias, if the layer has one, is subtracted from Y: only the weight is refitted."""

    def __init__(self, linear: nn.Linear):
        self.xtx = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float64)
        self.xty = torch.zeros(linear.in_features, linear.out_features, dtype=torch.float64)
        self.yty = torch.zeros((), dtype=torch.float64)
        self.tokens = 0
        self._handle = linear.register_forward_hook(self._add)

    def _add(self, module: nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = args[0].detach().reshape(-1, module.in_features).to(torch.float64).cpu()
        y = output.detach().reshape(-1, module.out_features).to(torch.float64).cpu()
        if module.bias is not None:
            y = y - module.bias.detach().to(torch.float64).cpu()
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty += (y * y).sum()
        self.tokens += x.shape[0]

    def remove(self) -> None:
        self._handle.remove()


def collect(
    attns: list[Attention], layers: Sequence[int], model: nn.Module, batches: list[torch.Tensor]
) -> dict[int, OProjStatistics]:
    """Run the (unpruned) model over `batches` and gather o_proj statistics of `layers`."""
    stats = {layer: OProjStatistics(attns[layer].o_proj) for layer in layers}
    try:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for s in stats.values():
            s.remove()
    return stats


def solve(stats: OProjStatistics, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares for the kept columns: the new weight [d_out, d_keep]."""
    a = stats.xtx.index_select(0, keep).index_select(1, keep)
    b = stats.xty.index_select(0, keep)
    scale = a.diagonal().mean().clamp(min=1e-12)
    a = a + ridge * scale * torch.eye(a.shape[0], dtype=a.dtype)
    solution: torch.Tensor = torch.linalg.solve(a, b)
    return solution.T


def relative_error(stats: OProjStatistics, keep: torch.Tensor, weight: torch.Tensor) -> float:
    """||X_keep W^T - Y||^2 / ||Y||^2 over the gathered tokens, from the statistics alone:
    tr(W Xk^T Xk W^T) - 2 tr(W Xk^T Y) + tr(Y^T Y)."""
    w = weight.detach().to(torch.float64).cpu()
    a = stats.xtx.index_select(0, keep).index_select(1, keep)
    b = stats.xty.index_select(0, keep)
    err = torch.trace(w @ a @ w.T) - 2 * torch.trace(w @ b) + stats.yty
    return float(err / stats.yty.clamp(min=1e-30))


def refit(
    attns: list[Attention],
    kept: dict[int, list[int]],
    stats: dict[int, OProjStatistics],
    ridge: float | str,
    held_out: dict[int, OProjStatistics] | None = None,
) -> dict[int, dict[str, float | bool]]:
    """Replace each pruned layer's o_proj weight (already sliced to the kept heads) with the
    least-squares fit on `stats`, when it helps: with `held_out` statistics (other calibration
    texts, never fitted), `ridge="auto"` takes the grid value with the lowest held-out error,
    and a layer whose fit does not lower its held-out error below the uncompensated weight's
    keeps that weight (a fit to a few thousand tokens can learn their noise; the issue that
    brought this check saw perplexity 39 -> 91 with 8 calibration texts). A numeric `ridge` is
    applied to every layer, its held-out errors reported.

    Returns {layer: {"ridge", "error_before", "error_after" (on the fitted text),
    "held_out_before", "held_out_after", "compensated"}}; the held-out entries only with `held_out`."""
    if ridge == "auto" and held_out is None:
        raise ValueError("compensate_ridge: auto chooses on held-out calibration text; none was given")
    summary: dict[int, dict[str, float | bool]] = {}
    for layer, groups in kept.items():
        o_proj = attns[layer].o_proj
        weight, entry = fit(
            stats[layer],
            None if held_out is None else held_out[layer],
            query_index(attns[layer], groups),
            o_proj.weight,
            ridge,
        )
        if entry["compensated"]:
            with torch.no_grad():
                o_proj.weight.copy_(weight.to(o_proj.weight.dtype))
        summary[layer] = entry
    return summary


def fit(
    stats: OProjStatistics,
    held_out: OProjStatistics | None,
    keep: torch.Tensor,
    weight: torch.Tensor,
    ridge: float | str,
) -> tuple[torch.Tensor, dict[str, float | bool]]:
    """One layer's refit for the kept o_proj input columns `keep`, whose current (uncompensated)
    weight is `weight` [d_out, len(keep)]: (the fit at the chosen ridge, in float64; the summary
    entry `refit` reports, whose `compensated` says whether the held-out error lets the fit
    replace `weight`). Also what the `kl` pruning criterion measures each candidate removal with."""
    grid = COMPENSATE_RIDGES if ridge == "auto" else (float(ridge),)
    fits = {r: solve(stats, keep, r) for r in grid}
    entry: dict[str, float | bool] = {"error_before": round(relative_error(stats, keep, weight), 6)}
    if held_out is None:
        chosen = grid[0]
        better = True
    else:
        scores = {r: relative_error(held_out, keep, w) for r, w in fits.items()}
        chosen = min(scores, key=lambda r: scores[r])
        baseline = relative_error(held_out, keep, weight)
        # A ridge given as a number is a fit asked for (the shipped configs pin the one their
        # adapter was trained after): it is reported, and only the whole-model check can undo it.
        better = scores[chosen] < baseline or ridge != "auto"
        entry |= {"held_out_before": round(baseline, 6), "held_out_after": round(scores[chosen], 6)}
    entry |= {
        "ridge": chosen,
        "error_after": round(relative_error(stats, keep, fits[chosen]), 6),
        "compensated": better,
    }
    return fits[chosen], entry
