"""``python -m train.report runs/<a> runs/<b> ... --out reports/<name>/``: compare runs as the DN papers do.

Writes ``report.md`` + PNGs, one self-contained ``report.html`` (PNGs embedded as base64 data URIs) and
``report.json`` (the table's raw numbers). The first run is the baseline: every other row also shows its
difference from it. Sections: results table, training curves, conv1 filters (initial / best / final),
activation sparsity (Gini index, fraction of zeros) before and after each DN position on a fixed validation
batch, and histograms of the learned DN parameters. A run still going (no ``summary.json``) is reported from
what exists and marked ``running`` (``summary damaged`` where ``summary.json`` is there but unreadable, with a note
naming it). A folder given twice is one run (a note says so). Runs on different data sets get one table and one
baseline per data set: no difference is computed across data sets. Runs that differ only in seed
(``--group-seeds``, on by default when some do) are also reported as groups: one row per group with mean +- sample
std (n) of val / test top-1, top-5, loss and the Gini sparsity, mean curves and mean sparsity per group
(:mod:`train.report_groups`); ``report.json`` then has
``groups`` with the numbers and member runs. Exit codes: 0 done, 2 bad input (missing or foreign run folder, or a
checkpoint refused because loading it would run code: checkpoints are read with ``weights_only=True`` only).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
from pathlib import Path
from typing import Any

from train import report_groups as groups
from train.checkpoint import CheckpointError
from train.files import write_text_atomic
from train.report_analysis import ReportError, RunData, finite, read_run

SWITCHES = ("relu", "batchnorm")
DN_SWITCHES = ("asact", "fix_all", "fix_gamma", "fix_sigma", "single_gamma", "single_sigma")


def table_row(run: RunData) -> dict[str, Any]:
    """One table row: from ``summary.json`` when present, else from the last epochs of ``metrics.jsonl``."""
    cfg, model = run.config, run.config["model"]
    specs = model.get("divnorm_specs", {})
    switches = [f"{k}={'on' if model.get(k) else 'off'}" for k in SWITCHES if k in model]
    switches += [k for k in DN_SWITCHES if specs.get(k)]
    if specs.get("type") == "ours":
        switches += [f"p={specs.get('p')}", f"power={specs.get('power')}"]
    elif specs.get("type") == "ken":
        switches += [f"lambda={specs.get('lamb')}"]
    row: dict[str, Any] = {
        "run": run.name,
        "folder": str(run.folder),
        "model": cfg.get("run", {}).get("model", "?"),
        "dataset": cfg.get("run", {}).get("dataset", "?"),
        "dn": specs.get("type", "nonorm"),
        "switches": ", ".join(switches),
        "loader": cfg.get("run", {}).get("loader") or cfg["data"].get("loader"),
        "epochs_planned": cfg.get("training", {}).get("epochs"),
    }
    summary = run.summary
    if summary is not None:
        row.update(
            status=summary.get("stopped", "done"),
            device=summary.get("device"),
            loader=summary.get("loader", row["loader"]),
            epochs=summary.get("epochs"),
            best_epoch=summary.get("best_epoch"),
            val=summary.get("val"),
            test=summary.get("test"),
            images_per_second=summary.get("images_per_second"),
            wall_seconds=summary.get("wall_seconds"),
        )
        return row
    epochs = run.metrics
    with_val = [m for m in epochs if isinstance(m.get("val"), dict)]
    best = max(with_val, key=lambda m: m["val"]["top1"], default=None)
    samples = sum(m["train"].get("samples", 0) for m in epochs if isinstance(m.get("train"), dict))
    seconds = sum(m["train"].get("seconds", 0.0) for m in epochs if isinstance(m.get("train"), dict))
    row.update(
        status="summary damaged" if run.summary_damaged else "running",
        device=cfg.get("device"),
        epochs=epochs[-1]["epoch"] if epochs else 0,
        best_epoch=best["epoch"] if best else None,
        val={k: best["val"][k] for k in ("top1", "top5", "loss")} if best else None,
        test=None,
        images_per_second=samples / seconds if seconds > 0 else None,
        # time in the epochs so far (train + val); start-up is not in metrics.jsonl
        wall_seconds=sum(
            m[s].get("seconds", 0.0) for m in epochs for s in ("train", "val") if isinstance(m.get(s), dict)
        )
        or None,
    )
    return row


COLUMNS = (
    ("val top-1", ("val", "top1")),
    ("val top-5", ("val", "top5")),
    ("test top-1", ("test", "top1")),
    ("test top-5", ("test", "top5")),
    ("images/s", ("images_per_second",)),
    ("wall s", ("wall_seconds",)),
)


def _get(row: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = row
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _fmt(value: Any, sign: bool = False) -> str:
    if not finite(value):
        return "-"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    """The results table, then the differences from the first run (the baseline)."""
    head = ["run", "model", "DN", "switches", "loader", "device", "epochs", "status"] + [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["run"],
            r["model"],
            r["dn"],
            r["switches"],
            str(r["loader"]),
            str(r.get("device") or "-"),
            f"{r['epochs']}/{r['epochs_planned']}",
            r["status"],
        ]
        cells += [_fmt(_get(r, path)) for _, path in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) > 1:
        base = rows[0]
        lines += ["", f"Difference from the baseline ({base['run']}):", ""]
        dhead = ["run"] + [f"Δ {c}" for c, _ in COLUMNS]
        lines += ["| " + " | ".join(dhead) + " |", "|" + "---|" * len(dhead)]
        for r in rows[1:]:
            cells = [r["run"]]
            for _, path in COLUMNS:
                a, b = _get(r, path), _get(base, path)
                cells.append(_fmt(a - b, sign=True) if finite(a) and finite(b) else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def build_report(
    folders: list[str], out: Path, batch_size: int = 64, log=print, group_seeds: bool | None = None
) -> dict[str, Any]:
    """Read the runs, compute, plot, and write report.md / report.html / report.json under ``out``.

    ``group_seeds``: report runs that differ only in seed as one group (mean +- sample std over the seeds; see
    :mod:`train.report_groups`); ``None`` = when some runs do (several runs share a config apart from seed).
    """
    from train import report_analysis as analysis
    from train import report_plots as plots

    unique, given = _distinct_folders(folders)
    runs = [read_run(f) for f in unique]  # every folder is checked before any work starts
    for run, spellings in zip(runs, given, strict=True):
        if len(spellings) > 1:  # one run named twice is one run: not a 2-seed group, not its own baseline
            note = f"given {len(spellings)} times ({', '.join(spellings)}): counted once"
            run.notes.append(note)
            log(f"report: note: {run.name} {note}")
    out.mkdir(parents=True, exist_ok=True)
    rows = [table_row(run) for run in runs]
    datasets = list(dict.fromkeys(str(row["dataset"]) for row in rows))
    names = _unique([_slug(r.name) for r in runs])
    indices = groups.group_indices([run.config for run in runs])
    grouped = any(len(members) > 1 for members in indices) if group_seeds is None else group_seeds
    # grouped: filters and DN parameter histograms of each group's first run only (its seeds look alike)
    shown = {members[0] for members in indices} if grouped else set(range(len(runs)))

    sparsity: dict[int, list[analysis.LayerSparsity]] = {}
    param_sections: list[str] = []
    analysis_rows: dict[str, Any] = {}
    for index, (run, slug) in enumerate(zip(runs, names, strict=True)):
        try:
            net, source = analysis.build_model(run)
            images = analysis.fixed_batch(run, batch_size)
            rows_s = analysis.activation_sparsity(net, images)
            params = analysis.dn_parameters(net)
        except CheckpointError:  # a refused (unsafe or unreadable) checkpoint stops the report: see main()
            raise
        except Exception as error:  # one run's analysis failing must not lose the rest of the report
            run.notes.append(f"no sparsity / DN parameters: {type(error).__name__}: {error}")
            continue
        run.notes.append(f"sparsity and DN parameters from {source} on the first {len(images)} validation images")
        sparsity[index] = rows_s
        analysis_rows[run.name] = {
            "source": source,
            "batch": len(images),
            "layers": [vars(r) for r in rows_s],
            "dn_parameters": params,
        }
        if index not in shown:
            continue
        if params:
            png = plots.dn_histograms(run.name, params, out / f"dn_params_{slug}.png")
            param_sections += [f"![DN parameters {run.name}]({png.name})", ""]
        else:
            param_sections += [f"{run.name}: no learned DN parameters (nonorm or fixed baseline layer).", ""]

    group_rows = [groups.group_row([rows[i] for i in members], analysis_rows) for members in indices]
    md = [f"# Run report: {', '.join(r.name for r in runs)}", ""]
    if len(datasets) > 1:  # a difference across data sets means nothing: one table and one baseline per data set
        md += [
            f"**These runs are on {len(datasets)} data sets ({', '.join(datasets)}): each data set has its own tables "
            "and its own baseline (its first run or group); no difference is computed across data sets.**",
            "",
        ]
    if grouped:
        md = [f"# Run report: {', '.join(g['group'] for g in group_rows)}", *md[2:]]
        md += [_baseline_line([g["group"] for g in group_rows], [str(g["dataset"]) for g in group_rows], "group"), ""]
        md += ["## Results by group (runs that differ only in seed)", ""]
        md += _per_dataset(group_rows, groups.markdown_group_table)
        md += [
            "",
            "Each cell: mean ± sample standard deviation (number of runs) over the group's seeds. Gini = the"
            " Gini index after each DN position on a fixed validation batch, mean over positions, then over seeds.",
            "",
            "## All runs",
            "",
        ]
    else:
        md += [_baseline_line([r["run"] for r in rows], [str(r["dataset"]) for r in rows], "run"), "", "## Results", ""]
    md += _per_dataset(rows, markdown_table) + [""]
    md += [
        "Top-1/top-5 in %; val = best validation epoch, test = best weights on the test split; images/s = training"
        " throughput; running (or summary damaged) runs: from metrics.jsonl, wall = epoch time only.",
        "",
    ]

    if grouped:  # one mean curve per group: 18 runs' curves on one axis would be unreadable
        curves = [
            (g["group"], groups.mean_curves([runs[i].metrics for i in m]))
            for g, m in zip(group_rows, indices, strict=True)
        ]
        title = "## Training curves (mean over each group's runs)"
    else:
        curves, title = [(r.name, r.metrics) for r in runs], "## Training curves"
    md += [title, "", f"![curves]({plots.curves(curves, out / 'curves.png').name})", ""]

    md += ["## conv1 filters (initial / best / final)" + (" of each group's first run" if grouped else ""), ""]
    for index, (run, slug) in enumerate(zip(runs, names, strict=True)):
        if index not in shown:
            continue
        weights = analysis.conv1_weights(run)
        if weights:
            png = plots.filter_grid(weights, f"{run.name}: conv1 filters", out / f"conv1_{slug}.png")
            md += [f"![conv1 {run.name}]({png.name})", ""]
        else:
            md += [f"{run.name}: no conv1 filters saved.", ""]

    if grouped:
        sparsity_runs = []
        for g, members in zip(group_rows, indices, strict=True):
            measured = [sparsity[i] for i in members if i in sparsity]
            if measured:
                sparsity_runs.append((f"{g['group']} (mean of {len(measured)})", groups.mean_sparsity(measured)))
    else:
        sparsity_runs = [(runs[i].name, rows_s) for i, rows_s in sparsity.items()]
    md += ["## Activation sparsity (before / after each DN position)", ""]
    if sparsity_runs:
        md += [f"![sparsity]({plots.sparsity(sparsity_runs, out / 'sparsity.png').name})", ""]
        for name, srows in sparsity_runs:
            md += [
                f"**{name}**",
                "",
                "| layer | kind | Gini before | Gini after | zeros before | zeros after |",
                "|---|---|---|---|---|---|",
            ]
            md += [
                f"| {r.name} | {r.kind} | {r.gini_before:.4f} | {r.gini_after:.4f} | {r.zeros_before:.4f} | "
                f"{r.zeros_after:.4f} |"
                for r in srows
            ]
            md += [""]
    else:
        md += ["No run could be analysed (see notes).", ""]
    md += ["## Learned DN parameters" + (" of each group's first run" if grouped else ""), ""] + param_sections
    notes = [f"- {run.name}: {note}" for run in runs for note in run.notes]
    if notes:
        md += ["## Notes", ""] + notes + [""]

    text = "\n".join(md)
    write_text_atomic(out / "report.md", text)
    write_text_atomic(out / "report.html", to_html(text, out))
    result = {
        "runs": rows,
        "analysis": analysis_rows,
        "notes": {r.name: r.notes for r in runs},
        "baselines": {d: next(r["run"] for r in rows if str(r["dataset"]) == d) for d in datasets},
    }
    if grouped:
        result["groups"] = group_rows
    write_text_atomic(out / "report.json", json.dumps(result, indent=2, default=str))
    what = f"{len(runs)} runs" + (f" in {len(group_rows)} groups" if grouped else "")
    log(f"report: {out / 'report.md'}, {out / 'report.html'} ({what})")
    return result


def _distinct_folders(folders: list[str]) -> tuple[list[str], list[list[str]]]:
    """The folders in the order given, each run folder once (the same folder spelled twice, or through a link, is
    one run), and for each the spellings it was given as."""
    keys: dict[Path, int] = {}
    unique: list[str] = []
    given: list[list[str]] = []
    for folder in folders:
        key = Path(folder).resolve()
        if key in keys:
            given[keys[key]].append(folder)
            continue
        keys[key] = len(unique)
        unique.append(folder)
        given.append([folder])
    return unique, given


def _baseline_line(names: list[str], datasets: list[str], kind: str) -> str:
    """``Baseline: **a** (the first run).``; per data set where the runs are on several."""
    if len(set(datasets)) == 1:
        return f"Baseline: **{names[0]}** (the first {kind})."
    first = {d: n for n, d in reversed(list(zip(names, datasets, strict=True)))}
    shown = ", ".join(f"**{first[d]}** ({d})" for d in dict.fromkeys(datasets))
    return f"Baselines: {shown} (the first {kind} of each data set)."


def _per_dataset(rows: list[dict[str, Any]], table) -> list[str]:
    """``table(rows)``; where the rows are on several data sets, one table (with its own baseline) per data set."""
    datasets = list(dict.fromkeys(str(r["dataset"]) for r in rows))
    if len(datasets) == 1:
        return table(rows)
    lines: list[str] = []
    for dataset in datasets:
        lines += [f"### Data set: {dataset}", ""] + table([r for r in rows if str(r["dataset"]) == dataset]) + [""]
    return lines[:-1]


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def to_html(markdown: str, folder: Path) -> str:
    """The report's Markdown (headings, tables, images, paragraphs) as one HTML page, PNGs inlined."""
    body, table = [], []

    def flush():
        if table:
            cells = [[html.escape(c.strip()) for c in line.strip().strip("|").split("|")] for line in table]
            rows = [f"<tr>{''.join(f'<th>{c}</th>' for c in cells[0])}</tr>"]
            rows += [f"<tr>{''.join(f'<td>{c}</td>' for c in r)}</tr>" for r in cells[2:]]
            body.append(f"<table>{''.join(rows)}</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        image = re.fullmatch(r"!\[(.*)\]\((.+\.png)\)", line)
        if image:
            data = base64.b64encode((folder / image.group(2)).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.strip():
            text = html.escape(line.removeprefix("- "))
            body.append("<p>" + re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text) + "</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:2px 6px;font-size:13px}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Run report</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/<exp>); the first is the baseline")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder, e.g. reports/<name>/")
    parser.add_argument(
        "--batch", type=int, default=64, metavar="N", help="validation images in the fixed sparsity batch (default 64)"
    )
    parser.add_argument(
        "--group-seeds",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one row per group of runs that differ only in seed (mean ± sample std); default: on when several "
        "runs share a config apart from seed and experiment name",
    )
    args = parser.parse_args(argv)
    if args.batch < 1:
        print("error: --batch must be >= 1", file=sys.stderr)
        return 2
    try:
        build_report(args.runs, Path(args.out), args.batch, group_seeds=args.group_seeds)
    except (ReportError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
