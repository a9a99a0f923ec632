"""Throughput profiler: images/s of every loader setting on this machine, the bottleneck named, the best chosen.

    python tools/benchmark.py --dataset imagenet|cifar100|synthetic --data PATH --loaders torch,dali,ffcv,gpu \
        --devices cpu,gpu --workers 1,2,4,8 --batch-sizes 64,256 --resolution 224 --model resnet50 \
        --mode loader|train|both|upper_bound --compile auto|on|off[,...] --compile-mode default \
        --seconds 20 --out benchmarks/<machine>/ [--tune]

Each setting runs in its own process (``tools/bench/runner.py``): a warm-up that is reported apart (DataLoader
worker start-up, DALI pipeline build, FFCV JIT compile, model compile), then ``--seconds`` of timed windows.
Settings that cannot run here (no GPU, backend not installed or not written) are recorded as ``skipped`` with
the reason. ``results.json`` is rewritten after every setting, so Ctrl-C (or a crash) keeps what was measured;
Ctrl-C also prints the table so far. The training modes follow the trainer's ``training.compile``: ``--compile
auto`` (default) compiles on a GPU and runs eager on the CPU; ``--compile off,on`` measures both, each its own
setting, and results.md sets the eager and compiled upper bounds side by side (the verdict uses the compiled one).
``--mode upper_bound`` measures only the fixed-batch bounds: no loader, so neither DALI nor FFCV is imported.
``--tune`` writes the best setting as the ``data`` config fragment that
``python -m train ... --loader auto`` reads. ``--make-sample-tree DIR`` builds the repeated ImageNet sample.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

from tools.bench import data as bench_data  # noqa: E402
from tools.bench.machine import describe_machine, machine_slug  # noqa: E402
from tools.bench.report import loader_label, markdown, tuned_fragment, verdicts, write_tuned  # noqa: E402
from tools.bench.settings import (  # noqa: E402
    COMPILE_CHOICES,
    COMPILE_MODES,
    RESIDENT,
    Setting,
    build_matrix,
    make_record,
)
from train.files import write_json_atomic as write_json  # noqa: E402
from train.files import write_text_atomic  # noqa: E402

INSTALL_HINT = {
    "dali": "bash tools/setup.sh, or .venv/bin/pip install 'nvidia-dali-cuda130==2.4.0'",
    "ffcv": "bash tools/setup.sh, or .venv/bin/pip install --no-deps -r requirements/lock-ffcv.txt",
}


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None

    return parse


def _option(text: str) -> tuple[str, str]:
    """``key=value`` for the data section, split only: :func:`validate` parses and checks the value as the trainer
    does (``train.config``: JSON values, else a string; the key's type, choices and range)."""
    key, equals, raw = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"--option takes key=value (e.g. subset=2000), got {text!r}")
    if not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} has no key before '=' (e.g. dali_decode=cpu)")
    return key.strip(), raw


def _variant(text: str) -> tuple[str | None, dict[str, str]]:
    """``[LOADER:]key=value[,key=value ...]``: one more setting of each loader (or of LOADER only) with these data
    keys on top of the ``--option`` ones, e.g. ``dali:dali_decode=cpu,dali_threads=15`` or ``loader_priority=low``."""
    loader, _, pairs = text.rpartition(":") if ":" in text.split("=", 1)[0] else ("", "", text)
    items = [part for part in pairs.replace(" ", ",").split(",") if part]
    if not items:
        raise argparse.ArgumentTypeError(f"--variant takes [LOADER:]key=value[,key=value], got {text!r}")
    parsed = {}
    for item in items:
        try:
            key, raw = _option(item)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(
                f"--variant {text!r}: {error} (expected [LOADER:]key=value[,key=value])"
            ) from None
        parsed[key] = raw
    return (loader.strip() or None), parsed


# data keys the benchmark sets itself, per setting: an --option / --variant of them would mislabel the measurement
FLAG_KEYS = {
    "batch_size": "--batch-sizes",
    "bz": "--batch-sizes",
    "workers": "--workers",
    "num_workers": "--workers",
    "loader": "--loaders",
    "dali_device": "--dali-devices",
    "image_size": "--resolution",
    "path": "--data",
}


