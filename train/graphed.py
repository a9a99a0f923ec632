"""``training.cuda_graphs``: the whole training step of the tensor-resident path as one replayed CUDA graph.

For small models (AlexNet / ResNet-18 at 32 px) a step is well under a millisecond of GPU work but several of
Python and kernel launches, so the GPU waits on the host. Here the batch gather + crop / flip / normalize, forward,
backward, optimizer step, metric sums and the NaN flag of one step are captured once (PyTorch's "whole-network
capture": warm-up on a side stream, the optimizer step inside the graph, static inputs) and replayed every step.
Per step the host does two things: write the step's learning rate into the optimizer's device tensor (a fill
kernel, no sync) and launch the replay.

Why explicit capture rather than ``torch.compile(mode="reduce-overhead")``: reduce-overhead graphs the model's
forward and backward only; the loader's gather, the optimizer step and the metric updates stay eager launches,
which is where an AlexNet step at batch 128 spends its time. A compiled model (default mode) can still sit inside
the captured step: its kernels are built during the warm-up steps.

What makes a step capturable: nothing syncs with the host (the epoch's order, crops and flips are static device
buffers filled once per epoch, the step index and global step live on the device, the metric count is a fill
kernel), nothing allocates a new input (the batch is gathered from the static buffers by the device step index),
and the learning rate is a device tensor (``build_optimizer(lr_on_device=True)``). Training batches are all full
(the contract drops the last partial one), so one graph serves every step; evaluation runs eagerly in large batches.

On the CPU (tests) :class:`GraphedSteps` runs the same step code without capture, so the step's logic is checked in
CI against the ordinary loop; the capture itself is checked by the GPU tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from train.compiled import CUDAGRAPH_MODES, error_line
from train.loop import TrainState, _check_finite, epoch_result, synchronize
from train.metrics import MetricSums
from train.preempt import EpochPosition, StepBoundary

WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuDNN / autotune / compile choices settle)


def graphs_blocker(
    *,
    device: torch.device,
    loader: Any,
    world_size: int,
    amp: str,
    compile_mode: str,
    record_samples: bool,
) -> str | None:
    """Why the whole-step graph cannot be used here (a sentence), or ``None`` when it can."""
    from loaders.tensor import TensorLoader

    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not isinstance(loader, TensorLoader):
        return "the captured step reads its batch from the tensor-resident loader (--loader gpu)"
    if world_size > 1:
        return "distributed runs all-reduce gradients outside the step (one process only)"
    if amp == "fp16":
        return "fp16's GradScaler checks for inf on the host every step (use training.amp=bf16)"
    if compile_mode in CUDAGRAPH_MODES:
        return (
            f"training.compile_mode={compile_mode} captures CUDA graphs of its own (use default or "
            "max-autotune-no-cudagraphs)"
        )
    if record_samples:
        return "training.record_samples copies every batch to the host"
    return None


class GraphedSteps:
    """The static buffers and the captured step of one run (built once; :meth:`start_epoch` refills per epoch).

    Args:
        state: the run's training state (model / compile guard, optimizer with a device learning rate, criterion).
        loader: the tensor-resident training loader (``epoch_plan`` / ``make_batch``).
        capture: capture a CUDA graph after :data:`WARMUP_STEPS` eager steps; ``False`` runs the same step code
            eagerly (CPU tests).
        strict: a capture that fails raises (``training.cuda_graphs=true``); otherwise (``auto``) the run goes on
            with uncaptured steps after one line naming the error.
        say: where that line goes.
    """

    def __init__(
        self,
        state: TrainState,
        loader: Any,
        *,
        capture: bool = True,
        strict: bool = False,
        say: Callable[[str], None] = print,
    ) -> None:
        self.state, self.loader, self.capture = state, loader, capture
        self.strict, self.say = strict, say
        self.fallback_error: str | None = None  # why a failed capture left the run on uncaptured steps
        device = state.device
        self.batch, self.steps = loader.batch_size, len(loader)
        rows = self.batch * self.steps
        self.order = torch.zeros(rows, dtype=torch.int64, device=device)
        self.offsets = torch.zeros(rows, 2, dtype=torch.int64, device=device)
        self.flips = torch.zeros(rows, dtype=torch.bool, device=device)
        self.step_index = torch.zeros(1, dtype=torch.int64, device=device)  # batch k of the epoch
        self.global_step = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.sums = MetricSums(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        self.capture_seconds = 0.0

    def start_epoch(self, epoch: int, position: EpochPosition | None = None) -> None:
        """Copy the epoch's order, crops and flips into the static buffers; reset counters and sums (or set them
        to a mid-epoch checkpoint's ``position``: the next replay builds batch ``position.batch``)."""
        self.loader.set_epoch(epoch)
        order, offsets, flips = self.loader.epoch_plan()
        rows = self.order.shape[0]
        self.order.copy_(order[:rows])
        self.offsets.copy_(offsets[:rows])
        self.flips.copy_(flips[:rows])
        self.step_index.fill_(position.batch if position else 0)
        self.global_step.fill_(self.state.global_step)
        self.first_bad.fill_(-1)
        self.sums.sums.copy_(torch.tensor(position.sums if position else [0.0] * 4, dtype=torch.float64))

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step_index`` of the epoch, selected on the device (no host-side slicing)."""
        shape = (self.steps, self.batch)
        rows = self.order.view(shape).index_select(0, self.step_index)[0]
        offsets = self.offsets.view(*shape, 2).index_select(0, self.step_index)[0]
        flips = self.flips.view(shape).index_select(0, self.step_index)[0]
        return self.loader.make_batch(rows, offsets, flips)

    def _step(self, model: nn.Module) -> None:
        """One whole step; every op is on the device and writes only static buffers (capturable)."""
        state = self.state
        images, labels = self._batch()
        with state.autocast():
            logits = model(images)
            loss = state.criterion(logits, labels)
        loss.backward()
        if state.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), state.grad_clip, foreach=True)
        state.optimizer.step()
        self.sums.update(loss, logits.float(), labels)
        bad = (self.first_bad < 0) & ~torch.isfinite(loss.detach())
        self.first_bad.copy_(torch.where(bad, self.global_step, self.first_bad))
        self.step_index.add_(1)
        self.global_step.add_(1)

    def _eager_step(self, model: nn.Module) -> None:
        self.state.optimizer.zero_grad(set_to_none=True)
        self._step(model)

    def run_step(self) -> float:
        """One training step: eager (warm-up, or always without capture), the capture, or a replay.

        Returns the seconds spent compiling / capturing (0 for a replay): kept out of images/s like compile time.
        """
        state = self.state
        if self.graph is not None:
            self.graph.replay()
            return 0.0
        if not self.capture or self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            if self.capture:  # warm-up on a side stream, as the capture docs require
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    _, compiling = state.call(self._eager_step, ("train", (self.batch,)))
                torch.cuda.current_stream().wait_stream(side)
                return compiling
            return state.call(self._eager_step, ("train", (self.batch,)))[1]
        return self._capture_and_replay()

    def _capture_and_replay(self) -> float:
        state = self.state
        synchronize(state.device)
        start = time.perf_counter()
        model = state.compiler.model if state.compiler is not None else state.model
        state.optimizer.zero_grad(set_to_none=True)  # backward allocates the grads inside the graph's pool
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(model)
        except Exception as error:  # noqa: BLE001 - auto falls back to the same step uncaptured, never a crash
            return self._fall_back(error, start)
        graph.replay()  # the capture recorded the step without running it
        synchronize(state.device)
        self.graph = graph
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    def _fall_back(self, error: Exception, start: float) -> float:
        """A capture failed: nothing of it ran on the device (a capture records, it does not execute), so this
        step runs again uncaptured and so do the rest; ``strict`` raises instead."""
        reason = error_line(error)
        if self.strict:
            raise RuntimeError(f"training.cuda_graphs=true: capturing the training step failed ({reason})") from error
        self.fallback_error = reason
        self.say(f"cuda graphs off: capturing the training step failed ({self.fallback_error}); uncaptured steps")
        self.capture = False
        synchronize(self.state.device)
        self.state.call(self._eager_step, ("train", (self.batch,)))
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        """The ``cuda_graphs`` entry of ``summary.json``."""
        return {
            "captured": self.graph is not None,
            "capture_seconds": round(self.capture_seconds, 3),
            "fallback_error": self.fallback_error,
        }


def train_one_epoch_graphed(
    state: TrainState,
    steps: GraphedSteps,
    epoch: int,
    progress: Callable[[int, int, float], None] | None = None,
    boundary: StepBoundary | None = None,
) -> dict[str, Any]:
    """:func:`train.loop.train_one_epoch` for the captured step: the same result keys, no data wait.

    ``boundary`` as there: continue a mid-epoch checkpoint, save every ``checkpoint.every_steps``, stop on a signal
    (a Python flag checked between replays; the saved position syncs once).
    """
    state.model.train()  # the graph was captured in training mode; evaluation in between sets eval mode
    position = (boundary.start(epoch) if boundary is not None else None) or EpochPosition(epoch, 0)
    steps.start_epoch(epoch, position)
    total = steps.steps
    compile_seconds, compile_samples = position.compile_seconds, position.compile_samples
    preempted = False
    synchronize(state.device)
    start = time.perf_counter() - position.seconds
    for done in range(position.batch + 1, total + 1):
        state.schedule.step(state.global_step)  # writes the device learning rate in place
        setup = steps.run_step()
        if setup:
            compile_seconds += setup
            compile_samples += steps.batch
        state.global_step += 1
        agreed_stop = None
        if done % state.refresh_steps == 0:
            agreed_stop = _check_finite(
                steps.first_bad, state, epoch, boundary is not None and boundary.signals.requested
            )
            if progress is not None:
                progress(done, total, done * steps.batch / max(time.perf_counter() - start, 1e-9))
        action = boundary.after_step(state.global_step, done == total, agreed_stop) if boundary is not None else None
        if action is not None:
            _check_finite(steps.first_bad, state, epoch)  # never checkpoint a diverged step
            synchronize(state.device)
            boundary.save(EpochPosition(epoch, done, steps.sums.sums.tolist(), time.perf_counter() - start, 0.0,
                                        compile_seconds, compile_samples))  # fmt: skip
            if action == "stop":
                preempted = True
                break
    synchronize(state.device)
    seconds = time.perf_counter() - start
    _check_finite(steps.first_bad, state, epoch)
    taken = done if preempted else total
    # no data wait: the batch is built inside the step
    result = epoch_result(state, steps.sums, seconds, 0.0, compile_seconds, compile_samples, taken, preempted)
    if progress is not None:
        progress(total, total, result["images_per_second"])
    return result


__all__ = ["WARMUP_STEPS", "GraphedSteps", "graphs_blocker", "train_one_epoch_graphed"]
