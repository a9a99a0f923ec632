"""One training run end to end: set up, (resume), train/validate per epoch, test, write the run folder.

Run folder ``<logging.runs_dir>/<exp>/`` (rank 0 writes, every file atomically):

* ``config.json``   the fully resolved config (plus dataset / model / exp);
* ``metrics.jsonl`` one line per epoch: train/val loss, top-1, top-5, lr, images/s, data-wait, compute and compile
  time;
* ``last.pt``       full state after the latest epoch (``--resume`` continues from it), or inside an epoch after a
  SIGTERM / SIGUSR1 or every ``checkpoint.every_steps`` steps (train/preempt.py); ``best.pt`` the weights of the
  best validation top-1;
* ``conv1.pt``      the first convolution's filters: ``{"initial", "best", "final"}``;
* ``summary.json``  ``val`` / ``test`` ``{"top1", "top5", "loss"}``, ``images_per_second``, ``wall_seconds``,
  ``compile`` ...
* ``events.out.tfevents.*`` TensorBoard logs (``logging.tensorboard``, see :mod:`train.tensorboard`).

:class:`Run` holds the run's parts and walks its steps, each a screen or less: :meth:`Run.prepare` (folder,
loaders, network, optimizer, compile), :meth:`Run.restore` (``--resume``), :meth:`Run.begin` (files written at
the start), :meth:`Run.train` -> :meth:`Run.epoch` (train, validate, book-keep, :meth:`Run.save`), and
:meth:`Run.finish` (test with the best weights, ``summary.json``). A signal makes :meth:`Run.train` save the
position at the next step boundary and :meth:`Run.execute` raise :class:`train.preempt.Preempted` (exit code 3).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train import checkpoint as ckpt
from train import distributed
from train.build import (
    amp_name,
    build_network,
    check_input_size,
    input_size,
    network_shape,
    resolve_amp,
    resolve_device,
    split_cpu_threads,
)
from train.compiled import CompileGuard, resolve_compile
from train.config import ConfigError
from train.data import build_split_loader, loader_spec, resolve_loader_name, with_evaluation_batch
from train.files import write_json_atomic as write_json
from train.graphed import GraphedSteps, graphs_blocker, train_one_epoch_graphed
from train.loop import NonFiniteLossError, TrainState, evaluate, train_one_epoch
from train.metrics import MetricsLog, progress_bar_factory
from train.preempt import Preempted, StepBoundary, StopSignals
from train.run_checkpoint import RunCheckpoints, public_metrics
from train.schedule import LrSchedule, build_optimizer
from train.streams import describe, running_on, training_stream
from train.tensorboard import EVENT_FILE_GLOB, TensorBoardLog

__all__ = ["Run", "RunRequest", "build_network", "resolve_amp", "resolve_device", "run"]

# files of a run that --overwrite removes before starting again
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "conv1.pt", "samples.pt")


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


def run(request: RunRequest, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, validate, test; returns the summary (rank 0 also writes it)."""
    env = distributed.detect_env()
    device = resolve_device(request.config["device"], env)
    if device.type == "cpu":
        split_cpu_threads(env)
    distributed.init(env, device, request.config["distributed"]["backend"])
    try:
        return Run(request, env, device, log if env.is_main else (lambda _msg: None)).execute()
    finally:
        distributed.shutdown()


def new_book() -> dict[str, Any]:
    """Best-so-far and throughput bookkeeping, saved in ``last.pt`` (plain numbers only)."""
    return {
        "epoch": 0,
        "best_top1": -math.inf,
        "best_epoch": None,
        "best_val": None,
        "best_loss": math.inf,
        "bad_epochs": 0,
        "train_seconds": 0.0,
        "train_images": 0,
        "data_seconds": 0.0,
        "compile_seconds": 0.0,
        "eval_seconds": 0.0,
    }


