"""Structured attention-head pruning that really removes heads.

Unit of pruning: a key/value group. With grouped-query attention each KV head serves a
group of query heads; removing the KV head together with its whole query group keeps
every layer's group size uniform (which transformers' attention kernels require) and
shrinks the KV cache, the memory that bounds context on a phone. So pruning takes rows
out of q/k/v (and their biases) and columns out of o_proj, group by group, and records
the per-layer head counts in the config so a saved model loads back at its new size.

Importance, after Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"):
- `taylor`: |dL/dm| for a mask m multiplying each group's attention output, summed over
  calibration text, normalised per layer;
- `attention_entropy`: groups whose heads attend diffusely (high entropy) go first;
- `weight_norm`: Frobenius norm of the group's q/k/v rows and o_proj columns;
- `random`: the control every criterion must beat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.compress import compensation
from workbench.data import calibration_texts as shipped_calibration_texts
from workbench.models.anatomy import (
    attention_layers,
    eager_attention,
    keep_groups,
    kv_groups,
    mask_o_proj_input,
    record_in_config,
)
from workbench.step_options import CRITERIA, PruneOptions


@dataclass
class PruneReport:
    step: str
    criterion: str
    group_size: int
    removed: dict[int, list[int]]
    """layer -> removed KV group indices (in the unpruned numbering)"""
    heads_before: list[int]
    heads_after: list[int]
    kv_heads_before: list[int]
    kv_heads_after: list[int]
    params_before: int
    params_after: int
    importance: list[list[float]] = field(default_factory=list)
    compensation: dict[int, dict[str, float]] = field(default_factory=dict)
    """layer -> relative o_proj output error on the calibration text before/after the refit"""


# --- importance ---------------------------------------------------------------------------


def _calibration_batches(tokenizer, texts: list[str], n: int, tokens: int, device) -> list[torch.Tensor]:
    batches = []
    for text in texts[:n]:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :tokens]
        if ids.shape[1] >= 8:
            batches.append(ids.to(device))
    if not batches:
        raise ValueError("calibration text is empty or too short to measure head importance")
    return batches


def taylor_importance(model, attns, batches) -> torch.Tensor:
    groups = max(kv_groups(a) for a in attns)
    mask = torch.ones(len(attns), groups, device=batches[0].device, requires_grad=True)
    handles = [mask_o_proj_input(attn, mask[layer, : kv_groups(attn)]) for layer, attn in enumerate(attns)]
    grads = torch.zeros(len(attns), groups, device=mask.device)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for ids in batches:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (grad,) = torch.autograd.grad(loss, mask)
            grads += grad.abs()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    # Michel et al. normalise importance within each layer (L2) before ranking across layers.
    return grads / grads.norm(dim=1, keepdim=True).clamp(min=1e-12)


def entropy_importance(model, attns, batches) -> torch.Tensor:
    groups = max(kv_groups(a) for a in attns)
    entropy = torch.zeros(len(attns), groups, device=batches[0].device)
    with eager_attention(model), torch.inference_mode():
        for ids in batches:
            probs = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
            for layer, (attn, p) in enumerate(zip(attns, probs)):
                h = -(p * p.clamp(min=1e-12).log()).sum(-1).mean(dim=(0, 2))  # per query head
                entropy[layer, : kv_groups(attn)] += h.view(kv_groups(attn), attn.num_key_value_groups).mean(-1)
    return -entropy / len(batches)


def weight_norm_importance(attns) -> torch.Tensor:
    groups = max(kv_groups(a) for a in attns)
    scores = torch.zeros(len(attns), groups)
    for layer, attn in enumerate(attns):
        hd, gs = attn.head_dim, attn.num_key_value_groups
        for g in range(kv_groups(attn)):
            q = attn.q_proj.weight[g * gs * hd : (g + 1) * gs * hd]
            k = attn.k_proj.weight[g * hd : (g + 1) * hd]
            v = attn.v_proj.weight[g * hd : (g + 1) * hd]
            o = attn.o_proj.weight[:, g * gs * hd : (g + 1) * gs * hd]
            scores[layer, g] = sum(float(t.detach().float().norm()) for t in (q, k, v, o))
    return scores


def random_importance(attns, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(len(attns), max(kv_groups(a) for a in attns), generator=generator)


def importance(
    model,
    tokenizer,
    criterion: str,
    *,
    texts: list[str] | None = None,
    seed: int = 0,
    calibration_texts: int = 16,
    calibration_tokens: int = 256,
) -> torch.Tensor:
    """[layer, kv group] scores; higher means keep."""
    attns = attention_layers(model)
    if criterion == "random":
        return random_importance(attns, seed)
    if criterion == "weight_norm":
        return weight_norm_importance(attns)
    if texts is None:
        texts = shipped_calibration_texts()
    device = attns[0].q_proj.weight.device
    batches = _calibration_batches(tokenizer, texts, calibration_texts, calibration_tokens, device)
    if criterion == "taylor":
        return taylor_importance(model, attns, batches).detach().cpu()
    if criterion == "attention_entropy":
        return entropy_importance(model, attns, batches).detach().cpu()
    raise ValueError(f"unknown importance criterion {criterion!r} (known: {', '.join(CRITERIA)})")


# --- selection and the step ---------------------------------------------------------------


def choose_groups(
    scores: torch.Tensor,
    counts: list[int],
    *,
    ratio: float | None,
    per_layer: int | None,
    min_groups_per_layer: int = 1,
) -> dict[int, list[int]]:
    """Which KV groups to remove: the least important, within the budget and the floor."""
    if per_layer is not None:
        for layer, n in enumerate(counts):
            if n - per_layer < min_groups_per_layer:
                raise ValueError(
                    f"per_layer={per_layer} would leave layer {layer} with {max(n - per_layer, 0)} of its {n} KV groups; "
                    f"at least {min_groups_per_layer} must stay (lower per_layer)"
                )
    else:
        assert ratio is not None  # PruneOptions gives exactly one budget
        removable = sum(max(n - min_groups_per_layer, 0) for n in counts)
        wanted = math.floor(ratio * sum(counts) + 1e-9)
        if wanted > removable:
            raise ValueError(
                f"ratio={ratio} asks for {wanted} of {sum(counts)} KV groups, but only {removable} can go while "
                f"every layer keeps {min_groups_per_layer}; lower the ratio"
            )
    removed: dict[int, list[int]] = {}
    if per_layer is not None:
        for layer, n in enumerate(counts):
            order = sorted(range(n), key=lambda g: float(scores[layer, g]))
            removed[layer] = sorted(order[:per_layer])
        return {k: v for k, v in removed.items() if v}
    assert ratio is not None
    budget = math.floor(ratio * sum(counts) + 1e-9)
    ranked = sorted(((float(scores[layer, g]), layer, g) for layer, n in enumerate(counts) for g in range(n)))
    left = list(counts)
    for _, layer, group in ranked:
        if budget == 0:
            break
        if left[layer] <= min_groups_per_layer:
            continue
        removed.setdefault(layer, []).append(group)
        left[layer] -= 1
        budget -= 1
    return {layer: sorted(groups) for layer, groups in sorted(removed.items())}


def prune_groups(model: nn.Module, removed: dict[int, list[int]]) -> None:
    attns = attention_layers(model)
    for layer, groups in removed.items():
        n = kv_groups(attns[layer])
        if len(groups) >= n:
            raise ValueError(f"removing groups {groups} would leave layer {layer} with no attention heads")
        keep_groups(attns[layer], [g for g in range(n) if g not in set(groups)])
    record_in_config(model, attns)


def _check_removal(removed: dict[int, list[int]], counts: list[int], min_groups_per_layer: int) -> None:
    for layer, groups in removed.items():
        if layer >= len(counts):
            raise ValueError(f"remove: layer {layer} does not exist; the model has {len(counts)} layers")
        if any(g >= counts[layer] for g in groups):
            raise ValueError(f"remove: layer {layer} has KV groups 0..{counts[layer] - 1}, not {groups}")
        if counts[layer] - len(groups) < min_groups_per_layer:
            raise ValueError(
                f"remove: layer {layer} would keep {counts[layer] - len(groups)} of its {counts[layer]} "
                f"KV groups; at least {min_groups_per_layer} must stay"
            )


def prune_heads(session, **options) -> PruneReport:
    opts = PruneOptions.model_validate(options)
    model = session.model
    attns = attention_layers(model)
    counts = [kv_groups(a) for a in attns]
    gs = attns[0].num_key_value_groups
    params_before = sum(p.numel() for p in model.parameters())
    if opts.remove is not None:
        _check_removal(opts.remove, counts, opts.min_groups_per_layer)
        removed = {layer: sorted(groups) for layer, groups in sorted(opts.remove.items()) if groups}
        scores = torch.zeros(len(counts), max(counts))
    else:
        scores = importance(
            model,
            session.tokenizer,
            opts.criterion,
            seed=opts.seed,
            calibration_texts=opts.calibration_texts,
            calibration_tokens=opts.calibration_tokens,
        )
        removed = choose_groups(
            scores, counts, ratio=opts.ratio, per_layer=opts.per_layer, min_groups_per_layer=opts.min_groups_per_layer
        )
    stats = None
    if opts.compensate and removed:
        batches = _calibration_batches(
            session.tokenizer,
            shipped_calibration_texts(),
            opts.calibration_texts,
            opts.calibration_tokens,
            attns[0].q_proj.weight.device,
        )
        stats = compensation.collect(attns, list(removed), model, batches)
    prune_groups(model, removed)
    fitted = {}
    if stats is not None:
        kept = {layer: [g for g in range(counts[layer]) if g not in set(groups)] for layer, groups in removed.items()}
        fitted = compensation.refit(attns, kept, stats, opts.compensate_ridge)
    after = [kv_groups(a) for a in attns]
    return PruneReport(
        step="prune_heads",
        criterion="given" if opts.remove is not None else opts.criterion,
        group_size=gs,
        removed={int(k): v for k, v in removed.items()},
        heads_before=[n * gs for n in counts],
        heads_after=[n * gs for n in after],
        kv_heads_before=counts,
        kv_heads_after=after,
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        importance=[]
        if opts.remove is not None
        else [[round(float(x), 6) for x in row[:n]] for row, n in zip(scores, counts)],
        compensation=fitted,
    )
