"""Shared numerics for the divisive normalization layers: fp32 compute under autocast and divergence checks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# Smallest value a denominator may take. With the config's eps = 0 and a learnable sigma that has reached 0, a
# pool of all-zero inputs would give 0 / 0. ``ours`` floors its per-pool offset |sigma|^P + eps at this value
# (a (G,)-sized op, so the output stays exact: 0 there), ``ken`` floors the base of its power. The result differs
# from the unfloored formula only when the offset is below 1e-20, and ``ours`` keeps its output bound
# y <= exp(gamma). 1e-20 rather than float32's tiny: backward divides by the denominator squared.
DENOMINATOR_FLOOR = 1e-20

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the energy and the division run in: fp32 for fp16/bf16 inputs, else the input's own dtype."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def nonfinite_parameters(module: nn.Module, prefix: str = "") -> list[str]:
    """Qualified names of the parameters of ``module`` that hold NaN or inf (empty when all are finite).

    This syncs with the device (one ``.item()`` per parameter tensor), so call it per epoch or per logging
    interval, not per step.
    """
    bad = []
    for name, param in module.named_parameters(prefix=prefix.rstrip(".")):
        if not bool(torch.isfinite(param).all()):
            bad.append(name)
    return bad


class FiniteCheckMixin:
    """Adds :meth:`check_finite` to a normalization layer: divergence is reported, never silently reset."""

    def check_finite(self, name: str = "") -> None:
        """Raise :class:`FloatingPointError` naming every parameter of this layer that holds NaN or inf.

        The original ``ken`` code replaced a NaN parameter by a constant and carried on, hiding that training
        diverged; here the caller decides (stop the run, lower the learning rate, reload a checkpoint).
        """
        bad = nonfinite_parameters(self, prefix=name)  # type: ignore[arg-type]
        if bad:
            label = name or type(self).__name__
            raise FloatingPointError(
                f"divisive normalization {label} diverged: non-finite values in {', '.join(bad)}; "
                "lower the learning rate or raise eps, and restart from the last good checkpoint"
            )


def divnorm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every divisive normalization layer in ``model`` as ``(qualified name, module)``."""
    for name, module in model.named_modules():
        if isinstance(module, FiniteCheckMixin):
            yield name, module


def check_finite(model: nn.Module) -> None:
    """Raise :class:`FloatingPointError` if any divisive normalization layer of ``model`` has NaN/inf parameters.

    The message names each bad parameter by its qualified name (e.g. ``features.2.sigma``). Cost: one device
    sync per DN parameter tensor, so call it once per epoch or logging interval.
    """
    bad = []
    for name, layer in divnorm_layers(model):
        bad.extend(nonfinite_parameters(layer, prefix=name))
    if bad:
        raise FloatingPointError(
            f"divisive normalization diverged: non-finite values in {', '.join(bad)}; "
            "lower the learning rate or raise eps, and restart from the last good checkpoint"
        )
