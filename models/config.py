"""The config's ``model`` section: its defaults, and checking a user's dict against them.

``DEFAULT_MODEL_CONFIG`` is the single source of the model defaults; the trainer's JSON configs use the same
values. :func:`resolve_model_config` fills missing keys from it and turns a bad key or value into one
:class:`ModelConfigError` that names the fix. The ``divnorm_specs`` sub-dict is passed on to
``divnorm.build_divnorm``, which checks its own keys; only ``asact`` (where the ResNets put the layer) and
``p`` (read by the pooled weight inits) are read here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

WEIGHT_INITS = ("kaiming", "normal", "multivariate_gaussian", "kaiming_gaussian")
NONLINEARITIES = ("relu", "linear", "leaky_relu", "tanh", "sigmoid")

# The original's divnorm_specs defaults (REFERENCE.md, "Configuration"). `asact` is the one key here that the
# model builders consume; the rest go to divnorm.build_divnorm unchanged.
DEFAULT_DIVNORM_SPECS: dict[str, Any] = {
    "type": "nonorm",
    "sigma": 1.0,
    "gamma": 1.0,
    "eps": 0,
    "p": 0.5,
    "power": 2,
    "lamb": 10.0,
    "alpha": 0.1,
    "beta": 1.0,
    "k": 10.0,
    "asact": False,
    "fix_all": False,
    "fix_gamma": False,
    "fix_sigma": False,
    "single_gamma": False,
    "single_sigma": False,
    "kernel": "auto",  # ours: fused Triton kernel on CUDA tensors (auto), triton or torch; docs/divnorm-kernel.md
    # ours before a training BatchNorm: ReLU -> DN -> BN as one function (true | auto: where its Triton kernel
    # runs, CUDA channels-last | false); docs/divnorm-kernel.md
    "fuse_bn": False,
    # the baselines' own keys (the shared alpha / beta / k above are ken's): lrn at AlexNet's values, gdn
    "lrn_size": 5,
    "lrn_alpha": 1e-4,
    "lrn_beta": 0.75,
    "lrn_k": 2.0,
    "gdn_beta_min": 1e-6,
    "gdn_gamma_init": 0.1,
}

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    # conv unit = conv -> ReLU -> DivNorm -> BatchNorm; each part switched on/off here.
    "batchnorm": True,
    "relu": True,
    # ResNet downsample shortcut: True = torchvision's conv + BN; False = the original's BN-less conv.
    "shortcut_bn": True,
    # ResNets: zero the last BatchNorm weight of each residual block so blocks start as identities (torchvision's
    # zero_init_residual). Off by default, as in the original and torchvision; deep DN ResNets train better with it.
    "zero_init_residual": False,
    # weight init of every conv: kaiming | normal | multivariate_gaussian | kaiming_gaussian.
    "weight_init": "kaiming",
    "nonlinearity": "relu",  # kaiming's gain (original key)
    "std": 0.01,  # `normal` and `multivariate_gaussian`: std of each weight; "input_size" = 1/sqrt(fan_in)
    "mean_std": 0.01,  # `multivariate_gaussian`: std of the shared per-pool mean filter
    "std_ratio": 0.01,  # `kaiming_gaussian`: pool spread = std_ratio * std of the pool's Kaiming filter
    "divnorm_specs": DEFAULT_DIVNORM_SPECS,
}

_BOOL_KEYS = ("batchnorm", "relu", "shortcut_bn", "zero_init_residual")


class ModelConfigError(ValueError):
    """A user mistake in the ``model`` config section or the model name; the message names the fix."""


def _positive_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ModelConfigError(f"model.{key} must be a positive number, got {value!r}")
    return float(value)


def resolve_model_config(model_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a complete, checked copy of ``model_config``: missing keys (also inside ``divnorm_specs``) take
    :data:`DEFAULT_MODEL_CONFIG`'s values; unknown keys or bad values raise :class:`ModelConfigError`.

    Keys of ``divnorm_specs`` other than ``asact`` and ``p`` are not checked here: ``divnorm.build_divnorm``
    rejects the ones it does not know when the first layer is built.
    """
    user = dict(model_config or {})
    unknown = sorted(set(user) - set(DEFAULT_MODEL_CONFIG))
    if unknown:
        raise ModelConfigError(
            f"unknown model config key(s) {', '.join(unknown)}; valid keys: {', '.join(DEFAULT_MODEL_CONFIG)}"
        )
    config = copy.deepcopy(DEFAULT_MODEL_CONFIG)
    specs = user.pop("divnorm_specs", None)
    config.update(copy.deepcopy(user))
    if specs is not None:
        if not isinstance(specs, Mapping):
            raise ModelConfigError(f"model.divnorm_specs must be a dict, got {specs!r}")
        config["divnorm_specs"].update(copy.deepcopy(dict(specs)))

    for key in _BOOL_KEYS:
        if not isinstance(config[key], bool):
            raise ModelConfigError(f"model.{key} must be true or false, got {config[key]!r}")
    if not isinstance(config["divnorm_specs"]["asact"], bool):
        raise ModelConfigError(
            f"model.divnorm_specs.asact must be true or false, got {config['divnorm_specs']['asact']!r}"
        )
    if config["divnorm_specs"].get("fuse_bn", False) not in ("auto", True, False):
        raise ModelConfigError(
            f'model.divnorm_specs.fuse_bn must be "auto", true or false, got {config["divnorm_specs"]["fuse_bn"]!r}'
        )
    if config["weight_init"] not in WEIGHT_INITS:
        raise ModelConfigError(
            f"unknown model.weight_init {config['weight_init']!r}; choose one of: {', '.join(WEIGHT_INITS)}"
        )
    if config["nonlinearity"] not in NONLINEARITIES:
        raise ModelConfigError(
            f"unknown model.nonlinearity {config['nonlinearity']!r}; choose one of: {', '.join(NONLINEARITIES)}"
        )
    if config["std"] != "input_size":
        if isinstance(config["std"], str):
            raise ModelConfigError(f'model.std must be a positive number or "input_size", got {config["std"]!r}')
        config["std"] = _positive_number("std", config["std"])
    config["mean_std"] = _positive_number("mean_std", config["mean_std"])
    config["std_ratio"] = _positive_number("std_ratio", config["std_ratio"])
    p = config["divnorm_specs"]["p"]
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
        raise ModelConfigError(f"model.divnorm_specs.p must be a number in [0, 1], got {p!r}")
    return config
