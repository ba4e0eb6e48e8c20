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
- `random`: the control every criterion must beat;
- `kl`: measured rather than estimated: the KL divergence of the model's next-token
  distributions from the original's when that one group is removed (and, with `compensate`, its
  layer's o_proj refitted on the calibration text), one forward pass per group. Taylor's gradient
  is a first-order guess that cannot see the refit; on the embedded model with the `mix`
  calibration the kl prune, before any recovery, is 1.38x the unpruned perplexity on fiction
  where taylor's is 2.25x (docs/recovery.md).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.compress import compensation
from workbench.compress.calibration import resolve
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
    compensation: dict[int, dict[str, float | bool]] = field(default_factory=dict)
    """layer -> relative o_proj output error before/after the refit on the fitted calibration
    texts and on held-out ones, the ridge used, and whether the refit was kept (compensation.refit)"""
    compensation_check: dict = field(default_factory=dict)
    """the whole model's loss on held-out calibration texts with and without the refit, and
    whether it was kept"""
    calibration: dict | None = None
    """which calibration data importance and compensation read (Calibration.record)"""
    groups_from: str = "importance"
    """"importance" (measured here), "given" (the `remove` option), or the recover adapter whose
    prune record was replayed"""
    importance_note: str | None = None


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


def _log_probs(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1) for ids in batches]


def kl_importance(
    model, attns, fit: list[torch.Tensor], held: list[torch.Tensor], ridge: float | str | None
) -> torch.Tensor:
    """Mean KL(original || without the group) per token, each group removed alone (its query
    heads' o_proj input zeroed) and, where `ridge` is given, its layer's o_proj refitted on `fit`
    at the ridge `held` chooses. The refit is applied even where the step's per-layer check would
    refuse it: one group alone often costs its layer an output error at the noise of the held-out
    check (layer 28 of the embedded model: 0.0101 nats refused, 0.0018 refitted), while the
    groups finally removed together are refitted and checked by the step itself (all 16 layers
    of pruned-25 kept their refit). Measured both ways on the embedded model, the refit-always
    groups pruned to 1.56x / 1.375x (reference / prose), the checked ones to 1.73x / 1.40x.
    The KL is read on the first half of the `fit` texts: one forward pass of them per group
    (90 groups x 8 x 256 tokens, 5.5 min for the embedded model on a 2-core CPU)."""
    counts = [kv_groups(a) for a in attns]
    stats = held_stats = None
    if ridge is not None:
        stats = compensation.collect(attns, range(len(attns)), model, fit)
        held_stats = compensation.collect(attns, range(len(attns)), model, held)
    measured = fit[: (len(fit) + 1) // 2]
    original = _log_probs(model, measured)
    tokens = sum(ids.shape[1] for ids in measured)
    scores = torch.zeros(len(attns), max(counts))
    bar = tqdm(total=sum(counts), desc="kl: each KV group removed", unit="group")
    for layer, attn in enumerate(attns):
        weight = attn.o_proj.weight
        unpruned = weight.detach().clone()
        for group in range(counts[layer]):
            mask = torch.ones(counts[layer], device=weight.device)
            mask[group] = 0
            handle = mask_o_proj_input(attn, mask)
            try:
                if ridge is not None and stats is not None and held_stats is not None:
                    keep = compensation.query_index(attn, [g for g in range(counts[layer]) if g != group])
                    refit, _ = compensation.fit(stats[layer], held_stats[layer], keep, unpruned[:, keep], ridge)
                    with torch.no_grad():
                        weight[:, keep.to(weight.device)] = refit.to(weight.device, weight.dtype)
                total = 0.0
                for p, q in zip(original, _log_probs(model, measured)):
                    total += float((p.exp() * (p - q)).sum())
                scores[layer, group] = total / tokens
            finally:
                handle.remove()
                with torch.no_grad():
                    weight.copy_(unpruned)
            bar.update()
    bar.close()
    return scores


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
    compensate_ridge: float | str | None = None,
) -> torch.Tensor:
    """[layer, kv group] scores; higher means keep. `compensate_ridge`: the `kl` criterion
    measures each removal with the o_proj refit of that ridge (None: uncompensated)."""
    attns = attention_layers(model)
    if criterion == "random":
        return random_importance(attns, seed)
    if criterion == "weight_norm":
        return weight_norm_importance(attns)
    if texts is None:
        texts = shipped_calibration_texts()
    device = attns[0].q_proj.weight.device
    if criterion == "kl" and compensate_ridge is not None:
        fit, held = _fit_and_held(tokenizer, texts, calibration_texts, calibration_tokens, device)
        return kl_importance(model, attns, fit, held, compensate_ridge)
    batches = _calibration_batches(tokenizer, texts, calibration_texts, calibration_tokens, device)
    if criterion == "kl":
        return kl_importance(model, attns, batches, [], None)
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


