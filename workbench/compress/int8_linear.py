"""int8 weight-only linear layers that are fast in eager mode.

torchao's int8 weight-only tensors quantize well, but in eager mode (no torch.compile)
their matmul de-quantizes the weight on every call, so on a CPU an int8 model decoded
slower than the float32 one it came from (about 12 vs 26 tok/s on the embedded model).
PyTorch ships a kernel for exactly this case, `torch._weight_int8pack_mm`: int8 weights
with one scale per output channel, bf16 activations, read once per product. This layer
keeps torchao's quantization (the same symmetric per-channel int8 mapping, computed by
torchao's primitives) and multiplies with that kernel. The activations pass through bf16
on the way in, the output goes back to the caller's dtype, so it mixes with float32
neighbours the way the fp16/bf16 schemes do.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from workbench.models.memory import drop_if_mapped, weight_file_spans

_ACT = torch.bfloat16
_CHUNK_ROWS = 4096


class Int8Linear(nn.Linear):
    """`weight` is int8 (out, in); `scales` one bf16 scale per output channel."""

    qparams = ("scales",)
    """The buffers beside `weight` that hold its quantization parameters: they count in the
    layer's storage, and a float export drops them (it writes `dequantized()` instead)."""
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scales", scales)
        # nn.Linear types bias as a Parameter; it is None in a layer without one
        bias_param = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.bias = bias_param  # type: ignore[assignment]

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        from torchao.quantization.quant_primitives import (
            MappingType,
            choose_qparams_affine,
            quantize_affine,
        )

        # Rows are quantized independently (one scale each), so a chunk of rows at a time, written
        # into the result in place, gives the same values. Whole, the embedded model's 49,152-row
        # lm_head made float32 temporaries of its full size, several at once: the int8 load peak.
        # Each chunk read from a mapped checkpoint gives its pages back once quantized: the lm_head
        # tied to the embedding table otherwise paged all 113 MB of it in, the next load peak.
        spans = weight_file_spans()
        weight = linear.weight.detach()
        values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[0], dtype=_ACT, device=weight.device)
        for start in range(0, weight.shape[0], _CHUNK_ROWS):
            w = weight[start : start + _CHUNK_ROWS].float()
            block = (1, w.shape[1])
            scale, zero = choose_qparams_affine(
                w, MappingType.SYMMETRIC, block, torch.int8, eps=torch.finfo(torch.float32).eps
            )
            values[start : start + len(w)] = quantize_affine(w, block, scale, zero, torch.int8)
            scales[start : start + len(w)] = scale.reshape(-1).to(_ACT)
            drop_if_mapped(weight[: start + _CHUNK_ROWS], spans)  # all rows read so far: pages that span chunks too
        return cls(values, scales, linear.bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(_ACT)
        y = torch._weight_int8pack_mm(flat, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias.to(_ACT)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 weights, bf16 scales"


@functools.cache
def kernel_available(device_type: str) -> bool:
    """Whether this PyTorch build has the packed int8 kernel on that device (CPU has; others vary)."""
    try:
        device = torch.device(device_type)
        torch._weight_int8pack_mm(
            torch.ones(1, 32, dtype=_ACT, device=device),
            torch.ones(8, 32, dtype=torch.int8, device=device),
            torch.ones(8, dtype=_ACT, device=device),
        )
        return True
    except (RuntimeError, NotImplementedError):
        return False
