"""The four backbones (alexnet, vgg16, resnet18, resnet50) with divisive normalization, behind one registry.

``create_model(name, num_classes=..., model_config=<the config's model dict>, image_size=32|224)`` builds one;
``list_models()`` names them; ``DEFAULT_MODEL_CONFIG`` holds the defaults of the ``model`` config section;
``load_pretrained(folder)`` returns a trained network from an exported folder or a run folder (no pickle).
Every conv unit is ``conv -> ReLU -> DN -> BatchNorm`` with each part switched by ``model.relu``,
``model.divnorm_specs.type`` and ``model.batchnorm`` (see :mod:`models.layers`).
"""

from __future__ import annotations

# Importing the network modules registers their builders.
from models import alexnet as _alexnet  # noqa: F401
from models import resnet as _resnet  # noqa: F401
from models import vgg as _vgg  # noqa: F401
from models.config import DEFAULT_DIVNORM_SPECS, DEFAULT_MODEL_CONFIG, ModelConfigError, resolve_model_config
from models.layers import UnitParts, conv_unit, parts_from_config
from models.pretrained import load_pretrained
from models.registry import create_model, list_models, register_model
from models.summary import count_parameters, first_conv, layer_counts
from models.weight_init import init_weights

__all__ = [
    "DEFAULT_DIVNORM_SPECS",
    "DEFAULT_MODEL_CONFIG",
    "ModelConfigError",
    "UnitParts",
    "conv_unit",
    "count_parameters",
    "create_model",
    "first_conv",
    "init_weights",
    "layer_counts",
    "list_models",
    "load_pretrained",
    "parts_from_config",
    "register_model",
    "resolve_model_config",
]
