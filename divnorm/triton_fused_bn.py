"""Triton kernels for ReLU -> ``ours`` -> BatchNorm (training), channels-last: the DN output never leaves the chip.

The math is :class:`divnorm.fused_bn.ReluDivNormBatchNormFunction`'s (the torch reference). Four kernels, each
over tiles of [rows, pools, channels-of-a-pool] of the channels-last tensor seen as (N*H*W) rows of C channels,
recompute ``r = relu(x)``, ``q = |r|^P``, the pool sums ``D`` and ``y = exp(gamma) q / D`` in registers from the
conv output ``x``:

- forward statistics: per-channel mean and M2 of ``y`` (Chan's parallel update per tile, one partial row per
  program, combined by torch: no atomics, deterministic, stable for any batch size);
- forward output: ``out = y * a_c + b_c`` with ``a = w / sqrt(var + eps)``, ``b = bias - mean * a``;
- backward statistics: per-channel sums of ``dout`` and ``dout * yhat``;
- backward input: ``dy = k1_c dout + k2_c yhat + k3_c`` (BatchNorm's backward), then DN's backward to ``dx`` and
  the per-pool partial sums for gamma and sigma.

So the forward reads ``x`` twice and writes ``out`` once, and the backward reads ``x`` and ``dout`` twice and
writes ``dx`` once: 8 passes over a tensor of the conv output's size, the count of a compiled ReLU + BatchNorm
without DN. Run layer by layer, DN would add at least 5 more (its own floor, docs/divnorm-kernel.md).
NCHW input is not taken here (:func:`divnorm.fused_bn.relu_divnorm_batchnorm` gives it the torch function).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from divnorm.common import DENOMINATOR_FLOOR
from divnorm.triton_ours import (
    _abs_power,
    _backward_programs,
    _blocks,
    _check_input,
    _jit,
    _layout,
    _param_strides,
    _pool_terms,
    _power_slope,
    parameter_gradients,
)


@_jit
def _tile_setup(
    gamma_ptr,
    sigma_ptr,
    num_channels,
    num_pools,
    gamma_stride,
    sigma_stride,
    eps,
    floor,
    POOL: tl.constexpr,
    POWER: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """What does not change from tile to tile: this program's pools and channels, the offsets of a tile's elements
    from its first row, the masks, and the per-pool gain exp(gamma) and floored offset."""
    pools = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    in_pool = tl.arange(0, BLOCK_S)
    rows = tl.arange(0, BLOCK_PIX)
    channels = pools[:, None] * POOL + in_pool[None, :]
    offsets = rows[:, None, None] * num_channels + channels[None, :, :]
    pool_mask = pools < num_pools
    channel_mask = pool_mask[:, None] & (in_pool < POOL)[None, :]
    gain, offset = _pool_terms(gamma_ptr, sigma_ptr, pools, pool_mask, gamma_stride, sigma_stride, eps, floor, POWER)
    return rows, pools, pool_mask, channels, channel_mask, offsets, gain, offset


@_jit
def _dn_tile(
    x_ptr,
    tile_id,
    rows,
    channel_mask,
    offsets,
    gain,
    offset,
    num_rows,
    num_channels,
    POWER: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
):
    """Row tile ``tile_id`` of x: (base, valid rows, mask, r, q, D, scale), the DN of relu(x) (or x) in fp32 with
    y = q * scale; the pool sums never leave registers."""
    first = tile_id * BLOCK_PIX
    row_valid = (first + rows) < num_rows
    mask = row_valid[:, None, None] & channel_mask[None, :, :]
    base = first.to(tl.int64) * num_channels  # int64: the tensor may exceed 2**31 elements
    r = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        r = tl.maximum(r, 0.0)
    q = _abs_power(r, POWER)
    denominator = tl.sum(q, axis=2) + offset[None, :]
    scale = gain[None, :] / denominator
    return base, row_valid, mask, r, q, denominator, scale


@_jit
def _forward_stats_kernel(
    x_ptr,
    partial_ptr,
    gamma_ptr,
    sigma_ptr,
    num_rows,
    num_tiles,
    num_channels,
    num_pools,
    gamma_stride,
    sigma_stride,
    eps,
    floor,
    POOL: tl.constexpr,
    POWER: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    program = tl.program_id(0)
    rows, pools, pool_mask, channels, channel_mask, offsets, gain, offset = _tile_setup(
        gamma_ptr, sigma_ptr, num_channels, num_pools, gamma_stride, sigma_stride, eps, floor,
        POOL, POWER, BLOCK_PIX, BLOCK_G, BLOCK_S,
    )  # fmt: skip

    count = tl.sum(tl.zeros([BLOCK_PIX], dtype=tl.float32), axis=0)  # rows seen so far (an fp32 scalar)
    mean = tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.float32)
    for tile_id in range(program, num_tiles, tl.num_programs(0)):
        base, row_valid, mask, r, q, denominator, scale = _dn_tile(
            x_ptr, tile_id, rows, channel_mask, offsets, gain, offset, num_rows, num_channels, POWER, RELU, BLOCK_PIX
        )
        y = q * scale[:, :, None]
        n_tile = tl.sum(row_valid.to(tl.float32), axis=0)  # rows of this tile inside the tensor
        tile_mean = tl.sum(y, axis=0) / n_tile
        centred = tl.where(row_valid[:, None, None], y - tile_mean[None, :, :], 0.0)
        tile_m2 = tl.sum(centred * centred, axis=0)
        total = count + n_tile
        delta = tile_mean - mean
        mean += delta * (n_tile / total)
        m2 += tile_m2 + delta * delta * (count * n_tile / total)
        count = total
    row = partial_ptr + program * 3 * num_channels
    tl.store(row + channels, mean, mask=channel_mask)
    tl.store(row + num_channels + channels, m2, mask=channel_mask)
    tl.store(row + 2 * num_channels + channels, mean * 0.0 + count, mask=channel_mask)


@_jit
def _forward_output_kernel(
    x_ptr,
    out_ptr,
    a_ptr,
    b_ptr,
    gamma_ptr,
    sigma_ptr,
    num_rows,
    num_channels,
    num_pools,
    gamma_stride,
    sigma_stride,
    eps,
    floor,
    POOL: tl.constexpr,
    POWER: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    rows, pools, pool_mask, channels, channel_mask, offsets, gain, offset = _tile_setup(
        gamma_ptr, sigma_ptr, num_channels, num_pools, gamma_stride, sigma_stride, eps, floor,
        POOL, POWER, BLOCK_PIX, BLOCK_G, BLOCK_S,
    )  # fmt: skip
    a = tl.load(a_ptr + channels, mask=channel_mask, other=0.0)
    b = tl.load(b_ptr + channels, mask=channel_mask, other=0.0)
    base, row_valid, mask, r, q, denominator, scale = _dn_tile(
        x_ptr,
        tl.program_id(0),
        rows,
        channel_mask,
        offsets,
        gain,
        offset,
        num_rows,
        num_channels,
        POWER,
        RELU,
        BLOCK_PIX,
    )
    out = q * (scale[:, :, None] * a[None, :, :]) + b[None, :, :]
    tl.store(out_ptr + base + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _backward_stats_kernel(
    x_ptr,
    dout_ptr,
    partial_ptr,
    mean_ptr,
    rstd_ptr,
    gamma_ptr,
    sigma_ptr,
    num_rows,
    num_tiles,
    num_channels,
    num_pools,
    gamma_stride,
    sigma_stride,
    eps,
    floor,
    POOL: tl.constexpr,
    POWER: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    program = tl.program_id(0)
    rows, pools, pool_mask, channels, channel_mask, offsets, gain, offset = _tile_setup(
        gamma_ptr, sigma_ptr, num_channels, num_pools, gamma_stride, sigma_stride, eps, floor,
        POOL, POWER, BLOCK_PIX, BLOCK_G, BLOCK_S,
    )  # fmt: skip
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0)
    rstd = tl.load(rstd_ptr + channels, mask=channel_mask, other=0.0)

    sum_dout = tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.float32)
    sum_dout_yhat = tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.float32)
    for tile_id in range(program, num_tiles, tl.num_programs(0)):
        base, row_valid, mask, r, q, denominator, scale = _dn_tile(
            x_ptr, tile_id, rows, channel_mask, offsets, gain, offset, num_rows, num_channels, POWER, RELU, BLOCK_PIX
        )
        dout = tl.load(dout_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        yhat = (q * scale[:, :, None] - mean[None, :, :]) * rstd[None, :, :]
        sum_dout += tl.sum(dout, axis=0)
        sum_dout_yhat += tl.sum(dout * yhat, axis=0)  # dout = 0 on masked rows
    row = partial_ptr + program * 2 * num_channels
    tl.store(row + channels, sum_dout, mask=channel_mask)
    tl.store(row + num_channels + channels, sum_dout_yhat, mask=channel_mask)


@_jit
def _backward_input_kernel(
    x_ptr,
    dout_ptr,
    dx_ptr,
    partial_ptr,
    mean_ptr,
    rstd_ptr,
    k1_ptr,
    k2_ptr,
    k3_ptr,
    gamma_ptr,
    sigma_ptr,
    num_rows,
    num_tiles,
    num_channels,
    num_pools,
    gamma_stride,
    sigma_stride,
    eps,
    floor,
    POOL: tl.constexpr,
    POWER: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    program = tl.program_id(0)
    rows, pools, pool_mask, channels, channel_mask, offsets, gain, offset = _tile_setup(
        gamma_ptr, sigma_ptr, num_channels, num_pools, gamma_stride, sigma_stride, eps, floor,
        POOL, POWER, BLOCK_PIX, BLOCK_G, BLOCK_S,
    )  # fmt: skip
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0)[None, :, :]
    rstd = tl.load(rstd_ptr + channels, mask=channel_mask, other=0.0)[None, :, :]
    k1 = tl.load(k1_ptr + channels, mask=channel_mask, other=0.0)[None, :, :]
    k2 = tl.load(k2_ptr + channels, mask=channel_mask, other=0.0)[None, :, :]
    k3 = tl.load(k3_ptr + channels, mask=channel_mask, other=0.0)[None, :, :]

    total_sum = tl.zeros([BLOCK_G], dtype=tl.float32)  # sum of T per pool
    correction_sum = tl.zeros([BLOCK_G], dtype=tl.float32)  # sum of T / D per pool
    for tile_id in range(program, num_tiles, tl.num_programs(0)):
        base, row_valid, mask, r, q, denominator, scale = _dn_tile(
            x_ptr, tile_id, rows, channel_mask, offsets, gain, offset, num_rows, num_channels, POWER, RELU, BLOCK_PIX
        )
        dout = tl.load(dout_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        yhat = (q * scale[:, :, None] - mean) * rstd
        # BatchNorm's backward; 0 on masked rows and channels (k3 would leak into the pool sums there)
        dy = tl.where(mask, k1 * dout + k2 * yhat + k3, 0.0)
        total = scale * tl.sum(dy * q, axis=2)  # T = sum_pool(dy * y)
        correction = total / denominator
        # with RELU, r = 0 where x <= 0, so dq/dr is 0 there: ReLU's own mask
        dx = (scale[:, :, None] * dy - correction[:, :, None]) * _power_slope(r, q, POWER)
        tl.store(dx_ptr + base + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        total_sum += tl.sum(total, axis=0)
        correction_sum += tl.sum(correction, axis=0)
    row = partial_ptr + program * 2 * num_pools
    tl.store(row + pools, total_sum, mask=pool_mask)
    tl.store(row + num_pools + pools, correction_sum, mask=pool_mask)


def _geometry(x: torch.Tensor, pool: int):
    """(layout, blocks, number of row tiles, pool blocks) of channels-last ``x``; ValueError for another layout."""
    _check_input(x)
    layout = _layout(x)
    if layout is None or not layout.channels_last:
        raise ValueError("the fused ReLU-DN-BatchNorm kernel takes channels-last input; use the torch function")
    blocks = _blocks(layout, x.shape[1] // pool, pool)
    return layout, blocks, triton.cdiv(layout.pixels, blocks.pix), triton.cdiv(x.shape[1] // pool, blocks.pools)


def forward(
    x: torch.Tensor,
    gamma: torch.Tensor,
    sigma: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pool: int,
    power: float,
    eps: float,
    bn_eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batchnorm(dn(relu(x)))`` with batch statistics: (out, mean, biased var, rstd), the last three fp32 (C,)."""
    layout, blocks, num_tiles, pool_blocks = _geometry(x, pool)
    channels, num_pools = x.shape[1], x.shape[1] // pool
    gamma_stride, sigma_stride = _param_strides(gamma, sigma)
    gamma, sigma = gamma.contiguous(), sigma.contiguous()
    common = dict(POOL=pool, POWER=float(power), RELU=bool(relu), BLOCK_PIX=blocks.pix, BLOCK_G=blocks.pools,
                  BLOCK_S=blocks.pool, num_warps=blocks.num_warps)  # fmt: skip
    programs = _backward_programs(x, num_tiles, pool_blocks)
    partial = torch.empty((programs, 3, channels), dtype=torch.float32, device=x.device)
    _forward_stats_kernel[(programs, pool_blocks)](
        x, partial, gamma, sigma, layout.pixels, num_tiles, channels, num_pools, gamma_stride, sigma_stride,
        float(eps), DENOMINATOR_FLOOR, **common,
    )  # fmt: skip
    means, m2s, counts = partial.unbind(1)
    mean = (means * counts).sum(0) / layout.pixels  # Chan's combination of the programs' (count, mean, M2)
    var = (m2s + counts * (means - mean).square()).sum(0) / layout.pixels
    rstd = torch.rsqrt(var + bn_eps)
    a = weight.float() * rstd
    b = bias.float() - mean * a
    out = torch.empty_like(x)
    _forward_output_kernel[(num_tiles, pool_blocks)](
        x, out, a, b, gamma, sigma, layout.pixels, channels, num_pools, gamma_stride, sigma_stride, float(eps),
        DENOMINATOR_FLOOR, **common,
    )  # fmt: skip
    return out, mean, var, rstd


def backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    gamma: torch.Tensor,
    sigma: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    pool: int,
    power: float,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward`'s ``out``: (dx, dgamma, dsigma, dweight, dbias)."""
    layout, blocks, num_tiles, pool_blocks = _geometry(x, pool)
    if not dout.is_contiguous(memory_format=torch.channels_last):  # e.g. an expanded gradient of .sum()
        dout = dout.contiguous(memory_format=torch.channels_last)
    channels, num_pools = x.shape[1], x.shape[1] // pool
    gamma_stride, sigma_stride = _param_strides(gamma, sigma)
    gamma_c, sigma_c = gamma.contiguous(), sigma.contiguous()
    common = dict(POOL=pool, POWER=float(power), RELU=bool(relu), BLOCK_PIX=blocks.pix, BLOCK_G=blocks.pools,
                  BLOCK_S=blocks.pool, num_warps=blocks.num_warps)  # fmt: skip
    programs = _backward_programs(x, num_tiles, pool_blocks)
    sums = torch.empty((programs, 2, channels), dtype=torch.float32, device=x.device)
    _backward_stats_kernel[(programs, pool_blocks)](
        x, dout, sums, mean, rstd, gamma_c, sigma_c, layout.pixels, num_tiles, channels, num_pools, gamma_stride,
        sigma_stride, float(eps), DENOMINATOR_FLOOR, **common,
    )  # fmt: skip
    grad_bias, grad_weight = sums[:, 0].sum(0), sums[:, 1].sum(0)  # two tensors: op outputs may not alias
    k1 = weight.float() * rstd
    k2 = -k1 * grad_weight / layout.pixels
    k3 = -k1 * grad_bias / layout.pixels
    dx = torch.empty_like(x)
    partial = torch.empty((programs, 2, num_pools), dtype=torch.float32, device=x.device)
    _backward_input_kernel[(programs, pool_blocks)](
        x, dout, dx, partial, mean, rstd, k1, k2, k3, gamma_c, sigma_c, layout.pixels, num_tiles, channels,
        num_pools, gamma_stride, sigma_stride, float(eps), DENOMINATOR_FLOOR, **common,
    )  # fmt: skip
    grad_gamma, grad_sigma = parameter_gradients(*partial.sum(0), gamma, sigma, power, eps)
    return dx, grad_gamma, grad_sigma, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
