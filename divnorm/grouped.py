"""``ours``: grouped (Heeger-style) divisive normalization over contiguous channel pools, the paper's layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from divnorm.common import DENOMINATOR_FLOOR, FiniteCheckMixin, compute_dtype
from divnorm.ops import KERNEL_CHOICES, ours_fused, triton_imports

# Dtypes the fused kernel takes (fp32 math inside); kernel=auto leaves others (float64) to the torch path.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
            Whatever eps is, the per-pool offset ``|sigma|^P + eps`` is floored at ``DENOMINATOR_FLOOR``, so
            0/0 cannot occur when sigma has been learned down to 0 and a pool's inputs are all 0.
        single_gamma / single_sigma: one scalar shared by all pools instead of one per pool.
        fix_gamma / fix_sigma / fix_all: freeze that parameter (per pool or single; the original's fix_*
            only worked with single_*). Frozen parameters stay ``nn.Parameter`` with ``requires_grad=False``,
            so checkpoints keep the same keys.
        kernel: ``auto`` (the fused Triton kernel for CUDA tensors when triton imports and the call is not being
            compiled, else the torch path: under ``torch.compile`` inductor fuses the torch path, which measured
            as fast as the kernel or faster on the H200 (docs/divnorm-kernel.md); decided per call from the
            input's device), ``triton`` (always the kernel: CUDA tensors, or CPU
            tensors under ``TRITON_INTERPRET=1``) or ``torch`` (always the torch path). Same math either way.

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
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"divnorm_specs.kernel must be one of {', '.join(KERNEL_CHOICES)}, got {kernel!r}")
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
        self.kernel = kernel
        # Resolved here, outside any torch.compile trace: auto tries the import only where a GPU could use it.
        self._auto_kernel = kernel == "auto" and torch.cuda.is_available() and triton_imports()

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, pools={self.num_pools}x{self.pool}, power={self.power:g}, eps={self.eps:g}, "
            f"gamma_trainable={self.gamma.requires_grad}, sigma_trainable={self.sigma.requires_grad}, "
            f"kernel={self.kernel}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"DivisiveNorm2d({self.num_channels}) expects (N, {self.num_channels}, H, W) input, "
                f"got {tuple(x.shape)}"
            )
        if self.kernel == "triton" or (
            self._auto_kernel and x.is_cuda and x.dtype in KERNEL_DTYPES and not torch.compiler.is_compiling()
        ):
            # fp32 math inside the kernel for every input dtype; the output keeps x's dtype and layout
            return ours_fused(x, self.gamma, self.sigma, self.pool, self.power, self.eps)
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            args = (x.to(dtype), self.gamma.to(dtype), self.sigma.to(dtype), self.pool, self.power, self.eps)
            y = GroupedDivNormFunction.apply(*args)
        return y.to(x.dtype)


def grouped_divnorm_autograd(
    x: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor, pool: int, power: float, eps: float
) -> torch.Tensor:
    """The same layer as plain autograd ops (twice differentiable; slower): the benchmark's and tests' cross-check."""
    n, c, h, w = x.shape
    xg = x.reshape(n, c // pool, pool, h, w)
    q = xg * xg if power == 2 else xg.abs().pow(power)
    energy = q.sum(dim=2, keepdim=True)
    offset = ((sigma * sigma if power == 2 else sigma.abs().pow(power)) + eps).clamp_min(DENOMINATOR_FLOOR)
    denominator = energy + offset.view(1, -1, 1, 1, 1)
    return (q * (gamma.exp().view(1, -1, 1, 1, 1) / denominator)).reshape(n, c, h, w)


def _pooled_view(t: torch.Tensor, pool: int, channels_last: bool) -> torch.Tensor:
    """A view of (N, C, H, W) ``t`` with the channel axis split into (pools, pool) and the pool axis at dim 2 or 3.

    NCHW: (N, G, S, H*W), so reductions over S run with H*W contiguous (vectorized). Channels-last: (N, H*W, G, S),
    the same memory read in its own order; a 5-D (N, G, S, H, W) view of channels-last memory mixes layouts in
    every broadcast and ran about 2x slower. Copies only if ``t`` has the other layout (e.g. an odd gradient).
    """
    n, c, h, w = t.shape
    if channels_last:
        return t.permute(0, 2, 3, 1).reshape(n, h * w, c // pool, pool)
    return t.reshape(n, c // pool, pool, h * w)


def _unpooled(t: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    """Inverse of :func:`_pooled_view`: back to (N, C, H, W) in the same memory layout."""
    n, c, h, w = shape
    if channels_last:
        return t.view(n, h, w, c).permute(0, 3, 1, 2)
    return t.view(n, c, h, w)


class GroupedDivNormFunction(torch.autograd.Function):
    """Forward and a hand-derived backward for ``y = exp(gamma) * q / D``, ``q = |x|^P``, ``D = sum_pool q + s``.

    Why by hand: autograd of the composition keeps ``q``, the scale and the quotient alive, walks the
    full-size tensor more often and launches about twice as many kernels (each a thread barrier, which is
    what costs most on a busy CPU). With ``s = max(|sigma|^P + eps, floor)``, ``scale = exp(gamma) / D`` and
    ``A = sum_pool(grad * q)``, ``T = scale * A`` (all per pool and pixel, 1/pool the input's size)::

        dL/dx_c   = (scale * grad_c - T / D) * dq_c/dx_c        (dq/dx = 2x for P = 2)
        dL/dgamma = sum(T)
        dL/dsigma = -sum(T / D) * d|sigma|^P/dsigma

    The floor sits on the per-pool offset ``s`` (a (G,)-sized op) rather than on ``D``, so ``D >= floor``
    holds without a full clamp and ``x`` keeps its exact gradient. Only ``x``, ``D`` and ``scale`` are saved
    (not the output, so an in-place op on it is safe). Not twice differentiable;
    :func:`grouped_divnorm_autograd` is.
    """

    @staticmethod
    def forward(ctx, x, gamma, sigma, pool: int, power: float, eps: float):  # type: ignore[override]
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        dim = 3 if channels_last else 2
        param_shape = (1, 1, -1, 1) if channels_last else (1, -1, 1, 1)
        xg = _pooled_view(x, pool, channels_last)
        y = xg * xg if power == 2 else xg.abs().pow(power)
        offset = ((sigma * sigma if power == 2 else sigma.abs().pow(power)) + eps).clamp_min(DENOMINATOR_FLOOR)
        denominator = y.sum(dim=dim, keepdim=True).add_(offset.view(param_shape))  # 1/pool of the input's size
        # The gain is folded into the small per-pool factor, so the full-size tensor is touched once more.
        scale = torch.div(gamma.exp().view(param_shape), denominator)
        y.mul_(scale)  # in place: q becomes the output, one full-size allocation in all
        ctx.save_for_backward(xg, gamma, sigma, scale, denominator)
        ctx.pool, ctx.power, ctx.eps, ctx.dim, ctx.channels_last = pool, power, eps, dim, channels_last
        ctx.shape = x.shape
        return _unpooled(y, x.shape, channels_last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        xg, gamma, sigma, scale, denominator = ctx.saved_tensors
        pool, power, dim, channels_last = ctx.pool, ctx.power, ctx.dim, ctx.channels_last
        gg = _pooled_view(grad, pool, channels_last)
        if power == 2:
            grad_x = gg * xg  # the one full-size buffer of this backward, reused below
            pooled = grad_x.mul_(xg).sum(dim=dim, keepdim=True)  # A = sum_pool(grad * x^2)
        else:
            pooled = (gg * xg.abs().pow(power)).sum(dim=dim, keepdim=True)
        total = pooled.mul_(scale)  # T = sum_pool(grad * y)
        correction = torch.div(total, denominator)  # T / D
        grad_gamma = grad_sigma = None
        if ctx.needs_input_grad[0]:
            if power == 2:
                # dL/dx = (2 * scale * grad - 2 * T / D) * x: two passes over the full-size buffer
                torch.addcmul(correction.mul(-2), gg, scale, value=2, out=grad_x)
                grad_x.mul_(xg)
            else:
                dq_dx = xg.abs().pow(power - 1).mul_(xg.sign()).mul_(power)
                grad_x = torch.addcmul(-correction, gg, scale).mul_(dq_dx)
            grad_x = _unpooled(grad_x, ctx.shape, channels_last)
        else:
            grad_x = None
        if ctx.needs_input_grad[1]:
            grad_gamma = _sum_to(total, gamma, dim)
        if ctx.needs_input_grad[2]:
            offset = (sigma * sigma if power == 2 else sigma.abs().pow(power)) + ctx.eps
            d_offset = 2 * sigma if power == 2 else power * sigma.abs().pow(power - 1) * sigma.sign()
            # the floor on the offset is constant where it is active
            grad_sigma = -_sum_to(correction, sigma, dim) * d_offset * (offset > DENOMINATOR_FLOOR)
        return grad_x, grad_gamma, grad_sigma, None, None, None


def _sum_to(per_pool: torch.Tensor, param: torch.Tensor, pool_dim: int) -> torch.Tensor:
    """Sum a per-pool, per-pixel gradient down to a per-pool (G,) or single (1,) parameter's shape."""
    group_dim = pool_dim - 1
    total = per_pool.sum(dim=[d for d in range(per_pool.dim()) if d != group_dim])
    return total if param.numel() == total.numel() else total.sum().reshape(param.shape)
