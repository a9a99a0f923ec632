"""``python -m train.study [dataset] [key=value ...]``: the DN papers' comparison grid in one command.

Trains AlexNet x {no DN (``nonorm``), ``ours``, ``ken``} x {BatchNorm on, off} x 3 seeds with the data set's recipe
(``configs/<dataset>/alexnet.json``; for CIFAR-100 the original's batch 128, 90 epochs, SGD lr 0.05, steplr 30 /
0.1), then writes one report with mean +- sample std of val / test top-1 per variant beside the Gini sparsity.

Every run is an ordinary ``python -m train <dataset> alexnet <study>/<variant>/seed<seed> ...`` run in its own
process, its folder ``<logging.runs_dir>/<study>/<variant>/seed<seed>/``, its output in
``<study>/logs/<variant>-seed<seed>.log``. Running the same command again continues the study: a run with
``summary.json`` is finished and skipped, a run with ``last.pt`` continues with ``--resume``, any other leftover
folder starts again (``--overwrite``). A finished or stopped run whose ``config.json`` differs from what the command
gives it now (apart from the ``logging`` and ``checkpoint`` sections and the epochs) is refused (exit 2), naming
the run and the keys. ``--parallel N`` keeps N runs going at once (the default 1 runs them one after
another). At the end: ``<study>/report/`` (:mod:`train.report`, runs grouped by seed) and ``<study>/study.json``
(the grid, each run's command, state and wall time, the study's wall time).

A run the study saw finish loses its ``last.pt`` (AlexNet: 458 MB of weights and momentum, 18 runs 8 GB; only
needed to continue training) unless ``--keep-last``; ``best.pt`` stays for the report.

Exit codes: 0 every run finished, 1 some run failed (named with its log; the report covers the rest), 2 bad input
(nothing started, or a run exited 2 and the rest were not started), 130 interrupted (run the same command again to
continue).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.config import (
    DATASETS,
    MODELS,
    ConfigError,
    defaults,
    flatten,
    load_config,
    option_overrides,
    parse_override,
)

DN_TYPES = ("nonorm", "ours", "ken")
BATCHNORM = {"on": True, "off": False}
# keys the grid sets for every run: an override of them would silently collapse the grid
GRID_KEYS = {
    "seed": "--first-seed / --seeds",
    "runs": "--seeds (the study repeats runs itself)",
    "model.divnorm_specs.type": "--dn",
    "model.batchnorm": "--batchnorm",
}
# config keys a run's results do not depend on (where files go, progress output, checkpoint saving), and the planned
# epochs, which only note a difference (see main): a kept run that differs in other keys is refused (see plan)
RESULT_NEUTRAL_SECTIONS = ("logging.", "checkpoint.")
EPOCHS_KEY = "training.epochs"


@dataclass
class StudyRun:
    """One run of the grid: its variant, seed, experiment name, folder and ``python -m train`` arguments."""

    variant: str
    seed: int
    exp: str
    folder: Path
    log_path: Path
    arguments: list[str]
    state: str = "new"  # new | done | resume | restart
    result: str = "pending"  # pending | skipped | finished | failed
    seconds: float | None = None
    returncode: int | None = None
    epochs: int = 0  # planned epochs per run
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # the resolved config this command gives it
    process: Any = field(default=None, repr=False)
    log_file: Any = field(default=None, repr=False)
    started: float = 0.0

    def command(self) -> list[str]:
        """The ``python -m train`` command line of this run in its present state."""
        extra = {"resume": ["--resume"], "restart": ["--overwrite"]}.get(self.state, [])
        return [sys.executable, "-m", "train", *self.arguments, *extra]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.study",
        description="AlexNet x {nonorm, ours, ken} x {BatchNorm on, off} x seeds, then one report (mean ± std).",
        epilog="example: python -m train.study cifar100 --data-dir data --seeds 3   "
        "(check: python -m train.study synthetic --device cpu --epochs 1 data.subset=512 data.image_size=16)",
    )
    parser.add_argument("dataset", nargs="?", default="cifar100", help="cifar100 (default), synthetic, imagenet")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides passed to every run")
    parser.add_argument("--name", metavar="STUDY", help="study folder under logging.runs_dir (default dn-<dataset>)")
    parser.add_argument("--model", default="alexnet", choices=MODELS, help="network (default alexnet)")
    parser.add_argument("--dn", default=",".join(DN_TYPES), help="DN types, comma-separated (default nonorm,ours,ken)")
    parser.add_argument("--batchnorm", default="on,off", help="BatchNorm settings: on,off (default both)")
    parser.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per variant (default 3)")
    parser.add_argument("--first-seed", type=int, metavar="S", help="seeds S, S+1, ... (default: the config's seed)")
    parser.add_argument("--epochs", type=int, metavar="N", help="epochs per run (default: the recipe's)")
    parser.add_argument("--data-dir", metavar="PATH", help="data set root (sets data.path; CIFAR-100: the parent "
                        "of cifar-100-python/)")  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), help="training device (default: cuda if present)")
    parser.add_argument("--loader", default="gpu", help="data backend of every run (default gpu: tensor-resident)")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="training processes at a time (default 1; whether N > 1 is faster on one GPU is not measured yet)",
    )
    parser.add_argument("--report-batch", type=int, default=64, metavar="N", help="sparsity batch (default 64)")
    parser.add_argument("--keep-last", action="store_true", help="keep finished runs' last.pt (default: removed)")
    parser.add_argument("--dry-run", action="store_true", help="print each run's command and state, run nothing")
    return parser


def _choices(text: str, valid: dict[str, Any] | tuple[str, ...], option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in valid]
    if bad or not items:
        raise ConfigError(f"{option} {text!r}: choose from {', '.join(valid)} (comma-separated)")
    return list(dict.fromkeys(items))


def plan(args: argparse.Namespace) -> tuple[Path, list[StudyRun]]:
    """The study folder and its runs (seed-major: a stopped study has every variant of the first seeds)."""
    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    for item in args.overrides:
        key, _value = parse_override(item)
        if key in GRID_KEYS:
            raise ConfigError(f"{item!r}: the study sets {key} for every run; use {GRID_KEYS[key]}")
    if args.seeds < 1 or args.parallel < 1 or args.report_batch < 1:
        raise ConfigError("--seeds, --parallel and --report-batch must be >= 1")
    dns = _choices(args.dn, DN_TYPES, "--dn")
    norms = _choices(args.batchnorm, BATCHNORM, "--batchnorm")
    common = list(args.overrides) + ["runs=1"]
    common += option_overrides(loader=args.loader, data_dir=args.data_dir, device=args.device, epochs=args.epochs)
    variants = {}
    for norm in norms:
        for dn in dns:
            grid = [f"model.divnorm_specs.type={dn}", f"model.batchnorm={str(BATCHNORM[norm]).lower()}"]
            config = load_config(args.dataset, args.model, common + grid)  # a bad key fails here, nothing started
            variants[f"{dn}-{'bn' if BATCHNORM[norm] else 'nobn'}"] = (grid, config)
    config = next(iter(variants.values()))[1]
    first_seed = int(config["seed"]) if args.first_seed is None else args.first_seed
    name = args.name or f"dn-{args.dataset}"
    root = Path(config["logging"]["runs_dir"]) / name
    # what each run's config.json will record: the loader as the trainer resolves it (auto -> the tuned setting)
    resolved = {variant: _resolved_loader(args.dataset, config) for variant, (_, config) in variants.items()}
    runs = []
    for seed in range(first_seed, first_seed + args.seeds):
        for variant, (grid, variant_config) in variants.items():
            exp = f"{name}/{variant}/seed{seed}"
            arguments = [args.dataset, args.model, exp, *common, *grid, f"seed={seed}"]
            log_path = root / "logs" / f"{variant}-seed{seed}.log"
            folder = root / variant / f"seed{seed}"
            epochs = int(variant_config["training"]["epochs"])
            run = StudyRun(variant, seed, exp, folder, log_path, arguments, epochs=epochs)
            run.config = {**resolved[variant], "seed": seed}
            runs.append(run)
    for run in runs:
        if (run.folder / "summary.json").is_file():
            run.state = "done"
        elif (run.folder / "last.pt").is_file():
            run.state = "resume"
        elif run.folder.exists() and any(run.folder.iterdir()):
            run.state = "restart"  # stopped before its first checkpoint: nothing to continue from
    check_kept_runs(runs, name)
    return root, runs


def _resolved_loader(dataset: str, config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``data.loader`` resolved as the trainer resolves it before writing config.json
    (``auto`` -> the tuned backend and its settings, ``data.gpu``), so a kept run compares like with like."""
    from train.data import resolve_loader_name

    resolved = copy.deepcopy(config)
    resolve_loader_name(resolved, dataset, lambda _message: None)
    return resolved


