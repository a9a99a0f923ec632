"""VGG-16 (configuration D) with every feature conv built as a conv unit.

224 px: torchvision's ``vgg16_bn`` layout (convs with bias, 7x7 adaptive pool, 4096-4096 classifier); with ReLU
and BatchNorm on and DN off its parameter count equals torchvision's. 32 px: the same 13 convs and five
max-pools (32 -> 1 px), then a small classifier 512 -> 512 -> 512 -> classes (ReLU + dropout between), the
usual CIFAR VGG head: the 224 px head would put 119 M parameters on a 1x1 feature map.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.layers import UnitParts, conv_unit
from models.registry import register_model

# Output channels of the convs per stage; a max-pool ends each stage.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
    """VGG whose convs are ``conv -> act -> DN -> norm`` units (``features.conv1_1`` ... ``conv5_3``)."""

    def __init__(
        self,
        stages: tuple[tuple[int, ...], ...] = VGG16_STAGES,
        num_classes: int = 1000,
        *,
        parts: UnitParts | None = None,
        small_input: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        parts = parts or UnitParts()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = 3
        for stage, widths in enumerate(stages, start=1):
            for index, width in enumerate(widths, start=1):
                layers[f"conv{stage}_{index}"] = conv_unit(in_channels, width, 3, padding=1, parts=parts)
                in_channels = width
            layers[f"pool{stage}"] = nn.MaxPool2d(kernel_size=2, stride=2)
        self.features = nn.Sequential(layers)
        pooled, hidden = (1, 512) if small_input else (7, 4096)
        self.avgpool = nn.AdaptiveAvgPool2d((pooled, pooled))
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * pooled * pooled, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))  # flatten, not view: channels-last safe


@register_model
def vgg16(config: Mapping[str, Any], *, num_classes: int, parts: UnitParts, small_input: bool) -> VGG:
    """VGG-16; 224 px = torchvision's ``vgg16_bn`` layout, 32 px = same convs with a 512-wide classifier."""
    return VGG(VGG16_STAGES, num_classes, parts=parts, small_input=small_input)
