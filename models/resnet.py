"""ResNet-18 (basic blocks) and ResNet-50 (bottlenecks, stride on the 3x3 conv as torchvision v1.5).

Every conv, stem included, is a conv unit ``conv -> act -> DN -> norm``; within a block the last conv has no
activation (it comes after the residual add). ``divnorm_specs.asact`` places DN as REFERENCE.md describes:

- ``asact = false``: DN after every conv, the last of each block included; after the add: ReLU (if ``relu``).
- ``asact = true``: no DN after the last conv of a block; after the add: DN, then ReLU if ``relu`` is on.

The downsample shortcut is a 1x1 conv with BatchNorm (torchvision's) when ``shortcut_bn`` and ``batchnorm``
are on; ``shortcut_bn = false`` gives the original's BN-less shortcut. DN never sits on the shortcut. With
ReLU and BatchNorm on and DN off, the 224 px parameter counts equal torchvision's ``resnet18`` / ``resnet50``.
``zero_init_residual`` (default off) zeroes the last BatchNorm weight of every block, so each block starts as its
shortcut. The 32 px layout uses the usual CIFAR stem (3x3 conv stride 1, no max-pool); the stages are unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.layers import UnitParts, conv_unit
from models.registry import register_model


def post_add_activation(num_channels: int, parts: UnitParts, asact: bool) -> nn.Module:
    """What follows the residual add: [DN if ``asact``] then [activation]; an identity when both are off."""
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    dn = parts.dn(num_channels) if asact else None
    if dn is not None:
        modules["dn"] = dn
    # Not in place after DN: a DN layer may keep its output for its backward pass.
    act = parts.act(inplace=dn is None)
    if act is not None:
        modules["act"] = act
    return nn.Sequential(modules) if modules else nn.Identity()


def shortcut(in_channels: int, out_channels: int, stride: int, parts: UnitParts, with_norm: bool) -> nn.Module:
    """The downsample path: 1x1 conv (stride ``stride``), then the norm layer when ``with_norm``."""
    modules: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    )
    norm = parts.norm(out_channels) if with_norm else None
    if norm is not None:
        modules["norm"] = norm
    return nn.Sequential(modules)


class BasicBlock(nn.Module):
    """Two 3x3 conv units and the identity (or downsample) shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, parts: UnitParts, asact: bool, downsample=None):
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv1=conv_unit(in_channels, width, 3, stride=stride, padding=1, bias=False, parts=parts),
                conv2=conv_unit(width, width, 3, padding=1, bias=False, act=False, dn=not asact, parts=parts),
            )
        )
        self.downsample = downsample
        self.activation = post_add_activation(width, parts, asact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        # Out of place: the last unit may end in a DN layer whose backward needs its output unchanged.
        return self.activation(self.features(x) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4) conv units and the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, parts: UnitParts, asact: bool, downsample=None):
        super().__init__()
        out_channels = width * self.expansion
        self.features = nn.Sequential(
            OrderedDict(
                conv1=conv_unit(in_channels, width, 1, bias=False, parts=parts),
                conv2=conv_unit(width, width, 3, stride=stride, padding=1, bias=False, parts=parts),
                conv3=conv_unit(width, out_channels, 1, bias=False, act=False, dn=not asact, parts=parts),
            )
        )
        self.downsample = downsample
        self.activation = post_add_activation(out_channels, parts, asact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.activation(self.features(x) + identity)


class ResNet(nn.Module):
    """ResNet with injected conv-unit parts: ``stem``, ``layer1`` ... ``layer4``, ``avgpool``, ``fc``."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: tuple[int, int, int, int],
        num_classes: int = 1000,
        *,
        parts: UnitParts | None = None,
        small_input: bool = False,
        asact: bool = False,
        shortcut_bn: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        parts = parts or UnitParts()
        if small_input:
            stem = OrderedDict(conv1=conv_unit(3, 64, 3, padding=1, bias=False, parts=parts))
        else:
            stem = OrderedDict(
                conv1=conv_unit(3, 64, 7, stride=2, padding=3, bias=False, parts=parts),
                maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        self.stem = nn.Sequential(stem)
        in_channels = 64
        for index, (width, blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage), start=1):
            stride = 1 if index == 1 else 2
            layers = []
            for position in range(blocks):
                out_channels = width * block.expansion
                downsample = None
                if position == 0 and (stride != 1 or in_channels != out_channels):
                    downsample = shortcut(in_channels, out_channels, stride, parts, shortcut_bn)
                layers.append(block(in_channels, width, stride if position == 0 else 1, parts, asact, downsample))
                in_channels = out_channels
            self.add_module(f"layer{index}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)
        if zero_init_residual:
            # Each block starts as its shortcut (Goyal et al. 2017, torchvision's option). With DN after every
            # conv, the backward gain per conv-DN-BN unit exceeds 1 and compounds over ResNet-50's 49 units;
            # starting the residual branches at zero keeps the early gradients bounded.
            for module in self.modules():
                if isinstance(module, BasicBlock | Bottleneck):
                    last_norm = getattr(module.features[-1], "norm", None)
                    if isinstance(last_norm, nn.BatchNorm2d):
                        nn.init.zeros_(last_norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(block, blocks_per_stage, config: Mapping[str, Any], num_classes: int, parts: UnitParts, small_input):
    return ResNet(
        block,
        blocks_per_stage,
        num_classes,
        parts=parts,
        small_input=small_input,
        asact=config["divnorm_specs"]["asact"],
        shortcut_bn=config["shortcut_bn"],
        zero_init_residual=config["zero_init_residual"],
    )


@register_model
def resnet18(config: Mapping[str, Any], *, num_classes: int, parts: UnitParts, small_input: bool) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2)."""
    return _build(BasicBlock, (2, 2, 2, 2), config, num_classes, parts, small_input)


@register_model
def resnet50(config: Mapping[str, Any], *, num_classes: int, parts: UnitParts, small_input: bool) -> ResNet:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3)."""
    return _build(Bottleneck, (3, 4, 6, 3), config, num_classes, parts, small_input)
