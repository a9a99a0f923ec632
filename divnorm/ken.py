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

    The window length is fixed at construction from the initial lambda: recomputing it from the learned value
    each step would need a device sync per forward; the weights ``exp(-|j| / lambda)`` do follow the learned
    lambda (so it receives a gradient). The base of the power is floored at ``DENOMINATOR_FLOOR`` so a k or
    alpha driven negative gives a large finite output rather than NaN; :meth:`check_finite` reports divergence
    (the original reset NaN parameters to constants instead).

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
        self.num_channels = num_channels
        self.window = ken_window(lamb)
        trainable = not fix_all
        self.lamb = nn.Parameter(torch.tensor(float(lamb)), requires_grad=trainable)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=trainable)
        self.beta = nn.Parameter(torch.tensor(float(beta)), requires_grad=trainable)
        self.k = nn.Parameter(torch.tensor(float(k)), requires_grad=trainable)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, window={self.window}, trainable={self.lamb.requires_grad}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"LineDivisiveNorm2d({self.num_channels}) expects (N, {self.num_channels}, H, W) input, "
                f"got {tuple(x.shape)}"
            )
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = self._normalize(x.to(dtype), dtype)
        return y.to(x.dtype)

    def _normalize(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n, c, h, w = x.shape
        lamb, alpha, beta, k = (t.to(dtype) for t in (self.lamb, self.alpha, self.beta, self.k))
        half = self.window // 2
        offsets = torch.arange(-half, half + 1, device=x.device, dtype=dtype)
        kernel = torch.exp(-offsets.abs() / lamb).view(1, 1, -1)
        energy = x * x
        # The channel sum is a 1-D convolution along C at each pixel: move C last ((N*H*W, 1, C); free for
        # channels-last input), convolve with zero padding, and move it back.
        lines = energy.permute(0, 2, 3, 1).reshape(n * h * w, 1, c)
        pooled = F.conv1d(lines, kernel, padding=half).view(n, h, w, c).permute(0, 3, 1, 2)
        base = (k * (1 + (alpha / lamb) * pooled)).clamp_min(DENOMINATOR_FLOOR)
        return energy / base.pow(beta)
