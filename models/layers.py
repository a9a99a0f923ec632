"""The one conv unit every network is built from: conv -> activation -> divisive normalization -> norm.

The activation, DN and norm parts are injected (timm style) through :class:`UnitParts`, so no network file
knows which DN variant, or whether BatchNorm, is in use; :func:`parts_from_config` makes the parts from the
config's ``model`` section (``relu``, ``divnorm_specs``, ``batchnorm``). A part that is off is left out of the
module tree rather than replaced by an identity, so ``print(model)`` shows exactly what runs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from divnorm import build_divnorm
from divnorm.fused_bn import fusion_applies, relu_divnorm_batchnorm
from models.config import ModelConfigError


@dataclass(frozen=True)
class UnitParts:
    """Factories for the parts of a conv unit; ``None`` switches a part off.

    ``act_layer(inplace=bool)`` builds the activation; ``dn_layer(num_channels)`` the divisive normalization;
    ``norm_layer(num_channels)`` the normalization after it (any layer taking ``num_channels`` first, e.g.
    ``nn.BatchNorm2d`` or ``partial(nn.GroupNorm, 32)`` with the argument order swapped by a lambda).
    """

    act_layer: Callable[..., nn.Module] | None = nn.ReLU
    dn_layer: Callable[[int], nn.Module] | None = None
    norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d
    # divnorm_specs.fuse_bn: run ReLU -> ours -> BatchNorm (training) as one function (divnorm.fused_bn)
    fuse_bn: bool | str = False

    def act(self, *, inplace: bool) -> nn.Module | None:
        """A new activation module, or ``None`` when the activation is off."""
        return None if self.act_layer is None else self.act_layer(inplace=inplace)

    def dn(self, num_channels: int) -> nn.Module | None:
        """A new divisive normalization layer over ``num_channels`` channels, or ``None`` when DN is off."""
        return None if self.dn_layer is None else self.dn_layer(num_channels)

    def norm(self, num_channels: int) -> nn.Module | None:
        """A new normalization layer over ``num_channels`` channels, or ``None`` when it is off."""
        return None if self.norm_layer is None else self.norm_layer(num_channels)


def divnorm_factory(divnorm_specs: Mapping[str, Any]) -> Callable[[int], nn.Module] | None:
    """``num_channels -> DN layer`` for the config's ``divnorm_specs``, or ``None`` for type ``nonorm``.

    ``asact`` is a placement switch read by the ResNets, not a layer setting, so it is not passed on. The specs
    are checked once here (a layer over 64 channels is built and dropped) so that a bad key fails before any
    network is assembled, with divnorm's own message.
    """
    specs = {key: value for key, value in divnorm_specs.items() if key != "asact"}
    try:
        probe = build_divnorm(specs, 64)
    except (ValueError, KeyError, TypeError) as error:
        raise ModelConfigError(f"model.divnorm_specs: {error}") from error
    if isinstance(probe, nn.Identity):
        return None
    return partial(build_divnorm, specs)


def parts_from_config(config: Mapping[str, Any]) -> UnitParts:
    """The :class:`UnitParts` a resolved ``model`` config asks for (see :mod:`models.config`)."""
    return UnitParts(
        act_layer=nn.ReLU if config["relu"] else None,
        dn_layer=divnorm_factory(config["divnorm_specs"]),
        norm_layer=nn.BatchNorm2d if config["batchnorm"] else None,
        fuse_bn=config["divnorm_specs"].get("fuse_bn", False),
    )


class ConvUnit(nn.Sequential):
    """``conv -> act -> dn -> norm`` as a sequential (the same module names and checkpoint keys), whose tail runs
    as one fused function where :func:`divnorm.fused_bn.fusion_applies` says so (``ours`` DN before a training
    BatchNorm; by default only under ``torch.compile``). Otherwise, and always in eval mode, layer by layer.
    """

    def __init__(self, modules: OrderedDict[str, nn.Module], *, fuse_bn: bool | str = False) -> None:
        super().__init__(modules)
        self.fuse_bn = fuse_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dn = self._modules.get("dn")
        if dn is None or self.fuse_bn is False:
            return super().forward(x)
        x = self.conv(x)
        act, norm = self._modules.get("act"), self._modules.get("norm")
        if fusion_applies(self.fuse_bn, act, dn, norm, x):
            return relu_divnorm_batchnorm(x, dn, norm, relu=act is not None)
        for module in (act, dn, norm):
            if module is not None:
                x = module(x)
        return x


def conv_unit(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    parts: UnitParts,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
    act: bool = True,
    dn: bool = True,
) -> ConvUnit:
    """One conv unit: ``Conv2d -> activation -> DN -> norm`` (a :class:`ConvUnit`).

    ``act=False`` / ``dn=False`` leave that part out at this position even when ``parts`` has it (the last conv
    of a residual block); the norm follows ``parts`` alone. The activation runs in place: it directly follows
    the conv, whose backward does not need its output.
    """
    modules: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
    )
    optional = {
        "act": parts.act(inplace=True) if act else None,
        "dn": parts.dn(out_channels) if dn else None,
        "norm": parts.norm(out_channels),
    }
    modules.update((name, module) for name, module in optional.items() if module is not None)
    return ConvUnit(modules, fuse_bn=parts.fuse_bn)
