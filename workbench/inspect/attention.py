"""Attention heads, looked at one by one: what they attend to, and what removing one costs.

- `capture_attention`: the attention probabilities of chosen layers and heads for a text.
  Only eager attention materialises probabilities, so the model is switched to it for the
  capture and back afterwards; the numbers are those of the same weights.
- `head_stats`: per head, the summaries that sort heads into kinds: entropy (diffuse or
  focused), mean attention distance (local or long-range), attention to the first token
  (the "attention sink" of Xiao et al. 2023) and to the previous token.
- `ablate_heads`: a context in which any set of query heads outputs zeros, done with hooks
  on o_proj's input, so the weights never change; `ablation_loss` and `ablation_scan`
  measure the loss change it causes, the ground truth a pruning criterion approximates.
- `head_importance`: the pruning criteria's scores per KV group, to set beside the above.

Layers and heads are numbered as transformers numbers them (`model.layers.{i}`, query head h
of a layer belongs to KV group h // group_size).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.compress.pruning import importance
from workbench.models.anatomy import attention_layers, eager_attention, kv_groups, mask_o_proj_input
from workbench.step_options import CRITERIA


def _heads_of(attn) -> int:
    return kv_groups(attn) * attn.num_key_value_groups


def _check_layers(attns, layers) -> list[int]:
    if layers is None:
        return list(range(len(attns)))
    layers = [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        if not isinstance(layer, int) or not 0 <= layer < len(attns):
            raise ValueError(f"layer {layer!r} does not exist: this model has layers 0..{len(attns) - 1}")
    return layers


def _check_heads(attns, layer: int, heads) -> list[int]:
    n = _heads_of(attns[layer])
    if heads is None:
        return list(range(n))
    heads = [heads] if isinstance(heads, int) else list(heads)
    for head in heads:
        if not isinstance(head, int) or not 0 <= head < n:
            raise ValueError(f"head {head!r} does not exist in layer {layer}: it has heads 0..{n - 1}")
    return heads


def _ids(session, text: str | list[int], max_tokens: int | None) -> torch.Tensor:
    if isinstance(text, str):
        ids = session.tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = list(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text must be at least 2 tokens long")
    return torch.tensor([ids], device=session.model.get_input_embeddings().weight.device)


@dataclass
class AttentionCapture:
    """Attention probabilities of one text: `probs[layer][head]` is a (query, key) matrix
    whose rows sum to 1 (row q covers keys 0..q; later keys are masked to 0)."""

    tokens: list[str]
    token_ids: list[int]
    probs: dict[int, torch.Tensor]
    """layer -> (heads captured, query, key) float32 on the CPU"""
    heads: dict[int, list[int]]
    """layer -> the head numbers along probs[layer]'s first axis"""

    def pattern(self, layer: int, head: int) -> torch.Tensor:
        if layer not in self.probs:
            raise ValueError(f"layer {layer} was not captured (captured: {sorted(self.probs)})")
        if head not in self.heads[layer]:
            raise ValueError(f"head {head} of layer {layer} was not captured (captured: {self.heads[layer]})")
        return self.probs[layer][self.heads[layer].index(head)]

    def frame(self, layer: int, head: int) -> pd.DataFrame:
        """One head's pattern as a (query token, key token) frame, for a heatmap or a table."""
        labels = [f"{i}:{t}" for i, t in enumerate(self.tokens)]
        return pd.DataFrame(self.pattern(layer, head).numpy(), index=labels, columns=labels)


def capture_attention(
    session,
    text: str | list[int],
    *,
    layers: int | Iterable[int] | None = None,
    heads: int | Iterable[int] | None = None,
    max_tokens: int | None = 256,
) -> AttentionCapture:
    """Attention probabilities of `layers` (default all) and `heads` (default all) for `text`
    (a string, tokenized without special tokens, or token ids) in one forward pass."""
    model = session.model
    attns = attention_layers(model)
    layers = _check_layers(attns, layers)
    chosen = {layer: _check_heads(attns, layer, heads) for layer in layers}
    ids = _ids(session, text, max_tokens)
    probs: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:

        def keep(module, args, output, layer=layer):
            weights = output[1]
            if weights is None:
                raise RuntimeError(f"layer {layer} returned no attention probabilities under eager attention")
            probs[layer] = weights[0, chosen[layer]].detach().float().cpu()

        handles.append(attns[layer].register_forward_hook(keep))
    try:
        with eager_attention(model), torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    token_ids = ids[0].tolist()
    return AttentionCapture(
        tokens=[session.tokenizer.decode([t]) for t in token_ids],
        token_ids=token_ids,
        probs=probs,
        heads=chosen,
    )


def head_stats(capture: AttentionCapture) -> pd.DataFrame:
    """One row per captured head: entropy (nats), mean attention distance (tokens back),
    attention to the first token (sink) and to the previous token, averaged over queries
    1..n-1 (query 0 can only attend to itself, which says nothing about the head)."""
    rows = []
    for layer, probs in sorted(capture.probs.items()):
        n = probs.shape[-1]
        q = torch.arange(n).view(n, 1)
        k = torch.arange(n).view(1, n)
        distance = (q - k).clamp(min=0).float()
        body = slice(1, n)
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)[:, body].mean(-1)
        mean_distance = (probs * distance).sum(-1)[:, body].mean(-1)
        sink = probs[:, body, 0].mean(-1)
        previous = torch.diagonal(probs, offset=-1, dim1=-2, dim2=-1).mean(-1)
        for i, head in enumerate(capture.heads[layer]):
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "entropy": float(entropy[i]),
                    "mean_distance": float(mean_distance[i]),
                    "sink": float(sink[i]),
                    "previous_token": float(previous[i]),
                }
            )
    return pd.DataFrame(rows, columns=["layer", "head", "entropy", "mean_distance", "sink", "previous_token"])


