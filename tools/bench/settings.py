"""The benchmark matrix: one :class:`Setting` per measurement, and the result record it turns into.

A record is a plain JSON-ready dict with at least ``loader``, ``device``, ``workers``, ``batch_size``, ``mode``
(``loader`` | ``train`` | ``upper_bound``), ``model``, ``images_per_second``, ``status`` (``ok`` | ``skipped`` |
``failed``) and ``reason``, so that other tools can read ``results.json`` without this package. Records of the
training modes also carry ``compile`` (true/false: whether the model ran under ``torch.compile``, already resolved
from ``auto``) and ``compile_mode`` (the ``torch.compile`` mode when compiled, else null).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("loader", "train", "upper_bound")
# data keys that change only the training step, not what the loader yields: a variant of only these has no
# loader-only setting (it would repeat the plain one)
TRAINING_ONLY_OPTIONS = frozenset({"loader_priority"})
DEVICES = ("cpu", "gpu")
# the loader name of the compute-only upper bound: a fixed batch already on the device, no loader at all
RESIDENT = "resident"
# --compile values: auto follows the trainer's training.compile=auto (compile on CUDA, eager on the CPU)
COMPILE_CHOICES = ("auto", "on", "off")
# --compile-mode values, the trainer's training.compile_mode choices (``default`` = torch.compile's own default)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # train.compiled's


def resolve_compile(choice: str, device: str) -> bool:
    """Whether a training setting on ``device`` (``cpu`` | ``gpu``) compiles for the ``--compile`` value ``choice``.

    ``auto`` is the trainer's default: compiled on a GPU (1.46x eager for ResNet-50 on an H200), eager on the CPU
    (compiling needs a C++ toolchain there and takes longer than a short benchmark runs).
    """
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"unknown compile setting {choice!r}; choose from {', '.join(COMPILE_CHOICES)}")
    if choice == "auto":
        return device == "gpu"
    return choice == "on"


def compile_variants(choices: list[str], device: str) -> list[bool]:
    """The distinct resolved compile settings of ``choices`` on ``device``, eager first (``auto,on`` on a GPU is
    one setting, not two)."""
    return sorted({resolve_compile(choice, device) for choice in choices})


@dataclass(frozen=True)
class Setting:
    """One point of the matrix, everything a runner process needs to measure it."""

    dataset: str
    loader: str  # torch | dali | ffcv | gpu | resident (upper bound)
    device: str  # cpu | gpu
    workers: int
    batch_size: int
    mode: str  # loader | train | upper_bound
    model: str | None = None
    resolution: int | None = None  # None: the dataset default
    data_dir: str | None = None
    dali_device: str | None = None  # only for the dali loader: auto | cpu | gpu
    seconds: float = 20.0
    windows: int = 5
    warmup_batches: int = 10  # loader mode
    warmup_steps: int = 3  # train / upper_bound modes (a CPU training step can take seconds)
    warmup_seconds: float = 2.0
    amp: str = "auto"  # auto (bf16 on CPU, fp16 on GPU) | bf16 | fp16 | off
    compile: bool = False  # resolved: torch.compile the model (train / upper_bound modes)
    compile_mode: str = "default"  # torch.compile mode when compiled: default | reduce-overhead | max-autotune
    divnorm: str = "nonorm"
    options: dict[str, Any] = field(default_factory=dict)  # extra data-section keys (e.g. subset)
    profile_steps: int = 20  # GPU training modes: steps profiled after timing (tools/bench/gpu_profile.py), 0: none
    seed: int = 42

    @property
    def label(self) -> str:
        """A short human name: ``dali[cpu] cpu w2 b256``."""
        loader = f"{self.loader}[{self.dali_device}]" if self.dali_device else self.loader
        compiled = " compiled" if self.compile and self.mode != "loader" else ""
        return f"{loader} {self.device} w{self.workers} b{self.batch_size}{compiled}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Setting:
        return cls(**data)


def make_record(setting: Setting, status: str, reason: str = "", **measured: Any) -> dict[str, Any]:
    """The result record of ``setting``: its keys first, then the measurements."""
    record: dict[str, Any] = {
        "dataset": setting.dataset,
        "loader": setting.loader,
        "device": setting.device,
        "workers": setting.workers,
        "batch_size": setting.batch_size,
        "mode": setting.mode,
        "model": setting.model,
        "resolution": setting.resolution,
        "dali_device": setting.dali_device,
        "amp": setting.amp if setting.mode != "loader" else None,
        "compile": setting.compile if setting.mode != "loader" else None,
        "compile_mode": setting.compile_mode if setting.mode != "loader" and setting.compile else None,
        "divnorm": setting.divnorm if setting.mode != "loader" else None,
        "options": dict(setting.options),  # the extra data keys it ran with (--option), e.g. dali_decode
        "images_per_second": None,
        "status": status,
        "reason": reason,
    }
    record.update(measured)
    return record


def build_matrix(
    *,
    dataset: str,
    loaders: list[str],
    devices: list[str],
    workers: list[int],
    batch_sizes: list[int],
    modes: list[str],
    models: list[str],
    divnorms: list[str],
    dali_devices: list[str],
    common: dict[str, Any],
    compiles: list[str] | None = None,
    option_sets: list[tuple[str | None, dict[str, Any]]] | None = None,
) -> list[Setting]:
    """Every setting in run order: per device and batch size the upper bound first, then each loader.

    ``modes`` holds ``loader``, ``train`` and/or ``upper_bound``; ``train`` brings the ``upper_bound`` of each
    model with it, ``upper_bound`` alone measures only the bounds (no loader at all). The ``gpu``
    (tensor-resident) loader has no workers, so it runs once per device and batch size (``workers`` 0) instead
    of once per worker count; ``dali`` runs once per ``dali_devices`` entry. ``compiles`` (``auto`` | ``on`` |
    ``off`` values, default ``["auto"]``) is an axis of the training modes like the batch sizes: each value is
    resolved per device (:func:`resolve_compile`) and every distinct result is its own setting. ``option_sets``
    (``(loader or None, data keys)``, the ``--variant`` values) add settings: each loader runs with ``common``'s
    options alone, then once more per variant that names it (or no loader) with the variant's keys on top, so the
    levers of one loader are compared within one run.
    """
    bounds = "train" in modes or "upper_bound" in modes
    settings: list[Setting] = []
    for device, batch_size in itertools.product(devices, batch_sizes):
        variants = [
            {"model": model, "divnorm": divnorm, "compile": compiled}
            for model in models
            for divnorm in divnorms
            for compiled in compile_variants(compiles or ["auto"], device)
        ]
        if bounds:
            for variant in variants:
                settings.append(Setting(dataset, RESIDENT, device, 0, batch_size, "upper_bound", **variant, **common))
        for loader in loaders if "loader" in modes or "train" in modes else []:
            worker_counts = [0] if loader == "gpu" else workers
            dali_variants = dali_devices if loader == "dali" else [None]
            extra = [{}] + [keys for named, keys in option_sets or [] if named in (None, loader)]
            for count, dali_device, keys in itertools.product(worker_counts, dali_variants, extra):
                base = {"dali_device": dali_device, **common}
                base["options"] = {**common.get("options", {}), **keys}
                if "loader" in modes and not (keys and set(keys) <= TRAINING_ONLY_OPTIONS):
                    settings.append(Setting(dataset, loader, device, count, batch_size, "loader", **base))
                if "train" in modes:
                    for variant in variants:
                        settings.append(Setting(dataset, loader, device, count, batch_size, "train", **variant, **base))
    return settings
