"""AlexNet (torchvision's 64/192/384/256/256 layout) with every feature conv built as a conv unit.

224 px: torchvision's ``alexnet`` exactly (11x11/4 and 5x5 convs); with ReLU on and DN and BatchNorm off its
parameter count equals torchvision's. 32 px (CIFAR, as the original): conv1 3x3 stride 1 and conv2 3x3; the
three max-pools take 32 -> 15 -> 7 -> 3 and the adaptive pool lifts 3x3 to the classifier's 6x6 input, so the
classifier (and its parameter count) is the same at both sizes. The classifier is never changed by the
``relu`` / ``batchnorm`` / DN switches: they act on the feature convs only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.layers import UnitParts, conv_unit
from models.registry import register_model


class AlexNet(nn.Module):
    """AlexNet whose five convs are ``conv -> act -> DN -> norm`` units (``features.conv1`` ... ``conv5``)."""

    def __init__(
        self, num_classes: int = 1000, *, parts: UnitParts | None = None, small_input: bool = False, dropout=0.5
    ) -> None:
        super().__init__()
        parts = parts or UnitParts()
        if small_input:
            conv1 = conv_unit(3, 64, 3, stride=1, padding=1, parts=parts)
            conv2 = conv_unit(64, 192, 3, padding=1, parts=parts)
        else:
            conv1 = conv_unit(3, 64, 11, stride=4, padding=2, parts=parts)
            conv2 = conv_unit(64, 192, 5, padding=2, parts=parts)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=conv1,
                pool1=nn.MaxPool2d(kernel_size=3, stride=2),
                conv2=conv2,
                pool2=nn.MaxPool2d(kernel_size=3, stride=2),
                conv3=conv_unit(192, 384, 3, padding=1, parts=parts),
                conv4=conv_unit(384, 256, 3, padding=1, parts=parts),
                conv5=conv_unit(256, 256, 3, padding=1, parts=parts),
                pool3=nn.MaxPool2d(kernel_size=3, stride=2),
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        # flatten, not view: a channels-last tensor cannot be viewed as (N, C*H*W) in NCHW order.
        return self.classifier(torch.flatten(x, 1))


@register_model
def alexnet(config: Mapping[str, Any], *, num_classes: int, parts: UnitParts, small_input: bool) -> AlexNet:
    """AlexNet; 224 px = torchvision's, 32 px = the original's CIFAR variant (3x3 conv1 stride 1, 3x3 conv2)."""
    return AlexNet(num_classes, parts=parts, small_input=small_input)
