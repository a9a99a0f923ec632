"""From the config's ``data`` section to loaders: backend choice (incl. ``auto``), specs per split.

``--loader auto`` (or ``data.loader = "auto"``) reads the tuned fragment the benchmark tool writes, by default
``benchmarks/<machine>/tuned.json`` (``<machine>`` from :func:`machine_name`) or the file ``data.tuned_path``.
The fragment is a JSON object ``{"loader": "<backend>", "data": {<data keys>}}``, optionally keyed by data set
(``{"imagenet": {...}, "cifar100": {...}}``, as ``tools/benchmark.py --tune`` writes it); its keys are validated like
any config key, and only loader settings are taken (``batch_size`` stays the config's: it is a training
hyperparameter). Without a fragment, or where the tuned backend cannot read this run's data (its package is not
installed, FFCV and ``data.path`` holds no ``.beton``, torch and ``data.path`` is a ``tools/convert.py`` output),
the choice falls back, and says so in the log: to ``gpu`` (tensor-resident) for the in-memory sets; for ImageNet
to ``torch`` for an ImageFolder tree, or to the loader of the format ``data.path`` was converted to
(:func:`fallback_loader`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from loaders import build_loader, missing_package
from loaders.base import Loader, LoaderSpec
from loaders.datasets import dataset_info
from train.config import CONFIG_DIR, ConfigError, defaults, merge

BENCHMARKS_DIR = CONFIG_DIR.parent / "benchmarks"
TRAINING_KEYS = ("batch_size", "eval_batch_size", "subset")


def machine_name() -> str:
    """Folder name of this machine under ``benchmarks/``: GPU model and count, or ``cpu``, plus CPU cores.

    e.g. ``nvidia-h100-80gb-hbm3-x1-16cpu`` or ``cpu-2cpu``.
    """
    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)}-x{torch.cuda.device_count()}"
    else:
        gpu = "cpu"
    return re.sub(r"[^a-z0-9]+", "-", f"{gpu}-{cores}cpu".lower()).strip("-")


def tuned_fragment_path(config: Mapping[str, Any]) -> Path:
    explicit = config["data"]["tuned_path"]
    return Path(explicit) if explicit else BENCHMARKS_DIR / machine_name() / "tuned.json"


def apply_tuned(config: dict[str, Any], dataset: str, log: Callable[[str], None]) -> None:
    """Resolve ``data.loader = "auto"`` in place from the tuned fragment, or the fallback."""
    path = tuned_fragment_path(config)
    fragment: dict[str, Any] | None = None
    if path.is_file():
        try:
            fragment = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"tuned loader file {path} is not valid JSON: {error}") from None
        if isinstance(fragment, dict) and dataset in fragment:
            fragment = fragment[dataset]
        if not isinstance(fragment, dict) or "loader" not in fragment:
            log(f"loader auto: {path} has no 'loader' entry for {dataset}; using the fallback")
            fragment = None
    if fragment is None:
        fallback = fallback_loader(dataset, config["data"]["path"])
        if not path.is_file():
            log(
                f"loader auto: no tuned settings at {path} (run tools/benchmark.py to write them); using {fallback}"
                + _converted_note(fallback, config)
            )
        config["data"]["loader"] = fallback
        return
    update = {"data": dict(fragment.get("data", {}))}
    update["data"]["loader"] = fragment["loader"]
    # the batch size is a training hyperparameter (it sets the learning rate's scale): the config keeps it
    kept = [key for key in TRAINING_KEYS if update["data"].pop(key, None) is not None]
    if kept:
        log(f"loader auto: keeping the config's {', '.join(kept)} (the tuned file's value is for throughput only)")
    merge(config, update, defaults(), f"from {path}")
    if config["data"]["loader"] == "auto":
        raise ConfigError(f"{path}: 'loader' must name a backend, not 'auto'")
    log(f"loader auto: {config['data']['loader']} with tuned settings from {path}")
    blocker = tuned_loader_blocker(config, dataset)
    if blocker is not None:
        fallback = fallback_loader(dataset, config["data"]["path"])
        log(f"loader auto: {blocker}; using {fallback} instead" + _converted_note(fallback, config))
        config["data"]["loader"] = fallback


def tuned_loader_blocker(config: Mapping[str, Any], dataset: str) -> str | None:
    """Why the tuned backend cannot read this run's data here (its package is missing, or FFCV without a ``.beton``
    under ``data.path``: a tuned file says what is fastest on the machine, not what the data was converted to);
    None when it can."""
    name = config["data"]["loader"]
    package = missing_package(name)
    if package is not None:
        return f"the tuned {name} loader needs {package}, which is not installed"
    path = config["data"]["path"]
    if name == "torch" and not dataset_info(dataset).in_memory and converted_loaders(path):
        return f"the tuned torch loader reads ImageFolder trees, not the tools/convert.py output at {path}"
    if name == "ffcv" and not dataset_info(dataset).in_memory:
        from loaders.base import LoaderError
        from loaders.ffcv import converted_beton

        try:
            found = converted_beton(LoaderSpec(dataset, "train", 1, True, data_dir=path))
        except LoaderError as error:
            return f"the tuned ffcv loader cannot read {path}: {error}"
        if found is None:
            return f"the tuned ffcv loader reads .beton files and {path} holds none (tools/convert.py --format ffcv)"
    return None


def fallback_loader(dataset: str, data_path: str | os.PathLike | None = None) -> str:
    """The backend ``--loader auto`` takes without a usable tuned setting: the tensor-resident ``gpu`` loader for
    the in-memory sets. For ImageNet, torch (it needs no extra package) for an ImageFolder tree or no path; for a
    ``tools/convert.py`` output, which torch cannot read, the loader of a format found there: of both, the one whose
    package is installed, DALI first where CUDA is (its decoding runs on the GPU), FFCV first on a CPU machine (its
    CPU pipeline is the faster there: docs/limits.md)."""
    if dataset_info(dataset).in_memory:
        return "gpu"
    converted = converted_loaders(data_path)
    if not converted:
        return "torch"
    order = ("dali", "ffcv") if torch.cuda.is_available() else ("ffcv", "dali")
    converted.sort(key=lambda name: (missing_package(name) is not None, order.index(name)))
    return converted[0]  # with no package for either, its loader's error says how to install it


def _converted_note(fallback: str, config: Mapping[str, Any]) -> str:
    if fallback not in ("dali", "ffcv"):
        return ""
    return f", the format of the conversion at {config['data']['path']}"


def converted_loaders(data_path: str | os.PathLike | None) -> list[str]:
    """The loaders of the ImageNet conversions ``tools/convert.py`` left at ``data_path`` (the output folder, or its
    ``dali`` / ``ffcv`` folder, or a ``.beton``): ``dali`` for its shards, ``ffcv`` for its ``.beton`` files. A
    conversion its loader will reject (a split missing, another data set) counts: that loader's error is the one
    that says what is wrong."""
    if not data_path:
        return []
    from loaders.base import LoaderError
    from loaders.dali_sources import find_converted_dir
    from loaders.ffcv import converted_beton

    found = []
    try:
        if find_converted_dir(data_path) is not None:
            found.append("dali")
    except LoaderError:
        found.append("dali")
    try:
        if converted_beton(LoaderSpec("imagenet", "train", 1, True, data_dir=str(data_path))) is not None:
            found.append("ffcv")
    except LoaderError:
        found.append("ffcv")
    return found


def resolve_loader_name(config: dict[str, Any], dataset: str, log: Callable[[str], None]) -> str:
    """The backend to use: ``data.loader``, ``auto`` resolved, and the original ``data.gpu`` switch honoured."""
    data = config["data"]
    if data["loader"] == "auto":
        apply_tuned(config, dataset, log)
    elif data["gpu"] and data["loader"] == "torch":
        # the original's data.gpu = true meant its GPU pipeline: DALI for ImageNet; for the in-memory sets the
        # tensor-resident loader is the GPU path
        data["loader"] = "gpu" if dataset_info(dataset).in_memory else "dali"
        log(f"data.gpu=true: using the {data['loader']} loader")
    return data["loader"]


def loader_spec(
    config: Mapping[str, Any],
    dataset: str,
    split: str,
    train: bool,
    device: torch.device,
    dtype: torch.dtype,
    rank: int = 0,
    world_size: int = 1,
    download: bool = False,
) -> LoaderSpec:
    """The :class:`LoaderSpec` of one split from the resolved config."""
    data = config["data"]
    batch = data["batch_size"] if train else (data["eval_batch_size"] or data["batch_size"])
    return LoaderSpec(
        dataset=dataset,
        split=split,
        batch_size=int(batch),
        train=train,
        data_dir=data["path"],
        device=device,
        dtype=dtype,
        channels_last=bool(config["training"]["channels_last"]),
        image_size=data["image_size"],
        workers=int(data["workers"]),
        seed=int(config["seed"]),
        rank=rank,
        world_size=world_size,
        download=download,
        options=dict(data),
    )


# evaluation batch of the tensor-resident loader on a GPU when data.eval_batch_size is unset: no gradients are kept,
# so a large batch costs little memory and makes evaluation a small share of an epoch
RESIDENT_EVAL_BATCH = 1024


def with_evaluation_batch(spec: LoaderSpec, loader_name: str, config: Mapping[str, Any]) -> LoaderSpec:
    """``spec`` with the evaluation batch the trainer uses: at least :data:`RESIDENT_EVAL_BATCH` for the ``gpu``
    loader on CUDA unless ``data.eval_batch_size`` is set; other specs unchanged."""
    if spec.train or loader_name != "gpu" or spec.device.type != "cuda" or config["data"]["eval_batch_size"]:
        return spec
    return dataclasses.replace(spec, batch_size=max(spec.batch_size, RESIDENT_EVAL_BATCH))


def build_split_loader(name: str, spec: LoaderSpec) -> Loader:
    """``loaders.build_loader`` (kept here so the trainer has one place that builds loaders)."""
    return build_loader(name, spec)
