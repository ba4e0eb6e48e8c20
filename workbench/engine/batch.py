"""The running batch: which requests are in it, their KV cache, mask and next logits.

Rows are left-padded so every row's newest token sits in the last column; each row's
positions count only its own tokens. Requests can join a running batch (continuous
batching): they are prefilled on their own, then their cache and mask are left-padded to
the batch's length and stacked under it. Rows that finish leave the batch and the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one (batch, longest) tensor, and the mask of real tokens."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts nothing: each row's positions count its own tokens only."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def can_join(cache: Cache) -> bool:
    """Only plain dynamic layers can be padded and stacked; other policies run alone."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class Batch:
    def __init__(self, forward: Callable, new_cache: Callable[[], Cache], pad_id: int, device: torch.device):
        self._forward = forward
        self._new_cache = new_cache
        self._pad_id = pad_id
        self._device = device
        self.rows: list[int] = []
        """batch row -> request index"""
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.padded = False

    def add(self, indices: list[int], prompts: list[list[int]], inputs: dict | None = None) -> None:
        """Prefill these prompts and put them in the batch, their next logits ready. `inputs`
        (image embeddings or pixels) belong to a single prompt, prefilled on its own."""
        if inputs is not None and len(prompts) != 1:
            raise ValueError("a prompt with prefill inputs (images) is prefilled on its own")
        ids, mask = left_pad(prompts, self._pad_id)
        ids, mask = ids.to(self._device), mask.to(self._device)
        cache = self._new_cache()
        padded = not bool(mask.all())
        if padded:
            logits = self._forward(ids, cache, mask, positions_of(mask))
        elif inputs is not None:
            logits = self._forward(ids, cache, inputs=inputs)
        else:
            logits = self._forward(ids, cache)
        if self.cache is None:
            self.cache, self.mask, self.logits, self.padded = cache, mask, logits, padded
        else:
            assert self.mask is not None and self.logits is not None
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, cache.layers, strict=True):  # DynamicLayers: can_join
                old.keys = torch.cat([_pad_seq(old.keys, width), _pad_seq(new.keys, width)])  # type: ignore[union-attr,arg-type]
                old.values = torch.cat([_pad_seq(old.values, width), _pad_seq(new.values, width)])  # type: ignore[union-attr,arg-type]
            self.mask = torch.cat(
                [F.pad(self.mask, (width - self.mask.shape[1], 0)), F.pad(mask, (width - mask.shape[1], 0))]
            )
            self.logits = torch.cat([self.logits, logits])
            self.padded = True
        self.rows += indices

    def keep(self, rows: list[int]) -> None:
        """Keep only these batch rows (finished and cancelled ones leave)."""
        if len(rows) == len(self.rows):
            return
        assert self.cache is not None and self.mask is not None, "keep() before add()"
        index = torch.tensor(rows, device=self._device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[r] for r in rows]

    def step(self, tokens: list[int]) -> None:
        """Feed each remaining row its sampled token; the next logits are ready after."""
        assert self.mask is not None, "step() before add()"
        step = torch.tensor(tokens, device=self._device).view(-1, 1)
        # The mask grows every step, padded or not: it must span the whole cache, or a request
        # that joins later is padded against a stale width and the earlier rows' keys misalign.
        positions = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones_like(positions)], dim=-1)
        if self.padded:
            self.logits = self._forward(step, self.cache, self.mask, positions)
        else:
            self.logits = self._forward(step, self.cache)


def _pad_seq(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad a (batch, heads, seq, dim) cache tensor along seq with zeros (masked out)."""
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def to_dynamic(batch: Batch, forward: Callable, new_cache: Callable[[], Cache]) -> None:
    """Hand a lone request's compiled decode over to the eager path so that others can join:
    the filled part of its static cache (the mask's width: the mask grows every step) moves
    into a fresh dynamic cache, and later steps run through `forward`."""
    assert batch.cache is not None and batch.mask is not None, "to_dynamic() before add()"
    width = batch.mask.shape[1]
    cache = new_cache()
    for index, layer in enumerate(batch.cache.layers):
        # copies: a CUDA graph's static buffers are overwritten by its next replay
        keys, values = cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values)  # type: ignore[union-attr]
        cache.update(keys[:, :, :width].clone(), values[:, :, :width].clone(), index)
    batch.cache, batch._forward, batch._new_cache = cache, forward, new_cache
