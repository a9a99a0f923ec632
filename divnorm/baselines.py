"""Baselines for comparison runs: AlexNet's local response normalization and GDN (Balle et al.)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from divnorm.common import FiniteCheckMixin, compute_dtype


class LocalResponseNorm2d(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` (AlexNet: size 5, alpha 1e-4, beta 0.75, k 2) computed in fp32 under autocast.

    Takes ``num_channels`` first like every norm here (unused: LRN has no per-channel state). In fp16 the
    squares of activations above ~256 overflow, hence the fp32 compute.
    """

    def __init__(
        self, num_channels: int, *, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
    ) -> None:
        if size < 1:
            raise ValueError(f"divnorm_specs.lrn_size must be >= 1, got {size}")
        super().__init__(size=int(size), alpha=float(alpha), beta=float(beta), k=float(k))
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(compute_dtype(x))).to(x.dtype)


class _LowerBound(torch.autograd.Function):
    """``max(x, bound)`` whose gradient still flows where it would raise x back above the bound.

    A plain clamp would zero the gradient of a parameter stuck at the bound for good; this is the usual GDN
    trick (Balle et al.; CompressAI ``LowerBoundFunction``).
    """

    @staticmethod
    def forward(ctx, x, bound: float):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        # Descent moves x by -grad: let it through if x is above the bound or the step would increase x.
        passes = (x >= ctx.bound) | (grad < 0)
        return grad * passes, None


class NonNegative(nn.Module):
    """Reparameterize a non-negative value v >= minimum as ``v = max(u, sqrt(minimum + p))^2 - p``, ``p = 2^-36``.

    Learning ``u`` instead of v keeps gradients well-scaled near zero (the square root at init) and enforces
    the bound without projection steps.
    """

    def __init__(self, minimum: float = 0.0, offset: float = 2.0**-18) -> None:
        super().__init__()
        self.pedestal = offset**2
        self.bound = (minimum + self.pedestal) ** 0.5

    def init(self, value: torch.Tensor) -> torch.Tensor:
        """The raw ``u`` that maps to ``value``."""
        return torch.sqrt(torch.clamp_min(value + self.pedestal, self.pedestal))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return _LowerBound.apply(raw, self.bound) ** 2 - self.pedestal


class GDN2d(FiniteCheckMixin, nn.Module):
    """Generalized divisive normalization: ``y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)`` (Balle et al.).

    ``beta >= beta_min`` and ``gamma >= 0`` through :class:`NonNegative`; initial beta 1, gamma
    ``gamma_init * I``. The channel sum is a 1x1 convolution (C x C weights). Computed in fp32 under autocast.

    Args:
        num_channels: C.
        beta_min: lower bound of beta (config key ``gdn_beta_min``, default 1e-6).
        gamma_init: initial diagonal of gamma (config key ``gdn_gamma_init``, default 0.1).
        fix_all: freeze beta and gamma.
    """

    def __init__(
        self, num_channels: int, *, beta_min: float = 1e-6, gamma_init: float = 0.1, fix_all: bool = False
    ) -> None:
        super().__init__()
        if not beta_min > 0:
            raise ValueError(f"divnorm_specs.gdn_beta_min must be > 0, got {beta_min}")
        if gamma_init < 0:
            raise ValueError(f"divnorm_specs.gdn_gamma_init must be >= 0, got {gamma_init}")
        self.num_channels = num_channels
        self.beta_param = NonNegative(minimum=beta_min)
        self.gamma_param = NonNegative()
        trainable = not fix_all
        beta = self.beta_param.init(torch.ones(num_channels))
        gamma = self.gamma_param.init(gamma_init * torch.eye(num_channels))
        self.beta = nn.Parameter(beta, requires_grad=trainable)
        self.gamma = nn.Parameter(gamma, requires_grad=trainable)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, beta_min={self.beta_param.bound**2 - self.beta_param.pedestal:g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype, dtype = x.dtype, compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            beta = self.beta_param(self.beta).to(dtype)
            gamma = self.gamma_param(self.gamma).to(dtype).view(self.num_channels, self.num_channels, 1, 1)
            norm = F.conv2d(x * x, gamma, beta)
            return (x * torch.rsqrt(norm)).to(out_dtype)