def config_differences(folder: Path, config: dict[str, Any]) -> list[tuple[str, Any, Any]] | None:
    """``(key, value in the run's config.json, value now)`` for every key whose value changes results; ``None`` when
    ``config.json`` cannot be read. Keys the run's (older) config.json lacks count at their default, as
    ``--resume`` reads them; :data:`RESULT_NEUTRAL_SECTIONS` and the epochs are left out."""
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    saved.pop("run", None)
    before, base = flatten(saved), flatten(defaults())
    return [
        (key, before.get(key, base.get(key)), value)
        for key, value in flatten(config).items()
        if key != EPOCHS_KEY and not key.startswith(RESULT_NEUTRAL_SECTIONS) and before.get(key, base.get(key)) != value
    ]


def check_kept_runs(runs: list[StudyRun], name: str) -> None:
    """A run the study would keep (finished: skipped) or continue (``--resume``) must have been started with the
    config this command gives it; else the report would show numbers of another config under this command (a
    finished run), or one run would train half with each config (a resumed one). Refused with one line naming the
    first such run, its differing keys and how to proceed; nothing is started or written."""
    stale = []
    for run in runs:
        if run.state not in ("done", "resume"):
            continue
        differences = config_differences(run.folder, run.config)
        if differences is None:
            stale.append((run, f"its {run.folder / 'config.json'} cannot be read"))
        elif differences:
            shown = ", ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, old, new in differences[:4])
            more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
            stale.append((run, f"config differs from this command's: {shown}{more}"))
    if stale:
        run, why = stale[0]
        others = f" (and {len(stale) - 1} more run(s) alike)" if len(stale) > 1 else ""
        kind = "finished" if run.state == "done" else "stopped"
        raise ConfigError(
            f"{kind} run {run.exp}: {why}{others}; pass a new --name (a study other than {name}) to train these "
            f"settings, or delete {run.folder} to train that run again"
        )


