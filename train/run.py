"""One training run end to end: build, (resume), train/validate per epoch, test, write the run folder.

Run folder ``<logging.runs_dir>/<exp>/`` (rank 0 writes, every file atomically):

* ``config.json``   the fully resolved config (plus dataset / model / exp);
* ``metrics.jsonl`` one line per epoch: train/val loss, top-1, top-5, lr, images/s, data-wait and compute time;
* ``last.pt``       full state after the latest epoch (``--resume`` continues from it), ``best.pt`` the weights
  of the best validation top-1;
* ``conv1.pt``      the first convolution's filters: ``{"initial", "best", "final"}``;
* ``summary.json``  ``val`` / ``test`` ``{"top1", "top5", "loss"}``, ``images_per_second``, ``wall_seconds``, ...
* ``events.out.tfevents.*`` TensorBoard logs (``logging.tensorboard``, see :mod:`train.tensorboard`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train import checkpoint as ckpt
from train import distributed
from train.config import ConfigError
from train.data import build_split_loader, loader_spec, resolve_loader_name
from train.files import write_json_atomic as write_json
from train.loop import NonFiniteLossError, TrainState, evaluate, train_one_epoch
from train.metrics import MetricsLog, progress_bar_factory
from train.schedule import LrSchedule, build_optimizer
from train.tensorboard import EVENT_FILE_GLOB, TensorBoardLog

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunRequest:
    """What the command line asks for, beyond the config."""

    dataset: str
    model: str
    exp: str
    config: dict[str, Any]
    resume: bool = False
    overwrite: bool = False
    download: bool = False
    start_time: float = field(default_factory=time.perf_counter)


def resolve_device(name: str, env: distributed.DistributedEnv) -> torch.device:
    """``auto`` -> CUDA when present; ``cuda`` without a GPU is a clear error. One GPU per local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda, but no CUDA GPU is visible to PyTorch; use --device cpu")
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {env.local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, off on CPU (CPU bf16 autocast is slower without AMX); fp16 needs CUDA."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("training.amp=fp16 needs CUDA (its GradScaler is for GPUs); use bf16 or off on CPU")
    return AMP_DTYPES.get(amp)


def network_shape(dataset: str, config: dict[str, Any]) -> dict[str, int]:
    """``{"num_classes", "layout"}`` of the run's network: ``layout`` is ``create_model``'s ``image_size``
    (32 = the small-input layout for inputs up to 64 px, else 224). Recorded in config.json's ``run`` section so
    ``models.load_pretrained`` can rebuild the network without knowing the data sets."""
    from loaders.datasets import dataset_info

    info = dataset_info(dataset)
    image_size = config["data"]["image_size"] or info.image_size
    return {"num_classes": info.num_classes, "layout": 32 if image_size <= 64 else 224}


def build_network(request: RunRequest) -> nn.Module:
    """``models.create_model`` with the config's model section (imported here: train depends on models)."""
    import models

    shape = network_shape(request.dataset, request.config)
    try:
        return models.create_model(
            request.model,
            num_classes=shape["num_classes"],
            model_config=request.config["model"],
            image_size=shape["layout"],
        )
    except (KeyError, ValueError) as error:
        raise ConfigError(f"model config: {error}") from None


def _cpu_threads(env: distributed.DistributedEnv) -> None:
    """Split the CPU cores between the processes of this node (torchrun sets LOCAL_WORLD_SIZE)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size if env.enabled else 1))
    if local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def run(request: RunRequest, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, validate, test; returns the summary (rank 0 also writes it)."""
    config = request.config
    env = distributed.detect_env()
    device = resolve_device(config["device"], env)
    if device.type == "cpu":
        _cpu_threads(env)
    distributed.init(env, device, config["distributed"]["backend"])
    main = env.is_main
    say = log if main else (lambda _msg: None)
    try:
        return _run(request, env, device, main, say)
    finally:
        distributed.shutdown()


def _run(
    request: RunRequest, env: distributed.DistributedEnv, device: torch.device, main: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    config, training = request.config, request.config["training"]
    folder = Path(config["logging"]["runs_dir"]) / request.exp
    last_path = folder / "last.pt"
    state_ckpt = _check_folder(request, folder, last_path) if main else None
    state_ckpt = distributed.broadcast_object(state_ckpt is not None, env) and ckpt.load(last_path)

    loader_name = resolve_loader_name(config, request.dataset, say)
    amp_dtype = resolve_amp(training["amp"], device)

    def make(split: str, train: bool):
        dtype = amp_dtype or torch.float32
        spec = loader_spec(
            config, request.dataset, split, train, device, dtype, env.rank, env.world_size, request.download
        )
        return build_split_loader(loader_name, spec)

    # loaders first: a missing data set fails before the model is built
    train_loader, val_loader = make("train", True), make("val", False)
    torch.manual_seed(int(config["seed"]))
    net = build_network(request)
    memory_format = torch.channels_last if training["channels_last"] else torch.contiguous_format
    net = net.to(device=device, memory_format=memory_format)
    if env.enabled:  # same init on every rank (seed above), then per-rank streams (dropout differs across ranks)
        ckpt.seed_all(distributed.rank_seed(int(config["seed"]), env.rank))
    if env.enabled and config["distributed"]["sync_bn"]:
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        else:
            say("distributed.sync_bn ignored: SyncBatchNorm needs CUDA")

    epochs = int(training["epochs"])
    batch = int(config["data"]["batch_size"])
    lr = float(config["optimizer"]["lr"])
    if config["distributed"]["scale_lr"]:
        lr *= batch * env.world_size / config["distributed"]["base_batch_size"]
    optimizer = build_optimizer(net, config["optimizer"], lr)
    schedule = LrSchedule(optimizer, config["lr_scheduler"], lr, epochs, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    model: nn.Module = net
    if env.enabled:
        ids = [device.index] if device.type == "cuda" else None
        find_unused = config["distributed"]["find_unused_parameters"]
        model = nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=find_unused)
    if training["compile"]:
        model = torch.compile(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=float(training["label_smoothing"]))
    state = TrainState(
        model,
        optimizer,
        schedule,
        criterion,
        device,
        env,
        amp_dtype,
        scaler,
        training["grad_clip"],
        max(int(config["logging"]["refresh_steps"]), 1),
    )

    conv1 = {"initial": ckpt.conv1_weight(net)}
    book = {
        "epoch": 0,
        "best_top1": -math.inf,
        "best_epoch": None,
        "best_val": None,
        "best_loss": math.inf,
        "bad_epochs": 0,
        "train_seconds": 0.0,
        "train_images": 0,
        "data_seconds": 0.0,
    }
    if state_ckpt:
        net.load_state_dict(state_ckpt["model"])
        optimizer.load_state_dict(state_ckpt["optimizer"])
        if scaler is not None and state_ckpt.get("scaler"):
            scaler.load_state_dict(state_ckpt["scaler"])
        schedule.load_state_dict(state_ckpt["schedule"])
        state.global_step = int(state_ckpt["global_step"])
        book.update(state_ckpt["book"])
        conv1 = dict(state_ckpt.get("conv1", conv1))
        if len(state_ckpt["rng"]) == env.world_size:  # same number of ranks: continue every stream exactly
            ckpt.set_rng_state(state_ckpt["rng"][env.rank])
        else:  # another world size: fresh per-rank streams (the loaders' shuffles depend only on seed and epoch)
            ckpt.seed_all(distributed.rank_seed(int(config["seed"]), env.rank, book["epoch"]))
            say(f"resuming {len(state_ckpt['rng'])}-rank checkpoint on {env.world_size} rank(s): RNG reseeded per rank")
        say(f"resumed {last_path} at epoch {book['epoch']} (step {state.global_step})")
    metrics_log = MetricsLog(folder / "metrics.jsonl", enabled=main)
    if main:
        metrics_log.truncate_after(book["epoch"])
        meta = {"dataset": request.dataset, "model": request.model, "exp": request.exp, "loader": loader_name}
        meta.update(network_shape(request.dataset, config))  # for models.load_pretrained(run folder)
        write_json(folder / "config.json", {**config, "run": meta})
        if config["checkpoint"]["save_conv1"]:
            ckpt.save_conv1(folder / "conv1.pt", conv1)
    board = TensorBoardLog(folder, config, enabled=main, start_epoch=book["epoch"], log=say)
    board.log_config(config)
    say(
        f"{request.dataset} / {request.model} / loader {loader_name} / {device} x{env.world_size} / "
        f"amp {training['amp']} / {len(train_loader)} steps per epoch / run folder {folder}"
    )

    record: list[torch.Tensor] | None = [] if training["record_samples"] else None
    progress = progress_bar_factory(config["logging"]["progress_bar"], main)
    stop_reason = "completed"
    for epoch in range(book["epoch"], epochs):
        try:
            train_metrics = train_one_epoch(state, train_loader, epoch, progress(epoch, epochs), record)
            distributed.broadcast_buffers(net, env)  # every rank validates and saves rank 0's BN statistics
            _check_divnorm(net)
        except (NonFiniteLossError, FloatingPointError) as error:
            say(f"stopped: {error}")
            stop_reason = "nonfinite"
            break
        book["train_seconds"] += train_metrics["seconds"]
        book["data_seconds"] += train_metrics["data_seconds"]
        book["train_images"] += train_metrics["samples"]
        last_epoch = epoch + 1 == epochs
        val_metrics = None
        if (epoch + 1) % max(int(training["eval_every"]), 1) == 0 or last_epoch:
            val_metrics = evaluate(state, val_loader)
        schedule.end_epoch(val_metrics["loss"] if val_metrics else None)
        improved = val_metrics is not None and val_metrics["top1"] > book["best_top1"]
        if improved:
            book.update(best_top1=val_metrics["top1"], best_epoch=epoch + 1, best_val=_public(val_metrics))
            conv1["best"] = ckpt.conv1_weight(net)
        if val_metrics is not None:
            if val_metrics["loss"] < book["best_loss"]:
                book.update(best_loss=val_metrics["loss"], bad_epochs=0)
            else:
                book["bad_epochs"] += 1
        book["epoch"] = epoch + 1
        early = training["early_stop"] and book["bad_epochs"] >= int(training["patience"])
        conv1["final"] = ckpt.conv1_weight(net)
        if main:
            record_line = {"epoch": epoch + 1, "lr": train_metrics["lr"], "train": _rounded(train_metrics)}
            if val_metrics is not None:
                record_line["val"] = _rounded(val_metrics)
            metrics_log.append(record_line)
            board.log_epoch(record_line, net)
            _save(folder, config, net, optimizer, scaler, schedule, state, book, conv1, improved, val_metrics, env)
        else:
            _save(folder, config, net, optimizer, scaler, schedule, state, book, conv1, False, None, env)
        say(_epoch_line(epoch + 1, epochs, train_metrics, val_metrics))
        if early:
            say(f"early stop: validation loss did not improve for {training['patience']} epochs")
            stop_reason = "early_stop"
            break

    summary = _finish(request, env, device, state, net, folder, book, conv1, loader_name, stop_reason, make, say)
    board.log_test(summary)
    board.close()
    if record is not None:
        _write_record(folder, record, net, env)
    return summary


def _check_folder(request: RunRequest, folder: Path, last_path: Path) -> bool | None:
    """Validate resume/overwrite against what the run folder holds; True when there is a checkpoint to load."""
    if request.resume:
        if not last_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {last_path}; start the run without --resume")
        return True
    if folder.exists() and any(folder.iterdir()):
        if not request.overwrite:
            raise ConfigError(
                f"run folder {folder} already exists; pass --resume to continue it, --overwrite to start again, "
                "or choose another experiment name"
            )
        for name in ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "conv1.pt", "samples.pt"):
            (folder / name).unlink(missing_ok=True)
        for path in [*folder.glob(EVENT_FILE_GLOB), *folder.glob("eval-*.json")]:  # old TensorBoard / evaluate
            path.unlink()
    return None


def _save(folder, config, net, optimizer, scaler, schedule, state, book, conv1, improved, val_metrics, env) -> None:
    """last.pt every epoch (with every rank's RNG state), best.pt on improvement; rank 0 writes."""
    rngs = distributed.gather_objects(ckpt.rng_state(), env)  # collective: every rank calls it
    if not env.is_main:
        return
    if config["checkpoint"]["save_last"]:
        ckpt.atomic_save(
            {
                "model": ckpt.model_state(net),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "schedule": schedule.state_dict(),
                "global_step": state.global_step,
                "book": book,
                "conv1": conv1,
                "rng": rngs,
                "config": config,
            },
            folder / "last.pt",
        )
    if improved and config["checkpoint"]["save_best"]:
        ckpt.atomic_save(
            {"model": ckpt.model_state(net), "epoch": book["epoch"], "val": _public(val_metrics)}, folder / "best.pt"
        )
    if config["checkpoint"]["save_conv1"]:
        ckpt.save_conv1(folder / "conv1.pt", conv1)


def _finish(request, env, device, state, net, folder, book, conv1, loader_name, stop_reason, make, say):
    """Test with the best weights, write summary.json, print the final line."""
    config = request.config
    test_metrics = None
    best_path = folder / "best.pt"
    if config["training"]["test_at_end"] and book["epoch"] > 0:
        has_best = distributed.broadcast_object(best_path.is_file() if env.is_main else None, env)
        final_state = ckpt.model_state(net)
        if has_best:  # every rank reads rank 0's file (same file system in one node; multi-node: shared runs_dir)
            net.load_state_dict(ckpt.load(best_path)["model"])
        test_metrics = evaluate(state, make("test", False))
        net.load_state_dict(final_state)
    wall = time.perf_counter() - request.start_time
    summary = {
        "exp": request.exp,
        "dataset": request.dataset,
        "model": request.model,
        "loader": loader_name,
        "device": str(device),
        "world_size": env.world_size,
        "amp": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(state.amp_dtype, "off"),
        "epochs": book["epoch"],
        "epochs_planned": int(config["training"]["epochs"]),
        "best_epoch": book["best_epoch"],
        "stopped": stop_reason,
        "val": book["best_val"],
        "test": _public(test_metrics) if test_metrics else None,
        "images_per_second": book["train_images"] / max(book["train_seconds"], 1e-9),
        "data_wait_fraction": book["data_seconds"] / max(book["train_seconds"], 1e-9),
        "train_seconds": book["train_seconds"],
        "wall_seconds": wall,
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    if env.is_main:
        write_json(folder / "summary.json", summary)
    test = summary["test"] or {"top1": math.nan, "top5": math.nan}
    say(
        f"done: {request.exp}: test top-1 {test['top1']:.2f}% top-5 {test['top5']:.2f}%"
        f" (best val top-1 {book['best_top1']:.2f}% at epoch {book['best_epoch']}), "
        f"{summary['images_per_second']:.0f} images/s, {wall:.1f} s wall -> {folder / 'summary.json'}"
    )
    return summary


def _write_record(folder: Path, record: list[torch.Tensor], net: nn.Module, env) -> None:
    """Debug trace (``training.record_samples``): per rank, the (label, pixel sum) of every training sample
    seen and the final flat parameters; gathered to rank 0, written to ``samples.pt``."""
    mine = {
        "samples": torch.cat(record) if record else torch.empty(0, 2, dtype=torch.float64),
        "params": torch.cat([p.detach().cpu().double().flatten() for p in net.parameters()]),
    }
    everyone = distributed.gather_objects(mine, env)
    if env.is_main:
        ckpt.atomic_save({"ranks": everyone}, folder / "samples.pt")


def _public(metrics: dict[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    return {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"]}


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def _epoch_line(epoch: int, epochs: int, train: dict[str, Any], val: dict[str, Any] | None) -> str:
    line = (
        f"epoch {epoch}/{epochs}: train loss {train['loss']:.4f} top-1 {train['top1']:.2f}% | "
        f"{train['images_per_second']:.0f} img/s (data wait {train['data_seconds']:.1f} s, compute "
        f"{train['compute_seconds']:.1f} s) | lr {train['lr']:.4g}"
    )
    if val is not None:
        line += f" | val loss {val['loss']:.4f} top-1 {val['top1']:.2f}% top-5 {val['top5']:.2f}%"
    return line


def _check_divnorm(net: nn.Module) -> None:
    """Divergence inside a divisive normalization layer (NaN gamma/sigma) stops the run like a NaN loss."""
    try:
        from divnorm.common import check_finite
    except ImportError:  # pragma: no cover
        return
    check_finite(net)