class Run(RunCheckpoints):
    """One run's parts (loaders, network, optimizer, state, bookkeeping) and the steps that use them (the
    checkpoint steps, restore / save / save_position, are :class:`train.run_checkpoint.RunCheckpoints`')."""

    def __init__(
        self, request: RunRequest, env: distributed.DistributedEnv, device: torch.device, say: Callable[[str], None]
    ) -> None:
        self.request, self.env, self.device, self.say = request, env, device, say
        self.config = request.config
        self.training = request.config["training"]
        self.folder = Path(self.config["logging"]["runs_dir"]) / request.exp
        self.book = new_book()
        self.record: list[torch.Tensor] | None = [] if self.training["record_samples"] else None
        self.board: TensorBoardLog | None = None  # opened by begin()
        self.signals = StopSignals()
        every_steps = self.config["checkpoint"]["every_steps"]
        self.boundary = StepBoundary(env, self.signals, every_steps, self.save_position, say)
        interval = self.config["checkpoint"]["interval_seconds"]
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval < 0:
            raise ConfigError(
                f"checkpoint.interval_seconds must be 0 (a checkpoint every epoch) or a number of seconds, got "
                f"{interval!r}"
            )
        # checkpoint.interval_seconds (train/run_checkpoint.py): rank 0's deferred epoch-end checkpoint
        self.unsaved_epoch, self.pending_best, self.last_write = False, None, None

    def execute(self) -> dict[str, Any]:
        """prepare -> restore -> begin -> train -> finish (or :class:`Preempted` after a signal)."""
        self.signals.install()  # from here on SIGTERM / SIGUSR1 only set a flag, read at step boundaries
        try:
            try:
                checkpoint = self.prepare()
                with running_on(self.stream):
                    if checkpoint:
                        self.restore(checkpoint)
                    self.begin()
                    self.compiler.guard = self._first_compile_guard(self.state.global_step, bool(checkpoint))
                    stop_reason = self.train()
            finally:
                self.signals.close()
            if stop_reason == "preempted":
                raise Preempted(f"stopped by {self.signals.name}: {self.folder / 'last.pt'} holds the position")
            with running_on(self.stream):
                summary = self.finish(stop_reason)
            self.board.log_test(summary)
        finally:
            if self.board is not None:
                self.board.close()
        if self.record is not None:
            self._write_record()
        return summary

    # -- set-up --------------------------------------------------------------------------------------------------

    def prepare(self) -> dict[str, Any] | None:
        """Check the folder, build loaders (a missing data set fails first), network, optimizer, compile wrapper.

        Returns the checkpoint to resume from (``None`` for a fresh run).
        """
        request, env, device, config, training = self.request, self.env, self.device, self.config, self.training
        last_path = self.folder / "last.pt"
        # what --overwrite removes goes in begin(), once the data, the network and the device have been checked
        wants_resume = _check_folder(request, self.folder, last_path) if env.is_main else None
        self.clear_folder = env.is_main and not request.resume and request.overwrite
        checkpoint = ckpt.load(last_path) if distributed.broadcast_object(wants_resume is not None, env) else None

        self.loader_name = resolve_loader_name(config, request.dataset, self.say)
        self.amp_dtype = resolve_amp(training["amp"], device)
        self.train_loader, self.val_loader = self.make_loader("train", True), self.make_loader("val", False)
        if len(self.train_loader) == 0:
            data = config["data"]
            raise ConfigError(
                f"no training step: {request.dataset}'s training split (data.subset={data['subset']}) holds fewer "
                f"images per process than data.batch_size={data['batch_size']} (the last partial batch is dropped); "
                "lower data.batch_size or use more data"
            )
        # data.loader_priority (train/streams.py): after the loader choice, which --loader auto may have tuned
        self.stream = training_stream(device, config["data"]["loader_priority"])

        torch.manual_seed(int(config["seed"]))
        net = build_network(request.dataset, request.model, config)
        _check_kernel(config, device)
        check_input_size(net, request.model, input_size(request.dataset, config))
        memory_format = torch.channels_last if training["channels_last"] else torch.contiguous_format
        self.net = net = net.to(device=device, memory_format=memory_format)
        if env.enabled:  # same init on every rank (seed above), then per-rank streams (dropout differs across ranks)
            ckpt.seed_all(distributed.rank_seed(int(config["seed"]), env.rank))
        if env.enabled and config["distributed"]["sync_bn"]:
            if device.type == "cuda":
                net = self.net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            else:
                self.say("distributed.sync_bn ignored: SyncBatchNorm needs CUDA")

        batch = int(config["data"]["batch_size"])
        lr = float(config["optimizer"]["lr"])
        if config["distributed"]["scale_lr"]:
            lr *= batch * env.world_size / config["distributed"]["base_batch_size"]
        self.cuda_graphs = self._resolve_cuda_graphs()
        fused = device.type == "cuda"  # one kernel for all parameters (and capturable)
        optimizer = build_optimizer(net, config["optimizer"], lr, fused=fused, lr_on_device=self.cuda_graphs)
        schedule = LrSchedule(optimizer, config["lr_scheduler"], lr, int(training["epochs"]), len(self.train_loader))
        scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        model: nn.Module = net
        if env.enabled:
            ids = [device.index] if device.type == "cuda" else None
            find_unused = config["distributed"]["find_unused_parameters"]
            model = nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=find_unused)
        self.compiler = CompileGuard(
            model,
            enabled=resolve_compile(training["compile"], device),
            mode=training["compile_mode"],
            dynamic=training["compile_dynamic"],
            device=device,
            say=self.say,
        )
        self.state = TrainState(
            model,
            optimizer,
            schedule,
            nn.CrossEntropyLoss(label_smoothing=float(training["label_smoothing"])),
            device,
            env,
            self.amp_dtype,
            scaler,
            training["grad_clip"],
            max(int(config["logging"]["refresh_steps"]), 1),
            compiler=self.compiler,
        )
        self.graphed = None
        if self.cuda_graphs:
            strict = self.training["cuda_graphs"] is True
            self.graphed = GraphedSteps(self.state, self.train_loader, strict=strict, say=self.say)
        self.conv1 = {"initial": ckpt.conv1_weight(net)}
        return checkpoint

    def _first_compile_guard(self, start_step: int, resumed: bool) -> Callable[[], contextlib.AbstractContextManager]:
        """A signal during a compile before this process has trained a step stops the run at once (exit 3): there
        is nothing to save, and waiting for the step boundary can hang when the same signal (sent to the process
        group: Slurm, ``timeout``) ended inductor's compile workers. One process only: with DDP the ranks agree
        on a stop at the boundary as before."""
        if self.env.world_size > 1:
            return contextlib.nullcontext
        if resumed:
            hint = "last.pt still holds the position it was resumed from: continue with --resume"
        else:
            hint = "nothing was trained or saved yet: start it again (--overwrite)"

        def guard() -> contextlib.AbstractContextManager:
            if self.state.global_step != start_step:
                return contextlib.nullcontext()
            return self.signals.immediate("during the first compile", hint)

        return guard

    def _resolve_cuda_graphs(self) -> bool:
        """``training.cuda_graphs``: auto -> on where possible (else off, one line why); true -> on or an error."""
        setting = self.training["cuda_graphs"]
        if setting is False:
            return False
        blocker = graphs_blocker(
            device=self.device,
            loader=self.train_loader,
            world_size=self.env.world_size,
            amp=amp_name(self.amp_dtype),
            compile_mode=self.training["compile_mode"],
            record_samples=bool(self.training["record_samples"]),
        )
        if blocker is None:
            return True
        if setting is True:
            raise ConfigError(f"training.cuda_graphs=true is not possible here: {blocker}; use auto or false")
        self.say(f"cuda graphs off: {blocker}")
        return False

    def make_loader(self, split: str, train: bool):
        """The loader of ``split`` (train augmentation when ``train``), in the AMP dtype, for this rank."""
        request, env = self.request, self.env
        spec = loader_spec(
            self.config,
            request.dataset,
            split,
            train,
            self.device,
            self.amp_dtype or torch.float32,
            env.rank,
            env.world_size,
            request.download,
        )
        return build_split_loader(self.loader_name, with_evaluation_batch(spec, self.loader_name, self.config))

    def begin(self) -> None:
        """Write config.json (and conv1.pt's initial filters), open metrics.jsonl, print the run's line."""
        request, training = self.request, self.training
        if self.clear_folder:
            _clear_folder(self.folder)
        self.metrics_log = MetricsLog(self.folder / "metrics.jsonl", enabled=self.env.is_main)
        if self.env.is_main:
            self.metrics_log.truncate_after(self.book["epoch"])
            meta = {"dataset": request.dataset, "model": request.model, "exp": request.exp, "loader": self.loader_name}
            meta.update(network_shape(request.dataset, self.config))  # for models.load_pretrained(run folder)
            write_json(self.folder / "config.json", {**self.config, "run": meta})
            if self.config["checkpoint"]["save_conv1"]:
                ckpt.save_conv1(self.folder / "conv1.pt", self.conv1)
        self.board = TensorBoardLog(
            self.folder, self.config, enabled=self.env.is_main, start_epoch=self.book["epoch"], log=self.say
        )
        self.board.log_config(self.config)
        priority = describe(self.stream, self.config["data"]["loader_priority"])
        if priority:
            self.say(priority)
        compiled = f"compile {self.compiler.mode}" if self.compiler.enabled else "eager"
        compiled += " + cuda graphs" if self.graphed is not None else ""
        self.say(
            f"{request.dataset} / {request.model} / loader {self.loader_name} / {self.device} x{self.env.world_size} / "
            f"amp {training['amp']} / {compiled} / {len(self.train_loader)} steps per epoch / run folder {self.folder}"
        )

    # -- epochs --------------------------------------------------------------------------------------------------

    def train(self) -> str:
        """Every remaining epoch; returns why training stopped: completed, early_stop, nonfinite or preempted."""
        epochs = int(self.training["epochs"])
        self.progress = progress_bar_factory(self.config["logging"]["progress_bar"], self.env.is_main)
        for epoch in range(self.book["epoch"], epochs):
            stop = self.epoch(epoch, epochs)
            if stop:
                return stop
            if epoch + 1 < epochs and self.boundary.stop_agreed(self.device):  # a signal during validation/saving
                save_last = self.config["checkpoint"]["save_last"]  # the epoch's checkpoint, if the interval held it
                self.save(False, None, force_last=not save_last, final=True, only_unsaved=save_last)
                self.say(f"preempted ({self.signals.name}) after epoch {epoch + 1}: continue with --resume")
                return "preempted"
        return "completed"

    def epoch(self, epoch: int, epochs: int) -> str | None:
        """Train and (every ``eval_every``) validate one epoch, book-keep, save; a stop reason or ``None``."""
        state, book, training = self.state, self.book, self.training
        try:
            progress = self.progress(epoch, epochs)
            if self.graphed is not None:
                train_metrics = train_one_epoch_graphed(state, self.graphed, epoch, progress, self.boundary)
            else:
                train_metrics = train_one_epoch(state, self.train_loader, epoch, progress, self.record, self.boundary)
            if train_metrics["preempted"]:
                return "preempted"
            distributed.broadcast_buffers(self.net, self.env)  # every rank validates and saves rank 0's BN stats
            _check_divnorm(self.net)
        except (NonFiniteLossError, FloatingPointError) as error:
            self.say(f"stopped: {error}")
            return "nonfinite"
        book["train_seconds"] += train_metrics["seconds"] - train_metrics["compile_seconds"]
        book["train_images"] += train_metrics["timed_samples"]
        book["data_seconds"] += train_metrics["data_seconds"]
        book["compile_seconds"] += train_metrics["compile_seconds"]
        val_metrics = None
        if (epoch + 1) % max(int(training["eval_every"]), 1) == 0 or epoch + 1 == epochs:
            val_metrics = evaluate(state, self.val_loader)
            book["compile_seconds"] += val_metrics["compile_seconds"]
            book["eval_seconds"] += val_metrics["seconds"] - val_metrics["compile_seconds"]
        state.schedule.end_epoch(val_metrics["loss"] if val_metrics else None)
        improved = val_metrics is not None and val_metrics["top1"] > book["best_top1"]
        if improved:
            book.update(best_top1=val_metrics["top1"], best_epoch=epoch + 1, best_val=public_metrics(val_metrics))
            self.conv1["best"] = ckpt.conv1_weight(self.net)
        if val_metrics is not None:
            if val_metrics["loss"] < book["best_loss"]:
                book.update(best_loss=val_metrics["loss"], bad_epochs=0)
            else:
                book["bad_epochs"] += 1
        book["epoch"] = epoch + 1
        self.conv1["final"] = ckpt.conv1_weight(self.net)
        if self.env.is_main:
            train_line = {key: value for key, value in train_metrics.items() if key != "preempted"}
            line = {"epoch": epoch + 1, "lr": train_metrics["lr"], "train": _rounded(train_line)}
            if val_metrics is not None:
                line["val"] = _rounded(val_metrics)
            self.metrics_log.append(line)
            self.board.log_epoch(line, self.net)
        early_stop = bool(training["early_stop"]) and book["bad_epochs"] >= int(training["patience"])
        self.save(improved, val_metrics, final=early_stop or epoch + 1 == epochs)
        self.say(_epoch_line(epoch + 1, epochs, train_metrics, val_metrics))
        if early_stop:
            self.say(f"early stop: validation loss did not improve for {training['patience']} epochs")
            return "early_stop"
        return None

    # -- the end -------------------------------------------------------------------------------------------------

    def finish(self, stop_reason: str) -> dict[str, Any]:
        """Test with the best weights, write summary.json, print the final line."""
        request, env, book, config = self.request, self.env, self.book, self.config
        test_metrics = None
        best_path = self.folder / "best.pt"
        self.write_pending_best()  # held back by checkpoint.interval_seconds and no last.pt since (non-finite)
        if config["training"]["test_at_end"] and book["epoch"] > 0:
            has_best = distributed.broadcast_object(best_path.is_file() if env.is_main else None, env)
            final_state = ckpt.model_state(self.net)
            if has_best:  # every rank reads rank 0's file (same file system in one node; multi-node: shared runs_dir)
                self.net.load_state_dict(ckpt.load(best_path)["model"])
            test_metrics = evaluate(self.state, self.make_loader("test", False))
            self.net.load_state_dict(final_state)
        wall = time.perf_counter() - request.start_time
        summary = {
            "exp": request.exp,
            "dataset": request.dataset,
            "model": request.model,
            "loader": self.loader_name,
            "device": str(self.device),
            "world_size": env.world_size,
            "amp": amp_name(self.amp_dtype),
            "compile": self.compiler.describe(self.training["compile"]),
            "compile_seconds": book["compile_seconds"],
            "cuda_graphs": {"setting": self.training["cuda_graphs"], "enabled": self.graphed is not None}
            | (self.graphed.describe() if self.graphed is not None else {}),
            "epochs": book["epoch"],
            "epochs_planned": int(config["training"]["epochs"]),
            "best_epoch": book["best_epoch"],
            "stopped": stop_reason,
            "val": book["best_val"],
            "test": public_metrics(test_metrics) if test_metrics else None,
            "images_per_second": book["train_images"] / max(book["train_seconds"], 1e-9),
            "data_wait_fraction": book["data_seconds"] / max(book["train_seconds"], 1e-9),
            "train_seconds": book["train_seconds"],
            "eval_seconds": book["eval_seconds"],
            # validation's share of the time spent training + validating (compile time excluded)
            "eval_share": book["eval_seconds"] / max(book["train_seconds"] + book["eval_seconds"], 1e-9),
            "wall_seconds": wall,
            "parameters": sum(p.numel() for p in self.net.parameters()),
        }
        if env.is_main:
            write_json(self.folder / "summary.json", summary)
        test = summary["test"] or {"top1": math.nan, "top5": math.nan}
        self.say(
            f"done: {request.exp}: test top-1 {test['top1']:.2f}% top-5 {test['top5']:.2f}%"
            f" (best val top-1 {book['best_top1']:.2f}% at epoch {book['best_epoch']}), "
            f"{summary['images_per_second']:.0f} images/s, {wall:.1f} s wall -> {self.folder / 'summary.json'}"
        )
        return summary