def _start(run: StudyRun, stream: bool, threads: int | None) -> None:
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # epoch lines as they happen, not when a pipe buffer fills
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    # appended (an interrupted run's earlier output stays); closed by _finish, which outlives this function
    log = run.log_file = open(run.log_path, "a")  # noqa: SIM115
    log.write(f"$ {shlex.join(run.command())}\n")
    log.flush()
    run.started = time.perf_counter()
    output = subprocess.PIPE if stream else log
    run.process = subprocess.Popen(run.command(), stdout=output, stderr=subprocess.STDOUT, text=True, env=env)
    if stream:  # one run at a time: its lines go to the console and the log file alike
        for line in run.process.stdout:
            sys.stdout.write(line)
            log.write(line)
        run.process.wait()


def _finish(run: StudyRun, say, keep_last: bool = True) -> None:
    run.returncode = run.process.returncode
    run.seconds = time.perf_counter() - run.started
    run.log_file.close()
    run.process = run.log_file = None
    ok = run.returncode == 0 and (run.folder / "summary.json").is_file()
    run.result = "finished" if ok else "failed"
    if ok and not keep_last:
        (run.folder / "last.pt").unlink(missing_ok=True)
    say(f"study: {run.exp} {run.result} (exit {run.returncode}) in {run.seconds:.1f} s; log {run.log_path}")


def execute(runs: list[StudyRun], parallel: int, device: str | None, keep_last: bool = True, say=print) -> None:
    """Run every unfinished run, ``parallel`` at a time; each run's result and wall time land on its StudyRun."""
    todo = []
    for run in runs:
        if run.state == "done":
            run.result = "skipped"
        else:
            todo.append(run)
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 and device == "cpu" else None
    active: list[StudyRun] = []
    try:
        while todo or active:
            while todo and len(active) < parallel:
                run = todo.pop(0)
                say(f"study: starting {run.exp} ({run.state}); {len(todo)} waiting")
                _start(run, stream=parallel == 1, threads=threads)
                active.append(run)
            for run in [r for r in active if r.process.poll() is not None]:
                _finish(run, say, keep_last)
                active.remove(run)
                if run.returncode == 2 and todo:  # a user mistake (e.g. no data set): every other run would repeat it
                    say(f"study: {run.exp} exited 2 (bad input, see its log): not starting the {len(todo)} other runs")
                    todo.clear()
            if active:
                time.sleep(0.5)
    except KeyboardInterrupt:
        for run in active:  # the runs got the same Ctrl-C: let them write their last checkpoint
            if run.process is not None:
                run.process.wait()
        raise


