"""TensorBoard event files in the run folder: ``tensorboard --logdir runs`` shows every run side by side.

Written by rank 0 into the run folder itself (``runs/<exp>/events.out.tfevents.*``), so the run's name in
TensorBoard is its experiment name. Per epoch:

* scalars: every number of the epoch's ``metrics.jsonl`` line under its path (``train/loss``, ``train/top1``,
  ``train/top5``, ``train/images_per_second``, ``val/loss``, ``lr``, ...) plus ``train/data_wait_fraction``
  (data-wait seconds / epoch seconds); at the end ``test/loss``, ``test/top1``, ``test/top5`` from
  ``summary.json`` at the last epoch. Scalars are stored in float64 (TensorBoard's tensor-based scalar format),
  so they equal ``metrics.jsonl`` exactly; the scalar dashboard shows them as usual.
* histograms: every parameter of every divisive normalization layer (``divnorm/<layer>/<parameter>``);
* image: the conv1 filters as a grid (``conv1/filters``), each filter scaled to [0, 1] on its own;
* text (once): the resolved config (``config``).

``logging.tensorboard = false`` turns it off; without the ``tensorboard`` package it logs one line and writes
nothing. A resumed run hides what the interrupted one logged past its checkpoint (TensorBoard's purge step).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The file name prefix TensorBoard gives its event files: --overwrite deletes these.
EVENT_FILE_GLOB = "events.out.tfevents.*"


def _numbers(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"train": {"loss": 1.0}, "lr": 0.1}`` -> ``{"train/loss": 1.0, "lr": 0.1}`` (numbers only)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def filter_image(weights: torch.Tensor, upscale: int = 8) -> torch.Tensor:
    """conv1 filters ``(out, in, h, w)`` as one ``(3, H, W)`` grid in [0, 1], eight filters a row; each filter
    scaled on its own (shape shows, magnitude does not); 3-channel filters in colour, others as channel 0 in
    gray. Nearest-neighbour ``upscale`` so 3x3 filters are visible at TensorBoard's 1:1 zoom."""
    from torchvision.utils import make_grid

    w = weights.detach().float().cpu()
    w = w if w.shape[1] == 3 else w[:, :1].expand(-1, 3, -1, -1)
    low = w.amin(dim=(1, 2, 3), keepdim=True)
    span = (w.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-12)
    w = torch.nn.functional.interpolate((w - low) / span, scale_factor=upscale, mode="nearest")
    return make_grid(w, nrow=8, padding=2, pad_value=1.0)


class TensorBoardLog:
    """The run's TensorBoard writer; every method is a no-op when disabled (other ranks, switched off, no
    ``tensorboard`` package)."""

    def __init__(
        self,
        folder: str | Path,
        config: Mapping[str, Any],
        enabled: bool = True,
        start_epoch: int = 0,
        log: Callable[[str], None] = print,
    ) -> None:
        self.writer = None
        if not enabled or not config["logging"]["tensorboard"]:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("logging.tensorboard: no tensorboard package (pip install tensorboard); writing no event files")
            return
        # purge_step writes a session-start marker at that step; TensorBoard takes every marker after the folder's
        # first as a restart and hides the older events from that step on: what an interrupted run logged past its
        # last checkpoint. A fresh run writes one too, or a resumed run's marker would count as the first.
        self.writer = SummaryWriter(str(folder), purge_step=start_epoch + 1)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def _scalar(self, tag: str, value: float, step: int) -> None:
        # float64, new style: equal to metrics.jsonl (float32 would not be)
        self.writer.add_scalar(tag, value, step, new_style=True, double_precision=True)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved config as a text entry (indented: Markdown shows it as a code block)."""
        if not self.enabled:
            return
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
        self.writer.flush()

    def log_epoch(self, record: Mapping[str, Any], net: nn.Module | None = None) -> None:
        """One ``metrics.jsonl`` line (its ``epoch`` is the step) and, given ``net``, its DN parameters and
        conv1 filters."""
        if not self.enabled:
            return
        step = int(record["epoch"])
        for tag, value in _numbers(record).items():
            if tag != "epoch":
                self._scalar(tag, value, step)
        train = record.get("train") or {}
        if train.get("seconds"):
            self._scalar("train/data_wait_fraction", train["data_seconds"] / train["seconds"], step)
        if net is not None:
            self.log_weights(net, step)
        self.writer.flush()

    def log_weights(self, net: nn.Module, step: int) -> None:
        """Histograms of every DN layer's parameters and the conv1 filter grid."""
        from divnorm.common import divnorm_layers
        from train.checkpoint import first_conv, unwrap

        net = unwrap(net)
        for name, layer in divnorm_layers(net):
            for param_name, param in layer.named_parameters():
                values = param.detach().float().cpu()
                if values.numel() and bool(torch.isfinite(values).all()):
                    self.writer.add_histogram(f"divnorm/{name}/{param_name}", values, step)
        conv = first_conv(net)
        if conv is not None:
            self.writer.add_image("conv1/filters", filter_image(conv.weight), step)

    def log_test(self, summary: Mapping[str, Any]) -> None:
        """``summary.json``'s test metrics at its last epoch (nothing when the run was not tested)."""
        if not self.enabled or not summary.get("test"):
            return
        step = int(summary["epochs"])
        for key, value in summary["test"].items():
            if isinstance(value, int | float) and math.isfinite(value):
                self._scalar(f"test/{key}", float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
