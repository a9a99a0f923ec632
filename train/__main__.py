"""``python -m train``: the command line (see :func:`build_parser` for every option).

With no arguments it runs the embedded default job (the README's main job): the built-in synthetic data set
with a divisive-normalization AlexNet, a few minutes on two CPU cores, results in ``runs/default/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

START = time.perf_counter()  # wall time counts from here (start-up included)
_UNCLAIMED_START = [START]  # only the first main() of a process counts from import; later calls from their own start

from train.config import (  # noqa: E402
    DATASETS,
    MODELS,
    ConfigError,
    apply_overrides,
    defaults,
    load_config,
    merge,
    option_overrides,
)

LOADERS = ("torch", "dali", "ffcv", "gpu", "auto")
DEFAULT_JOB = ("synthetic", "alexnet", "default")
# The default job: a DN AlexNet on 3,000 synthetic training images at 16 px for 2 epochs (validation and test on
# the full 2,000-image splits), sized to finish on two CPU cores in well under 3 minutes; see the README.
DEFAULT_OVERRIDES = (
    "model.divnorm_specs.type=ours",
    "data.loader=gpu",
    "data.subset=3000",
    "data.image_size=16",
    "training.epochs=2",
)

EPILOG = f"""\
datasets: {", ".join(DATASETS)}   (synthetic: built in, 100 classes of 32x32, no download)
models:   {", ".join(MODELS)}
loaders:  torch (torchvision DataLoader workers), dali (NVIDIA DALI; GPU or CPU), ffcv (FFCV .beton),
          gpu (whole data set resident on the device; synthetic/cifar100), auto (tuned by tools/benchmark.py)

overrides: key=value with nested keys joined by '-' (the original's syntax) or '.', values parsed as JSON:
  python -m train imagenet alexnet exp1 model-relu=false model-divnorm_specs-type=ours --data-dir /data/imagenet
  python -m train cifar100 resnet18 r18 optimizer.lr=0.1 lr_scheduler.name=cosine training.amp=bf16 --download
  python -m train synthetic alexnet quick data.subset=2000 --epochs 2 --loader gpu
Config files: configs/defaults.json (every key) + configs/<dataset>/<model>.json. Outputs: runs/<exp>/.
Several GPUs / nodes: torchrun --nproc_per_node=N -m train <dataset> <model> <exp> ...
With no arguments: the default job, i.e. python -m train {" ".join(DEFAULT_JOB)} {" ".join(DEFAULT_OVERRIDES)}
  (writes runs/default/summary.json).
Exit codes: 0 done, 1 checkpoint write failed, 2 bad command/config/data, 130 Ctrl-C,
  3 preempted: SIGTERM or SIGUSR1 saved the position in last.pt; rerun with --resume (docs/preemption.md).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a CNN with divisive normalization; results in runs/<exp>/.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", nargs="?", help=f"data set: {', '.join(DATASETS)}")
    parser.add_argument("model", nargs="?", help=f"network: {', '.join(MODELS)}")
    parser.add_argument("exp", nargs="?", help="experiment name: the run folder is runs/<exp>/")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. model-divnorm_specs-type=ours or optimizer.lr=0.1",
    )
    parser.add_argument(
        "--loader",
        choices=LOADERS,
        help="data backend (default: the config's data.loader); auto reads "
        "benchmarks/<machine>/tuned.json or data.tuned_path",
    )
    parser.add_argument(
        "--data-dir",
        metavar="PATH",
        help="data set root or converted folder (sets data.path): CIFAR-100 parent of "
        "cifar-100-python/, ImageNet root with train/ and val/, or tools/convert.py output",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="training device (default: cuda if present)")
    parser.add_argument("--epochs", type=int, metavar="N", help="number of epochs (sets training.epochs)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue runs/<exp>/ from last.pt with its saved config (overrides still apply)",
    )
    parser.add_argument("--overwrite", action="store_true", help="start runs/<exp>/ afresh if it exists")
    parser.add_argument("--download", action="store_true", help="download CIFAR-100 if missing (needs internet)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def resolve(args: argparse.Namespace) -> tuple[str, str, str, dict, bool]:
    """(dataset, model, exp, resolved config, overwrite) from the parsed arguments."""
    positional = [args.dataset, args.model, args.exp]
    overwrite = args.overwrite
    if not any(positional) and not args.overrides:
        dataset, model, exp = DEFAULT_JOB
        args.overrides = list(DEFAULT_OVERRIDES)
        print(f"default job: python -m train {' '.join(DEFAULT_JOB)} {' '.join(DEFAULT_OVERRIDES)}", flush=True)
        overwrite = overwrite or not args.resume  # the default job is meant to be re-run as is
    elif not all(positional) or any("=" in p for p in positional):
        raise ConfigError("give <dataset> <model> <exp> before any key=value (see python -m train --help)")
    else:
        dataset, model, exp = positional
    cli = list(args.overrides)
    cli += option_overrides(loader=args.loader, data_dir=args.data_dir, device=args.device, epochs=args.epochs)
    if args.resume:
        runs_dir = load_config(dataset, model, cli)["logging"]["runs_dir"]  # where the run folder is
        config = _saved_config(Path(runs_dir) / exp, dataset, model)
        apply_overrides(config, cli, defaults())
    else:
        config = load_config(dataset, model, cli)
    return dataset, model, exp, config, overwrite


def _saved_config(folder: Path, dataset: str, model: str) -> dict:
    """The config a run was started with (for --resume), checked against the dataset/model asked for."""
    path = folder / "config.json"
    if not (folder / "last.pt").is_file() or not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {folder / 'last.pt'}; start the run without --resume")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--resume: {path} is not readable JSON ({error}); the run cannot be resumed") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} holds a {type(saved).__name__}, not a run's config")
    meta = saved.pop("run", {})
    if meta and (meta.get("dataset"), meta.get("model")) != (dataset, model):
        raise ConfigError(
            f"--resume: {folder} was a {meta.get('dataset')} / {meta.get('model')} run, not {dataset} / {model}"
        )
    config = copy.deepcopy(defaults())
    merge(config, saved, defaults(), f"from {path}")
    return config


