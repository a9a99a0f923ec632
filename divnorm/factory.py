"""``build_divnorm(specs, num_channels)``: the config's ``divnorm_specs`` dict -> a normalization module.

Keys each type reads (a key absent from the dict takes the default shown; keys of other types are ignored):

==========  =========================================================================================
type        keys (default)
==========  =========================================================================================
nonorm      none (returns ``nn.Identity``)
ours        p (0.5), power (2), gamma (1.0), sigma (1.0), eps (1e-8 when absent; configs set 0),
            single_gamma, single_sigma, fix_gamma, fix_sigma, fix_all (all false),
            kernel (auto: the fused Triton kernel on CUDA tensors, else torch | triton | torch)
ken         lamb (10.0), alpha (0.1), beta (1.0), k (10.0), fix_all (false)
lrn         lrn_size (5), lrn_alpha (1e-4), lrn_beta (0.75), lrn_k (2.0)  (AlexNet's values)
gdn         gdn_beta_min (1e-6), gdn_gamma_init (0.1), fix_all (false)
==========  =========================================================================================

``type``, ``asact`` (a placement switch read by models) and ``fuse_bn`` (whether a model's conv unit runs
ReLU -> ``ours`` -> BatchNorm as one function, :mod:`divnorm.fused_bn`) are accepted for every type. The baselines use
their own ``lrn_*`` / ``gdn_*`` keys because the shared ``alpha``/``beta``/``k`` defaults belong to ``ken``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from divnorm.baselines import GDN2d, LocalResponseNorm2d
from divnorm.grouped import DivisiveNorm2d
from divnorm.ken import LineDivisiveNorm2d
from divnorm.ops import KERNEL_CHOICES

_COMMON_KEYS = {"type", "asact", "fuse_bn"}

# Keys whose value is a string from a fixed set.
_CHOICES: dict[str, tuple[str, ...]] = {"kernel": KERNEL_CHOICES}

TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "nonorm": {},
    "ours": {
        "p": 0.5,
        "power": 2.0,
        "gamma": 1.0,
        "sigma": 1.0,
        "eps": 1e-8,  # REFERENCE.md: 1e-8 when the key is absent
        "single_gamma": False,
        "single_sigma": False,
        "fix_gamma": False,
        "fix_sigma": False,
        "fix_all": False,
        "kernel": "auto",  # docs/divnorm-kernel.md
    },
    "ken": {"lamb": 10.0, "alpha": 0.1, "beta": 1.0, "k": 10.0, "fix_all": False},
    "lrn": {"lrn_size": 5, "lrn_alpha": 1e-4, "lrn_beta": 0.75, "lrn_k": 2.0},
    "gdn": {"gdn_beta_min": 1e-6, "gdn_gamma_init": 0.1, "fix_all": False},
}


def _build_nonorm(num_channels: int) -> nn.Module:
    return nn.Identity()


def _build_lrn(num_channels: int, *, lrn_size, lrn_alpha, lrn_beta, lrn_k) -> nn.Module:
    return LocalResponseNorm2d(num_channels, size=lrn_size, alpha=lrn_alpha, beta=lrn_beta, k=lrn_k)


def _build_gdn(num_channels: int, *, gdn_beta_min, gdn_gamma_init, fix_all) -> nn.Module:
    return GDN2d(num_channels, beta_min=gdn_beta_min, gamma_init=gdn_gamma_init, fix_all=fix_all)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "nonorm": _build_nonorm,
    "ours": DivisiveNorm2d,
    "ken": LineDivisiveNorm2d,
    "lrn": _build_lrn,
    "gdn": _build_gdn,
}

DIVNORM_TYPES: tuple[str, ...] = tuple(_BUILDERS)


def known_keys() -> set[str]:
    """Every key some divisive normalization type reads (the union over types, plus ``type`` and ``asact``)."""
    keys = set(_COMMON_KEYS)
    for defaults in TYPE_DEFAULTS.values():
        keys.update(defaults)
    return keys


def build_divnorm(specs: Mapping[str, Any], num_channels: int) -> nn.Module:
    """Build the layer ``specs["type"]`` names for ``num_channels`` channels (``nn.Identity`` for ``nonorm``).

    ``specs`` is the config's full ``model.divnorm_specs`` dict: keys belonging to other types (``lamb`` for
    ``ours``) are ignored, absent keys take the type's defaults (:data:`TYPE_DEFAULTS`; ``type`` itself defaults
    to ``nonorm``), and a key no type knows or an unknown type raises ``ValueError`` naming the choices.
    """
    if not isinstance(specs, Mapping):
        raise TypeError(f"divnorm_specs must be a dict, got {type(specs).__name__}")
    kind = specs.get("type", "nonorm")
    if kind not in _BUILDERS:
        raise ValueError(f"unknown divnorm_specs.type {kind!r}; choose one of: {', '.join(DIVNORM_TYPES)}")
    unknown = sorted(set(specs) - known_keys())
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValueError(f"unknown divnorm_specs key(s) {names}; known keys: {', '.join(sorted(known_keys()))}")
    if not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
    kwargs = {key: specs.get(key, default) for key, default in TYPE_DEFAULTS[kind].items()}
    for key, value in kwargs.items():
        _check_value_type(key, value, TYPE_DEFAULTS[kind][key])
    return _BUILDERS[kind](num_channels, **kwargs)


def _check_value_type(key: str, value: Any, default: Any) -> None:
    """Switches must be booleans, choices one of their strings, settings numbers (a JSON "2" would fail in torch)."""
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise ValueError(f"divnorm_specs.{key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"divnorm_specs.{key} must be true or false, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"divnorm_specs.{key} must be a number, got {value!r}")
