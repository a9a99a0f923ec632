"""One training epoch and one evaluation pass: the hot loop, visible in one screen.

No ``.item()`` per step: loss and hit counts accumulate on the device (:class:`train.metrics.MetricSums`), and the
host syncs only every ``refresh_steps`` steps (progress bar, NaN check) and at the end of the epoch. Time is
split into *data wait* (blocked in ``next(loader)``) and *compute* (everything else, measured after a final
device sync), so a slow loader shows up as data wait.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loaders.base import Loader
from train.compiled import CompileGuard
from train.distributed import DistributedEnv
from train.metrics import MetricSums
from train.preempt import EpochPosition, StepBoundary
from train.schedule import LrSchedule


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the message names the first bad step."""


@dataclass
class TrainState:
    """Everything a training step touches."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    criterion: nn.Module
    device: torch.device
    env: DistributedEnv
    amp_dtype: torch.dtype | None = None  # None: full precision
    scaler: torch.amp.GradScaler | None = None  # only for fp16
    grad_clip: float | None = None
    refresh_steps: int = 50
    global_step: int = 0
    compiler: CompileGuard | None = None  # set: the model called is the guard's (compiled, or eager after a failure)

    def call(self, work: Callable[[nn.Module], Any], key: tuple) -> tuple[Any, float]:
        """``work(model)`` with the model to call now; returns its result and the seconds spent compiling."""
        if self.compiler is None:
            return work(self.model), 0.0
        return self.compiler.run(work, key)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_finite(first_bad: torch.Tensor, state: TrainState, epoch: int, stop: bool = False) -> bool:
    """Stop on a NaN/inf loss (one host sync; reduced over ranks so every rank stops together).

    The same reduction carries this rank's preemption flag ``stop``; returns whether any rank has it set.
    """
    bad = torch.stack((first_bad, first_bad.new_tensor(int(stop))))
    if state.env.enabled:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    step, stop = bad.tolist()
    if step >= 0:
        raise NonFiniteLossError(
            f"training loss became NaN/inf at step {step} (epoch {epoch + 1}); stopped. The last good checkpoint "
            "(last.pt, end of the previous epoch) is kept; lower optimizer.lr, add warmup or gradient clipping"
        )
    return bool(stop)


def train_one_epoch(
    state: TrainState,
    loader: Loader,
    epoch: int,
    progress: Callable[[int, int, float], None] | None = None,
    record: list[torch.Tensor] | None = None,
    boundary: StepBoundary | None = None,
) -> dict[str, Any]:
    """Train one epoch; returns loss/top-1/top-5 over all ranks plus timing and throughput.

    ``progress(step, total, images_per_second)`` is called at each refresh (rank 0 passes a progress bar).
    ``record``, when given, receives each batch's labels and per-sample pixel sums (a debug trace of which
    samples this rank saw). ``boundary`` (train/preempt.py) continues a mid-epoch checkpoint, saves one every
    ``checkpoint.every_steps`` steps and stops after a signal: the result then has ``preempted: True``.
    """
    model, device = state.model, state.device
    model.train()
    # -- preemption: continue a mid-epoch checkpoint (sums and timing of the batches before it included) --
    resume = boundary.start(epoch) if boundary is not None else None
    resume = resume or EpochPosition(epoch, 0)
    loader.set_epoch(epoch, resume.batch)
    sums = MetricSums(device)
    sums.sums += torch.tensor(resume.sums, dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    data_seconds, compile_seconds, compile_samples = resume.data_seconds, resume.compile_seconds, resume.compile_samples
    steps = resume.batch
    total = len(loader)
    preempted = False
    synchronize(device)
    start = time.perf_counter() - resume.seconds
    batches = iter(loader) if steps < total else iter(())
    while True:
        wait = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        data_seconds += time.perf_counter() - wait
        state.schedule.step(state.global_step)
        step = functools.partial(train_step, state, images=images, labels=labels)
        (loss, logits), compiling = state.call(step, ("train", images.shape))
        if compiling:  # a step that compiled is compile time, not training throughput
            compile_seconds += compiling
            compile_samples += labels.shape[0]
        sums.update(loss, logits.float(), labels)
        # remember the first non-finite step on the device; checked at the next sync point
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), state.global_step, first_bad)
        if record is not None:
            record.append(torch.stack([labels.double(), images.double().sum(dim=(1, 2, 3))], dim=1).cpu())
        state.global_step += 1
        steps += 1
        agreed_stop = None
        if steps % state.refresh_steps == 0:
            # a sync point: also makes the live images/s honest, and agrees on a preemption across ranks
            agreed_stop = _check_finite(first_bad, state, epoch, boundary is not None and boundary.signals.requested)
            if progress is not None:
                elapsed = time.perf_counter() - start
                progress(steps, total, steps * loader.batch_size / max(elapsed, 1e-9))
        # -- preemption: a mid-epoch checkpoint every checkpoint.every_steps steps, or save and stop on a signal --
        action = boundary.after_step(state.global_step, steps == total, agreed_stop) if boundary is not None else None
        if action is not None:
            _check_finite(first_bad, state, epoch)  # never checkpoint a diverged step
            synchronize(device)
            position = EpochPosition(epoch, steps, sums.sums.tolist(), time.perf_counter() - start, data_seconds,
                                     compile_seconds, compile_samples)  # fmt: skip
            boundary.save(position)
            if action == "stop":
                preempted = True
                break
    synchronize(device)
    seconds = time.perf_counter() - start
    _check_finite(first_bad, state, epoch)
    result = epoch_result(state, sums, seconds, data_seconds, compile_seconds, compile_samples, steps, preempted)
    if progress is not None:
        progress(steps, total, result["images_per_second"] / state.env.world_size)
    return result


def epoch_result(
    state: TrainState,
    sums: MetricSums,
    seconds: float,
    data_seconds: float,
    compile_seconds: float,
    compile_samples: int,
    steps: int,
    preempted: bool,
) -> dict[str, Any]:
    """An epoch's metrics line: loss / top-1 / top-5 over all ranks (one sync), timing and throughput, the steps
    taken and the last learning rate. The steps that compiled are left out of images/s (their time and images)."""
    result = sums.result(state.env)
    images_total = result["samples"]  # all ranks together
    timed = max(seconds - compile_seconds, 1e-9)
    # the compiling steps happen on every rank alike, so the world's share is scaled
    timed_images = images_total - compile_samples * state.env.world_size
    result.update(
        seconds=seconds,
        data_seconds=data_seconds,
        compute_seconds=max(seconds - data_seconds - compile_seconds, 0.0),
        compile_seconds=compile_seconds,
        timed_samples=max(timed_images, 0),
        images_per_second=timed_images / timed if timed_images > 0 else images_total / max(seconds, 1e-9),
        steps=steps,
        lr=float(state.optimizer.param_groups[0]["lr"]),  # a device tensor under CUDA graphs
        preempted=preempted,
    )
    return result


def train_step(
    state: TrainState, model: nn.Module, *, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and optimizer step on one batch; returns (loss, logits). One AMP branch, here only."""
    with state.autocast():
        logits = model(images)
        loss = state.criterion(logits, labels)
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        if state.grad_clip:
            state.scaler.unscale_(state.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), state.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        loss.backward()
        if state.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), state.grad_clip)
        state.optimizer.step()
    return loss, logits


def _forward(state: TrainState, model: nn.Module, *, images: torch.Tensor) -> torch.Tensor:
    with state.autocast():
        return model(images)


@torch.no_grad()
def evaluate(state: TrainState, loader: Loader) -> dict[str, Any]:
    """Loss (plain cross-entropy, no label smoothing), top-1 and top-5 over the whole split, all ranks."""
    device = state.device
    state.model.eval()
    sums = MetricSums(device)
    synchronize(device)
    start = time.perf_counter()
    compile_seconds = 0.0
    for images, labels in loader:
        logits, compiling = state.call(functools.partial(_forward, state, images=images), ("eval", images.shape))
        compile_seconds += compiling
        logits = logits.float()
        loss = nn.functional.cross_entropy(logits, labels)
        sums.update(loss, logits, labels)
    synchronize(device)
    result = sums.result(state.env)
    result["seconds"] = time.perf_counter() - start
    result["compile_seconds"] = compile_seconds
    return result
