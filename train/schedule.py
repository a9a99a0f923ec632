"""Learning-rate schedule as a plain function of the step, plus the optimizer and its parameter groups.

Every schedule is a multiplier of the base learning rate, evaluated each step from ``(step, steps_per_epoch)``
and the plateau state, so resuming needs only the step count and two numbers:

* ``steplr``: ``gamma ** (epoch // step_size)`` (epoch-wise, as the original's StepLR);
* ``plateau``: multiplied by ``factor`` after ``patience`` epochs without a lower validation loss (as
  ReduceLROnPlateau, mode min, stepped on the validation loss like the original);
* ``cosine``: half cosine from 1 to ``min_lr / lr`` over ``t_max`` epochs, per step;
* ``onecycle``: linear ramp to the peak over ``pct_start`` of the run, then linear decay to zero (per step);
* ``none``: constant.

A linear warmup from ``warmup_start_factor`` to 1 over ``warmup_epochs`` (fractional allowed) multiplies any of
them. Weight decay can skip normalization parameters, chosen by module type (BatchNorm, GroupNorm, LayerNorm,
InstanceNorm, LocalResponseNorm and every divisive normalization layer), never by parameter name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def _divnorm_types() -> tuple[type, ...]:
    try:  # divnorm's layers share a mixin; fall back to the package they live in
        from divnorm.common import FiniteCheckMixin

        return (FiniteCheckMixin,)
    except ImportError:  # pragma: no cover - divnorm is part of this repository
        return ()


def is_norm_module(module: nn.Module) -> bool:
    """True for normalization layers (batch/group/layer/instance norm, LRN, divisive normalization)."""
    return isinstance(module, _NORM_TYPES + _divnorm_types()) or type(module).__module__.startswith("divnorm")


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_on_norm: bool) -> list[dict[str, Any]]:
    """Optimizer groups: everything decays, except (optionally) the parameters owned by norm modules."""
    if not no_decay_on_norm:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm_params: set[int] = set()
    for module in model.modules():
        if is_norm_module(module):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in norm_params else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module, cfg: Mapping[str, Any], lr: float, *, fused: bool = False, lr_on_device: bool = False
) -> torch.optim.Optimizer:
    """SGD (momentum, dampening, nesterov) or Adam/AdamW from the config's ``optimizer`` section.

    ``fused``: torch's fused kernels (one launch for all parameters; CUDA). ``lr_on_device``: the learning rate is
    a 1-element tensor on the parameters' device that :meth:`LrSchedule.step` writes in place, so a captured CUDA
    graph reads each step's value without a host sync.
    """
    groups = parameter_groups(model, cfg["weight_decay"], cfg["no_weight_decay_on_norm"])
    name = cfg["name"]
    options: dict[str, Any] = {"fused": True} if fused else {}
    device = next((p.device for group in groups for p in group["params"]), torch.device("cpu"))
    if lr_on_device:
        for group in groups:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
    if name == "sgd":
        nesterov = cfg["nesterov"] and cfg["momentum"] > 0 and cfg["dampening"] == 0
        return torch.optim.SGD(
            groups, lr=lr, momentum=cfg["momentum"], dampening=cfg["dampening"], nesterov=nesterov, **options
        )
    betas = (cfg["beta1"], cfg["beta2"])
    optimizer_class = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    capturable = lr_on_device and device.type == "cuda"  # (CPU tests run the step code uncaptured)
    if capturable:
        # Adam's step counter on the device as well; fused or not, a captured step() checks for capturable=True
        options["capturable"] = True
    optimizer = optimizer_class(groups, lr=lr, betas=betas, eps=cfg["eps"], amsgrad=cfg["amsgrad"], **options)
    if capturable:  # its warm-up steps run uncaptured on purpose: not worth torch's one-time warning
        optimizer._warned_capturable_if_run_uncaptured = True
    return optimizer


class LrSchedule:
    """The learning rate of every step; call :meth:`step` before each optimizer step."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], base_lr: float, epochs: int, steps: int
    ) -> None:
        self.optimizer = optimizer
        self.cfg = dict(cfg)
        self.base_lr = base_lr
        self.epochs = max(int(epochs), 1)
        self.steps_per_epoch = max(int(steps), 1)
        self.plateau_scale = 1.0
        self.plateau_best = math.inf
        self.plateau_bad_epochs = 0

    def multiplier(self, step: int) -> float:
        """Factor of the base learning rate at global step ``step`` (0-based)."""
        cfg, spe = self.cfg, self.steps_per_epoch
        epoch_float = step / spe
        name = cfg["name"]
        if name == "steplr":
            factor = cfg["gamma"] ** (int(epoch_float) // max(int(cfg["step_size"]), 1))
        elif name == "plateau":
            factor = self.plateau_scale
        elif name == "cosine":
            progress = min(epoch_float / max(cfg["t_max"], 1e-9), 1.0)
            floor = cfg["min_lr"] / self.base_lr if self.base_lr > 0 else 0.0
            factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        elif name == "onecycle":
            total = self.epochs * spe
            peak = max(cfg["pct_start"] * total, 1.0)
            factor = step / peak if step < peak else max(total - step, 0) / max(total - peak, 1.0)
        else:
            factor = 1.0
        warmup_steps = cfg["warmup_epochs"] * spe
        if step < warmup_steps:
            start = cfg["warmup_start_factor"]
            factor *= start + (1.0 - start) * step / warmup_steps
        return factor

    def step(self, step: int) -> float:
        """Set the learning rate of every parameter group for global step ``step``; returns it."""
        lr = self.base_lr * self.multiplier(step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # a device tensor a CUDA graph reads: written in place, no sync
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr

    def end_epoch(self, val_loss: float | None) -> None:
        """Plateau bookkeeping (ReduceLROnPlateau rules, mode min, threshold 1e-4 relative)."""
        if self.cfg["name"] != "plateau" or val_loss is None or not math.isfinite(val_loss):
            return
        if val_loss < self.plateau_best * (1 - 1e-4):
            self.plateau_best = val_loss
            self.plateau_bad_epochs = 0
        else:
            self.plateau_bad_epochs += 1
            if self.plateau_bad_epochs > self.cfg["patience"]:
                self.plateau_scale *= self.cfg["factor"]
                self.plateau_bad_epochs = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.plateau_scale, "best": self.plateau_best, "bad_epochs": self.plateau_bad_epochs}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.plateau_scale = float(state["scale"])
        self.plateau_best = float(state["best"])
        self.plateau_bad_epochs = int(state["bad_epochs"])
