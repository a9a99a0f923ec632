"""Turn benchmark records into decisions and files: verdicts, the tuned setting, results.json / results.md / PNGs.

Verdict per model (and DN variant, and device), following the issue's definition: with ``U`` the compute-only
upper bound (training steps on a device-resident batch), ``L`` the best loader-only images/s at the batch size of
the best training setting and ``T`` that best training throughput:

* ``loader-bound`` when ``L < U``: even alone the loader cannot feed the model as fast as it computes;
* ``compute-bound`` otherwise: the loader keeps up. When ``T`` is still well below ``U`` the loader and the step
  compete for the same resource (CPU cores on a CPU run, host threads on a GPU run); the verdict says so.

``headroom`` = ``U / T - 1``: how much faster training would run if data were free.

``U`` is the compiled bound wherever one was measured (``--compile on`` or ``auto`` on a GPU): an eager bound is
1.46x below what the same H200 does for ResNet-50, so judging loaders against it would call a loader fast enough
that is not. Each verdict also carries the share of that bound every training setting reaches (``shares``) and
both bounds with their ratio, which results.md sets side by side.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from tools.bench.gpu_profile import gpu_time_table
from tools.bench.settings import RESIDENT, resolve_compile
from train.files import write_json_atomic as write_json

CONTENTION_FRACTION = 0.9  # T below 90 % of U with a fast enough loader: the two compete


def ok(records: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """The measured records whose keys equal ``match``."""
    return [
        r
        for r in records
        if r.get("status") == "ok"
        and r.get("images_per_second") is not None
        and all(r.get(k) == v for k, v in match.items())
    ]


# --option keys that only shorten a measurement: not part of a setting's name or of a tuned setting
MEASUREMENT_ONLY_OPTIONS = frozenset({"subset"})


def _best(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(records, key=lambda r: r["images_per_second"], default=None)


def loader_label(record: dict[str, Any]) -> str:
    """``dali[gpu]``-style name of a record's loader, with the ``--option`` keys it ran with (``dali[gpu]
    dali_decode=cpu``), except those that only shorten a measurement."""
    label = f"{record['loader']}[{record['dali_device']}]" if record.get("dali_device") else record["loader"]
    options = {k: v for k, v in (record.get("options") or {}).items() if k not in MEASUREMENT_ONLY_OPTIONS}
    return " ".join([label, *(f"{k}={v}" for k, v in sorted(options.items()))])


def describe_setting(record: dict[str, Any]) -> str:
    loader = loader_label(record)
    text = f"{loader}, {record['device']}, workers {record['workers']}, batch {record['batch_size']}"
    return text + compile_suffix(record)


def compile_suffix(record: dict[str, Any]) -> str:
    """``, compiled`` (with a mode other than the default) for a compiled training record, else nothing."""
    if record.get("mode") == "loader" or not record.get("compile"):
        return ""
    mode = record.get("compile_mode")
    return ", compiled" + (f" ({mode})" if mode and mode != "default" else "")


def upper_bounds(records: list[dict[str, Any]], **match: Any) -> dict[bool, dict[str, Any]]:
    """The best measured upper-bound record per compile setting (False: eager, True: compiled) for ``match``."""
    found: dict[bool, dict[str, Any]] = {}
    for record in ok(records, mode="upper_bound", **match):
        compiled = bool(record.get("compile"))
        if compiled not in found or record["images_per_second"] > found[compiled]["images_per_second"]:
            found[compiled] = record
    return found


def ceiling(records: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The bound a training setting is judged against: the compiled upper bound when one was measured, else the
    eager one (None when neither was)."""
    found = upper_bounds(records, **match)
    return found.get(True) or found.get(False)


