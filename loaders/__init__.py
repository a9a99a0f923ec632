"""Data loaders: one contract (:mod:`loaders.base`), four backends, chosen by name.

``build_loader("torch" | "dali" | "ffcv" | "gpu", spec)`` returns a :class:`loaders.base.Loader`. Backends are
imported lazily, so ``torch`` works where DALI or FFCV are not installed; a missing backend raises
:class:`loaders.base.LoaderError` saying how to install it. Importing the package does not import torch (the
conversion tool uses :mod:`loaders.datasets` without it): ``Loader`` and ``LoaderSpec`` load on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from loaders.errors import LoaderError

if TYPE_CHECKING:
    from loaders.base import Loader, LoaderSpec


def __getattr__(name: str):
    if name in ("Loader", "LoaderSpec"):
        from loaders import base

        return getattr(base, name)
    raise AttributeError(f"module 'loaders' has no attribute {name!r}")


# backend name -> (module, class name, pip extra that installs it)
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "torch": ("loaders.torch_loader", "TorchLoader", None),
    "dali": ("loaders.dali", "DaliLoader", "dali"),
    "ffcv": ("loaders.ffcv", "FfcvLoader", "ffcv"),
    "gpu": ("loaders.tensor", "TensorLoader", None),
}


# backend name -> the package it needs beyond torch
BACKEND_PACKAGES = {"dali": "nvidia.dali", "ffcv": "ffcv"}


def missing_package(name: str) -> str | None:
    """The package the ``name`` backend needs that is not installed here, found without importing it; None when
    nothing is missing."""
    package = BACKEND_PACKAGES.get(name)
    if package is None:
        return None
    try:
        return None if importlib.util.find_spec(package) is not None else package
    except ModuleNotFoundError:  # a parent package (``nvidia``) is missing
        return package


def list_backends() -> list[str]:
    return list(BACKENDS)


def backend_class(name: str) -> type[Loader]:
    if name not in BACKENDS:
        raise LoaderError(f"unknown loader {name!r}; choose one of: {', '.join(BACKENDS)}")
    module_name, class_name, _ = BACKENDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def build_loader(name: str, spec: LoaderSpec) -> Loader:
    """Build the ``name`` backend's loader for ``spec``."""
    return backend_class(name)(spec)


__all__ = [
    "BACKENDS",
    "BACKEND_PACKAGES",
    "Loader",
    "LoaderError",
    "LoaderSpec",
    "backend_class",
    "build_loader",
    "list_backends",
    "missing_package",
]