def check_data_options(args: argparse.Namespace) -> None:
    """``--option`` / ``--variant`` values parsed and checked with the trainer's own override validation
    (:func:`train.config.check_value`: type, choices, range), in place; a bad one exits naming the item and the fix.
    Keys the benchmark sets through its own flags (batch size, workers, ...) are refused, naming the flag."""
    from train.config import ConfigError, check_value, defaults, parse_value

    data_defaults = defaults()["data"]
    given = [key for key, _ in args.option] + [key for _, variant in args.variant for key in variant]
    flagged = [key for key in dict.fromkeys(given) if key in FLAG_KEYS]
    if flagged:
        uses = ", ".join(f"{key}: use {FLAG_KEYS[key]}" for key in flagged)
        raise SystemExit(
            f"benchmark: --option / --variant cannot set {', '.join(flagged)}; the benchmark sets them per setting "
            f"({uses})"
        )
    unknown_keys = sorted({key for key in given if key not in data_defaults})
    if unknown_keys:
        raise SystemExit(
            f"benchmark: --option / --variant key(s) {', '.join(unknown_keys)} are not data keys of "
            "configs/defaults.json (e.g. dali_decode, hw_decoder_load, prefetch, loader_priority)"
        )

    def checked(flag: str, key: str, raw: str) -> Any:
        try:
            return check_value(f"data.{key}", parse_value(raw), data_defaults[key], f"{flag} {key}={raw}")
        except ConfigError as error:
            raise SystemExit(f"benchmark: {error}") from None

    args.option = [(key, checked("--option", key, raw)) for key, raw in args.option]
    args.variant = [
        (loader, {key: checked("--variant", key, raw) for key, raw in keys.items()}) for loader, keys in args.variant
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=["imagenet", "cifar100", "synthetic"], help="data set to read")
    p.add_argument("--data", help="source data set (ImageFolder root, CIFAR-100 root) or a tools/convert.py output")
    p.add_argument("--loaders", type=_csv(str), default=["torch", "dali", "ffcv", "gpu"], help="torch,dali,ffcv,gpu")
    p.add_argument("--devices", type=_csv(str), default=["cpu", "gpu"], help="training devices: cpu,gpu")
    p.add_argument("--workers", type=_csv(int), default=[1, 2], help="worker counts (DataLoader / DALI threads / FFCV)")
    p.add_argument("--batch-sizes", type=_csv(int), default=[64, 256])
    p.add_argument(
        "--resolution", type=int, default=None, help="image size (default: 32 synthetic/cifar100, 224 imagenet)"
    )
    p.add_argument(
        "--model", type=_csv(str), default=["resnet18"], help="model(s) for --mode train: alexnet,resnet18,..."
    )
    p.add_argument("--divnorm", type=_csv(str), default=["nonorm"], help="DN variant(s) of the model, e.g. nonorm,ours")
    p.add_argument(
        "--mode",
        choices=["loader", "train", "both", "upper_bound"],
        default="both",
        help="train brings each model's upper bound; upper_bound measures only the bounds (no loader)",
    )
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per setting (after warm-up)")
    p.add_argument("--windows", type=int, default=5, help="timed windows per setting (median and spread over them)")
    p.add_argument("--warmup-batches", type=int, default=10, help="loader mode: untimed batches before timing")
    p.add_argument("--warmup-steps", type=int, default=3, help="train modes: untimed steps before timing")
    p.add_argument("--warmup-seconds", type=float, default=2.0)
    p.add_argument(
        "--profile-steps",
        type=int,
        default=20,
        help="GPU training settings: steps profiled after the timing, for the GPU time per image of the step, the "
        "loader and the gaps (0: none)",
    )
    p.add_argument(
        "--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="auto: bf16 (fp16 on GPUs without bf16)"
    )
    p.add_argument(
        "--compile",
        type=_csv(str),
        default=["auto"],
        help="training modes: auto (compile on a GPU, eager on the CPU, as the trainer), on, off, or a list "
        "(off,on measures both); compile time counts as warm-up",
    )
    p.add_argument(
        "--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile mode of compiled settings"
    )
    p.add_argument(
        "--dali-devices", type=_csv(str), default=["auto"], help="DALI data.dali_device values: auto,cpu,gpu"
    )
    p.add_argument(
        "--option", type=_option, action="append", default=[], help="extra data key=value (e.g. subset=2000)"
    )
    p.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=[],
        metavar="[LOADER:]KEY=VALUE[,KEY=VALUE]",
        help="one more setting per loader (or per LOADER) with these data keys, measured in the same run as the "
        "plain setting, e.g. dali:dali_decode=cpu,dali_threads=15 or loader_priority=low (repeatable)",
    )
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/<machine>)")
    p.add_argument(
        "--tune",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write the best setting as a config fragment (default PATH: <out>/tuned.json)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache folder for conversions (default ~/.cache/divnorm-trainer/benchmark)",
    )
    p.add_argument("--setting-timeout", type=float, default=None, help="kill a setting after this many seconds")
    p.add_argument("--in-process", action="store_true", help="measure in this process (debugging; no hang protection)")
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    p.add_argument("--rebuild", action="store_true", help="rewrite results.md / plots / tuned from <out>/results.json")
    p.add_argument(
        "--make-sample-tree", type=Path, metavar="DIR", help="build the repeated ImageNet sample tree and exit"
    )
    p.add_argument("--copies", type=int, default=30, help="--make-sample-tree: copies of each sample image in train/")
    p.add_argument("--val-copies", type=int, default=2, help="--make-sample-tree: copies in val/")
    args = p.parse_args(argv)
    if args.make_sample_tree is None and args.dataset is None and not args.rebuild:  # --rebuild reads results.json's
        p.error("--dataset is required")
    return args


