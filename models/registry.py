"""The model registry: ``@register_model`` builders and :func:`create_model`, timm style.

A builder is ``fn(config, *, num_classes, parts, small_input) -> nn.Module``: ``config`` is the resolved
``model`` section, ``parts`` the injected conv-unit parts, ``small_input`` True for the 32 px (CIFAR) layout.
:func:`create_model` resolves the config, builds the parts, calls the builder and initializes the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from models.config import ModelConfigError, resolve_model_config
from models.layers import UnitParts, parts_from_config
from models.weight_init import init_weights

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}

# Inputs up to this size get the small-input (CIFAR) layout: stride-1 3x3 stems, no early downsampling.
SMALL_INPUT_MAX = 64


def register_model(builder: Builder) -> Builder:
    """Decorator: register ``builder`` under its function name (which must be new)."""
    name = builder.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = builder
    return builder


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    num_classes: int = 1000,
    model_config: Mapping[str, Any] | None = None,
    image_size: int = 224,
) -> nn.Module:
    """Build the network ``name`` for ``num_classes`` classes, as the config's ``model`` section describes.

    ``model_config`` keys missing take :data:`models.DEFAULT_MODEL_CONFIG`'s values. ``image_size`` picks the
    layout: up to 64 px the small-input (CIFAR, 32 px) variant, above it the ImageNet (224 px) variant; both
    accept other input sizes through adaptive pooling (the ImageNet layout needs at least ~64 px). Weights are
    initialized by ``model_config["weight_init"]`` with torch's global RNG (seed it for reproducible runs).
    An unknown name or config key raises :class:`models.ModelConfigError` naming the valid choices.
    """
    if name not in _REGISTRY:
        raise ModelConfigError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ModelConfigError(f"image_size must be a positive integer (32 or 224), got {image_size!r}")
    config = resolve_model_config(model_config)
    parts: UnitParts = parts_from_config(config)
    model = _REGISTRY[name](config, num_classes=num_classes, parts=parts, small_input=image_size <= SMALL_INPUT_MAX)
    init_weights(model, config)
    return model
