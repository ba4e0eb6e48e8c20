"""GPTQ for the int4 layers: round each weight knowing what the others' rounding already cost.

Round-to-nearest (RTN) rounds every weight on its own. GPTQ (Frantar et al. 2022,
arXiv:2210.17323) rounds one input column at a time and moves the error it made onto the
columns not yet rounded, weighted by the inverse Hessian H = X^T X of the layer's inputs on
calibration text, so the layer's *outputs* on text like it stay close, not its weights.
torchao 0.18 ships GPTQ only for CUDA (it asserts a CUDA device and needs the `mslk` kernels
for int4), so this is a small CPU implementation that writes exactly what `Int4Linear` holds:
values 0..15 and tinygemm's bf16 scale and zero per group (w = (q - 8) * scale + zero).

Layers are quantized in order, decoder block after decoder block, each on the inputs the
already-quantized blocks before it produce (the inputs of block 0 are captured once, then each
block is run on them twice: once to collect its Hessians, once quantized to feed the next), so
a later layer corrects what earlier ones got wrong and a whole model costs about two forward
passes of the calibration text plus the rounding. Layers outside the decoder blocks (lm_head)
come last, from one forward pass of the quantized model.

That takes minutes on a small CPU (the embedded model: about 4 on two cores), and a config's
quantize step runs again at every load, so the rounded layers are cached on disk under a key
of everything they depend on: the model's weights as GPTQ found them, the layers, the settings,
the calibration windows' tokens and the torch version. A second load reads them in a second.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from workbench.compress.int4_linear import Int4Linear
from workbench.compress.recovery_data import fingerprint

_LEVELS = 15
_MID = 8
"""tinygemm's int4 values are 0..15 around a midpoint of 8: w = (q - 8) * scale + zero."""
_EPS = 1e-6
_BLOCK = 128
"""Columns rounded between two lazy updates of the rest of the matrix (the paper's B)."""


@dataclass(frozen=True)
class GPTQSettings:
    group_size: int
    damp: float
    """added to the Hessian's diagonal, as a share of its mean: keeps the inverse stable"""
    act_order: bool
    """round columns in order of decreasing Hessian diagonal (the most active inputs first)"""
    refine: int = 2
    """rounds of: refit every group's scale and zero to the values rounded so far (least squares
    on the layer's outputs), then round again with them"""


def tinygemm_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min/max scale and zero, rounded to bf16 as the kernel stores them: the same
    mapping as torchao's `_choose_qparams_affine_tinygemm`. w: (rows, cols), cols a multiple
    of group_size; returns two (rows, cols / group_size) float32 tensors."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((high - low) / _LEVELS).clamp(min=_EPS)
    zero = low + scale * _MID
    return scale.bfloat16().float(), zero.bfloat16().float()


_SHRINK = torch.linspace(0.97, 0.76, 8).tolist()
"""Shares of a group's [min, max] span its qparams may cover, tried after the full span (the
GPTQ reference code's `mse` search, coarser): clipping the one extreme weight of a group buys
the other 31 a finer step."""


