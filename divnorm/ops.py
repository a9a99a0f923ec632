"""The fused ``ours`` kernel as torch custom ops (``divnorm::ours_fwd`` / ``divnorm::ours_bwd``) with autograd.

Registered through ``torch.library`` with fake (meta) implementations, so ``torch.compile`` traces a model that
uses the kernel as one graph: the op is an opaque node with known output shapes, no graph break. Triton itself
is imported only when an op runs (``divnorm`` imports without it); see :mod:`divnorm.triton_ours`.

Outside a compile (eager), :func:`ours_fused` and :func:`relu_dn_bn` call the same kernels through a plain
``torch.autograd.Function`` with the same saved tensors and backward: a custom op's eager dispatch (its autograd
wrapper, redispatch and dynamo-disable frames, twice per step) cost more host time than the kernels' own wrappers
(measured on the CPU with the launches compiled but not run: 345-436 us a ``ours`` forward + backward through the
ops, 212-232 us through the Function; docs/divnorm-kernel.md), and the eager layer is host-bound on the H200.
"""

from __future__ import annotations

import torch

KERNEL_CHOICES: tuple[str, ...] = ("auto", "triton", "torch")

_TRITON_IMPORTS: bool | None = None


def triton_imports() -> bool:
    """Whether ``import triton`` succeeds here (tried once, then cached)."""
    global _TRITON_IMPORTS
    if _TRITON_IMPORTS is None:
        try:
            import triton  # noqa: F401
        except Exception:  # a broken install counts as absent: kernel=auto then takes the torch path
            _TRITON_IMPORTS = False
        else:
            _TRITON_IMPORTS = True
    return _TRITON_IMPORTS


def _kernels():
    """:mod:`divnorm.triton_ours`, imported at the first kernel call; one clear error when triton is missing."""
    if not triton_imports():
        raise RuntimeError(
            "divnorm_specs.kernel=triton needs the triton package (it ships with CUDA builds of torch: "
            "pip install triton); use kernel=auto or torch"
        )
    from divnorm import triton_ours

    return triton_ours


def _output_like(x: torch.Tensor) -> torch.Tensor:
    """Mirrors :func:`divnorm.triton_ours.output_like` without importing triton (the fake must agree with it)."""
    if x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("divnorm::ours_fwd", mutates_args=())
def ours_fwd(
    x: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor, pool: int, power: float, eps: float
) -> torch.Tensor:
    """Fused forward of ``ours`` on (N, C, H, W) ``x``; output in x's dtype and memory format."""
    return _kernels().forward(x, gamma, sigma, pool, power, eps)


@ours_fwd.register_fake
def _ours_fwd_fake(x, gamma, sigma, pool, power, eps):
    return _output_like(x)


@torch.library.custom_op("divnorm::ours_bwd", mutates_args=())
def ours_bwd(
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
    """Fused backward: (dx or an empty tensor, dgamma, dsigma; both zeros when neither is needed)."""
    return _kernels().backward(grad, x, gamma, sigma, pool, power, eps, need_x, need_gamma, need_sigma)


@ours_bwd.register_fake
def _ours_bwd_fake(grad, x, gamma, sigma, pool, power, eps, need_x, need_gamma, need_sigma):
    dx = _output_like(x) if need_x else x.new_empty(0)
    return dx, torch.empty_like(gamma), torch.empty_like(sigma)


def _setup_context(ctx, inputs, output) -> None:
    x, gamma, sigma, pool, power, eps = inputs
    ctx.save_for_backward(x, gamma, sigma)  # x only: the backward recomputes the pool sums in registers
    ctx.pool, ctx.power, ctx.eps = pool, power, eps


def _backward_through(bwd, ctx, grad):
    x, gamma, sigma = ctx.saved_tensors
    need_x, need_gamma, need_sigma = ctx.needs_input_grad[:3]
    needs = (need_x, need_gamma, need_sigma)
    dx, grad_gamma, grad_sigma = bwd(grad, x, gamma, sigma, ctx.pool, ctx.power, ctx.eps, *needs)
    return (
        dx if need_x else None,
        grad_gamma if need_gamma else None,
        grad_sigma if need_sigma else None,
        None,
        None,
        None,
    )


def _backward(ctx, grad):
    return _backward_through(ours_bwd, ctx, grad)


ours_fwd.register_autograd(_backward, setup_context=_setup_context)


class _OursEager(torch.autograd.Function):
    """The op pair's eager twin: the kernels called directly, the op's context and backward."""

    @staticmethod
    def forward(x, gamma, sigma, pool, power, eps):
        return _kernels().forward(x, gamma, sigma, pool, power, eps)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, grad):
        return _backward_through(_kernels().backward, ctx, grad)


