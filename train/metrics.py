"""Metrics without per-step host syncs: device-side sums, reduced across ranks once per epoch.

:class:`MetricSums` keeps ``[loss_sum, correct_top1, correct_top5, count]`` as one float64 tensor on the
training device; each step adds to it with tensor ops only (no ``.item()``), and :meth:`MetricSums.result`
syncs once, all-reduces across ranks and returns percentages. :class:`MetricsLog` appends one JSON line per
epoch to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from train.distributed import DistributedEnv, all_reduce_sum


def correct_topk(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, per k (0-d tensors, no sync)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (N, maxk)
    hits = top.eq(labels.unsqueeze(1))
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


class MetricSums:
    """Running sums of loss, top-1/top-5 hits and sample count for one split and epoch, on the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch (``loss`` is the batch mean). Tensor ops only: safe on the hot path."""
        top1, top5 = correct_topk(logits.detach(), labels)
        n = labels.shape[0]
        # torch.full, not new_tensor: a fill kernel rather than a host-to-device copy, so a CUDA graph can hold it
        count = torch.full((), n, dtype=torch.float64, device=loss.device)
        self.sums += torch.stack([loss.detach().double() * n, top1.double(), top5.double(), count])

    def result(self, env: DistributedEnv) -> dict[str, float]:
        """Loss (mean per sample), top-1 and top-5 (percent) over all ranks; one sync."""
        sums = all_reduce_sum(self.sums.clone(), env).cpu().tolist()
        loss_sum, top1, top5, count = sums
        count = max(count, 1.0)
        return {
            "loss": loss_sum / count,
            "top1": 100.0 * top1 / count,
            "top5": 100.0 * top5 / count,
            "samples": int(sums[3]),
        }


class MetricsLog:
    """``metrics.jsonl``: one JSON object per epoch, appended (rank 0 only)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, epoch: int) -> None:
        """Drop the lines of epochs after ``epoch`` (1-based, completed): a resumed run rewrites what the
        interrupted one logged past its last checkpoint, so the file matches the checkpoint."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and _epoch_of(line) <= epoch]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _epoch_of(line: str) -> int:
    try:
        return int(json.loads(line).get("epoch", -1))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 1 << 30  # a torn last line from an interruption: drop it


def progress_bar_factory(mode: str, main: bool):
    """Per-epoch progress callbacks: a tqdm bar with live images/s on rank 0 (``logging.progress_bar``:
    on, off, or auto = on when stderr is a terminal)."""
    enabled = main and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))

    def for_epoch(epoch: int, epochs: int):
        if not enabled:
            return None
        from tqdm import tqdm

        bar = tqdm(total=None, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, dynamic_ncols=True)

        def update(step: int, total: int, images_per_second: float) -> None:
            bar.total = total
            bar.n = step
            bar.set_postfix_str(f"{images_per_second:.0f} img/s", refresh=False)
            bar.refresh()
            if step >= total:
                bar.close()

        return update

    return for_epoch