def main(argv: list[str] | None = None) -> int:
    started = _UNCLAIMED_START.pop() if _UNCLAIMED_START else time.perf_counter()
    args = build_parser().parse_intermixed_args(argv)
    try:
        dataset, model, exp, config, overwrite = resolve(args)
        if args.print_config:
            print(json.dumps(config, indent=2))
            return 0
        from loaders.base import LoaderError
        from train.checkpoint import CheckpointError, CheckpointWriteError
        from train.files import OutputLockedError
        from train.preempt import EXIT_PREEMPTED, Preempted
        from train.run import RunRequest, run
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    runs = max(int(config["runs"]), 1)
    try:
        # one process per run folder; a second one stops here, naming the first one's pid
        with run_folder_lock(Path(config["logging"]["runs_dir"]) / exp):
            for index in range(runs):
                run_config = copy.deepcopy(config)
                run_exp = exp
                if runs > 1:  # the original's "runs": repeats with seeds seed, seed+1, ... in runs/<exp>/run<i>/
                    run_config["seed"] = config["seed"] + index
                    run_exp = f"{exp}/run{index}"
                request = RunRequest(
                    dataset,
                    model,
                    run_exp,
                    run_config,
                    resume=args.resume,
                    overwrite=overwrite,
                    download=args.download,
                    start_time=started if index == 0 else time.perf_counter(),
                )
                run(request)
    except (ConfigError, LoaderError, CheckpointError, OutputLockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except CheckpointWriteError as error:  # the machine's fault, not the command's: exit 1
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Preempted as error:  # a signal asked the run to stop: requeue it and continue with --resume
        print(f"preempted: {error}; {error.hint} (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted: the run folder holds the last saved checkpoint; continue with --resume", file=sys.stderr)
        return 130
    return 0


def run_folder_lock(folder: Path) -> contextlib.AbstractContextManager:
    """One training per run folder: an exclusive lock on ``<runs_dir>/.<exp>.lock`` beside ``folder``.

    Only the process with ``RANK`` 0 (torchrun's global rank; a plain run is rank 0) takes it: rank 0 is the only
    writer, and with a run folder on a file system shared by several nodes a per-node lock would make the nodes
    of one job refuse each other. A second job's rank 0 fails at once; torchrun then stops that job's other ranks.
    The lock file sits beside the run folder, not in it, so a fresh run still finds its folder empty and
    ``--overwrite`` and ``python -m train.report`` never meet it.
    """
    from train.files import exclusive_lock

    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return contextlib.nullcontext()
    return exclusive_lock(folder.parent, f"training of {folder}", name=f".{folder.name}.lock")


if __name__ == "__main__":
    sys.exit(main())