LOSS_TOLERANCE = 1e-3
"""A refit that raises the held-out loss by less than this fraction is kept (both losses are in
the report): on a tiny random model compensation moves the loss by ~0.02%, noise either way; the
failure this check exists for raised it by 23% (perplexity 39.5 -> 91.3 on data/evaluation.txt)."""


def split_calibration(texts: list[str], n: int) -> tuple[list[str], list[str]]:
    """(texts to fit on, held-out texts to check the fit on). The fit reads the first `n`, as
    importance does; the check reads the next quarter of that (at least 2) when the calibration
    has them, else the fit gives up its last quarter."""
    held = max(2, n // 4)
    if len(texts) >= n + held:
        return texts[:n], texts[n : n + held]
    fit = min(n, len(texts))
    held = max(1, fit // 4)
    if fit - held < 1:
        raise ValueError(
            f"compensate needs at least 2 calibration texts (one to fit on, one to check the fit on); "
            f"the calibration has {len(texts)}"
        )
    return texts[: fit - held], texts[fit - held : fit]


def _fit_and_held(tokenizer, texts: list[str], n: int, tokens: int, device) -> tuple[list, list]:
    """The batches a refit is fitted on and checked on (split_calibration), for compensation
    and for the `kl` criterion's refitted measurement alike."""
    fit_texts, held_texts = split_calibration(texts, n)
    fit = _calibration_batches(tokenizer, fit_texts, len(fit_texts), tokens, device)
    return fit, _calibration_batches(tokenizer, held_texts, len(held_texts), tokens, device)


def mean_loss(model, batches: list[torch.Tensor]) -> float:
    """Mean next-token loss per predicted token over `batches`."""
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for ids in batches:
            n = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * n
            tokens += n
    return total / tokens


def _compensate(model, attns, removed, counts, opts: PruneOptions, texts: list[str], tokenizer) -> tuple[dict, dict]:
    """Prune `removed` from `model` and refit the pruned layers' o_proj where held-out
    calibration text says it helps; (per-layer summary, whole-model check)."""
    device = attns[0].q_proj.weight.device
    fit, held = _fit_and_held(tokenizer, texts, opts.calibration_texts, opts.calibration_tokens, device)
    stats = compensation.collect(attns, list(removed), model, fit)
    held_stats = compensation.collect(attns, list(removed), model, held)
    prune_groups(model, removed)
    uncompensated = {layer: attns[layer].o_proj.weight.detach().clone() for layer in removed}
    kept = {layer: [g for g in range(counts[layer]) if g not in set(groups)] for layer, groups in removed.items()}
    summary = compensation.refit(attns, kept, stats, opts.compensate_ridge, held_out=held_stats)
    refused = {layer: entry for layer, entry in summary.items() if not entry["compensated"]}
    if refused:
        warnings.warn(
            "prune_heads compensate: the o_proj refit raised the held-out output error of layer(s) "
            + ", ".join(
                f"{layer} ({e['held_out_before']:.4g} -> {e['held_out_after']:.4g})" for layer, e in refused.items()
            )
            + "; those layers keep their pruned, uncompensated o_proj",
            stacklevel=3,
        )
    refitted = {layer: attns[layer].o_proj.weight.detach().clone() for layer in removed}
    loss_compensated = mean_loss(model, held)
    with torch.no_grad():
        for layer, weight in uncompensated.items():
            attns[layer].o_proj.weight.copy_(weight)
    loss_uncompensated = mean_loss(model, held)
    keep = loss_compensated <= loss_uncompensated * (1 + LOSS_TOLERANCE)
    if keep:
        with torch.no_grad():
            for layer, weight in refitted.items():
                attns[layer].o_proj.weight.copy_(weight)
    else:
        for entry in summary.values():
            entry["compensated"] = False
        warnings.warn(
            f"prune_heads compensate: the o_proj refit raised the loss on {len(held)} held-out calibration texts "
            f"({loss_uncompensated:.4f} -> {loss_compensated:.4f} nats per token, perplexity "
            f"{math.exp(loss_uncompensated):.2f} -> {math.exp(loss_compensated):.2f}); the pruned model is kept "
            "uncompensated (more calibration texts usually make the fit generalise)",
            stacklevel=3,
        )
    check = {
        "fit_texts": len(fit),
        "held_out_texts": len(held),
        "held_out_loss_uncompensated": round(loss_uncompensated, 5),
        "held_out_loss_compensated": round(loss_compensated, 5),
        "kept": keep,
    }
    return summary, check


def prune_heads(session, *, replay: dict | None = None, **options) -> PruneReport:
    """The step. `replay` (passed by the pipeline, not a config option): {"removed", "adapter",
    "importance"} of a recover adapter's prune record, whose groups are removed instead of
    measuring importance again."""
    opts = PruneOptions.model_validate(options)
    model = session.model
    attns = attention_layers(model)
    counts = [kv_groups(a) for a in attns]
    gs = attns[0].num_key_value_groups
    params_before = sum(p.numel() for p in model.parameters())
    # replayed groups still name the text they were measured on (the record matched its digest)
    calibration = resolve(session, opts.calibration) if opts.reads_calibration else None
    texts = calibration.texts if calibration is not None else []
    note = None
    if replay is not None:
        removed = {int(layer): sorted(groups) for layer, groups in sorted(replay["removed"].items()) if groups}
        _check_removal(removed, counts, opts.min_groups_per_layer)
        importance_rows = replay.get("importance") or []
        groups_from = f"replayed from the prune record of recover adapter {replay['adapter']}"
        if not importance_rows:
            note = "not re-measured: the groups were replayed, and the adapter's record predates recorded importance"
    elif opts.remove is not None:
        _check_removal(opts.remove, counts, opts.min_groups_per_layer)
        removed = {layer: sorted(groups) for layer, groups in sorted(opts.remove.items()) if groups}
        importance_rows, groups_from = [], "given"
    else:
        scores = importance(
            model,
            session.tokenizer,
            opts.criterion,
            texts=texts,
            seed=opts.seed,
            calibration_texts=opts.calibration_texts,
            calibration_tokens=opts.calibration_tokens,
            compensate_ridge=opts.compensate_ridge if opts.compensate else None,
        )
        removed = choose_groups(
            scores, counts, ratio=opts.ratio, per_layer=opts.per_layer, min_groups_per_layer=opts.min_groups_per_layer
        )
        importance_rows = [[round(float(x), 6) for x in row[:n]] for row, n in zip(scores, counts)]
        groups_from = "importance"
    fitted: dict = {}
    check: dict = {}
    if opts.compensate and removed:
        fitted, check = _compensate(model, attns, removed, counts, opts, texts, session.tokenizer)
    else:
        prune_groups(model, removed)
    after = [kv_groups(a) for a in attns]
    return PruneReport(
        step="prune_heads",
        criterion="given" if opts.remove is not None and replay is None else opts.criterion,
        group_size=gs,
        removed={int(k): v for k, v in removed.items()},
        heads_before=[n * gs for n in counts],
        heads_after=[n * gs for n in after],
        kv_heads_before=counts,
        kv_heads_after=after,
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        importance=importance_rows,
        compensation=fitted,
        compensation_check=check,
        calibration=calibration.record(used=opts.calibration_texts) if calibration is not None else None,
        groups_from=groups_from,
        importance_note=note,
    )
