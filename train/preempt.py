"""Preemption-safe training: a signal asks for a checkpoint at the next step boundary, then the run exits 3.

SIGTERM (what a cluster sends before it kills a job) and SIGUSR1 (SLURM's ``--signal``) only set a flag
(:class:`StopSignals`); the training loop looks at it at each step boundary (:class:`StepBoundary`), saves
``last.pt`` holding the exact position inside the epoch (:class:`EpochPosition`) and the run ends with
:data:`EXIT_PREEMPTED`. ``checkpoint.every_steps = N`` also saves that mid-epoch checkpoint every N steps (in case
the job is killed with no warning). ``--resume`` continues at the next batch; see docs/preemption.md.

Why the handler does nothing but set a flag: a second signal while the checkpoint is written (a scheduler that
signals twice, an impatient user) then changes nothing, and the write itself is atomic (temp file + rename), so
the folder holds the old checkpoint or the new one. Ctrl-C (SIGINT) during a checkpoint write is held back until
the write is done (:meth:`StopSignals.deferred_interrupt`).

Under torchrun every rank must stop at the same step (each then writes its part of the checkpoint: RNG states,
loader streams, partial metric sums). The flag is not reduced every step: it rides on the all-reduce that the
loop already does every ``logging.refresh_steps`` steps for its NaN check (one more integer in that tensor), so a
multi-process run stops within ``refresh_steps`` steps of the signal, and a single process at the next step.

Test hook: ``DIVNORM_SIGNAL_AT_STEP=k`` (or ``k:SIGUSR1``) makes the trainer send itself SIGTERM (SIGUSR1) with
``os.kill`` right after global step ``k``, a real signal through the real handler, so tests stop a run at a known
step without timing races; ``DIVNORM_SIGNAL_IN_SAVE=1`` sends a second SIGTERM while that checkpoint is written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from train.config import ConfigError
from train.distributed import DistributedEnv

EXIT_PREEMPTED = 3  # documented in python -m train --help and docs/preemption.md; 0/1/2/130 mean other things
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SIGNAL_AT_STEP_ENV = "DIVNORM_SIGNAL_AT_STEP"
SIGNAL_IN_SAVE_ENV = "DIVNORM_SIGNAL_IN_SAVE"
SIGNAL_IN_COMPILE_ENV = "DIVNORM_SIGNAL_IN_COMPILE"  # test hook: SIGTERM / SIGUSR1 to itself as a first compile starts


class Preempted(Exception):
    """The run saved its position after a signal and stopped; the process exits with :data:`EXIT_PREEMPTED`.

    ``hint``: what to run next (``--resume`` where a checkpoint holds the position)."""

    def __init__(self, message: str, hint: str = "continue with --resume") -> None:
        super().__init__(message)
        self.hint = hint


@dataclass
class EpochPosition:
    """Where a mid-epoch checkpoint stands on one rank: epoch (0-based), batches done in it, and the partial
    epoch's running metric sums (``[loss_sum, top1, top5, count]``) and timing, so the epoch's metrics line after
    a resume is the line of an uninterrupted epoch (time spent while stopped not counted)."""

    epoch: int
    batch: int
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    seconds: float = 0.0
    data_seconds: float = 0.0
    compile_seconds: float = 0.0
    compile_samples: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers only (a checkpoint that loads with ``weights_only=True``)."""
        return asdict(self)


