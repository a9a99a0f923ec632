"""ReLU -> ``ours`` DN -> BatchNorm (training) as one function, so that the DN output is never written.

The conv unit of every network here is ``conv -> ReLU -> DN -> BatchNorm``. Run as three layers, DN reads the
ReLU's output and writes its own full-size tensor, and BatchNorm reads that tensor twice (statistics, then
normalization) and keeps it for its backward; the backward walks it again. That is 5+ extra passes over a
tensor the size of the conv output per unit, a memory floor no DN kernel can beat on its own
(docs/divnorm-kernel.md: at its floor a standalone layer still costs ResNet-50 ~13 %).

Here the three are one :class:`torch.autograd.Function` whose forward keeps only the conv output ``x`` and small
statistics (the per-pixel pool denominators ``D``, 1/pool of ``x``'s size, and the per-channel batch mean and
1/std), and whose backward recomputes the DN output from ``x`` where it needs it. That torch function is the
reference and the path for CPU and NCHW tensors; it is not faster by itself: eager, its ops run one by one, and
inductor (measured on the CPU with ``benchmarks/fused_bn_traffic.py``) keeps a full-size fp32 intermediate in its
backward. The speed comes from the Triton kernels below, taken for channels-last CUDA tensors.

The math, with ``r = relu(x)`` (or ``x``), ``q = |r|^P``, ``D = sum_pool q + s`` (``s`` the floored per-pool
offset), ``y = exp(gamma) q / D``, batch statistics ``mu``, ``var`` of ``y`` per channel over the M = N*H*W
positions, ``rstd = 1/sqrt(var + eps_bn)``, ``yhat = (y - mu) rstd`` and ``out = w yhat + b``::

    dy      = w rstd (dout - sum(dout)/M - yhat sum(dout yhat)/M)          (BatchNorm's backward)
    A       = sum_pool(dy q),  T = A exp(gamma)/D                             (per pool and pixel)
    dx      = (exp(gamma)/D dy - T/D) dq/dr [x > 0]                           (DN's backward, as in grouped.py)
    dgamma  = sum T,  dsigma = -sum(T/D) ds/dsigma,  dw = sum(dout yhat),  db = sum(dout)

On channels-last CUDA tensors the same math runs as four Triton kernels (:mod:`divnorm.triton_fused_bn`, torch
custom ops in :mod:`divnorm.ops`) that hold the DN output in registers whether compiled or not: 8 passes over the
conv output's size per training step, as many as a compiled ReLU + BatchNorm without DN.

BatchNorm's running statistics are updated exactly as ``nn.BatchNorm2d`` does (unbiased variance, ``momentum``
or the cumulative average when it is ``None``, ``num_batches_tracked``).
"""

from __future__ import annotations

import torch
from torch import nn

from divnorm.common import DENOMINATOR_FLOOR, compute_dtype
from divnorm.grouped import KERNEL_DTYPES, DivisiveNorm2d, _pooled_view, _sum_to, _unpooled
from divnorm.ops import relu_dn_bn

FUSE_CHOICES = ("auto", True, False)


def fusion_applies(
    setting: object, act: nn.Module | None, dn: nn.Module | None, norm: nn.Module | None, x: torch.Tensor
) -> bool:
    """Whether a unit's ``act -> dn -> norm`` tail runs as one function on ``x`` (the conv's output) now.

    It can when the DN is ``ours`` followed by an ``nn.BatchNorm2d`` in training mode (batch statistics), the
    activation is a ReLU or absent, and nobody watches the DN layer's output (forward hooks, e.g. the report's
    sparsity probe). Then ``setting`` decides: ``true`` always, ``auto`` for CUDA tensors, ``false`` never.
    Which implementation runs is :func:`kernel_applies`'s choice.
    """
    if setting is False or not isinstance(dn, DivisiveNorm2d) or type(norm) is not nn.BatchNorm2d:
        return False
    if act is not None and type(act) is not nn.ReLU:
        return False
    if not norm.training or dn._forward_hooks or dn._forward_pre_hooks or norm._forward_hooks:
        return False
    return setting is True or x.is_cuda


