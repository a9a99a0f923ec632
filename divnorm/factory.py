"""``build_divnorm(specs, num_channels)``: the config's ``divnorm_specs`` dict -> a normalization module."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from divnorm.grouped import DivisiveNorm2d
from divnorm.ken import LineDivisiveNorm2d

# Keys every type accepts: read by models (asact) or meaningful for any layer (type).
_COMMON_KEYS = {"type", "asact"}

# Keys each type reads, with the default used when the key is absent from the dict. eps defaults to 1e-8 when
# absent (REFERENCE.md); the shipped configs set it to 0, which the layer guards with a denominator floor.
_OURS_DEFAULTS: dict[str, Any] = {
    "p": 0.5,
    "power": 2.0,
    "gamma": 1.0,
    "sigma": 1.0,
    "eps": 1e-8,
    "single_gamma": False,
    "single_sigma": False,
    "fix_gamma": False,
    "fix_sigma": False,
    "fix_all": False,
}

TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "nonorm": {},
    "ours": _OURS_DEFAULTS,
    "ken": {"lamb": 10.0, "alpha": 0.1, "beta": 1.0, "k": 10.0, "fix_all": False},
}


def _build_nonorm(num_channels: int, **_: Any) -> nn.Module:
    return nn.Identity()


def _build_ours(num_channels: int, **kw: Any) -> nn.Module:
    return DivisiveNorm2d(num_channels, **kw)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "nonorm": _build_nonorm,
    "ours": _build_ours,
    "ken": LineDivisiveNorm2d,
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
    ``ours``) are ignored, keys absent take the type's defaults (``TYPE_DEFAULTS``), and a key no type knows or
    an unknown type raises ``ValueError`` naming the choices. ``asact`` is a placement switch that models read;
    it is accepted and ignored here.
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
    kwargs = {key: specs.get(key, default) for key, default in TYPE_DEFAULTS[kind].items()}
    return _BUILDERS[kind](num_channels, **kwargs)