class StopSignals:
    """Flag-only handlers for SIGTERM and SIGUSR1 while installed (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._immediate: tuple[str, str] | None = None  # (where, hint) of the stop raised inside :meth:`immediate`

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def close(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:  # the first signal counts; later ones (during the save) change nothing
            self.received = signum
        if self._immediate is not None:
            (where, hint), self._immediate = self._immediate, None
            raise Preempted(f"stopped by {signal.Signals(signum).name} {where}", hint)

    @contextlib.contextmanager
    def immediate(self, where: str, hint: str) -> Iterator[None]:
        """Inside the block a signal raises :class:`Preempted` at once instead of waiting for a step boundary: for
        work that has nothing to save and may never reach a boundary (a run's first compile: a signal sent to the
        whole process group also ends inductor's compile workers, and the compile then waits on them for ever)."""
        if self.received is not None:
            raise Preempted(f"stopped by {self.name} {where}", hint)
        self._immediate = (where, hint)
        hook = os.environ.get(SIGNAL_IN_COMPILE_ENV)
        try:
            if hook:
                os.kill(os.getpid(), getattr(signal, hook))
            yield
        finally:
            self._immediate = None

    @contextlib.contextmanager
    def deferred_interrupt(self) -> Iterator[None]:
        """Hold Ctrl-C back while a checkpoint is written; raise it (KeyboardInterrupt) once the write is done."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        pressed: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, _frame: pressed.append(signum))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if pressed:
            raise KeyboardInterrupt


class StepBoundary:
    """What happens after each training step: nothing, a mid-epoch save (``every_steps``), or save and stop.

    ``save(position)`` writes the checkpoint (a collective: under torchrun every rank calls it at the same step).
    """

    def __init__(
        self,
        env: DistributedEnv,
        signals: StopSignals,
        every_steps: int,
        save: Callable[[EpochPosition], None],
        say: Callable[[str], None] = print,
    ) -> None:
        if not isinstance(every_steps, int) or every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps must be 0 (off) or a number of steps, got {every_steps!r}")
        self.env, self.signals, self.every_steps, self.save, self.say = env, signals, every_steps, save, say
        self.resume: EpochPosition | None = None  # set by Run.restore from a mid-epoch checkpoint
        self.hook_step, self.hook_signal = _parse_hook(os.environ.get(SIGNAL_AT_STEP_ENV))

    def start(self, epoch: int) -> EpochPosition | None:
        """The position to continue ``epoch`` from (once), or None to start it at its first batch."""
        position, self.resume = self.resume, None
        if position is not None and position.epoch != epoch:
            raise ValueError(f"the checkpoint stopped inside epoch {position.epoch + 1}, not {epoch + 1}")
        return position

    def after_step(self, global_step: int, last: bool, agreed_stop: bool | None) -> str | None:
        """``"stop"``, ``"save"`` or None after global step ``global_step`` (``last``: the epoch's last batch).

        ``agreed_stop`` is the flag reduced over ranks when this step synced (None otherwise); a multi-process run
        only stops on it, so that every rank stops at the same step.
        """
        if global_step == self.hook_step:
            os.kill(os.getpid(), self.hook_signal)  # the test hook: a real signal, handled before the next line
        stop = bool(agreed_stop) if self.env.enabled else self.signals.requested
        if stop:
            return "stop"
        if self.every_steps and global_step % self.every_steps == 0 and not last:  # the epoch's end saves anyway
            return "save"
        return None

    def stop_agreed(self, device: torch.device) -> bool:
        """Whether any rank got a signal (one small all-reduce; every rank must call it, e.g. at an epoch end)."""
        if not self.env.enabled:
            return self.signals.requested
        flag = torch.tensor([int(self.signals.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def signal_in_save(self) -> None:
        """The test hook ``DIVNORM_SIGNAL_IN_SAVE``: a second SIGTERM while the checkpoint is being written."""
        if os.environ.get(SIGNAL_IN_SAVE_ENV) and self.signals.requested:
            os.kill(os.getpid(), signal.SIGTERM)


def _parse_hook(value: str | None) -> tuple[int | None, int]:
    if not value:
        return None, signal.SIGTERM
    step, _, name = value.partition(":")
    try:
        return int(step), int(getattr(signal, name or "SIGTERM"))
    except (ValueError, AttributeError):
        raise ConfigError(f"{SIGNAL_AT_STEP_ENV}={value!r}: expected a step number, optionally :SIGUSR1") from None
