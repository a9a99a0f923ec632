"""Small read-only helpers about a built network: parameter counts, the first conv, the units' make-up."""

from __future__ import annotations

from collections import Counter

from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``model`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first ``Conv2d`` in module order: conv1, whose weights the trainer saves for receptive-field plots."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError(f"{type(model).__name__} has no Conv2d")


def layer_counts(model: nn.Module) -> dict[str, int]:
    """How many modules of each class ``model`` holds, e.g. ``{"Conv2d": 20, "BatchNorm2d": 20, ...}``."""
    counts = Counter(type(module).__name__ for module in model.modules() if not list(module.children()))
    return dict(sorted(counts.items()))
