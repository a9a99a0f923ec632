"""Runs that differ only in their seed, reported as one group: mean +- sample std over the seeds.

Two runs belong to the same group when their resolved configs (``config.json``) are equal apart from ``seed``,
the experiment name (``run.exp``) and the ``logging`` section (where the files go and how progress prints; it
changes no number). A group's row holds, per metric, ``{"mean", "std", "n"}``: the mean over the members with a
finite value, the sample standard deviation (n - 1 in the denominator; ``None`` for fewer than two values) and
how many values there were. The Gini sparsity of a run is the mean over its DN positions of the Gini index after
the position (see :func:`train.report_analysis.activation_sparsity`); a group's is the mean over its seeds.
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
from typing import Any

from train.report_analysis import LayerSparsity, finite

# config keys that do not make two runs different experiments
IGNORED_TOP_LEVEL = ("seed", "logging")
SEED_SUFFIX = re.compile(r"[/_-](seed|run)\d+$")
METRICS = (("val", "top1"), ("val", "top5"), ("val", "loss"), ("test", "top1"), ("test", "top5"), ("test", "loss"))
EXTRAS = ("images_per_second", "wall_seconds")


def group_key(config: dict[str, Any]) -> str:
    """The run's config as canonical JSON without seed, experiment name and logging: equal keys = one group."""
    config = copy.deepcopy(config)
    for key in IGNORED_TOP_LEVEL:
        config.pop(key, None)
    if isinstance(config.get("run"), dict):
        config["run"].pop("exp", None)
    return json.dumps(config, sort_keys=True, default=str)


def group_indices(configs: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of the runs grouped by :func:`group_key`, groups and members in the order the runs were given."""
    groups: dict[str, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(group_key(config), []).append(index)
    return list(groups.values())


def group_name(names: list[str]) -> str:
    """``study/ours-bn`` for members ``study/ours-bn/seed42`` ...; else the first name plus how many others."""
    stems = {SEED_SUFFIX.sub("", name) for name in names}
    if len(stems) == 1:
        return stems.pop()
    return f"{names[0]} (+{len(names) - 1})"


def mean_std(values: list[Any]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` over the finite values: sample std (n - 1), ``None`` where undefined."""
    finite_values = [float(v) for v in values if finite(v)]
    n = len(finite_values)
    return {
        "mean": statistics.fmean(finite_values) if n else None,
        "std": statistics.stdev(finite_values) if n >= 2 else None,
        "n": n,
    }


def run_gini(layers: list[dict[str, Any]] | None) -> float | None:
    """One run's Gini sparsity: the mean over DN positions of the Gini index after the position."""
    values = [layer["gini_after"] for layer in layers or [] if finite(layer.get("gini_after"))]
    return statistics.fmean(values) if values else None


def _value(row: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def group_row(members: list[dict[str, Any]], analysis: dict[str, Any]) -> dict[str, Any]:
    """The row of one group from its members' table rows (:func:`train.report.table_row`) and sparsity analysis."""
    first = members[0]
    names = [m["run"] for m in members]
    row: dict[str, Any] = {
        "group": group_name(names),
        "members": names,
        "folders": [m["folder"] for m in members],
        "n": len(members),
        **{key: first.get(key) for key in ("model", "dataset", "dn", "switches", "loader", "device", "epochs_planned")},
        "epochs": [m.get("epochs") for m in members],
        "status": sorted({str(m.get("status")) for m in members}),
    }
    for split, metric in METRICS:
        row.setdefault(split, {})[metric] = mean_std([_value(m, (split, metric)) for m in members])
    for key in EXTRAS:
        row[key] = mean_std([m.get(key) for m in members])
    ginis = [run_gini(analysis.get(name, {}).get("layers")) for name in names]
    row["gini"] = mean_std(ginis)
    row["gini_runs"] = dict(zip(names, ginis, strict=True))
    return row


def mean_sparsity(per_run: list[list[LayerSparsity]]) -> list[LayerSparsity]:
    """Per DN position, the mean over runs of Gini / zeros before and after (positions in the first run's order)."""
    if not per_run:
        return []
    out = []
    for layer in per_run[0]:
        same = [r for rows in per_run for r in rows if r.name == layer.name]
        out.append(
            LayerSparsity(
                name=layer.name,
                kind=layer.kind,
                **{
                    key: statistics.fmean(getattr(r, key) for r in same)
                    for key in ("gini_before", "gini_after", "zeros_before", "zeros_after")
                },
            )
        )
    return out


def mean_curves(metrics: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per epoch, the mean over runs of train / val loss and top-1 (epochs every run has reached)."""
    records = []
    by_run = [{m["epoch"]: m for m in run} for run in metrics]
    common = sorted(set.intersection(*(set(run) for run in by_run))) if by_run else []
    for epoch in common:
        record: dict[str, Any] = {"epoch": epoch}
        for split in ("train", "val"):
            parts = [run[epoch].get(split) for run in by_run]
            if all(isinstance(p, dict) for p in parts):
                record[split] = {key: statistics.fmean(float(p[key]) for p in parts) for key in ("loss", "top1")}
        records.append(record)
    return records


GROUP_COLUMNS = (
    ("val top-1", ("val", "top1")),
    ("val top-5", ("val", "top5")),
    ("val loss", ("val", "loss")),
    ("test top-1", ("test", "top1")),
    ("test top-5", ("test", "top5")),
    ("test loss", ("test", "loss")),
    ("Gini", ("gini",)),
    ("images/s", ("images_per_second",)),
    ("wall s", ("wall_seconds",)),
)


def format_stat(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """``mean ± std (n)``; ``mean (1)`` for one value; ``-`` for none."""
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    if stat.get("std") is not None:
        text += f" ± {stat['std']:.{digits}f}"
    return f"{text} ({stat['n']})"


def markdown_group_table(groups: list[dict[str, Any]]) -> list[str]:
    """One row per group (mean ± sample std (n) over its seeds), then the mean differences from the first group."""
    head = ["group", "model", "DN", "switches", "loader", "runs", "status"] + [c for c, _ in GROUP_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [g["group"], str(g["model"]), str(g["dn"]), str(g["switches"]), str(g["loader"]), str(g["n"])]
        cells.append(", ".join(g["status"]))
        cells += [format_stat(_value(g, path), 4 if path == ("gini",) else 2) for _, path in GROUP_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if len(groups) > 1:
        base = groups[0]
        lines += ["", f"Difference of the means from the baseline group ({base['group']}):", ""]
        shown = [(c, p) for c, p in GROUP_COLUMNS if p[0] in ("val", "test", "gini")]
        lines += ["| group | " + " | ".join(f"Δ {c}" for c, _ in shown) + " |", "|" + "---|" * (len(shown) + 1)]
        for g in groups[1:]:
            cells = [g["group"]]
            for _, path in shown:
                a, b = (_value(x, path) or {} for x in (g, base))
                delta = (a.get("mean") - b.get("mean")) if finite(a.get("mean")) and finite(b.get("mean")) else None
                digits = 4 if path == ("gini",) else 2
                cells.append(f"{delta:+.{digits}f}" if delta is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return lines
