"""``ours``: grouped (Heeger-style) divisive normalization over contiguous channel pools, the paper's layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from divnorm.common import DENOMINATOR_FLOOR, FiniteCheckMixin, compute_dtype


def pool_size(num_channels: int, p: float) -> int:
    """Channels per pool: ``2 ** int(p * log2(C))`` as the original computes it; ``p == 1`` is one global pool.

    With ``p = 0.5``: C=64 -> 8, 128 -> 8, 192 -> 8, 256 -> 16, 384 -> 16, 512 -> 16, 2048 -> 32; C=3 -> 1.
    """
    if num_channels < 1:
        raise ValueError(f"divisive normalization needs at least one channel, got num_channels={num_channels}")
    if not 0 <= p <= 1:
        raise ValueError(f"divnorm_specs.p must lie in [0, 1] (pool size 2 ** int(p * log2(C))), got {p}")
    if p == 1:
        return num_channels
    size = 2 ** int(p * math.log2(num_channels))
    if num_channels % size:
        raise ValueError(
            f"{num_channels} channels do not split into pools of {size} (= 2 ** int(p * log2(C)) with p={p}); "
            "use a channel count divisible by the pool size, or p=1 for one global pool"
        )
    return size


class DivisiveNorm2d(FiniteCheckMixin, nn.Module):
    """Grouped divisive normalization (``type: ours``) over an (N, C, H, W) tensor.

    Channels are split into ``C // s`` contiguous pools of ``s = pool_size(C, p)`` channels; for channel c in
    pool g, with ``P = power``::

        y_c = exp(gamma_g) * |x_c|^P / (sum_{c' in g} |x_{c'}|^P + |sigma_g|^P + eps)

    For even P, ``|x|^P == x^P`` (the original formula); for odd or fractional P the absolute value is the fix
    for the original's crash, and keeps the output non-negative and bounded by ``exp(gamma)``. Sigma enters
    as ``|sigma|^P`` for the same reason (equal to ``sigma^P`` for the default P = 2).

    Args:
        num_channels: C, first so this layer can stand in for ``nn.BatchNorm2d``.
        p: pool-size exponent in [0, 1]; 1 gives one pool over all channels (the "global" form).
        power: P > 0; 2 is the default and takes a fast ``x * x`` path.
        gamma: initial log-gain (the gain ``exp(gamma)`` is positive by construction).
        sigma: initial semi-saturation constant.
        eps: added to the denominator (the config's default is 0; REFERENCE's default when absent is 1e-8).
            Whatever eps is, the denominator is floored at ``DENOMINATOR_FLOOR`` so 0/0 cannot occur.
        single_gamma / single_sigma: one scalar shared by all pools instead of one per pool.
        fix_gamma / fix_sigma / fix_all: freeze that parameter (per pool or single; the original's fix_*
            only worked with single_*). Frozen parameters stay ``nn.Parameter`` with ``requires_grad=False``,
            so checkpoints keep the same keys.

    Under autocast or for fp16/bf16 input the energy and division run in fp32 and the result is cast back to
    the input dtype. Any batch size (including 1) and channels-last input work; the output keeps the input's
    memory format.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        p: float = 0.5,
        power: float = 2.0,
        gamma: float = 1.0,
        sigma: float = 1.0,
        eps: float = 1e-8,
        single_gamma: bool = False,
        single_sigma: bool = False,
        fix_gamma: bool = False,
        fix_sigma: bool = False,
        fix_all: bool = False,
    ) -> None:
        super().__init__()
        if not power > 0:
            raise ValueError(f"divnorm_specs.power must be > 0, got {power}")
        if eps < 0:
            raise ValueError(f"divnorm_specs.eps must be >= 0, got {eps}")
        self.num_channels = num_channels
        self.p = float(p)
        self.pool = pool_size(num_channels, p)
        self.num_pools = num_channels // self.pool
        self.power = float(power)
        self.eps = float(eps)
        gamma_shape = 1 if single_gamma else self.num_pools
        sigma_shape = 1 if single_sigma else self.num_pools
        self.gamma = nn.Parameter(torch.full((gamma_shape,), float(gamma)), requires_grad=not (fix_gamma or fix_all))
        self.sigma = nn.Parameter(torch.full((sigma_shape,), float(sigma)), requires_grad=not (fix_sigma or fix_all))

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, pools={self.num_pools}x{self.pool}, power={self.power:g}, eps={self.eps:g}, "
            f"gamma_trainable={self.gamma.requires_grad}, sigma_trainable={self.sigma.requires_grad}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"DivisiveNorm2d({self.num_channels}) expects (N, {self.num_channels}, H, W) input, "
                f"got {tuple(x.shape)}"
            )
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = _grouped_divnorm(
                x.to(dtype), self.gamma.to(dtype), self.sigma.to(dtype), self.pool, self.power, self.eps
            )
        return y.to(x.dtype)


def _grouped_divnorm(
    x: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor, pool: int, power: float, eps: float
) -> torch.Tensor:
    n, c, h, w = x.shape
    groups = c // pool
    # Splitting the channel dim into (groups, pool) is a view for both NCHW and channels-last strides.
    xg = x.view(n, groups, pool, h, w)
    q = xg * xg if power == 2 else xg.abs().pow(power)
    energy = q.sum(dim=2, keepdim=True)  # (N, G, 1, H, W): 1/pool of the input's size
    offset = (sigma * sigma if power == 2 else sigma.abs().pow(power)) + eps
    denominator = (energy + offset.view(1, -1, 1, 1, 1)).clamp_min(DENOMINATOR_FLOOR)
    # The gain is folded into the small (N, G, 1, H, W) factor, so the full-size tensor is touched once.
    scale = gamma.exp().view(1, -1, 1, 1, 1) / denominator
    return (q * scale).view(n, c, h, w)
