"""``ken``: divisive normalization over a line topology of channels (Miller, Chung & Miller, ICLR 2022)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from divnorm.common import DENOMINATOR_FLOOR, FiniteCheckMixin, compute_dtype


def ken_window(lamb: float) -> int:
    """Window length over channels: ``ceil(8 * lambda)`` forced odd (so j = 0 sits in the middle)."""
    if not lamb > 0:
        raise ValueError(f"divnorm_specs.lamb must be > 0, got {lamb}")
    size = math.ceil(8 * lamb)
    return size if size % 2 else size + 1


class LineDivisiveNorm2d(FiniteCheckMixin, nn.Module):
    """Miller et al.'s divisive normalization (``type: ken``) over an (N, C, H, W) tensor::

        b_c = a_c^2 / (k * (1 + (alpha / lambda) * sum_j a_{c+j}^2 * exp(-|j| / lambda)))^beta

    with j over a window of ``ken_window(lambda)`` channels centred on c (j = 0 included), zero padding at the
    channel ends, and scalar learnable lambda, alpha, beta, k.

    The channel sum is a 1x1 convolution whose C x C weight is the banded Toeplitz matrix
    ``exp(-|c - c'| / lambda)`` masked to ``|c - c'| <= window // 2``. The window follows the *learned* lambda
    as in the original, but as a tensor mask, so there is no device sync per forward (the original read
    ``lambda.item()`` every step); the mask is piecewise constant, so lambda's gradient comes through the
    weights, as in the original. Zero padding at the channel ends is implicit (out-of-range neighbours simply
    do not exist in the matrix). Cost: one 1x1 convolution with C x C weights, channels-last friendly.

    The base of the power is floored at ``DENOMINATOR_FLOOR`` so a k or alpha driven negative yields a large
    finite output rather than NaN; :meth:`check_finite` reports divergence (the original reset a NaN parameter
    to a constant and carried on). Under autocast or for fp16/bf16 input the layer computes in fp32.

    Args:
        num_channels: C.
        lamb, alpha, beta, k: initial values (config defaults 10, 0.1, 1, 10; the 2022 paper's CIFAR runs used
            2, 0.1, 1, 1).
        fix_all: freeze all four parameters.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        lamb: float = 10.0,
        alpha: float = 0.1,
        beta: float = 1.0,
        k: float = 10.0,
        fix_all: bool = False,
    ) -> None:
        super().__init__()
        ken_window(lamb)  # validates lambda
        self.num_channels = num_channels
        trainable = not fix_all
        self.lamb = nn.Parameter(torch.tensor(float(lamb)), requires_grad=trainable)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=trainable)
        self.beta = nn.Parameter(torch.tensor(float(beta)), requires_grad=trainable)
        self.k = nn.Parameter(torch.tensor(float(k)), requires_grad=trainable)
        index = torch.arange(num_channels)
        # |c - c'| for every channel pair; not saved in checkpoints (it depends on num_channels only).
        self.register_buffer("distance", (index[:, None] - index[None, :]).abs().float(), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, trainable={self.lamb.requires_grad}"

    def channel_weights(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The C x C matrix ``exp(-|c - c'| / lambda)``, zero beyond half the window ``ceil(8 lambda)`` (odd)."""
        lamb = self.lamb.to(dtype)
        distance = self.distance.to(dtype)
        with torch.no_grad():
            size = torch.ceil(8 * lamb)
            half = torch.floor(size / 2)  # odd window n: (n - 1) / 2; even n is bumped to n + 1: n / 2
        return torch.exp(-distance / lamb) * (distance <= half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"LineDivisiveNorm2d({self.num_channels}) expects (N, {self.num_channels}, H, W) input, "
                f"got {tuple(x.shape)}"
            )
        out_dtype, dtype = x.dtype, compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            lamb, alpha, beta, k = (t.to(dtype) for t in (self.lamb, self.alpha, self.beta, self.k))
            energy = x * x
            weight = self.channel_weights(dtype).view(self.num_channels, self.num_channels, 1, 1)
            pooled = F.conv2d(energy, weight)
            base = (k * (1 + (alpha / lamb) * pooled)).clamp_min(DENOMINATOR_FLOOR)
            y = energy / base.pow(beta)
        return y.to(out_dtype)