def _shares(records: list[dict[str, Any]], trains: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """Each training setting's images/s as a share of the bound at its batch size, best first."""
    out = []
    for record in sorted(trains, key=lambda r: -r["images_per_second"]):
        bound = ceiling(records, batch_size=record["batch_size"], **match)
        if bound is None:
            continue
        out.append(
            {
                "setting": describe_setting(record),
                "compile": bool(record.get("compile")),
                "images_per_second": record["images_per_second"],
                "bound_images_per_second": bound["images_per_second"],
                "bound_compile": bool(bound.get("compile")),
                "share_percent": round(100.0 * record["images_per_second"] / bound["images_per_second"], 1),
            }
        )
    return out


def verdicts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict per (model, divnorm, device) that has an upper bound and at least one training setting.

    The best training setting is the fastest of any compile setting; it is judged against the compiled bound
    at its batch size when one was measured (see the module docstring), else the eager one.
    """
    out = []
    keys = sorted({(r["model"], r.get("divnorm"), r["device"]) for r in ok(records, mode="upper_bound")}, key=str)
    for model, divnorm, device in keys:
        match = {"model": model, "divnorm": divnorm, "device": device}
        trains = ok(records, mode="train", **match)
        best_train = _best(trains)
        if best_train is None:
            continue
        batch = best_train["batch_size"]
        bounds = upper_bounds(records, batch_size=batch, **match)
        upper = bounds.get(True) or bounds.get(False)
        if upper is None:
            continue
        eager_u = bounds[False]["images_per_second"] if False in bounds else None
        compiled_u = bounds[True]["images_per_second"] if True in bounds else None
        best_loader = _best(ok(records, mode="loader", device=device, batch_size=batch))
        u, t = upper["images_per_second"], best_train["images_per_second"]
        l_ips = best_loader["images_per_second"] if best_loader else None
        if l_ips is not None:
            bound = "loader-bound" if l_ips < u else "compute-bound"
        else:  # no loader-only measurement: judge by the training gap alone
            bound = "loader-bound" if t < CONTENTION_FRACTION * u else "compute-bound"
        note = ""
        if bound == "compute-bound" and t < CONTENTION_FRACTION * u:
            note = "the loader alone keeps up, but loading and the training step compete for the same cores"
        elif t > u / CONTENTION_FRACTION:
            note = (
                "training measured above its compute-only upper bound: the two were timed under different load "
                "(a shared or throttling machine); rerun when it is quiet"
            )
        elif bound == "loader-bound":
            note = "a faster loader setting (or more decode resources) would speed training up"
        out.append(
            {
                "model": model,
                "divnorm": divnorm,
                "device": device,
                "batch_size": batch,
                "verdict": bound,
                "note": note,
                "upper_bound_images_per_second": u,
                "upper_bound_compile": bool(upper.get("compile")),
                "eager_upper_bound_images_per_second": eager_u,
                "compiled_upper_bound_images_per_second": compiled_u,
                "compiled_over_eager": round(compiled_u / eager_u, 3) if compiled_u and eager_u else None,
                "best_train_images_per_second": t,
                "best_loader_images_per_second": l_ips,
                "best_loader_setting": describe_setting(best_loader) if best_loader else None,
                "best_setting": describe_setting(best_train),
                "best_setting_record": {k: best_train[k] for k in ("loader", "device", "workers", "batch_size")}
                | {"dali_device": best_train.get("dali_device"), "compile": bool(best_train.get("compile"))},
                "shares": _shares(records, trains, **match),
                # training measured above its own ceiling is noise between runs, not negative headroom
                "headroom_percent": round(max(0.0, 100.0 * (u / t - 1.0)), 1) if t > 0 else None,
            }
        )
    return out


def tuned_fragment(records: list[dict[str, Any]], dataset: str) -> dict[str, Any] | None:
    """The best measured setting as the trainer reads it: ``{"loader": ..., "data": {<data keys>}, "benchmark":
    {<where it came from>}}`` (train mode preferred over loader-only, a GPU over the CPU).

    Training settings are compared under the step the trainer will run by default (``training.compile=auto``:
    compiled on a GPU, eager on the CPU) when any was measured that way, since a loader fast enough for the eager
    step can be too slow for the compiled one; otherwise under whatever compile setting was measured.
    """
    for mode in ("train", "loader"):
        for device in ("gpu", "cpu"):
            candidates = [r for r in ok(records, mode=mode, device=device, dataset=dataset) if r["loader"] != RESIDENT]
            if mode == "train":
                as_trainer = [r for r in candidates if bool(r.get("compile")) == resolve_compile("auto", device)]
                candidates = as_trainer or candidates
            best = _best(candidates)
            if best is None:
                continue
            data: dict[str, Any] = {
                "loader": best["loader"],
                "workers": best["workers"],
                "batch_size": best["batch_size"],
            }
            if best.get("dali_device"):
                data["dali_device"] = best["dali_device"]
            # settings measured with --option keys (dali_decode, hw_decoder_load, ...) are tuned with them;
            # keys that only shrink the measurement (subset) are not settings to train with
            data.update({k: v for k, v in (best.get("options") or {}).items() if k not in MEASUREMENT_ONLY_OPTIONS})
            benchmark = {
                "device": device,
                "mode": mode,
                "model": best.get("model"),
                "compile": best.get("compile"),
                "resolution": best.get("resolution"),
                "images_per_second": best["images_per_second"],
            }
            return {"loader": best["loader"], "data": data, "benchmark": benchmark}
    return None


def write_tuned(path: Path, dataset: str, fragment: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """Merge ``fragment`` into the tuned file at ``path`` under the key ``dataset`` (other data sets are kept).

    The file is what ``python -m train ... --loader auto`` reads (``train/data.py``): ``{"<dataset>": {"loader":
    "<backend>", "data": {<data keys>}, "benchmark": {<provenance>}}, ...}``.
    """
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except ValueError:
            current = {}
    if not isinstance(current, dict):
        current = {}
    entry = {**fragment, "benchmark": {**fragment.get("benchmark", {}), **provenance}}
    tuned = {**current, dataset: entry}
    write_json(path, tuned)
    return tuned


# ------------------------------------------------------------------------------------------------ Markdown


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def format_ips(value: float | None) -> str:
    """Images/s as printed in the tables: thousands separated, one decimal below 100 (slow CPU training)."""
    if value is None:
        return "–"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def load_line(records: list[dict[str, Any]], cores: int) -> str:
    """How busy the machine was while timing: this benchmark's processes against the whole machine."""
    own = [r["cpu_percent"] for r in ok(records) if r.get("cpu_percent") is not None]
    total = [r["system_cpu_percent"] for r in ok(records) if r.get("system_cpu_percent") is not None]
    if not own or not total:
        return ""
    own_mean, total_mean = sum(own) / len(own), sum(total) / len(total)
    line = f"- Load while timing (mean over settings): benchmark {own_mean:.0f} %, whole machine {total_mean:.0f} %"
    line += f" of {100 * cores} % (100 % = one core)"
    if total_mean - own_mean > 50:
        line += "; other programs were using the CPU, so absolute numbers are low and noisy: compare within the run"
    return line


def _setting_row_key(r: dict[str, Any]) -> tuple:
    return (
        r["mode"],
        str(r.get("model")),
        str(r.get("divnorm")),
        bool(r.get("compile")),
        r["loader"],
        str(r.get("dali_device")),
        r["device"],
    )


def step_label(record: dict[str, Any]) -> str:
    """``compiled`` / ``compiled (max-autotune)`` / ``eager`` for a training record, empty for a loader one."""
    if record.get("mode") == "loader":
        return ""
    return compile_suffix(record).lstrip(", ") or "eager"


def pivot_tables(records: list[dict[str, Any]]) -> list[str]:
    """Per mode (and model): rows loader x device x workers, columns batch sizes, cells images/s."""
    lines: list[str] = []
    batches = sorted({r["batch_size"] for r in records})
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["mode"], r.get("model"), r.get("divnorm"), step_label(r))].append(r)
    order = {"loader": 0, "train": 1, "upper_bound": 2}
    for (mode, model, divnorm, step), rows in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 9), str(kv[0]))
    ):
        title = f"### images/s, mode `{mode}`" + (f", model `{model}`" if model else "")
        if divnorm and mode != "loader":
            title += f", divnorm `{divnorm}`"
        if step:
            title += f", {step}"
        lines += [title, "", "| loader | device | workers | " + " | ".join(f"batch {b}" for b in batches) + " |"]
        lines.append("|---|---|---:|" + "---:|" * len(batches))
        cells: dict[tuple, dict[int, str]] = defaultdict(dict)
        for r in rows:
            loader = loader_label(r)
            if r["status"] == "ok":
                text = f"{format_ips(r['images_per_second'])} ({format_ips(r.get('images_per_second_min'))}–"
                text += f"{format_ips(r.get('images_per_second_max'))})"
            else:
                text = r["status"]
            cells[(loader, r["device"], r["workers"])][r["batch_size"]] = text
        for (loader, device, workers), by_batch in sorted(cells.items(), key=lambda kv: str(kv[0])):
            row = [loader, device, str(workers)] + [by_batch.get(b, "") for b in batches]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def bound_table(records: list[dict[str, Any]]) -> list[str]:
    """Eager and compiled upper bounds side by side, per model, DN variant, device and batch size."""
    keys = sorted(
        {(r["model"], r.get("divnorm"), r["device"], r["batch_size"]) for r in ok(records, mode="upper_bound")},
        key=str,
    )
    if not keys:
        return []
    lines = [
        "## Upper bound: eager and compiled",
        "",
        "The compute-only ceiling (training steps on a fixed batch already on the device) with and without "
        "`torch.compile`; the verdict judges loaders against the compiled one where it was measured. Compile "
        "time is warm-up, outside the timed windows.",
        "",
        "| model | divnorm | device | batch | eager img/s | compiled img/s | compiled / eager | compile s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, divnorm, device, batch in keys:
        bounds = upper_bounds(records, model=model, divnorm=divnorm, device=device, batch_size=batch)
        eager, compiled = bounds.get(False), bounds.get(True)
        ratio = f"{compiled['images_per_second'] / eager['images_per_second']:.2f}x" if eager and compiled else "–"
        compiled_text = "–"
        if compiled:
            compiled_text = format_ips(compiled["images_per_second"])
            if compiled.get("compile_mode") not in (None, "default"):
                compiled_text += f" ({compiled['compile_mode']})"
        lines.append(
            f"| {model} | {divnorm} | {device} | {batch} | {format_ips(eager and eager['images_per_second'])} | "
            f"{compiled_text} | {ratio} | {_fmt(compiled and compiled.get('compile_seconds'), 1)} |"
        )
    return lines + [""]


def share_table(found: list[dict[str, Any]]) -> list[str]:
    """Every training setting's share of the bound it is judged against (compiled where measured)."""
    rows = [(v, share) for v in found for share in v.get("shares", [])]
    if not rows:
        return []
    lines = [
        "### Share of the upper bound per training setting",
        "",
        "| model | divnorm | setting | train img/s | bound img/s | bound | share |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for v, share in rows:
        bound = "compiled" if share["bound_compile"] else "eager"
        lines.append(
            f"| {v['model']} | {v['divnorm']} | {share['setting']} | {format_ips(share['images_per_second'])} | "
            f"{format_ips(share['bound_images_per_second'])} | {bound} | {_fmt(share['share_percent'], 1)} % |"
        )
    return lines + [""]


def markdown(result: dict[str, Any]) -> str:
    """results.md: command, machine, conversions, images/s tables, verdicts, details, skipped settings."""
    records = result["results"]
    machine = result["machine"]
    gpus = ", ".join(f"{g['name']} (driver {g['driver']})" for g in machine.get("gpus", [])) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in machine.get("libraries", {}).items() if v)
    git = machine.get("git", {})
    lines = [
        f"# Throughput: {result['dataset']} on {result['machine_name']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- Date (UTC): {result['finished']}{' — interrupted by Ctrl-C, partial' if result.get('interrupted') else ''}",
        f"- CPU: {machine['cpu_model']}, {machine['cpu_cores_logical']} logical cores, {machine['ram_gib']} GiB RAM",
        f"- GPU: {gpus}",
        f"- Libraries: {libs}",
        f"- Commit: {git.get('commit')}{' (with local changes)' if git.get('dirty') else ''}",
        f"- Timed: {result['settings']['seconds']} s per setting in {result['settings']['windows']} windows after "
        "warm-up; images/s = median over windows (min–max in brackets).",
    ]
    load = load_line(records, machine.get("cpu_cores_logical") or 1)
    lines += [load, ""] if load else [""]
    if result.get("conversions"):
        lines += [
            "## Conversions (timed apart from throughput)",
            "",
            "| format | status | seconds | out |",
            "|---|---|---:|---|",
        ]
        for c in result["conversions"]:
            lines.append(f"| {c['format']} | {c['status']} | {_fmt(c.get('seconds'), 1)} | `{c['out']}` |")
        lines.append("")
    lines += ["## Images/s per setting", ""] + pivot_tables(records)
    lines += bound_table(records)
    found = result.get("verdicts", [])
    if found:
        lines += ["## Verdict per model", ""]
        lines.append(
            "| model | divnorm | device | verdict | best setting | train img/s | loader-only img/s "
            "| upper bound img/s | headroom |"
        )
        lines.append("|---|---|---|---|---|---:|---:|---:|---:|")
        for v in found:
            # verdicts from before the compile axis carry no upper_bound_compile: their bound was eager
            bound = "compiled" if v.get("upper_bound_compile") else "eager"
            lines.append(
                f"| {v['model']} | {v['divnorm']} | {v['device']} | **{v['verdict']}** | {v['best_setting']} | "
                f"{format_ips(v['best_train_images_per_second'])} | {format_ips(v['best_loader_images_per_second'])} | "
                f"{format_ips(v['upper_bound_images_per_second'])} ({bound}) | {_fmt(v['headroom_percent'], 1)} % |"
            )
        lines.append("")
        notes = [f"- {v['model']} on {v['device']}: {v['verdict']}; {v['note']}." for v in found if v["note"]]
        lines += notes + ([""] if notes else []) + share_table(found)
    elif any(r["mode"] == "upper_bound" for r in records) and not any(r["mode"] == "train" for r in records):
        lines += [
            "## Verdict per model",
            "",
            "Upper-bound run: use `--mode both` for verdicts of loader settings against the bounds.",
            "",
        ]
    elif any(r["mode"] == "train" for r in records):
        lines += ["## Verdict per model", "", "No verdict: no training setting and upper bound both measured.", ""]
    else:
        lines += [
            "## Verdict per model",
            "",
            "Loader-only run: use `--mode both` for verdicts against the upper bound.",
            "",
        ]
    lines += gpu_time_table(records, describe_setting)
    if result.get("tuned"):
        lines += [
            "## Tuned setting",
            "",
            f"`{json.dumps(result['tuned'][result['dataset']]['data'])}` written to `{result['tuned_path']}` "
            "(read by `python -m train ... --loader auto`)",
            "",
        ]
    lines += ["## Details", ""]
    lines.append(
        "| mode | model | step | loader | device | workers | batch | img/s | p25–p75 | data wait % | CPU % "
        "| system CPU % | peak RSS MiB | build s | first batch s | warm-up s | GPU util % | GPU mem MiB |"
    )
    lines.append("|---|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(ok(records), key=_setting_row_key):
        loader = loader_label(r)
        cells = [r["mode"], r.get("model") or "", step_label(r), loader, r["device"], r["workers"], r["batch_size"]]
        cells += [format_ips(r["images_per_second"])]
        cells += [f"{format_ips(r.get('images_per_second_p25'))}–{format_ips(r.get('images_per_second_p75'))}"]
        cells += [_fmt(r.get("data_wait_percent"), 1)]
        cells += [_fmt(r.get(k)) for k in ("cpu_percent", "system_cpu_percent", "peak_rss_mib")]
        cells += [_fmt(r.get(k), 1) for k in ("build_seconds", "first_batch_seconds", "warmup_seconds")]
        cells += [_fmt(r.get(k)) for k in ("gpu_utilization_percent", "gpu_memory_allocated_mib")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    not_run = [r for r in records if r["status"] != "ok"]
    if not_run:
        lines += [
            "## Skipped or failed",
            "",
            "| mode | model | step | loader | device | workers | batch | status | reason |",
            "|---|---|---|---|---|---:|---:|---|---|",
        ]
        for r in sorted(not_run, key=_setting_row_key):
            reason = str(r.get("reason", "")).replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {r['mode']} | {r.get('model') or ''} | {step_label(r)} | {r['loader']} | {r['device']} | "
                f"{r['workers']} | "
                f"{r['batch_size']} | {r['status']} | {reason} |"
            )
        lines.append("")
    if result.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in result["plots"]] + [""]
    return "\n".join(lines)