def clipped_qparams(w: torch.Tensor, importance: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero (as `tinygemm_qparams`) with the span shrunk around its centre by
    whichever of _SHRINK rounds the group with the least error, each column's squared error
    weighted by `importance` (the Hessian's diagonal: how much that input moves the outputs)."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    weight = importance.float().reshape(1, -1, group_size)

    def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return ((_round(g, scale[..., None], zero[..., None])[1] - g) ** 2 * weight).sum(dim=-1)

    low, high = g.amin(dim=-1), g.amax(dim=-1)
    centre, half = (low + high) / 2, (high - low) / 2
    scales, zeros = tinygemm_qparams(w, group_size)  # the full span, exactly as RTN has it
    best = error(scales, zeros)
    for share in _SHRINK:
        scale = (2 * half * share / _LEVELS).clamp(min=_EPS).bfloat16().float()
        zero = (centre - half * share + scale * _MID).bfloat16().float()
        candidate = error(scale, zero)
        better = candidate < best
        best = torch.where(better, candidate, best)
        scales, zeros = torch.where(better, scale, scales), torch.where(better, zero, zeros)
    return scales, zeros


def refit_qparams(
    weight: torch.Tensor, values: torch.Tensor, hessian: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and zeros that, with these rounded values, keep the layer's outputs closest to
    the original's: w_hat = (q - 8) * scale + zero is linear in each row's 2 x groups qparams, so
    minimising (w - w_hat) H (w - w_hat)^T is one small least-squares solve per row."""
    rows, cols = weight.shape
    groups = cols // group_size
    h = hessian.float()
    by_zero = h.reshape(groups, group_size, cols).sum(dim=1)  # d(w_hat H) / d(zero): the same for every row
    scales, zeros = torch.empty(rows, groups), torch.empty(rows, groups)
    chunk = max(1, 2**22 // (cols * 2 * groups))  # rows per solve: (chunk, 2 x groups, cols) tensors of 16 MB
    ridge = torch.eye(2 * groups) * 1e-6 * float(h.diagonal().mean())
    for start in range(0, rows, chunk):
        v = values[start : start + chunk].float() - _MID
        n = len(v)
        # design^T H, design being d(w_hat) / d(scales, zeros): rows (chunk, 2 x groups, cols)
        by_scale = torch.bmm(v.reshape(n, groups, group_size).transpose(0, 1), h.reshape(groups, group_size, cols))
        weighted = torch.cat([by_scale.transpose(0, 1), by_zero.expand(n, -1, -1)], dim=1)
        # design^T H design, summing each group's columns (design is one group's values, or ones)
        normal = torch.cat(
            [
                (weighted * v[:, None, :]).reshape(n, 2 * groups, groups, group_size).sum(dim=-1),
                weighted.reshape(n, 2 * groups, groups, group_size).sum(dim=-1),
            ],
            dim=-1,
        )
        target = torch.bmm(weighted, weight[start : start + chunk, :, None].float())
        solved = torch.linalg.solve(normal + ridge, target)
        scales[start : start + chunk], zeros[start : start + chunk] = solved[..., 0].split(groups, dim=-1)
    scales = torch.where(scales.abs() < _EPS, _EPS, scales)
    return scales.bfloat16().float(), zeros.bfloat16().float()


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values 0..15, what the kernel makes of them) for weights sharing these qparams."""
    q = torch.clamp(torch.round((w - (zero - _MID * scale)) / scale), 0, _LEVELS)
    return q, (q - _MID) * scale + zero


@torch.no_grad()
def gptq_int4(
    weight: torch.Tensor, hessian: torch.Tensor, settings: GPTQSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's Algorithm 1 with per-group qparams: (values int32 0..15, scales, zeros), the
    last two (rows, cols / group_size), as `Int4Linear.from_int4` takes them.

    Without act_order the first pass takes a group's qparams from its weights as earlier rounding
    has moved them (the paper's choice); with act_order columns leave their groups' order, so every
    group's qparams are fixed from the original weights first ("static groups", span clipped by
    `clipped_qparams`) and the packed layout the kernel reads stays the same. Then `refine`
    rounds refit the qparams to the rounded values and round again with them, and a last refit
    fits the qparams to the final values: each refit can only lower the layer's output error on
    the calibration text (measured on the embedded model's int4 lm_head: KL on held-out prose
    0.0245 -> 0.0212, on the reference text 0.0099 -> 0.0087)."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True) if settings.act_order else torch.arange(cols)
    damped = h[order][:, order]
    damped.diagonal().add_(settings.damp * damped.diagonal().mean())
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True).float()
    except torch.linalg.LinAlgError:
        raise ValueError(
            f"GPTQ: the Hessian of a {rows} x {cols} layer is not positive definite even with damp "
            f"{settings.damp}; raise damp (e.g. 0.1) or give more calibration text"
        ) from None
    h = h.float()
    parts = [_round_rows(w[start : start + _ROWS], h, hinv, order, settings) for start in range(0, rows, _ROWS)]
    values, scales, zeros = (torch.cat(column) for column in zip(*parts))
    return values, scales, zeros


_ROWS = 4096
"""Rows rounded together: each row's rounding depends on the Hessian alone, not on other rows, so
a 49,152-row lm_head goes 4,096 rows at a time (identical values) and its float32 temporaries
are about 10 MB each instead of 113."""


def _round_rows(
    w: torch.Tensor, h: torch.Tensor, hinv: torch.Tensor, order: torch.Tensor, settings: GPTQSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = settings.group_size
    rows, cols = w.shape
    if settings.act_order:
        scales, zeros = clipped_qparams(w, torch.diag(h), g)
        values = _gptq_pass(w, hinv, order, g, scales, zeros, dynamic=False)
    else:
        scales, zeros = torch.zeros(rows, cols // g), torch.zeros(rows, cols // g)
        values = _gptq_pass(w, hinv, order, g, scales, zeros, dynamic=True)
    for _ in range(settings.refine):
        scales, zeros = _better(w, h, values, (scales, zeros), refit_qparams(w, values, h, g), g)
        values = _gptq_pass(w, hinv, order, g, scales, zeros, dynamic=False)
    scales, zeros = _better(w, h, values, (scales, zeros), refit_qparams(w, values, h, g), g)
    return values, scales, zeros


def _gptq_pass(
    w: torch.Tensor,
    hinv: torch.Tensor,
    order: torch.Tensor,
    g: int,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    dynamic: bool,
) -> torch.Tensor:
    """One rounding of every column in `order`, each error moved onto the columns after it.
    `dynamic`: each group's qparams are set (in place) from its weights when its first column
    comes, which needs the natural order."""
    w = w[:, order].clone()
    rows, cols = w.shape
    values = torch.zeros(rows, cols, dtype=torch.int32)
    for start in range(0, cols, _BLOCK):
        end = min(start + _BLOCK, cols)
        block, errors = w[:, start:end].clone(), torch.zeros(rows, end - start)
        for i in range(end - start):
            column = int(order[start + i])
            group = column // g
            if dynamic and column % g == 0:
                scales[:, group : group + 1], zeros[:, group : group + 1] = tinygemm_qparams(block[:, i : i + g], g)
            q, dq = _round(block[:, i], scales[:, group], zeros[:, group])
            values[:, column] = q.int()
            err = (block[:, i] - dq) / hinv[start + i, start + i]
            block[:, i:] -= err[:, None] * hinv[start + i, start + i : end][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return values


def _output_error(w: torch.Tensor, h: torch.Tensor, values: torch.Tensor, qparams: tuple, g: int) -> torch.Tensor:
    """Each row's (w - w_hat) H (w - w_hat)^T: how far its outputs move on the calibration text."""
    scales, zeros = qparams
    rows, cols = w.shape
    dq = ((values.float().reshape(rows, -1, g) - _MID) * scales[..., None] + zeros[..., None]).reshape(rows, cols)
    diff = w - dq
    return ((diff @ h) * diff).sum(dim=-1)


def _better(w: torch.Tensor, h: torch.Tensor, values: torch.Tensor, old: tuple, new: tuple, g: int) -> tuple:
    """Per row, whichever qparams move its outputs less (a refit rounded to bf16 can lose)."""
    keep = (_output_error(w, h, values, new, g) <= _output_error(w, h, values, old, g))[:, None]
    return torch.where(keep, new[0], old[0]), torch.where(keep, new[1], old[1])


# --- the model pass ------------------------------------------------------------------------


class _HessianHooks:
    """Sum X^T X of each named layer's inputs over every forward pass while attached."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.sums[name] = self.sums.get(name, 0) + x.t() @ x
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]

        return hook

    def hessians(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        for handle in self._handles:
            handle.remove()
        unseen = sorted(set(names) - set(self.sums))
        if unseen:
            raise ValueError(f"GPTQ: {unseen[0]} saw no input on the calibration text, so it has no Hessian")
        return {name: s / self.rows[name] for name, s in self.sums.items()}


class _Stop(Exception):
    """Raised from the first decoder block's pre-hook: the rest of the forward is not needed."""


def _decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder's list of blocks (`model.layers` in transformers' decoders), with its name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) > 0:
            return name, module
    return None


def _block_inputs(model: nn.Module, first: nn.Module, windows: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first decoder block receives for each window: hidden states, position
    embeddings, mask; later blocks receive the same but for the hidden states."""
    captured: list[tuple[tuple, dict]] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(input_ids=window.unsqueeze(0), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    outputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        outputs.append(((hidden, *args[1:]), kwargs))
    return outputs


def _quantize_layers(model: nn.Module, hessians: dict[str, torch.Tensor], settings: GPTQSettings) -> None:
    for name, hessian in hessians.items():
        linear = cast(nn.Linear, model.get_submodule(name))
        values, scales, zeros = gptq_int4(linear.weight, hessian, settings)
        model.set_submodule(name, Int4Linear.from_int4(values, scales, zeros, settings.group_size, linear.bias))


@torch.no_grad()
def gptq_quantize(model: nn.Module, names: Iterable[str], windows: list[torch.Tensor], settings: GPTQSettings) -> None:
    """Replace each named nn.Linear of `model` by a GPTQ-rounded `Int4Linear`, fitted on the
    token `windows` (1-d id tensors on the model's device), block by block (see module doc)."""
    names = set(names)
    if not names:
        return
    found = _decoder_blocks(model)
    inside: dict[int, list[str]] = {}
    if found is not None:
        prefix, blocks = found
        for name in names:
            head, _, rest = name.removeprefix(prefix + ".").partition(".")
            if name.startswith(prefix + ".") and head.isdigit() and rest:
                inside.setdefault(int(head), []).append(name)
    outside = names - {n for group in inside.values() for n in group}
    bar = tqdm(total=len(names), desc="GPTQ int4", unit="layer")
    if inside and found is not None:
        prefix, blocks = found
        inputs = _block_inputs(model, blocks[0], windows)
        for index in range(max(inside) + 1):
            block = blocks[index]
            targets = sorted(inside.get(index, []))
            if targets:
                hooks = _HessianHooks({n: model.get_submodule(n) for n in targets})
                _run_block(block, inputs)
                _quantize_layers(model, hooks.hessians(targets), settings)
                bar.update(len(targets))
            inputs = _run_block(block, inputs)
    if outside:
        hooks = _HessianHooks({n: model.get_submodule(n) for n in sorted(outside)})
        for window in windows:
            model(input_ids=window.unsqueeze(0), use_cache=False)
        _quantize_layers(model, hooks.hessians(outside), settings)
        bar.update(len(outside))
    bar.close()


# --- the cache -----------------------------------------------------------------------------


def cache_key(model: nn.Module, names: Iterable[str], windows: list[torch.Tensor], settings: GPTQSettings) -> str:
    tokens = hashlib.sha256(b"".join(w.cpu().numpy().tobytes() + b"|" for w in windows)).hexdigest()
    parts = [fingerprint(model), sorted(names), asdict(settings), tokens, torch.__version__]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def cached_gptq_quantize(
    model: nn.Module, names: Iterable[str], windows: list[torch.Tensor], settings: GPTQSettings, folder: Path
) -> bool:
    """`gptq_quantize`, or the layers it wrote for the same key before (see module doc).
    Returns whether they came from the cache."""
    names = sorted(names)
    path = folder / f"gptq-{cache_key(model, names, windows, settings)}.safetensors"
    if path.is_file():
        state = load_file(path)
        for name in names:
            linear = cast(nn.Linear, model.get_submodule(name))
            shape = (linear.out_features, linear.in_features)
            layer = Int4Linear(
                state[f"{name}.weight"], state[f"{name}.scales_and_zeros"], settings.group_size, shape, linear.bias
            )
            model.set_submodule(name, layer.to(linear.weight.device))
        return True
    gptq_quantize(model, names, windows, settings)
    state = {}
    for name in names:
        layer = cast(Int4Linear, model.get_submodule(name))
        state[f"{name}.weight"] = layer.weight.detach().cpu().contiguous()
        state[f"{name}.scales_and_zeros"] = layer.scales_and_zeros.detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(state, partial)
    partial.replace(path)
    return False
