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


_ROWS = 16
"""The kernel's packing takes outputs in multiples of 16 (the embedded model's all are; a tiny
test model's 386-token vocabulary is not): extra rows are zeros, and their outputs are cut off."""


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    extra = -t.shape[0] % _ROWS
    return torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) if extra else t


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
    def from_linear(cls, linear: nn.Linear, group_size: int, method: str = "rtn") -> Int4Linear:
        """Round-to-nearest with tinygemm's min/max qparams (`rtn`), or with qparams HQQ's
        half-quadratic solver fits to each group's weights (`hqq`): both data-free, both torchao's."""
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor
        from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm

        if method not in ("rtn", "hqq"):
            raise ValueError(f"Int4Linear.from_linear rounds with rtn or hqq, not {method!r} (gptq: see gptq.py)")
        algorithm = Int4ChooseQParamsAlgorithm.HQQ if method == "hqq" else Int4ChooseQParamsAlgorithm.TINYGEMM
        w = linear.weight.detach().to(_ACT)
        q = Int4OpaqueTensor.from_hp(_pad_rows(w), [1, group_size], int4_choose_qparams_algorithm=algorithm)
        return cls(q.qdata, q.scale_and_zero, group_size, cast(tuple[int, int], tuple(w.shape)), linear.bias)

    @classmethod
    @torch.no_grad()
    def from_int4(
        cls,
        values: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
    ) -> Int4Linear:
        """A layer from values already rounded elsewhere (GPTQ): `values` (out, in) integers
        0..15, `scales` and `zeros` (out, in / group_size) in tinygemm's convention, so the
        weight is (values - 8) * scale + zero; packed exactly as torchao packs its own."""
        from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

        if values.min() < 0 or values.max() > 15:
            raise ValueError("int4 values must lie in 0..15")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_pad_rows(values.to(torch.int32)).contiguous(), 1)
        scales_and_zeros = pack_tinygemm_scales_and_zeros(_pad_rows(scales.to(_ACT)), _pad_rows(zeros.to(_ACT)), _ACT)
        return cls(packed, scales_and_zeros, group_size, cast(tuple[int, int], tuple(values.shape)), bias)

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