def kernel_applies(x: torch.Tensor, dn: DivisiveNorm2d) -> bool:
    """Whether the fused Triton kernels (divnorm.triton_fused_bn) take ``x`` rather than the torch function.

    Only channels-last tensors; then as the layer's ``kernel`` says, the rule of the DN layer alone: ``triton``
    always, ``torch`` never, ``auto`` for CUDA tensors of a kernel dtype in eager mode when triton imports. Under
    ``torch.compile``, ``auto`` takes the torch function, which inductor compiles into a few fused passes (on the
    CPU it counts 10.3 passes over the tensor against 18.5 for the three layers and 8.0 for ReLU + BatchNorm
    without DN: benchmarks/cpu-2cpu/fused-bn-traffic/), as it did better than the opaque kernel for DN alone.
    """
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if dn.kernel != "auto":
        return dn.kernel == "triton"
    return dn._auto_kernel and x.is_cuda and x.dtype in KERNEL_DTYPES and not torch.compiler.is_compiling()


def relu_divnorm_batchnorm(x: torch.Tensor, dn: DivisiveNorm2d, norm: nn.BatchNorm2d, *, relu: bool) -> torch.Tensor:
    """``norm(dn(relu(x)))`` for a ``norm`` in training mode, with the DN output never materialized.

    Same value and gradients as the three layers (to rounding), and the same running-statistics update.
    """
    if x.dim() != 4 or x.shape[1] != dn.num_channels:
        raise ValueError(
            f"DivisiveNorm2d({dn.num_channels}) expects (N, {dn.num_channels}, H, W) input, got {tuple(x.shape)}"
        )
    channels = x.shape[1]
    count = x.numel() // channels
    if count <= 1:  # nn.BatchNorm2d's own check, with its words
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    momentum: float | torch.Tensor = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average, as nn.BatchNorm2d (a tensor: no host sync)
            momentum = 1.0 / norm.num_batches_tracked.to(norm.running_mean.dtype)
    dtype = compute_dtype(x)
    weight = norm.weight if norm.weight is not None else torch.ones(channels, device=x.device, dtype=dtype)
    bias = norm.bias if norm.bias is not None else torch.zeros(channels, device=x.device, dtype=dtype)
    with torch.autocast(x.device.type, enabled=False):
        if kernel_applies(x, dn):
            settings = (dn.pool, float(dn.power), float(dn.eps), float(norm.eps), relu)
            out, mean, var, _rstd = relu_dn_bn(x, dn.gamma, dn.sigma, weight, bias, *settings)
        else:
            params = (p.to(dtype) for p in (dn.gamma, dn.sigma, weight, bias))
            settings = (dn.pool, dn.power, dn.eps, norm.eps, relu)
            out, mean, var = ReluDivNormBatchNormFunction.apply(x, *params, *settings)
    if norm.track_running_stats and norm.running_mean is not None:
        with torch.no_grad():
            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), momentum)
            unbiased = var * (count / max(count - 1, 1))
            norm.running_var.lerp_(unbiased.to(norm.running_var.dtype), momentum)
    return out


