"""Fused Triton kernels for ``ours`` (grouped divisive normalization): one pass forward, one pass backward.

The math is :class:`divnorm.grouped.GroupedDivNormFunction`'s (the torch reference, kept as the CPU path). With
``q = |x|^P``, ``s_g = max(|sigma_g|^P + eps, floor)``, ``D = sum_pool q + s_g``, ``scale = exp(gamma_g) / D``::

    y_c     = scale * q_c
    dx_c    = (scale * dy_c - T / D) * dq_c/dx_c,   T = scale * sum_pool(dy * q)
    dgamma  = sum T,   dsigma = -sum(T / D) * d|sigma|^P/dsigma   (0 where the floor is active)

Each program holds a tile of [pixels, pools, channels-of-a-pool] in registers, so the pool sum never leaves the
chip: the forward reads x once and writes y once; the backward reads x and dy once, recomputes q and D (cheaper
than saving D: no extra write in the forward, no extra read in the backward) and writes dx once. The per-pool
parameter gradients are fp32 partial sums, one row per program (the backward loops over tiles, Liger-style, so
there are only a few hundred rows), summed by torch afterwards: deterministic, no atomics.

Memory layouts, both without a copy: channels-last, seen as rows of C contiguous channels (one row per pixel,
the batch folded into the rows); and NCHW, where the pixels of one image are contiguous and a pool's channels
lie H*W apart. Anything else is made contiguous first. Math is fp32 whatever the input dtype; the output has the
input's dtype and layout.

Triton's interpreter (``TRITON_INTERPRET=1``, kernels on the CPU, used by the tests) is a property of the
process: triton reads the variable when ``triton.language`` is first imported, and its own library functions
(``tl.sum``) are then interpreted or compiled for good. The kernels here follow that mode (not the variable's
value at the time this module is imported), so the two never disagree; the variable must be set before the
process starts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from divnorm.common import DENOMINATOR_FLOOR

# Whether triton.language was loaded under TRITON_INTERPRET=1: the kernels must run in the mode of its tl.sum.
INTERPRETED = isinstance(tl.sum, InterpretedFunction)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The launch shape, read at every call (benchmarks/tune_divnorm_kernel.py sweeps these on a GPU):
# tile_elements: elements per program tile (4096 fp32 values over 8 warps is 16 registers a thread per live tile;
#   the backward holds x, dy and q, still well inside the register file);
# elements_per_warp: num_warps = tile elements / this (1..16);
# backward_programs_per_sm: the backward runs at most this many programs per SM and loops over the remaining tiles
#   (fewer partial rows).
TUNING = {"tile_elements": 4096, "elements_per_warp": 512, "backward_programs_per_sm": 8}


def _jit(fn):
    """``@triton.jit`` in the mode ``triton.language`` was loaded in (see the module docstring)."""
    return InterpretedFunction(fn) if INTERPRETED else triton.JITFunction(fn)


@_jit
def _abs_power(v, POWER: tl.constexpr):
    """``|v|^P`` in fp32: ``v * v`` for the default P = 2 (exact, cheap), ``|v|`` for P = 1, else exp2/log2 (0 at 0)."""
    if POWER == 2.0:
        r = v * v
    elif POWER == 1.0:
        r = tl.abs(v)
    else:
        r = tl.exp2(POWER * tl.log2(tl.abs(v)))
    return r  # one return after the (compile-time) branches: the form every Triton frontend takes


@_jit
def _power_slope(v, q, POWER: tl.constexpr):
    """d|v|^P/dv given q = |v|^P: 2v for P = 2, sign(v) for P = 1, else P q / v without a second power; 0 at v = 0
    (where the torch path gives NaN for P < 1)."""
    if POWER == 2.0:
        slope = 2.0 * v
    elif POWER == 1.0:
        slope = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))
    else:
        slope = tl.where(v == 0, 0.0, POWER * q / tl.where(v == 0, 1.0, v))
    return slope


@_jit
def _pool_terms(gamma_ptr, sigma_ptr, pools, pool_mask, gamma_stride, sigma_stride, eps, floor, POWER: tl.constexpr):
    """Per pool: the gain ``exp(gamma)`` and the floored offset ``max(|sigma|^P + eps, floor)`` (fp32)."""
    gamma = tl.load(gamma_ptr + pools * gamma_stride, mask=pool_mask, other=0.0).to(tl.float32)
    sigma = tl.load(sigma_ptr + pools * sigma_stride, mask=pool_mask, other=0.0).to(tl.float32)
    return tl.exp(gamma), tl.maximum(_abs_power(sigma, POWER) + eps, floor)


@_jit
def _parameter_gradients_kernel(
    partial_ptr,
    sigma_ptr,
    grad_gamma_ptr,
    grad_sigma_ptr,
    programs,
    num_pools,
    eps,
    floor,
    POWER: tl.constexpr,
    SINGLE_GAMMA: tl.constexpr,
    SINGLE_SIGMA: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """One program: per pool, ``dgamma = sum T`` and ``dsigma = -sum(T / D) d|sigma|^P/dsigma`` where the offset is
    above the floor (a floored offset is constant: no gradient), both summed over the pools for a single parameter.
    ``partial`` holds a (2, G) row of sums per backward program; the rows are summed here, in a fixed order."""
    rows = tl.arange(0, BLOCK_P)
    gamma_sums = tl.zeros([BLOCK_G], dtype=tl.float32)
    correction_sums = tl.zeros([BLOCK_G], dtype=tl.float32)
    for first_pool in range(0, num_pools, BLOCK_G):
        pools = first_pool + tl.arange(0, BLOCK_G)
        pool_mask = pools < num_pools
        total = tl.zeros([BLOCK_G], dtype=tl.float32)
        correction = tl.zeros([BLOCK_G], dtype=tl.float32)
        for first_row in range(0, programs, BLOCK_P):
            program = first_row + rows
            mask = (program < programs)[:, None] & pool_mask[None, :]
            row = partial_ptr + program[:, None] * (2 * num_pools) + pools[None, :]
            total += tl.sum(tl.load(row, mask=mask, other=0.0), axis=0)
            correction += tl.sum(tl.load(row + num_pools, mask=mask, other=0.0), axis=0)
        if SINGLE_GAMMA:
            gamma_sums += total
        else:
            tl.store(grad_gamma_ptr + pools, total.to(grad_gamma_ptr.dtype.element_ty), mask=pool_mask)
        if SINGLE_SIGMA:
            correction_sums += correction
        else:
            sigma = tl.load(sigma_ptr + pools, mask=pool_mask, other=0.0).to(tl.float32)
            q = _abs_power(sigma, POWER)
            grad = tl.where(q + eps > floor, -correction * _power_slope(sigma, q, POWER), 0.0)
            tl.store(grad_sigma_ptr + pools, grad.to(grad_sigma_ptr.dtype.element_ty), mask=pool_mask)
    if SINGLE_GAMMA:
        tl.store(grad_gamma_ptr + tl.arange(0, 1), tl.sum(gamma_sums, axis=0).to(grad_gamma_ptr.dtype.element_ty))
    if SINGLE_SIGMA:
        sigma = tl.load(sigma_ptr + tl.arange(0, 1)).to(tl.float32)
        q = _abs_power(sigma, POWER)
        grad = tl.where(q + eps > floor, -tl.sum(correction_sums, axis=0) * _power_slope(sigma, q, POWER), 0.0)
        tl.store(grad_sigma_ptr + tl.arange(0, 1), grad.to(grad_sigma_ptr.dtype.element_ty))


@_jit
def _ours_forward_kernel(
    x_ptr,
    y_ptr,
    gamma_ptr,
    sigma_ptr,
    num_pixels,
    tiles_per_image,
    stride_image,
    stride_pixel,
    stride_channel,
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
    tile_id = tl.program_id(0)
    image = tile_id // tiles_per_image
    first_pixel = (tile_id - image * tiles_per_image) * BLOCK_PIX
    pools = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    in_pool = tl.arange(0, BLOCK_S)
    pixels = tl.arange(0, BLOCK_PIX)
    # int64 base (the tensor may exceed 2**31 elements); the offsets within a tile stay int32
    base = image.to(tl.int64) * stride_image + first_pixel.to(tl.int64) * stride_pixel
    channels = pools[:, None] * POOL + in_pool[None, :]
    offsets = pixels[:, None, None] * stride_pixel + channels[None, :, :] * stride_channel
    pool_mask = pools < num_pools
    mask = ((first_pixel + pixels) < num_pixels)[:, None, None] & (pool_mask[:, None] & (in_pool < POOL)[None, :])[
        None, :, :
    ]

    x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    q = _abs_power(x, POWER)
    gain, offset = _pool_terms(gamma_ptr, sigma_ptr, pools, pool_mask, gamma_stride, sigma_stride, eps, floor, POWER)

    denominator = tl.sum(q, axis=2) + offset[None, :]  # [BLOCK_PIX, BLOCK_G], the pool sums in registers
    scale = gain[None, :] / denominator
    y = q * scale[:, :, None]
    tl.store(y_ptr + base + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _ours_backward_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    partial_ptr,
    gamma_ptr,
    sigma_ptr,
    num_pixels,
    tiles_per_image,
    num_tiles,
    stride_image,
    stride_pixel,
    stride_channel,
    num_pools,
    gamma_stride,
    sigma_stride,
    eps,
    floor,
    POOL: tl.constexpr,
    POWER: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_PARAMS: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    program = tl.program_id(0)
    pools = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    in_pool = tl.arange(0, BLOCK_S)
    pixels = tl.arange(0, BLOCK_PIX)
    channels = pools[:, None] * POOL + in_pool[None, :]
    offsets = pixels[:, None, None] * stride_pixel + channels[None, :, :] * stride_channel
    pool_mask = pools < num_pools
    channel_mask = (pool_mask[:, None] & (in_pool < POOL)[None, :])[None, :, :]

    # The per-pool terms do not depend on the tile: computed once per program.
    gain, offset = _pool_terms(gamma_ptr, sigma_ptr, pools, pool_mask, gamma_stride, sigma_stride, eps, floor, POWER)

    total_sum = tl.zeros([BLOCK_G], dtype=tl.float32)  # sum of T per pool
    correction_sum = tl.zeros([BLOCK_G], dtype=tl.float32)  # sum of T / D per pool
    for tile_id in range(program, num_tiles, tl.num_programs(0)):
        image = tile_id // tiles_per_image
        first_pixel = (tile_id - image * tiles_per_image) * BLOCK_PIX
        base = image.to(tl.int64) * stride_image + first_pixel.to(tl.int64) * stride_pixel
        mask = ((first_pixel + pixels) < num_pixels)[:, None, None] & channel_mask
        x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        q = _abs_power(x, POWER)
        denominator = tl.sum(q, axis=2) + offset[None, :]
        scale = gain[None, :] / denominator
        total = scale * tl.sum(dy * q, axis=2)  # T; 0 on masked pixels and pools (q = dy = 0 there)
        correction = total / denominator
        if NEED_DX:
            dx = (scale[:, :, None] * dy - correction[:, :, None]) * _power_slope(x, q, POWER)
            tl.store(dx_ptr + base + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_PARAMS:
            total_sum += tl.sum(total, axis=0)
            correction_sum += tl.sum(correction, axis=0)
    if NEED_PARAMS:
        row = partial_ptr + program * 2 * num_pools
        tl.store(row + pools, total_sum, mask=pool_mask)
        tl.store(row + num_pools + pools, correction_sum, mask=pool_mask)


def interpreter_enabled() -> bool:
    """True when this process runs Triton kernels on the CPU under the interpreter (TRITON_INTERPRET=1 at start)."""
    return INTERPRETED


@dataclass(frozen=True)
class _Layout:
    """How a 4-D tensor's memory maps onto (image, pixel, channel) for the kernels."""

    channels_last: bool
    images: int
    pixels: int  # per image: H*W (NCHW) or N*H*W (channels-last, the batch folded into the rows)
    stride_image: int
    stride_pixel: int
    stride_channel: int