def _check_folder(request: RunRequest, folder: Path, last_path: Path) -> bool | None:
    """Validate resume/overwrite against what the run folder holds; True when there is a checkpoint to load."""
    if request.resume:
        if not last_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {last_path}; start the run without --resume")
        return True
    if folder.exists() and any(folder.iterdir()) and not request.overwrite:
        raise ConfigError(
            f"run folder {folder} already exists; pass --resume to continue it, --overwrite to start again, "
            "or choose another experiment name"
        )
    return None


def _clear_folder(folder: Path) -> None:
    """--overwrite: the earlier run's files go (once the new run has passed its checks: a mistyped option or a
    missing data set leaves the old run whole)."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for path in [*folder.glob(EVENT_FILE_GLOB), *folder.glob("eval-*.json")]:  # old TensorBoard / evaluate
        path.unlink()


def _check_kernel(config: dict[str, Any], device: torch.device) -> None:
    """divnorm_specs.kernel=triton needs CUDA (or Triton's CPU interpreter): one line before anything is written."""
    specs = config["model"]["divnorm_specs"]
    if specs.get("kernel") != "triton" or specs.get("type") != "ours" or device.type == "cuda":
        return
    from divnorm.triton_ours import interpreter_enabled

    if not interpreter_enabled():
        raise ConfigError(
            f"model.divnorm_specs.kernel=triton needs a CUDA device (this run is on {device.type}); use kernel=auto "
            "or torch, or set TRITON_INTERPRET=1 for Triton's (slow) CPU interpreter"
        )


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def _epoch_line(epoch: int, epochs: int, train: dict[str, Any], val: dict[str, Any] | None) -> str:
    line = (
        f"epoch {epoch}/{epochs}: train loss {train['loss']:.4f} top-1 {train['top1']:.2f}% | "
        f"{train['images_per_second']:.0f} img/s (data wait {train['data_seconds']:.1f} s, compute "
        f"{train['compute_seconds']:.1f} s"
    )
    if train.get("compile_seconds"):
        line += f", compile {train['compile_seconds']:.1f} s"
    line += f") | lr {train['lr']:.4g}"
    if val is not None:
        line += f" | val loss {val['loss']:.4f} top-1 {val['top1']:.2f}% top-5 {val['top5']:.2f}%"
    return line


def _check_divnorm(net: nn.Module) -> None:
    """Divergence inside a divisive normalization layer (NaN gamma/sigma) stops the run like a NaN loss."""
    from divnorm.common import check_finite

    check_finite(net)
