"""Triton kernels for ReLU -> ``ours`` -> BatchNorm (training), channels-last: the DN output never leaves the chip.

The math is :class:`divnorm.fused_bn.ReluDivNormBatchNormFunction`'s (the torch reference). Four kernels, each
over tiles of [rows, pools, channels-of-a-pool] of the channels-last tensor seen as (N*H*W) rows of C channels,
recompute ``r = relu(x)``, ``q = |r|^P``, the pool sums ``D`` and ``y = exp(gamma) q / D`` in registers from the
conv output ``x``:

- forward statistics: per-channel mean and M2 of ``y`` (Chan's parallel update per tile, one partial row per
  program, combined by ``_forward_finalize_kernel``: no atomics, deterministic, stable for any batch size);
- forward output: ``out = y * a_c + b_c`` with ``a = w / sqrt(var + eps)``, ``b = bias - mean * a``;
- backward statistics: per-channel sums of ``dout`` and ``dout * yhat`` (reduced by ``_backward_finalize_kernel``
  into BatchNorm's weight / bias gradients and the three coefficients below);
- backward input: ``dy = k1_c dout + k2_c yhat + k3_c`` (BatchNorm's backward), then DN's backward to ``dx`` and
  the per-pool partial sums for gamma and sigma (reduced by :func:`divnorm.triton_ours.parameter_gradients`).

The small reductions are one launch each instead of a dozen torch ops: host time is what a small layer costs.

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
def _forward_finalize_kernel(
    partial_ptr,
    weight_ptr,
    bias_ptr,
    mean_ptr,
    var_ptr,
    rstd_ptr,
    a_ptr,
    b_ptr,
    programs,
    num_channels,
    num_rows,
    bn_eps,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per channel, from the programs' (count, mean, M2) rows: the batch mean, the biased variance (Chan's
    combination), ``rstd`` and the output's scale ``a = w rstd`` and shift ``b = bias - mean a``; one launch."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < num_channels
    rows = tl.arange(0, BLOCK_P)
    weighted = tl.zeros([BLOCK_C], dtype=tl.float32)
    for first in range(0, programs, BLOCK_P):
        program = first + rows
        mask = (program < programs)[:, None] & channel_mask[None, :]
        row = partial_ptr + program[:, None] * (3 * num_channels) + channels[None, :]
        means = tl.load(row, mask=mask, other=0.0)
        counts = tl.load(row + 2 * num_channels, mask=mask, other=0.0)
        weighted += tl.sum(means * counts, axis=0)
    mean = weighted / num_rows
    spread = tl.zeros([BLOCK_C], dtype=tl.float32)
    for first in range(0, programs, BLOCK_P):
        program = first + rows
        mask = (program < programs)[:, None] & channel_mask[None, :]
        row = partial_ptr + program[:, None] * (3 * num_channels) + channels[None, :]
        means = tl.load(row, mask=mask, other=0.0)
        m2s = tl.load(row + num_channels, mask=mask, other=0.0)
        counts = tl.load(row + 2 * num_channels, mask=mask, other=0.0)
        delta = means - mean[None, :]
        spread += tl.sum(m2s + counts * delta * delta, axis=0)
    var = spread / num_rows
    rstd = 1.0 / tl.sqrt(var + bn_eps)
    a = tl.load(weight_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32) * rstd
    b = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32) - mean * a
    tl.store(mean_ptr + channels, mean, mask=channel_mask)
    tl.store(var_ptr + channels, var, mask=channel_mask)
    tl.store(rstd_ptr + channels, rstd, mask=channel_mask)
    tl.store(a_ptr + channels, a, mask=channel_mask)
    tl.store(b_ptr + channels, b, mask=channel_mask)


@_jit
def _backward_finalize_kernel(
    sums_ptr,
    weight_ptr,
    rstd_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    k_ptr,
    programs,
    num_channels,
    num_rows,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per channel, from the programs' (sum dout, sum dout yhat) rows: BatchNorm's weight and bias gradients and
    the three coefficients of its input gradient, ``k1 = w rstd``, ``k2 = -k1 dw / n``, ``k3 = -k1 db / n``
    (rows 0-2 of ``k``); one launch."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < num_channels
    rows = tl.arange(0, BLOCK_P)
    grad_bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    grad_weight = tl.zeros([BLOCK_C], dtype=tl.float32)
    for first in range(0, programs, BLOCK_P):
        program = first + rows
        mask = (program < programs)[:, None] & channel_mask[None, :]
        row = sums_ptr + program[:, None] * (2 * num_channels) + channels[None, :]
        grad_bias += tl.sum(tl.load(row, mask=mask, other=0.0), axis=0)
        grad_weight += tl.sum(tl.load(row + num_channels, mask=mask, other=0.0), axis=0)
    k1 = tl.load(weight_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    k1 = k1 * tl.load(rstd_ptr + channels, mask=channel_mask, other=0.0)
    tl.store(k_ptr + channels, k1, mask=channel_mask)
    tl.store(k_ptr + num_channels + channels, -k1 * grad_weight / num_rows, mask=channel_mask)
    tl.store(k_ptr + 2 * num_channels + channels, -k1 * grad_bias / num_rows, mask=channel_mask)
    tl.store(grad_weight_ptr + channels, grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=channel_mask)
    tl.store(grad_bias_ptr + channels, grad_bias.to(grad_bias_ptr.dtype.element_ty), mask=channel_mask)


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


FINALIZE_CHANNELS = 128  # channels a finalize program reduces (the grid covers C in blocks of this)


def _finalize_rows(programs: int) -> int:
    """Partial rows a finalize program loads at a time: a power of 2, at most 32."""
    return min(32, triton.next_power_of_2(programs))


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
    # (C,) fp32 each, from Chan's combination of the programs' (count, mean, M2); the three returned are separate
    # tensors (an op's outputs may not alias each other), a and b share one
    mean, var, rstd = (torch.empty(channels, dtype=torch.float32, device=x.device) for _ in range(3))
    a, b = torch.empty((2, channels), dtype=torch.float32, device=x.device).unbind(0)
    _forward_finalize_kernel[(triton.cdiv(channels, FINALIZE_CHANNELS),)](
        partial, weight, bias, mean, var, rstd, a, b, programs, channels, float(layout.pixels), float(bn_eps),
        BLOCK_P=_finalize_rows(programs), BLOCK_C=FINALIZE_CHANNELS, num_warps=4,
    )  # fmt: skip
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
    grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(weight)  # op outputs may not alias
    k = torch.empty((3, channels), dtype=torch.float32, device=x.device)  # k1, k2, k3 of BatchNorm's dx
    _backward_finalize_kernel[(triton.cdiv(channels, FINALIZE_CHANNELS),)](
        sums, weight, rstd, grad_weight, grad_bias, k, programs, channels, float(layout.pixels),
        BLOCK_P=_finalize_rows(programs), BLOCK_C=FINALIZE_CHANNELS, num_warps=4,
    )  # fmt: skip
    k1, k2, k3 = k.unbind(0)
    dx = torch.empty_like(x)
    partial = torch.empty((programs, 2, num_pools), dtype=torch.float32, device=x.device)
    _backward_input_kernel[(programs, pool_blocks)](
        x, dout, dx, partial, mean, rstd, k1, k2, k3, gamma_c, sigma_c, layout.pixels, num_tiles, channels,
        num_pools, gamma_stride, sigma_stride, float(eps), DENOMINATOR_FLOOR, **common,
    )  # fmt: skip
    grad_gamma, grad_sigma = parameter_gradients(partial, gamma, sigma, power, eps)
    return dx, grad_gamma, grad_sigma, grad_weight, grad_bias