def _layout(t: torch.Tensor) -> _Layout | None:
    """The kernel layout of ``t`` or None when it is neither channels-last nor NCHW contiguous."""
    n, c, h, w = t.shape
    # Rows first: when both hold (H = W = 1 or C = 1) a row of C channels is the better tile.
    if t.is_contiguous(memory_format=torch.channels_last):
        return _Layout(True, 1, n * h * w, 0, c, 1)
    if t.is_contiguous():
        return _Layout(False, n, h * w, c * h * w, 1, h * w)
    return None


def output_like(x: torch.Tensor) -> torch.Tensor:
    """The kernels' output for input ``x``: x's layout when supported, else NCHW contiguous (shared with the fake)."""
    if x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class _Blocks:
    pix: int
    pools: int
    pool: int
    num_warps: int


def _blocks(layout: _Layout, num_pools: int, pool: int) -> _Blocks:
    """Tile shape: whole pools always (the sum stays in registers); rows of C for channels-last, else pixel runs.

    Follows ``TUNING`` as it is at the call (the tuning sweep changes it between calls)."""
    return _tile_shape(layout, num_pools, pool, int(TUNING["tile_elements"]), int(TUNING["elements_per_warp"]))


@functools.lru_cache(maxsize=256)  # a handful of layer shapes per model: no per-call Python arithmetic
def _tile_shape(layout: _Layout, num_pools: int, pool: int, tile: int, elements_per_warp: int) -> _Blocks:
    block_s = _next_power_of_2(pool)
    block_g_max = _next_power_of_2(num_pools)
    if layout.channels_last:
        # As many whole pools of a row as fit (all of them up to C = 4096), then as many rows as fit.
        block_g = min(block_g_max, max(1, tile // block_s))
        block_pix = max(1, tile // (block_g * block_s))
    else:
        # Pixels are the contiguous axis: a run long enough for coalesced loads, then as many pools as fit.
        block_pix = min(max(min(128, tile // block_s), 8), _next_power_of_2(layout.pixels))
        block_g = min(block_g_max, max(1, tile // (block_pix * block_s)))
    block_pix = min(block_pix, _next_power_of_2(layout.pixels))
    num_warps = min(16, max(1, block_pix * block_g * block_s // elements_per_warp))
    return _Blocks(block_pix, block_g, block_s, num_warps)


def _check_input(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"divnorm_specs.kernel=triton needs CUDA tensors (got a {x.device.type} tensor); start the process with "
            "TRITON_INTERPRET=1 to run the kernel under Triton's CPU interpreter, or use kernel=auto or torch"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"divnorm_specs.kernel=triton supports float32, bfloat16 and float16 input, got {x.dtype}; "
            "use kernel=auto or torch for other dtypes"
        )


def _param_strides(gamma: torch.Tensor, sigma: torch.Tensor) -> tuple[int, int]:
    """Stride 1 for a per-pool parameter, 0 for a single one (every pool reads element 0)."""
    return (1 if gamma.numel() > 1 else 0), (1 if sigma.numel() > 1 else 0)


def forward(
    x: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor, pool: int, power: float, eps: float
) -> torch.Tensor:
    """``y = exp(gamma) |x|^P / (sum_pool |x|^P + max(|sigma|^P + eps, floor))`` for (N, C, H, W) ``x``."""
    _check_input(x)
    layout = _layout(x)
    if layout is None:  # an odd layout (a permuted or sliced view): the one copy this path makes
        x = x.contiguous()
        layout = _layout(x)
    y = output_like(x)
    if x.numel() == 0:
        return y
    num_pools = x.shape[1] // pool
    blocks = _blocks(layout, num_pools, pool)
    tiles_per_image = triton.cdiv(layout.pixels, blocks.pix)
    grid = (layout.images * tiles_per_image, triton.cdiv(num_pools, blocks.pools))
    gamma_stride, sigma_stride = _param_strides(gamma, sigma)
    _ours_forward_kernel[grid](
        x, y, gamma.contiguous(), sigma.contiguous(),
        layout.pixels, tiles_per_image, layout.stride_image, layout.stride_pixel, layout.stride_channel,
        num_pools, gamma_stride, sigma_stride, float(eps), DENOMINATOR_FLOOR,
        POOL=pool, POWER=float(power), BLOCK_PIX=blocks.pix, BLOCK_G=blocks.pools, BLOCK_S=blocks.pool,
        num_warps=blocks.num_warps,
    )  # fmt: skip
    return y


@functools.cache
def _multiprocessors(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_programs(x: torch.Tensor, num_tiles: int, pool_blocks: int) -> int:
    """Programs along the tile axis: enough to fill the GPU, few enough that the partial sums stay small."""
    if x.device.type == "cuda":
        slots = _multiprocessors(x.device.index) * int(TUNING["backward_programs_per_sm"])
    else:  # the interpreter: programs run one after another, a loop inside one costs the same
        slots = 16
    return max(1, min(num_tiles, max(1, slots // pool_blocks)))


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    gamma: torch.Tensor,
    sigma: torch.Tensor,
    pool: int,
    power: float,
    eps: float,
    need_x: bool,
    need_gamma: bool,
    need_sigma: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward` for x (an empty tensor when not needed), gamma and sigma (both computed when
    either is needed, zeros when neither is)."""
    _check_input(x)
    layout = _layout(x)
    if layout is None:
        x = x.contiguous()
        layout = _layout(x)
    if _layout(grad) != layout:  # e.g. an expanded gradient of .sum(): brought to x's layout, one copy
        memory_format = torch.channels_last if layout.channels_last else torch.contiguous_format
        grad = grad.contiguous(memory_format=memory_format)
    dx = output_like(x) if need_x else x.new_empty(0)
    need_params = (need_gamma or need_sigma) and x.numel() > 0
    if not need_params:
        grad_gamma, grad_sigma = torch.zeros_like(gamma), torch.zeros_like(sigma)
    if x.numel() == 0 or not (need_x or need_params):
        return dx, grad_gamma, grad_sigma
    num_pools = x.shape[1] // pool
    blocks = _blocks(layout, num_pools, pool)
    tiles_per_image = triton.cdiv(layout.pixels, blocks.pix)
    num_tiles = layout.images * tiles_per_image
    pool_blocks = triton.cdiv(num_pools, blocks.pools)
    programs = _backward_programs(x, num_tiles, pool_blocks)
    # every (program, pool) entry is written by the kernel when the sums are wanted
    partial = torch.empty((programs, 2, num_pools) if need_params else (1,), dtype=torch.float32, device=x.device)
    gamma_stride, sigma_stride = _param_strides(gamma, sigma)
    _ours_backward_kernel[(programs, pool_blocks)](
        x, grad, dx if need_x else x, partial, gamma.contiguous(), sigma.contiguous(),
        layout.pixels, tiles_per_image, num_tiles, layout.stride_image, layout.stride_pixel, layout.stride_channel,
        num_pools, gamma_stride, sigma_stride, float(eps), DENOMINATOR_FLOOR,
        POOL=pool, POWER=float(power), NEED_DX=need_x, NEED_PARAMS=need_params,
        BLOCK_PIX=blocks.pix, BLOCK_G=blocks.pools, BLOCK_S=blocks.pool, num_warps=blocks.num_warps,
    )  # fmt: skip
    if need_params:  # both computed in one launch; the one not needed is dropped by the caller
        grad_gamma, grad_sigma = parameter_gradients(partial, gamma, sigma, power, eps)
    return dx, grad_gamma, grad_sigma


def parameter_gradients(
    partial: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor, power: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgamma, dsigma) from the backward programs' (programs, 2, G) partial sums of ``T`` and ``T / D``: summed over
    the programs (and over the pools for a single parameter) and turned into the gradients in one launch."""
    grad_gamma, grad_sigma = torch.empty_like(gamma), torch.empty_like(sigma)
    programs, _, num_pools = partial.shape
    _parameter_gradients_kernel[(1,)](
        partial, sigma.contiguous(), grad_gamma, grad_sigma, programs, num_pools, float(eps), DENOMINATOR_FLOOR,
        POWER=float(power), SINGLE_GAMMA=gamma.numel() == 1, SINGLE_SIGMA=sigma.numel() == 1,
        BLOCK_P=min(32, _next_power_of_2(programs)), BLOCK_G=min(128, _next_power_of_2(num_pools)), num_warps=4,
    )  # fmt: skip
    return grad_gamma, grad_sigma
