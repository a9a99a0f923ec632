"""``torch.hub`` entry points: the registry's networks, untrained or with exported weights.

    net = torch.hub.load("/path/to/divnorm-trainer", "resnet50", divnorm="ours", source="local")
    net = torch.hub.load(".", "resnet18", num_classes=100, image_size=32, divnorm="ours", source="local")
    net = torch.hub.load(".", "resnet18", weights="exports/r18", source="local")  # python -m train.export output

Keyword arguments: ``num_classes`` (default 1000), ``image_size`` (the input size; up to 64 px gives the
small-input CIFAR layout, default 224; ``layout=32|224`` says the same), ``divnorm`` (the DN type, e.g. ``ours``,
``ken``, ``gdn``, ``lrn``, ``nonorm``; or a dict of ``divnorm_specs``), and any other key of the ``model`` config
section (``relu=False``, ``batchnorm=False``, ``weight_init="kaiming_gaussian"``, ...). ``weights=DIR`` loads an
exported folder (safetensors + config.json) or a run folder (best.pt read with ``weights_only=True``) and returns
it in eval mode; the architecture then comes from the folder, so no other keyword is taken.
"""

from __future__ import annotations

import os

import models
from models.pretrained import read_card

dependencies = ["torch"]

# torch.hub imports this file with its folder first on sys.path, but a package named "models" imported earlier
# (a common name) would win: say so instead of building someone else's network
_HERE = os.path.dirname(os.path.abspath(__file__))
if not os.path.abspath(models.__file__).startswith(os.path.join(_HERE, "models")):
    raise ImportError(
        f"another package named 'models' ({models.__file__}) was imported before this hubconf; "
        "load divnorm-trainer's hub entries in a fresh process"
    )


def _build(name, weights, num_classes, image_size, layout, divnorm, model_config):
    if weights is not None:
        given = {"num_classes": num_classes, "image_size": image_size, "layout": layout, "divnorm": divnorm}
        extra = sorted([key for key, value in given.items() if value is not None] + list(model_config))
        if extra:
            raise ValueError(f"weights={weights!r} fixes the architecture; drop {', '.join(extra)}")
        saved = read_card(weights)["model"]
        if saved != name:
            raise ValueError(f"{weights} holds a {saved}, not a {name}: torch.hub.load(..., {saved!r}, weights=...)")
        return models.load_pretrained(weights)
    if image_size is not None and layout is not None and image_size != layout:
        raise ValueError("give image_size or layout, not both")
    config = dict(model_config)
    if divnorm is not None:
        specs = dict(config.pop("divnorm_specs", None) or {})
        specs.update({"type": divnorm} if isinstance(divnorm, str) else dict(divnorm))
        config["divnorm_specs"] = specs
    return models.create_model(
        name,
        num_classes=1000 if num_classes is None else num_classes,
        model_config=config,
        image_size=image_size or layout or 224,
    )


def alexnet(weights=None, *, num_classes=None, image_size=None, layout=None, divnorm=None, **model_config):
    """AlexNet with conv -> ReLU -> DN -> BatchNorm units (see the module docstring for the keywords)."""
    return _build("alexnet", weights, num_classes, image_size, layout, divnorm, model_config)


def vgg16(weights=None, *, num_classes=None, image_size=None, layout=None, divnorm=None, **model_config):
    """VGG-16 with conv -> ReLU -> DN -> BatchNorm units (see the module docstring for the keywords)."""
    return _build("vgg16", weights, num_classes, image_size, layout, divnorm, model_config)


def resnet18(weights=None, *, num_classes=None, image_size=None, layout=None, divnorm=None, **model_config):
    """ResNet-18 with DN in every conv unit (see the module docstring for the keywords)."""
    return _build("resnet18", weights, num_classes, image_size, layout, divnorm, model_config)


def resnet50(weights=None, *, num_classes=None, image_size=None, layout=None, divnorm=None, **model_config):
    """ResNet-50 with DN in every conv unit (see the module docstring for the keywords)."""
    return _build("resnet50", weights, num_classes, image_size, layout, divnorm, model_config)