# --- ablation ------------------------------------------------------------------------------


def _normalise(attns, heads: Mapping[int, Iterable[int]] | Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    pairs = heads.items() if isinstance(heads, Mapping) else None
    out: dict[int, list[int]] = {}
    if pairs is None:
        grouped: dict[int, list[int]] = {}
        for item in heads:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"heads are given as {{layer: [head, ...]}} or [(layer, head), ...]; got {item!r}")
            grouped.setdefault(item[0], []).append(item[1])
        pairs = grouped.items()
    for layer, hs in pairs:
        (layer,) = _check_layers(attns, [layer])
        out.setdefault(layer, [])
        out[layer] = sorted(set(out[layer]) | set(_check_heads(attns, layer, list(hs))))
    return out


@contextmanager
def ablate_heads(session, heads: Mapping[int, Iterable[int]] | Iterable[tuple[int, int]]):
    """Inside the block, the given query heads contribute nothing: their slice of o_proj's
    input is zeroed by a forward pre-hook (the "mean-free" zero ablation of Michel et al.).
    The weights are untouched and everything is restored on exit, error or not."""
    model = session.model
    attns = attention_layers(model)
    chosen = _normalise(attns, heads)
    handles = []
    for layer, hs in chosen.items():
        attn = attns[layer]
        mask = torch.ones(_heads_of(attn), device=attn.o_proj.weight.device)
        mask[hs] = 0.0
        handles.append(mask_o_proj_input(attn, mask))
    try:
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


def loss(session, text: str | list[int], *, max_tokens: int | None = 256) -> float:
    """Mean next-token loss (nats) of the model on `text`."""
    ids = _ids(session, text, max_tokens)
    with torch.inference_mode():
        return float(session.model(input_ids=ids, labels=ids, use_cache=False).loss)


def ablation_loss(session, text: str | list[int], heads, *, max_tokens: int | None = 256) -> float:
    """Loss change (nats; positive = worse) from ablating `heads` on `text`."""
    base = loss(session, text, max_tokens=max_tokens)
    with ablate_heads(session, heads):
        ablated = loss(session, text, max_tokens=max_tokens)
    return ablated - base


def ablation_scan(
    session,
    text: str | list[int],
    *,
    layers: int | Iterable[int] | None = None,
    unit: str = "head",
    max_tokens: int | None = 128,
) -> pd.DataFrame:
    """The loss change of ablating each head (unit="head") or each KV group with its query
    heads (unit="group", what pruning removes), one at a time, over `layers`."""
    if unit not in ("head", "group"):
        raise ValueError(f"unit must be 'head' or 'group', not {unit!r}")
    attns = attention_layers(session.model)
    layers = _check_layers(attns, layers)
    base = loss(session, text, max_tokens=max_tokens)
    plan = []
    for layer in layers:
        attn = attns[layer]
        gs = attn.num_key_value_groups
        if unit == "head":
            plan += [(layer, h // gs, [h]) for h in range(_heads_of(attn))]
        else:
            plan += [(layer, g, list(range(g * gs, (g + 1) * gs))) for g in range(kv_groups(attn))]
    rows = []
    for layer, group, hs in tqdm(plan, desc=f"ablating {unit}s"):
        with ablate_heads(session, {layer: hs}):
            delta = loss(session, text, max_tokens=max_tokens) - base
        row = {"layer": layer, "group": group, "loss_delta": delta}
        if unit == "head":
            row["head"] = hs[0]
        rows.append(row)
    columns = ["layer", "head", "group", "loss_delta"] if unit == "head" else ["layer", "group", "loss_delta"]
    return pd.DataFrame(rows, columns=columns)


# --- importance ------------------------------------------------------------------------------


def head_importance(
    session,
    criterion: str = "taylor",
    *,
    texts: list[str] | None = None,
    seed: int = 0,
    calibration_texts: int = 4,
    calibration_tokens: int = 128,
) -> pd.DataFrame:
    """The pruning criterion's score for each KV group (higher = keep), with its query heads
    and its rank within the model (0 = the first the pruner would remove)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown importance criterion {criterion!r} (known: {', '.join(CRITERIA)})")
    attns = attention_layers(session.model)
    scores = importance(
        session.model,
        session.tokenizer,
        criterion,
        texts=texts,
        seed=seed,
        calibration_texts=calibration_texts,
        calibration_tokens=calibration_tokens,
    )
    rows = []
    for layer, attn in enumerate(attns):
        gs = attn.num_key_value_groups
        for group in range(kv_groups(attn)):
            rows.append(
                {
                    "layer": layer,
                    "group": group,
                    "heads": list(range(group * gs, (group + 1) * gs)),
                    "criterion": criterion,
                    "score": float(scores[layer, group]),
                }
            )
    frame = pd.DataFrame(rows)
    frame["rank"] = frame["score"].rank(method="first").astype(int) - 1
    return frame
