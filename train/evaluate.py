"""``python -m train.evaluate RUN``: evaluate a finished (or running) run's weights again.

Rebuilds the network from ``RUN/config.json`` exactly as the trainer did (:func:`train.build.build_network`), loads
``best.pt`` (or ``last.pt``'s ``model`` part) with ``torch.load(weights_only=True)``, runs one pass over a split
with the trainer's own loaders and evaluation loop, prints loss / top-1 / top-5 and writes them to
``RUN/eval-<split>.json``. With the run's own data, loader and device type it reproduces ``summary.json``'s
``test`` numbers exactly (same batches, same order, same precision). ``--data-dir``, ``--loader`` and
``key=value`` overrides (``data.subset=null``, ``data.eval_batch_size=256``) evaluate on another copy of the
data or another backend. Exit codes: 0 done, 2 bad input (missing run folder or checkpoint, unreadable data).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.config import ConfigError, apply_overrides, defaults, merge

SPLITS = ("val", "test")
CHECKPOINTS = ("best", "last")
LOADERS = ("torch", "dali", "ffcv", "gpu", "auto")


@dataclass
class RunFolder:
    """A run folder's resolved config and its ``run`` section (dataset, model, exp, loader, shape)."""

    folder: Path
    config: dict[str, Any]
    meta: dict[str, Any]

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    @property
    def model(self) -> str:
        return self.meta["model"]


def open_run(folder: str | Path) -> RunFolder:
    """Read ``folder/config.json`` (merged onto the current defaults, so older runs read too); a missing or
    foreign folder is a :class:`ConfigError` naming what was expected."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError(f"no run folder at {folder}; pass a folder written by python -m train (runs/<exp>)")
    if not path.is_file():
        raise ConfigError(f"{folder} is not a run folder: no config.json (expected runs/<exp>/ from python -m train)")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error})") from None
    meta = saved.pop("run", None) if isinstance(saved, dict) else None
    if not meta or "dataset" not in meta or "model" not in meta:
        raise ConfigError(f"{path} has no run section (dataset, model): not written by python -m train")
    config = copy.deepcopy(defaults())
    merge(config, saved, defaults(), f"from {path}")
    return RunFolder(folder, config, meta)


def checkpoint_weights(run: RunFolder, which: str = "best") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``model`` state dict of ``best.pt`` / ``last.pt`` (``weights_only=True``) and what else is known of
    it (``epoch``, ``val``); a missing file is a :class:`ConfigError`, a file torch refuses a ``ValueError``."""
    from models.pretrained import read_checkpoint_state

    path = run.folder / f"{which}.pt"
    if not path.is_file():
        hint = {
            "best": "checkpoint.save_best was off or no epoch was validated; try --checkpoint last",
            "last": "checkpoint.save_last was off or no epoch ended; try --checkpoint best",
        }[which]
        raise ConfigError(f"no checkpoint at {path} ({hint})")
    checkpoint = read_checkpoint_state(path)
    epoch = checkpoint.get("epoch")
    if epoch is None and isinstance(checkpoint.get("book"), dict):
        epoch = checkpoint["book"].get("epoch")
    return checkpoint["model"], {"checkpoint": path.name, "epoch": epoch, "val": checkpoint.get("val")}


def evaluate_run(
    folder: str | Path,
    split: str = "test",
    checkpoint: str = "best",
    data_dir: str | None = None,
    loader: str | None = None,
    device: str = "auto",
    overrides: tuple[str, ...] | list[str] = (),
    log=print,
) -> dict[str, Any]:
    """Evaluate ``folder``'s weights on ``split``; returns (and writes to ``eval-<split>.json``) the result."""
    from models.pretrained import load_weights
    from train import distributed
    from train.build import build_network, resolve_amp, resolve_device
    from train.checkpoint import unwrap
    from train.data import build_split_loader, loader_spec, resolve_loader_name, with_evaluation_batch
    from train.files import write_json_atomic
    from train.loop import TrainState, evaluate

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}")
    run = open_run(folder)
    config = run.config
    cli = list(overrides)
    if data_dir:
        cli.append(f"data.path={json.dumps(data_dir)}")
    if loader:
        cli.append(f"data.loader={loader}")
    apply_overrides(config, cli, defaults())
    state_dict, info = checkpoint_weights(run, checkpoint)

    env = distributed.DistributedEnv()  # one process: the whole split on this device
    torch_device = resolve_device(device, env)
    amp_dtype = resolve_amp(config["training"]["amp"], torch_device)
    # the run's recorded backend unless the command names one: the same batches as the trainer's test pass
    if not loader and run.meta.get("loader"):
        config["data"]["loader"] = run.meta["loader"]
    loader_name = resolve_loader_name(config, run.dataset, log)
    spec = loader_spec(config, run.dataset, split, False, torch_device, amp_dtype or torch.float32)
    data = build_split_loader(loader_name, with_evaluation_batch(spec, loader_name, config))  # the trainer's batches

    net = build_network(run.dataset, run.model, config)
    load_weights(net, state_dict, str(run.folder / info["checkpoint"]))
    memory_format = torch.channels_last if config["training"]["channels_last"] else torch.contiguous_format
    net = net.to(device=torch_device, memory_format=memory_format)
    state = TrainState(unwrap(net), None, None, nn.CrossEntropyLoss(), torch_device, env, amp_dtype)  # type: ignore[arg-type]
    start = time.perf_counter()
    metrics = evaluate(state, data)
    result = {
        "split": split,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "samples": metrics["samples"],
        **info,
        "loader": loader_name,
        "data_dir": config["data"]["path"],
        "device": str(torch_device),
        "amp": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "off"),
        "seconds": time.perf_counter() - start,
    }
    out = run.folder / f"eval-{split}.json"
    write_json_atomic(out, result)
    log(
        f"{run.folder} {split} ({info['checkpoint']}, epoch {info['epoch']}, {metrics['samples']} images, "
        f"{loader_name} on {torch_device}): loss {metrics['loss']:.4f} top-1 {metrics['top1']:.2f}% "
        f"top-5 {metrics['top5']:.2f}% -> {out}"
    )
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="Evaluate a run's best (or last) weights on a split; writes RUN/eval-<split>.json.",
    )
    parser.add_argument("run", help="run folder written by python -m train (runs/<exp>)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.subset=null data.workers=4"
    )
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate (default: test)")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="weights (default: best.pt)")
    parser.add_argument("--data-dir", metavar="PATH", help="another copy of the data set (sets data.path)")
    parser.add_argument("--loader", choices=LOADERS, help="data backend (default: the one the run used)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if present, else cpu"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from loaders.base import LoaderError

    try:
        evaluate_run(args.run, args.split, args.checkpoint, args.data_dir, args.loader, args.device, args.overrides)
    except (ConfigError, LoaderError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