def validate(args: argparse.Namespace) -> None:
    """User mistakes in the matrix become one clear message naming the fix."""
    from loaders import list_backends

    unknown = [name for name in args.loaders if name not in list_backends()]
    if unknown:
        raise SystemExit(f"benchmark: unknown loader(s) {', '.join(unknown)}; choose from {', '.join(list_backends())}")
    bad_devices = [d for d in args.devices if d not in ("cpu", "gpu")]
    if bad_devices:
        raise SystemExit(f"benchmark: unknown device(s) {', '.join(bad_devices)}; choose from cpu, gpu")
    if any(w < 0 for w in args.workers) or any(b < 1 for b in args.batch_sizes):
        raise SystemExit("benchmark: --workers must be >= 0 and --batch-sizes >= 1")
    if args.seconds <= 0 or args.windows < 1 or args.profile_steps < 0:
        raise SystemExit("benchmark: --seconds must be > 0, --windows >= 1 and --profile-steps >= 0")
    bad_compile = [c for c in args.compile if c not in COMPILE_CHOICES]
    if bad_compile or not args.compile:
        raise SystemExit(
            f"benchmark: unknown --compile {', '.join(bad_compile) or '(empty)'}; choose from "
            f"{', '.join(COMPILE_CHOICES)} or a comma list (e.g. off,on)"
        )
    bad_dali = [d for d in args.dali_devices if d not in ("auto", "cpu", "gpu")]
    if bad_dali:
        raise SystemExit(f"benchmark: unknown --dali-devices {', '.join(bad_dali)}; choose from auto, cpu, gpu")
    if args.mode != "loader":
        try:
            from models import list_models
        except ImportError as error:
            raise SystemExit(
                f"benchmark: --mode {args.mode} needs the models package ({error}); use --mode loader"
            ) from None
        missing = [m for m in args.model if m not in list_models()]
        if missing:
            raise SystemExit(
                f"benchmark: unknown model(s) {', '.join(missing)}; choose from {', '.join(list_models())}"
            )
    check_data_options(args)
    stray = sorted({loader for loader, _ in args.variant if loader is not None and loader not in args.loaders})
    if stray:
        raise SystemExit(f"benchmark: --variant names loader(s) {', '.join(stray)} that --loaders does not measure")
    bench_data.check_data(args.dataset, args.data)


