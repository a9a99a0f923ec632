"""Numbers behind a run report: reading a run folder, Gini index, activation sparsity, learned DN parameters.

Everything here reads what a run folder holds (``config.json``, ``metrics.jsonl``, ``summary.json``, ``best.pt`` /
``last.pt``, ``conv1.pt``) and works on a run that is still going: missing files become ``None`` and a note.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ReportError(Exception):
    """A user mistake (missing or foreign run folder, bad option): one clear message, exit code 2."""


@dataclass
class RunData:
    """What one run folder holds, read once."""

    folder: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    summary_damaged: str | None = None  # why summary.json, present, could not be read (then ``summary`` is None)

    @property
    def name(self) -> str:
        return self.config.get("run", {}).get("exp") or self.folder.name

    @property
    def running(self) -> bool:
        """No ``summary.json`` yet: the run is still going (or was interrupted); not when one is there, damaged."""
        return self.summary is None and self.summary_damaged is None


def read_run(folder: str | Path) -> RunData:
    """Read a run folder written by ``python -m train``; a missing or foreign folder is a :class:`ReportError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"run folder {folder} does not exist; pass folders written by python -m train (runs/<exp>)")
    missing = [name for name in ("config.json", "metrics.jsonl") if not (folder / name).is_file()]
    if missing:
        raise ReportError(
            f"{folder} is not a run folder of python -m train: {' and '.join(missing)} missing "
            "(expected runs/<exp>/ with config.json and metrics.jsonl)"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise ReportError(f"{folder / 'config.json'} is not valid JSON ({error}); is this a run folder?") from None
    if not isinstance(config, dict) or "model" not in config or "data" not in config:
        raise ReportError(f"{folder / 'config.json'} is not a trainer config (no model/data sections)")
    metrics = []
    # a running trainer may be mid-write of the last line: keep every complete JSON line, skip a torn one
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "epoch" in record:
            metrics.append(record)
    summary, damaged = None, None
    path = folder / "summary.json"
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            damaged = f"not valid JSON ({error})"
        else:
            if not isinstance(summary, dict):
                damaged = f"a JSON {type(summary).__name__}, not an object"
                summary = None
    run = RunData(folder, config, metrics, summary, summary_damaged=damaged)
    if damaged:  # the trainer writes it atomically at the end: the run ended, but its summary cannot be read
        run.notes.append(
            f"{path} is damaged ({damaged}): status unknown; the table shows the best epoch of metrics.jsonl"
        )
    elif run.running:
        run.notes.append("no summary.json yet: running or interrupted; table shows the last epoch of metrics.jsonl")
    return run


def gini(values: torch.Tensor) -> float:
    """Gini index of ``|values|`` (0 = all equal, -> 1 = all mass in one entry; Hurley & Rickard 2009).

    Standard form on the ascending sorted magnitudes a_1..a_n: ``sum_i (2i - n - 1) a_i / (n sum_i a_i)``.
    All-zero input gives 0 (no mass to be unequal about).
    """
    a = values.detach().flatten().double().abs().sort().values
    n = a.numel()
    total = a.sum()
    if n == 0 or total == 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * a).sum() / (n * total))


def dn_positions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The places divisive normalization sits or would sit: submodules named ``dn`` (``nn.Identity`` in a
    ``nonorm`` net, so baseline and DN runs are measured at the same positions) and any DN layer class."""
    try:
        from divnorm.common import FiniteCheckMixin
    except ImportError:  # pragma: no cover
        FiniteCheckMixin = ()  # noqa: N806
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and (name.split(".")[-1] == "dn" or isinstance(module, FiniteCheckMixin))
    ]


def build_model(run: RunData) -> tuple[nn.Module, str]:
    """Rebuild the run's network from its resolved config and load ``best.pt`` (else ``last.pt``)."""
    import models
    from loaders.datasets import dataset_info

    dataset, model_name = run.config["run"]["dataset"], run.config["run"]["model"]
    info = dataset_info(dataset)
    image_size = run.config["data"]["image_size"] or info.image_size
    net = models.create_model(
        model_name,
        num_classes=info.num_classes,
        model_config=run.config["model"],
        image_size=32 if image_size <= 64 else 224,
    )
    from train import checkpoint as ckpt

    for name in ("best.pt", "last.pt"):
        path = run.folder / name
        if path.is_file():
            net.load_state_dict(ckpt.load(path)["model"])
            return net.eval(), name
    raise FileNotFoundError("no best.pt or last.pt (checkpoints off, or the first epoch has not ended)")


def fixed_batch(run: RunData, size: int) -> torch.Tensor:
    """The first ``size`` images of the run's validation split, float32 on the CPU, normalized as in training.

    Deterministic: evaluation order, no augmentation. Read through the torch loader (which also reads converted
    array folders); when that cannot read the run's ``data.path`` (an ImageNet folder converted for DALI or
    FFCV only), the run's own backend on the CPU reads it instead.
    """
    from loaders import build_loader
    from train.data import loader_spec

    config = copy.deepcopy(run.config)
    config["data"].update(workers=0, eval_batch_size=size, pin_memory=False, subset=None, dali_device="cpu")
    config["training"]["channels_last"] = False
    dataset = config["run"]["dataset"]
    spec = loader_spec(config, dataset, "val", False, torch.device("cpu"), torch.float32)
    backends = ["torch"] + [b for b in (config.get("run", {}).get("loader"),) if b and b not in ("torch", "auto")]
    errors = []
    for backend in backends:
        try:
            for images, _labels in build_loader(backend, spec):
                return images.float()
            raise ValueError("the validation split is empty")
        except Exception as error:  # noqa: BLE001 - try the next backend, report all failures together
            errors.append(f"{backend}: {error}")
    raise ValueError("could not read a validation batch (" + "; ".join(errors) + ")")


@dataclass
class LayerSparsity:
    """Sparsity of one DN position's input (``before``) and output (``after``) on the fixed batch."""

    name: str
    kind: str
    gini_before: float
    gini_after: float
    zeros_before: float
    zeros_after: float


@torch.no_grad()
def activation_sparsity(model: nn.Module, images: torch.Tensor) -> list[LayerSparsity]:
    """Gini index and fraction of exact zeros before and after each DN position, via forward hooks."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    positions = dn_positions(model)
    kinds = {name: type(module).__name__ for name, module in positions}
    stand_in = not positions
    if stand_in:
        # a nonorm net leaves the DN slot out: measure where DN would sit (after each unit's activation), so the
        # baseline's rows line up with a DN run's "before" values; before = after there (no layer)
        positions = [(name, m) for name, m in model.named_modules() if name.split(".")[-1] == "act"]
        kinds = {name: "none (after act)" for name, _ in positions}

    def hook(name):
        def record(_module, inputs, output):
            # clone: an in-place ReLU after the position would otherwise change what we recorded
            after = output.detach().clone()
            seen[name] = (after if stand_in else inputs[0].detach().clone(), after)

        return record

    for name, module in positions:
        handles.append(module.register_forward_hook(hook(name)))
    try:
        model.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name, _module in positions:
        if name not in seen:
            continue
        before, after = seen[name]
        rows.append(
            LayerSparsity(
                name=name,
                kind=kinds[name],
                gini_before=gini(before),
                gini_after=gini(after),
                zeros_before=float((before == 0).double().mean()),
                zeros_after=float((after == 0).double().mean()),
            )
        )
    return rows


DN_PARAMETER_NAMES = ("gamma", "sigma", "lamb", "alpha", "beta", "k")


def dn_parameters(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """Learned DN parameters per layer: ``{layer: {"gamma": [...], "sigma": [...], ...}}`` (layers with any)."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, module in dn_positions(model):
        values = {
            key: [float(v) for v in getattr(module, key).detach().flatten().tolist()]
            for key in DN_PARAMETER_NAMES
            if isinstance(getattr(module, key, None), torch.Tensor)
        }
        if values:
            out[name] = values
    return out


def conv1_weights(run: RunData) -> dict[str, torch.Tensor]:
    """The conv1 filters saved by the trainer (``initial``/``best``/``final``, those present)."""
    path = run.folder / "conv1.pt"
    if not path.is_file():
        run.notes.append("no conv1.pt (checkpoint.save_conv1 off, or not written yet): no conv1 filter grids")
        return {}
    from train import checkpoint as ckpt

    weights = ckpt.load(path)
    missing = [k for k in ("initial", "best", "final") if k not in weights]
    if missing:
        run.notes.append(f"conv1.pt lacks {', '.join(missing)} (run still going?)")
    return {k: weights[k] for k in ("initial", "best", "final") if k in weights}


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
