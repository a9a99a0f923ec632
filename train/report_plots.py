"""Figures of a run report (matplotlib, Agg backend): curves, conv1 filter grids, sparsity, DN parameter histograms.

Each function writes one PNG atomically (temp file + ``os.replace``) and returns its path.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def curves(runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    """Loss and top-1 per epoch, train (solid) and val (dashed), every run on shared axes."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, (name, metrics) in enumerate(runs):
        color = f"C{index % 10}"
        for split, style in (("train", "-"), ("val", "--")):
            points = [(m["epoch"], m[split]) for m in metrics if isinstance(m.get(split), dict)]
            if not points:
                continue
            epochs = [e for e, _ in points]
            for ax, key in zip(axes, ("loss", "top1"), strict=True):
                ax.plot(
                    epochs, [p[key] for _, p in points], style, color=color, marker="o", ms=3, label=f"{name} {split}"
                )
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="top-1 (%)", title="top-1 accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def filter_grid(weights: dict[str, torch.Tensor], title: str, path: Path) -> Path:
    """conv1 filters at initial / best / final, one panel each; every filter scaled to [0, 1] on its own
    (shape shows, absolute magnitude does not); 3-channel filters shown as RGB, others as channel 0 in gray."""
    stages = list(weights)
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 4.4), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        ax.imshow(_tile(weights[stage]).numpy(), interpolation="nearest")
        ax.set_title(f"{stage}")
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def _tile(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    if w.shape[1] != 3:
        w = w[:, :1].repeat(1, 3, 1, 1)
    low = w.amin(dim=(1, 2, 3), keepdim=True)
    high = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - low) / (high - low).clamp_min(1e-12)
    n, _, h, k = w.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(rows * (h + 1) + 1, cols * (k + 1) + 1, 3)  # white 1-px separators
    for i in range(n):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (k + 1) : 1 + c * (k + 1) + k] = w[i].permute(1, 2, 0)
    return grid


def sparsity(runs: list[tuple[str, list[Any]]], path: Path) -> Path:
    """Gini index and fraction of zeros per DN position (before solid, after dashed), every run."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for index, (name, rows) in enumerate(runs):
        color = f"C{index % 10}"
        x = list(range(len(rows)))
        for ax, key in zip(axes, ("gini", "zeros"), strict=True):
            ax.plot(x, [getattr(r, f"{key}_before") for r in rows], "-o", color=color, ms=3, label=f"{name} before")
            ax.plot(x, [getattr(r, f"{key}_after") for r in rows], "--s", color=color, ms=3, label=f"{name} after")
    longest = max((rows for _, rows in runs), key=len, default=[])
    for ax, label in zip(axes, ("Gini index", "fraction of zeros"), strict=True):
        ax.set_xticks(range(len(longest)), [r.name for r in longest], rotation=60, ha="right", fontsize=6)
        ax.set(ylabel=label, title=f"{label} at each DN position")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def dn_histograms(name: str, params: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """One row per DN layer, one histogram per parameter (scalar parameters show as a single bar)."""
    keys = sorted({k for values in params.values() for k in values})
    fig, axes = plt.subplots(len(params), len(keys), figsize=(3 * len(keys), 1.9 * len(params)), squeeze=False)
    for row, (layer, values) in enumerate(params.items()):
        for col, key in enumerate(keys):
            ax = axes[row][col]
            if key in values:
                ax.hist(values[key], bins=min(20, max(1, len(values[key]))), color=f"C{col}")
            ax.set_title(f"{layer} {key}", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(f"{name}: learned DN parameters")
    fig.tight_layout()
    return _save(fig, path)
