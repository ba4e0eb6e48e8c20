"""int4 weight-only linear layers on a CPU, as plain tensors.

torchao quantizes (`Int4OpaqueTensor.from_hp`: tinygemm's asymmetric min/max qparams per
group, PyTorch's packed CPU layout) and its tensor subclass multiplies with PyTorch's own
`aten._weight_int4pack_mm_for_cpu`. Kept as a subclass, every product pays a Python
`__torch_function__` dispatch in eager mode, and a compiled decode step guards all 210
subclass weights of the embedded model on every call: on one 2-core Xeon, int4 decoded at
45.5 tok/s eager and 63.0 compiled that way, 52.6 and 73.0 with this layer (the same tokens).
So the layer keeps torchao's packed weight and scales as ordinary tensors and calls the
kernel itself. The kernel is ~30x slower with float32 activations, so the input is cast to
bf16 on the way in and the output back to the caller's dtype on the way out.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

_ACT = torch.bfloat16


class Int4Linear(nn.Linear):
    """`weight` is PyTorch's packed CPU int4 layout (uint8, two weights a byte);
    `scales_and_zeros` one bf16 scale and zero point per `group_size` inputs of each output."""

    qparams = ("scales_and_zeros",)
    """The buffers beside `weight` that hold its quantization parameters (see Int8Linear.qparams)."""
    scales_and_zeros: torch.Tensor

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        group_size: int,
        shape: tuple[int, int],
        bias: torch.Tensor | None,
    ):
        nn.Module.__init__(self)
        self.out_features, self.in_features = shape
        self.group_size = group_size
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        # nn.Linear types bias as a Parameter; it is None in a layer without one
        bias_param = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.bias = bias_param  # type: ignore[assignment]

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        w = linear.weight.detach().to(_ACT)
        # tinygemm qparams (asymmetric, min/max), from_hp's default: HQQ's took 505 s on the embedded model here
        q = Int4OpaqueTensor.from_hp(w, [1, group_size])
        return cls(q.qdata, q.scale_and_zero, group_size, cast(tuple[int, int], tuple(w.shape)), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(_ACT).contiguous()
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.weight, self.group_size, self.scales_and_zeros
        )
        y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(_ACT)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """The float32 (out, in) weight: the kernel applied to the identity, so exactly the
        values the layer multiplies with (bf16-rounded, as the kernel's output is)."""
        eye = torch.eye(self.in_features, dtype=_ACT, device=self.weight.device)
        w_t: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.weight, self.group_size, self.scales_and_zeros
        )
        return w_t[:, : self.out_features].t().float().contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int4 weights (packed), group_size={self.group_size}, bf16 scales and zeros"
        )