def why_unavailable(setting: Setting, cuda: bool, plan: bench_data.DataPlan) -> str | None:
    """The reason a setting cannot run here, found without starting it; None when it may run."""
    if setting.device == "gpu" and not cuda:
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    if setting.loader == RESIDENT:
        return None
    from loaders import BACKENDS, missing_package

    module = BACKENDS[setting.loader][0]
    if importlib.util.find_spec(module) is None:
        return f"backend module {module} is not in this checkout (not written yet)"
    package = missing_package(setting.loader)
    if package is not None:
        return f"{package} is not installed; install it with {INSTALL_HINT[setting.loader]}"
    return plan.unavailable.get(setting.loader)


def run_isolated(setting: Setting, timeout: float, workdir: Path, index: int) -> dict[str, Any]:
    """Measure ``setting`` in a child process (its own session, so a hang can be killed with its workers)."""
    setting_file, record_file, log_file = (
        workdir / f"{index:03d}.{ext}" for ext in ("setting.json", "record.json", "log")
    )
    setting_file.write_text(json.dumps(setting.to_json()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log_file, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "tools.bench.runner", str(setting_file), str(record_file)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(child)
            return make_record(setting, "failed", f"no result after {timeout:.0f} s (a hung worker?); log: {log_file}")
        except BaseException:  # Ctrl-C: take the child and its workers down with us
            _kill(child)
            raise
    if record_file.is_file():
        return json.loads(record_file.read_text())
    tail = " | ".join(log_file.read_text(errors="replace").strip().splitlines()[-3:])
    return make_record(setting, "failed", f"the setting's process exited {child.returncode}: {tail}")


def _kill(child: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def summary_line(record: dict[str, Any]) -> str:
    name = f"{record['mode']:<11} {record.get('model') or '':<9} {record['loader']:<8} {record['device']} "
    name += f"w{record['workers']} b{record['batch_size']}"
    options = loader_label(record).partition(" ")[2]  # the --option / --variant keys it ran with
    name += f" {options}" if options else ""
    if record.get("compile"):
        name += f" compiled({record.get('compile_mode')})"
    if record["status"] != "ok":
        return f"{name}: {record['status']} ({record['reason']})"
    return (
        f"{name}: {record['images_per_second']:,.0f} img/s ({record['images_per_second_min']:,.0f}–"
        f"{record['images_per_second_max']:,.0f}), cpu {record.get('cpu_percent')} %, "
        f"rss {record.get('peak_rss_mib')} MiB, warm-up {record.get('warmup_seconds')} s"
    )


def finish(result: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Verdicts, tuned fragment, results.json / results.md / plots (all atomic)."""
    from tools.bench.plots import write_plots

    records = result["results"]
    result["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    result["verdicts"] = verdicts(records)
    if args.tune is not None:
        fragment = tuned_fragment(records, args.dataset)
        if fragment is None:
            print("benchmark: --tune: no setting was measured, nothing written", file=sys.stderr)
        else:
            path = Path(args.tune) if args.tune else out / "tuned.json"
            provenance = {
                "measured": result["finished"],
                "results": str(out / "results.json"),
                "machine": result["machine_name"],
            }
            result["tuned"] = write_tuned(path, args.dataset, fragment, provenance)
            result["tuned_path"] = str(path)
    result["plots"] = write_plots(records, out)
    write_json(out / "results.json", result)
    write_text_atomic(out / "results.md", markdown(result))


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (one line on stderr, nothing measured or written; as the trainer and the other
    tools), 130 interrupted (what was measured is written)."""
    try:
        return _main(argv)
    except SystemExit as stop:
        if not isinstance(stop.code, str):  # argparse (already exit 2 for bad flags), --help
            raise
        print(stop.code, file=sys.stderr)  # a user mistake raised as SystemExit("benchmark: ...")
        return 2


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_sample_tree is not None:
        train, val = bench_data.make_sample_tree(args.make_sample_tree, args.copies, val_copies=args.val_copies)
        print(f"benchmark: {args.make_sample_tree}: {train} train and {val} val images")
        return 0
    if args.rebuild:  # after a crash or an edit of the report code: no measurement
        out = args.out or REPO / "benchmarks" / machine_slug()
        if not (out / "results.json").is_file():
            raise SystemExit(f"benchmark: --rebuild needs {out / 'results.json'}; pass --out")
        result = json.loads((out / "results.json").read_text())
        args.dataset = result["dataset"]
        finish(result, out, args)
        print(f"benchmark: rebuilt {out / 'results.md'} and {len(result['plots'])} plot(s) from {out / 'results.json'}")
        return 0
    validate(args)
    import torch

    cuda = torch.cuda.is_available()
    modes = ["loader", "train"] if args.mode == "both" else [args.mode]
    loaders = [] if modes == ["upper_bound"] else args.loaders  # the bounds read no data: no loader, no conversion
    common = {
        "resolution": args.resolution,
        "seconds": args.seconds,
        "windows": args.windows,
        "warmup_batches": args.warmup_batches,
        "warmup_steps": args.warmup_steps,
        "warmup_seconds": args.warmup_seconds,
        "profile_steps": args.profile_steps,
        "amp": args.amp,
        "compile_mode": args.compile_mode,
        "options": dict(args.option),
    }
    settings = build_matrix(
        dataset=args.dataset,
        loaders=loaders,
        devices=args.devices,
        workers=args.workers,
        batch_sizes=args.batch_sizes,
        modes=modes,
        models=args.model if modes != ["loader"] else [],
        divnorms=args.divnorm,
        dali_devices=args.dali_devices,
        common=common,
        compiles=args.compile,
        option_sets=args.variant,
    )
    if args.list:
        for s in settings:
            line = f"{s.mode:<11} {s.model or '':<9} {s.divnorm if s.mode != 'loader' else '':<7} {s.label}"
            print(" ".join([line, *(f"{k}={v}" for k, v in s.options.items())]))
        return 0
    out = args.out or REPO / "benchmarks" / machine_slug()
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": shlex.join(["python", "tools/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
        "dataset": args.dataset,
        "machine_name": machine_slug(),
        "machine": describe_machine(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {
            "seconds": args.seconds,
            "windows": args.windows,
            "warmup_batches": args.warmup_batches,
            "warmup_seconds": args.warmup_seconds,
            "isolated": not args.in_process,
        },
        "conversions": [],
        "interrupted": False,
        "results": [],
    }
    timeout = args.setting_timeout or max(300.0, 3 * args.seconds + 240)
    try:
        plan = bench_data.prepare_data(args.dataset, args.data, loaders, args.cache)
        result["conversions"] = plan.conversions
        with tempfile.TemporaryDirectory(prefix="divnorm-bench-") as workdir:
            for index, setting in enumerate(settings):
                if setting.loader != RESIDENT:
                    setting = Setting.from_json({**setting.to_json(), "data_dir": plan.data_dirs.get(setting.loader)})
                reason = why_unavailable(setting, cuda, plan)
                started = time.perf_counter()
                if reason is not None:
                    record = make_record(setting, "skipped", reason)
                elif args.in_process:
                    from tools.bench.runner import run_setting

                    record = run_setting(setting)
                else:
                    record = run_isolated(setting, timeout, Path(workdir), index)
                record["wall_seconds"] = round(time.perf_counter() - started, 2)
                result["results"].append(record)
                print(f"[{index + 1}/{len(settings)}] {summary_line(record)}", flush=True)
                write_json(out / "results.json", result)  # partial results survive a crash or Ctrl-C
    except KeyboardInterrupt:
        result["interrupted"] = True
        done = len(result["results"])
        for setting in settings[done:]:
            result["results"].append(make_record(setting, "skipped", "interrupted (Ctrl-C) before this setting ran"))
        print(
            f"\nbenchmark: interrupted after {done} of {len(settings)} settings; writing what was measured",
            file=sys.stderr,
        )
    finish(result, out, args)
    if result["interrupted"]:
        print(markdown(result))
    for v in result["verdicts"]:
        print(f"verdict {v['model']} on {v['device']}: {v['verdict']}, best {v['best_setting']}, ", end="")
        print(f"headroom {v['headroom_percent']} %")
    print(f"benchmark: wrote {out / 'results.json'}, {out / 'results.md'} and {len(result['plots'])} plot(s)")
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