def ours_fused(
    x: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor, pool: int, power: float, eps: float
) -> torch.Tensor:
    """``ours`` through the fused kernel (differentiable in x, gamma and sigma): the custom op while compiling,
    its eager twin otherwise (the same kernels, less host time)."""
    if torch.compiler.is_compiling():
        return ours_fwd(x, gamma, sigma, pool, float(power), float(eps))
    return _OursEager.apply(x, gamma, sigma, pool, float(power), float(eps))


# ReLU -> ours -> BatchNorm (training) in one kernel set (divnorm.triton_fused_bn), channels-last only.


def _fused_bn_kernels():
    """:mod:`divnorm.triton_fused_bn`, imported at the first call (the same message as the DN kernel's)."""
    _kernels()
    from divnorm import triton_fused_bn

    return triton_fused_bn


@torch.library.custom_op("divnorm::relu_dn_bn_fwd", mutates_args=())
def relu_dn_bn_fwd(
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
    """(out, batch mean, biased batch variance, rstd) of ``batchnorm(ours(relu(x)))``; x channels-last."""
    return _fused_bn_kernels().forward(x, gamma, sigma, weight, bias, pool, power, eps, bn_eps, relu)


@relu_dn_bn_fwd.register_fake
def _relu_dn_bn_fwd_fake(x, gamma, sigma, weight, bias, pool, power, eps, bn_eps, relu):
    stats = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats), torch.empty_like(stats)


@torch.library.custom_op("divnorm::relu_dn_bn_bwd", mutates_args=())
def relu_dn_bn_bwd(
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
    """(dx, dgamma, dsigma, dweight, dbias) for :func:`relu_dn_bn_fwd`'s ``out``."""
    return _fused_bn_kernels().backward(dout, x, gamma, sigma, weight, mean, rstd, pool, power, eps, relu)


@relu_dn_bn_bwd.register_fake
def _relu_dn_bn_bwd_fake(dout, x, gamma, sigma, weight, mean, rstd, pool, power, eps, relu):
    return (
        torch.empty_like(x),
        torch.empty_like(gamma),
        torch.empty_like(sigma),
        torch.empty_like(weight),
        torch.empty_like(weight),
    )


def _fused_bn_setup_context(ctx, inputs, output) -> None:
    x, gamma, sigma, weight, _bias, pool, power, eps, _bn_eps, relu = inputs
    _out, mean, var, rstd = output
    ctx.save_for_backward(x, gamma, sigma, weight, mean, rstd)  # x and (C,) statistics: the DN output is recomputed
    ctx.settings = (pool, power, eps, relu)
    ctx.mark_non_differentiable(mean, var, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients made for the three statistics (three launches a call)


def _fused_bn_backward_through(bwd, ctx, grad_out):
    if grad_out is None:  # the output did not reach the loss (gradients are not materialized as zeros)
        return (None,) * 10
    x, gamma, sigma, weight, mean, rstd = ctx.saved_tensors
    grads = bwd(grad_out, x, gamma, sigma, weight, mean, rstd, *ctx.settings)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])), None, None, None, None, None)


def _fused_bn_backward(ctx, grad_out, _grad_mean, _grad_var, _grad_rstd):
    return _fused_bn_backward_through(relu_dn_bn_bwd, ctx, grad_out)


relu_dn_bn_fwd.register_autograd(_fused_bn_backward, setup_context=_fused_bn_setup_context)


class _ReluDnBnEager(torch.autograd.Function):
    """:func:`relu_dn_bn_fwd`'s eager twin (see the module's notes)."""

    @staticmethod
    def forward(x, gamma, sigma, weight, bias, pool, power, eps, bn_eps, relu):
        return _fused_bn_kernels().forward(x, gamma, sigma, weight, bias, pool, power, eps, bn_eps, relu)

    setup_context = staticmethod(_fused_bn_setup_context)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_rstd):
        return _fused_bn_backward_through(_fused_bn_kernels().backward, ctx, grad_out)


def relu_dn_bn(
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
    """:func:`relu_dn_bn_fwd` while compiling, its eager twin otherwise: (out, mean, biased var, rstd)."""
    op = relu_dn_bn_fwd if torch.compiler.is_compiling() else _ReluDnBnEager.apply
    return op(x, gamma, sigma, weight, bias, pool, power, eps, bn_eps, relu)
