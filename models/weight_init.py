"""Weight initialization of every ``Conv2d`` (``model.weight_init``), as the original schemes define them.

- ``kaiming`` (default): ``kaiming_normal_`` (fan_in, gain of ``model.nonlinearity``), bias 0.
- ``normal``: N(0, ``std``^2) per weight; ``std = "input_size"`` means 1/sqrt(fan_in). Bias 0.
- ``multivariate_gaussian``: the filters of each DN pool (pool size ``2 ** int(p * log2(C_out))``, ``p`` from
  ``divnorm_specs``) are drawn around one shared mean filter: mean ~ N(0, ``mean_std``^2) per weight, then each
  filter = mean + N(0, ``std``^2). Filters that share a pool start similar, as DN pools them.
- ``kaiming_gaussian``: pool g is drawn around a Kaiming-initialized filter m_g: each filter =
  m_g + N(0, (``std_ratio`` * std(m_g))^2).

Linear layers and norm layers keep PyTorch's default init (as in the original). Differences from the
original code, on purpose: ``std`` is a standard deviation in both Gaussian pool schemes (the original passed
it as the covariance diagonal, i.e. a variance, so its ``std = 0.01`` drew with standard deviation 0.1 — set
``std = 0.1`` here to reproduce that); a last pool that does not fill up (C_out not a multiple of the pool
size) is drawn too instead of crashing; the weights are written in place, so the parameter object (and its
memory format) is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def pool_size(num_channels: int, p: float) -> int:
    """The DN pool size the ``ours`` layer uses for ``C`` channels: ``2 ** int(p * log2(C))``, all C when p = 1."""
    return num_channels if p == 1 else 2 ** int(p * math.log2(num_channels))


def _pooled_normal_(weight: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, size: int) -> None:
    """Fill ``weight`` (C_out, ...) so that the filters of pool g are ``means[g] + stds[g] * N(0, 1)``."""
    out_channels = weight.shape[0]
    pool_of_filter = torch.arange(out_channels, device=weight.device) // size
    noise = torch.randn_like(weight)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_(means[pool_of_filter] + stds[pool_of_filter].reshape(shape) * noise)


@torch.no_grad()
def init_conv_(conv: nn.Conv2d, config: Mapping[str, Any]) -> None:
    """Initialize one convolution in place by ``config["weight_init"]`` (see the module docstring)."""
    scheme = config["weight_init"]
    weight = conv.weight
    fan_in = weight[0].numel()
    size = pool_size(weight.shape[0], config["divnorm_specs"]["p"])
    num_pools = -(-weight.shape[0] // size)  # ceil: a last, partial pool is drawn too
    if scheme == "kaiming":
        nn.init.kaiming_normal_(weight, a=0, mode="fan_in", nonlinearity=config["nonlinearity"])
    elif scheme == "normal":
        std = 1 / math.sqrt(fan_in) if config["std"] == "input_size" else config["std"]
        nn.init.normal_(weight, mean=0.0, std=std)
    elif scheme == "multivariate_gaussian":
        std = 1 / math.sqrt(fan_in) if config["std"] == "input_size" else config["std"]
        means = torch.randn((num_pools, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
        _pooled_normal_(weight, means * config["mean_std"], torch.full((num_pools,), std, device=weight.device), size)
    elif scheme == "kaiming_gaussian":
        means = torch.empty((num_pools, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_normal_(means, a=0, mode="fan_in", nonlinearity="relu")
        stds = means.flatten(1).std(dim=1) * config["std_ratio"]
        _pooled_normal_(weight, means, stds, size)
    else:  # resolve_model_config has checked the name; this guards direct callers
        raise ValueError(f"unknown weight_init {scheme!r}")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_weights(model: nn.Module, config: Mapping[str, Any]) -> nn.Module:
    """Initialize every ``Conv2d`` of ``model`` by the resolved ``config``; returns ``model``."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            init_conv_(module, config)
    return model
