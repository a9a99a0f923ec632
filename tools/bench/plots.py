"""PNG plots of a benchmark (matplotlib, Agg backend, no display needed).

* ``throughput_by_loader.png``: images/s of every setting, grouped by loader, one panel per mode (and model),
  with the min–max spread over the timed windows as error bars; settings that did not run are marked;
* ``train_vs_loader.png``: per model and device, each loader's best loader-only and best training images/s
  beside the compute-only upper bounds (horizontal lines: eager dashed, compiled solid, where measured).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works without a display, and before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from tools.bench.report import format_ips, loader_label, step_label, upper_bounds  # noqa: E402

COLORS = {"torch": "#4C72B0", "dali": "#55A868", "ffcv": "#C44E52", "gpu": "#8172B2", "resident": "#937860"}


def _panel_key(r: dict[str, Any]) -> str:
    if r["mode"] == "loader":
        return "loader only"
    dn = f", {r['divnorm']}" if r.get("divnorm") and r["divnorm"] != "nonorm" else ""
    return f"{r['mode'].replace('_', ' ')}: {r['model']}{dn}, {step_label(r)}"


def _save(fig, path: Path) -> None:
    """Write the PNG through a temp file + ``os.replace`` (no half-written plot after Ctrl-C)."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def plot_by_loader(records: list[dict[str, Any]], path: Path) -> Path:
    """Bars of images/s per setting, grouped by loader, one panel per mode/model."""
    panels: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        panels[_panel_key(r)].append(r)
    names = sorted(panels, key=lambda k: (k != "loader only", k))
    fig, axes = plt.subplots(
        len(names),
        1,
        figsize=(max(8, 0.45 * max(len(v) for v in panels.values()) + 3), 3.6 * len(names)),
        squeeze=False,
    )
    for ax, name in zip(axes[:, 0], names):
        rows = sorted(panels[name], key=lambda r: (loader_label(r), r["device"], r["workers"], r["batch_size"]))
        x, ticks, group_mid, position, previous = [], [], {}, 0.0, None
        for r in rows:
            loader = loader_label(r)
            if previous is not None and loader != previous:
                position += 0.8  # a gap between loader groups
            previous = loader
            x.append(position)
            ticks.append(f"{r['device']} w{r['workers']}\nb{r['batch_size']}")
            group_mid.setdefault(loader, []).append(position)
            position += 1.0
        heights = [r["images_per_second"] or 0.0 for r in rows]
        lower = [
            max(0.0, (r["images_per_second"] or 0) - (r.get("images_per_second_min") or r["images_per_second"] or 0))
            for r in rows
        ]
        upper = [
            max(0.0, (r.get("images_per_second_max") or r["images_per_second"] or 0) - (r["images_per_second"] or 0))
            for r in rows
        ]
        colors = [COLORS.get(r["loader"], "#777777") for r in rows]
        ax.bar(x, heights, color=colors, yerr=[lower, upper], capsize=3, edgecolor="black", linewidth=0.5)
        top = max(heights + [1.0])
        for xi, r in zip(x, rows):
            if r["status"] != "ok":
                ax.text(xi, top * 0.02, r["status"], rotation=90, ha="center", va="bottom", fontsize=8, color="#aa0000")
        ax.set_xticks(x)
        ax.set_xticklabels(ticks, fontsize=7)
        for loader, positions in group_mid.items():
            ax.text(
                sum(positions) / len(positions),
                -0.28,
                loader.replace(" ", "\n"),  # one option key per line: variants' names stay apart
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="top",
                fontsize=9,
                fontweight="bold",
            )
        ax.set_ylabel("images/s")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return path


def plot_train_vs_loader(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Per (model, device): best loader-only and train images/s per loader, and the upper bound line."""
    uppers = [r for r in records if r["mode"] == "upper_bound" and r["status"] == "ok"]
    keys = sorted({(r["model"], r.get("divnorm"), r["device"]) for r in uppers}, key=str)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
    for ax, (model, divnorm, device) in zip(axes[0], keys):

        def best(mode: str, loader: str | None = None, *, _model=model, _device=device, _divnorm=divnorm) -> float:
            found = [
                r["images_per_second"]
                for r in records
                if r["status"] == "ok"
                and r["mode"] == mode
                and r["device"] == _device
                and (mode == "loader" or (r["model"] == _model and r.get("divnorm") == _divnorm))
                and (loader is None or loader_label(r) == loader)
            ]
            return max(found, default=0.0)

        loaders = sorted(
            {loader_label(r) for r in records if r["mode"] in ("loader", "train") and r["device"] == device}
        )
        xs = range(len(loaders))
        ax.bar(
            [i - 0.2 for i in xs],
            [best("loader", name) for name in loaders],
            width=0.4,
            label="loader only",
            color="#9ecae1",
            edgecolor="black",
            linewidth=0.5,
        )
        ax.bar(
            [i + 0.2 for i in xs],
            [best("train", name) for name in loaders],
            width=0.4,
            label="train",
            color="#3182bd",
            edgecolor="black",
            linewidth=0.5,
        )
        bounds = upper_bounds(records, model=model, divnorm=divnorm, device=device)
        for compiled, style in ((False, "--"), (True, "-")):
            if compiled in bounds:
                ips = bounds[compiled]["images_per_second"]
                name = "compiled" if compiled else "eager"
                ax.axhline(ips, color="#d62728", linestyle=style, label=f"upper bound, {name}: {format_ips(ips)}/s")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([name.replace(" ", "\n") for name in loaders], fontsize=8)
        ax.set_ylabel("images/s (best setting)")
        dn = f" ({divnorm})" if divnorm and divnorm != "nonorm" else ""
        ax.set_title(f"{model}{dn} on {device}")
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.legend(fontsize=8)
    _save(fig, path)
    return path


def write_plots(records: list[dict[str, Any]], out: Path) -> list[str]:
    """Both plots into ``out``; the paths written."""
    if not records:
        return []
    written = [plot_by_loader(records, out / "throughput_by_loader.png")]
    second = plot_train_vs_loader(records, out / "train_vs_loader.png")
    if second is not None:
        written.append(second)
    return [str(p) for p in written]