def report_folders(runs: list[StudyRun]) -> list[str]:
    """Run folders to report, variant by variant (the first variant, no DN with BatchNorm by default, is the
    baseline), seeds in order; runs that never wrote a folder are left out."""
    order = list(dict.fromkeys(run.variant for run in runs))
    ranked = sorted(runs, key=lambda run: (order.index(run.variant), run.seed))
    return [
        str(r.folder) for r in ranked if (r.folder / "config.json").is_file() and (r.folder / "metrics.jsonl").is_file()
    ]


def write_study_json(
    root: Path, args: argparse.Namespace, runs: list[StudyRun], wall: float, report_seconds: float | None = None
) -> dict[str, Any]:
    """``<study>/study.json``: the grid, every run's command, state, result and wall time, the study's wall time."""
    from train.files import write_json_atomic

    record = {
        "dataset": args.dataset,
        "model": args.model,
        "dn": args.dn.split(","),
        "batchnorm": args.batchnorm.split(","),
        "seeds": sorted({run.seed for run in runs}),
        "parallel": args.parallel,
        "wall_seconds": wall,
        "report_seconds": report_seconds,
        "runs": [
            {
                "exp": run.exp,
                "variant": run.variant,
                "seed": run.seed,
                "state": run.state,
                "result": run.result,
                "returncode": run.returncode,
                "seconds": run.seconds,
                "command": shlex.join(run.command()),
                "log": str(run.log_path),
            }
            for run in runs
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "study.json", record)
    return record


def _planned_epochs(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "summary.json").read_text())["epochs_planned"])
    except (ValueError, KeyError, TypeError):
        return None


def _summary_lines(groups: list[dict[str, Any]]) -> list[str]:
    from train.report_groups import format_stat

    return [
        f"  {g['group']}: val top-1 {format_stat(g['val']['top1'])}, test top-1 {format_stat(g['test']['top1'])}, "
        f"Gini {format_stat(g['gini'], 4)}"
        for g in groups
    ]


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_intermixed_args(argv)
    if "=" in args.dataset:  # python -m train.study key=value ...: the data set left at its default
        args.overrides.insert(0, args.dataset)
        args.dataset = "cifar100"
    try:
        root, runs = plan(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in runs:
            note = {"done": "# finished: skipped", "resume": "# continues", "restart": "# starts again"}
            print(f"{shlex.join(run.command())}  {note.get(run.state, '')}".rstrip())
        print(f"# then: python -m train.report <the {len(runs)} run folders> --group-seeds --out {root / 'report'}")
        return 0
    for run in runs:
        if run.state == "done":
            planned = _planned_epochs(run.folder)
            if planned is not None and planned != run.epochs:
                print(f"study: note: {run.exp} finished with {planned} epochs planned, not {run.epochs}: kept as is "
                      "(another --name trains the study afresh)")  # fmt: skip
    waiting = sum(run.state != "done" for run in runs)
    print(f"study: {len(runs)} runs in {root} ({len(runs) - waiting} finished already), {args.parallel} at a time")
    try:
        execute(runs, args.parallel, args.device, args.keep_last)
    except KeyboardInterrupt:
        write_study_json(root, args, runs, time.perf_counter() - started)
        print("interrupted: run the same command again to continue the study", file=sys.stderr)
        return 130
    write_study_json(root, args, runs, time.perf_counter() - started)  # the runs' record, should the report fail
    folders = report_folders(runs)
    failed = [run for run in runs if run.result == "failed"]
    report_started = time.perf_counter()
    if folders:
        from train.report import build_report
        from train.report_analysis import ReportError

        try:
            result = build_report(folders, root / "report", args.report_batch, group_seeds=True)
        except ReportError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print("\n".join(["study: mean ± sample std (n) over seeds:", *_summary_lines(result.get("groups", []))]))
    wall = time.perf_counter() - started
    write_study_json(root, args, runs, wall, time.perf_counter() - report_started)
    complete = sum(run.result in ("finished", "skipped") for run in runs)
    print(f"study: {complete}/{len(runs)} runs finished, {wall:.1f} s wall; {root / 'study.json'}")
    for run in failed:
        print(f"error: {run.exp} failed (exit {run.returncode}); see {run.log_path}", file=sys.stderr)
    if any(run.result == "pending" for run in runs):
        return 2  # stopped after a run's bad-input exit; the same command continues once the input is fixed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