class ReluDivNormBatchNormFunction(torch.autograd.Function):
    """The fused tail; see the module docstring for the math. Returns (out, batch mean, biased batch variance)."""

    @staticmethod
    def forward(ctx, x, gamma, sigma, weight, bias, pool: int, power: float, eps: float, bn_eps: float, relu: bool):  # type: ignore[override]
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        pool_dim, stat_dims = (3, (0, 1)) if channels_last else (2, (0, 3))
        pool_shape = (1, 1, -1, 1) if channels_last else (1, -1, 1, 1)
        chan_shape = (1, 1, -1, pool) if channels_last else (1, -1, pool, 1)
        xg = _pooled_view(x, pool, channels_last)
        dtype = compute_dtype(x)
        q = _energy(xg.to(dtype), power, relu)
        denominator = q.sum(dim=pool_dim, keepdim=True) + _offset(sigma, power, eps).view(pool_shape)
        y = q * (gamma.exp().view(pool_shape) / denominator)
        var, mean = torch.var_mean(y, dim=stat_dims, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + bn_eps)
        w, b = weight.view(chan_shape), bias.view(chan_shape)
        out = ((y - mean) * (rstd * w) + b).to(x.dtype)
        ctx.save_for_backward(x, gamma, sigma, weight, denominator, mean, rstd)
        ctx.settings = (pool, power, eps, relu, channels_last)
        mean_c, var_c = mean.reshape(-1), var.reshape(-1)
        ctx.mark_non_differentiable(mean_c, var_c)
        return _unpooled(out, x.shape, channels_last), mean_c, var_c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):  # type: ignore[override]
        x, gamma, sigma, weight, denominator, mean, rstd = ctx.saved_tensors
        pool, power, eps, relu, channels_last = ctx.settings
        pool_dim, stat_dims = (3, (0, 1)) if channels_last else (2, (0, 3))
        pool_shape = (1, 1, -1, 1) if channels_last else (1, -1, 1, 1)
        chan_shape = (1, 1, -1, pool) if channels_last else (1, -1, pool, 1)
        dtype = compute_dtype(x)
        count = x.numel() // x.shape[1]
        r = _pooled_view(x, pool, channels_last).to(dtype)
        if relu:
            r = r.clamp_min(0)
        q = r * r if power == 2 else r.abs().pow(power)
        scale = gamma.exp().view(pool_shape) / denominator
        y = q * scale
        dout = _pooled_view(grad_out, pool, channels_last).to(dtype)
        grad_bias = dout.sum(dim=stat_dims, keepdim=True)
        # sum(dout * yhat) with yhat = (y - mean) rstd, and BatchNorm's dy = a dout + b y + c per channel: no
        # full-size yhat for inductor to keep (it stored one in fp32 when yhat fed both the sum and dy)
        grad_weight = ((dout * y).sum(dim=stat_dims, keepdim=True) - mean * grad_bias) * rstd
        a = weight.view(chan_shape) * rstd
        b = -a * rstd * grad_weight / count
        c = -a * grad_bias / count - b * mean
        dy = a * dout + b * y + c
        # T = sum_pool(dy * y), summed term by term so that dy has one use (dx below) and is never stored
        total = ((a * dout + c) * q + b * (y * q)).sum(dim=pool_dim, keepdim=True) * scale
        correction = total / denominator
        grad_x = grad_gamma = grad_sigma = None
        if ctx.needs_input_grad[0]:
            dq_dr = 2 * r if power == 2 else power * r.abs().pow(power - 1) * r.sign()
            grad_x = _unpooled(((scale * dy - correction) * dq_dr).to(x.dtype), x.shape, channels_last)
        if ctx.needs_input_grad[1]:
            grad_gamma = _sum_to(total, gamma, pool_dim)
        if ctx.needs_input_grad[2]:
            offset = (sigma * sigma if power == 2 else sigma.abs().pow(power)) + eps
            d_offset = 2 * sigma if power == 2 else power * sigma.abs().pow(power - 1) * sigma.sign()
            grad_sigma = -_sum_to(correction, sigma, pool_dim) * d_offset * (offset > DENOMINATOR_FLOOR)
        grad_w = grad_weight.reshape(-1) if ctx.needs_input_grad[3] else None
        grad_b = grad_bias.reshape(-1) if ctx.needs_input_grad[4] else None
        return grad_x, grad_gamma, grad_sigma, grad_w, grad_b, None, None, None, None, None


def _energy(r: torch.Tensor, power: float, relu: bool) -> torch.Tensor:
    if relu:
        r = r.clamp_min(0)
    return r * r if power == 2 else r.abs().pow(power)


def _offset(sigma: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    return ((sigma * sigma if power == 2 else sigma.abs().pow(power)) + eps).clamp_min(DENOMINATOR_FLOOR)
