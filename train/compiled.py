"""``training.compile``: torch.compile by default on CUDA, a persistent cache, compile time kept apart, eager fallback.

* :func:`resolve_compile`: ``auto`` -> on for CUDA, off on CPU (inductor's CPU code is rarely faster for these
  convnets and needs a C++ toolchain); ``true`` / ``false`` as given.
* :func:`use_persistent_cache`: inductor's FX-graph and AOTAutograd caches are on by default in torch but live in
  ``/tmp`` (wiped at reboot, per machine); they move to the user's cache folder so a rerun of the same model
  compiles in seconds. ``TORCHINDUCTOR_CACHE_DIR`` set by the user wins.
* ``training.compile_dynamic`` (:data:`DYNAMIC_CHOICES`): ``false`` (default) compiles one static graph per input
  shape; ``auto`` is torch's own default (after a second shape dynamo compiles a shape-generic graph); ``true``
  compiles shape-generic graphs from the start. Static is the default because the shapes a run sees are few (the
  training batch, per resolution of a progressive schedule; the evaluation batch and the last partial ones), each
  static graph is specialised to its shape, and torch 2.14.1's automatic dynamic shapes fail (CPU inductor, NCHW
  tensors, i.e. ``training.channels_last=false``) when training returns to an earlier resolution after three sizes
  (8 -> 12 -> 16 -> 8 px or 32 -> 48 -> 64 -> 32: ``AssertionError: expected ... stride 3072==12288``: the generic
  graph checks the strides of the size it was compiled at); static graphs do not. Not yet compared on a GPU.
* :class:`CompileGuard`: holds the eager module and its compiled twin. Compilation happens lazily on the first call
  of each new (train/eval mode, input shape); the guard times exactly those calls (synchronized) as compile time, so
  epoch images/s excludes them, and when one of them raises it falls back to eager for good with one warning line
  naming the error, then reruns the same work eagerly: a model that cannot compile never crashes the run.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from train.preempt import Preempted

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# the modes whose inductor options capture CUDA graphs of their own (``triton.cudagraphs`` in
# ``torch._inductor.list_mode_options(mode)``): they cannot sit inside the trainer's whole-step capture
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
DYNAMIC_CHOICES = ("auto", True, False)  # training.compile_dynamic -> torch.compile(dynamic=None | True | False)
T = TypeVar("T")


def error_line(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters of it): how a fallback names its cause."""
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first_line}"


def resolve_compile(setting: Any, device: torch.device) -> bool:
    """``training.compile`` (``auto`` | true | false) -> whether to compile on ``device``."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def cache_dir() -> Path:
    """Where inductor's caches go: ``$TORCHINDUCTOR_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/divnorm-trainer``."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "divnorm-trainer" / "torchinductor"


def use_persistent_cache() -> Path:
    """Point inductor (and Triton, if unset) at the persistent cache folder; returns it."""
    folder = cache_dir()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return folder


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompileGuard:
    """The model the loop calls: compiled where enabled, eager after a compile failure; compile time measured.

    Args:
        eager: the module (possibly DDP-wrapped) to run eagerly.
        enabled: compile it (``resolve_compile``'s answer).
        mode: ``training.compile_mode``; ``default`` passes no mode to ``torch.compile``.
        dynamic: ``training.compile_dynamic``: False (a static graph per shape), ``"auto"`` (torch's default) or
            True.
        device: synchronized around timed first calls, so the time is the compile's and not the queue's.
        say: where the one fallback warning line goes.
    """

    def __init__(
        self,
        eager: nn.Module,
        *,
        enabled: bool,
        mode: str = "default",
        dynamic: bool | str = False,
        device: torch.device,
        say: Callable[[str], None] = print,
    ) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"training.compile_mode={mode!r}; choose one of: {', '.join(COMPILE_MODES)}")
        if dynamic not in DYNAMIC_CHOICES:
            raise ValueError(f"training.compile_dynamic={dynamic!r}; choose one of: auto, true, false")
        self.eager = eager
        self.enabled = enabled
        self.mode = mode
        self.device = device
        self.say = say
        self.seconds = 0.0  # total time of the calls that compiled
        self.error: str | None = None  # the compile failure that made the run fall back to eager
        self._seen: set[tuple] = set()
        # around each compiling call: the run's stop-at-once guard for its first compile (train/run.py)
        self.guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.model: nn.Module = eager
        if enabled:
            use_persistent_cache()
            self.model = torch.compile(  # type: ignore[assignment]
                eager, mode=None if mode == "default" else mode, dynamic=None if dynamic == "auto" else bool(dynamic)
            )

    @property
    def compiled(self) -> bool:
        """True while the compiled module is in use (compile on and no failure)."""
        return self.enabled and self.error is None

    def run(self, work: Callable[[nn.Module], T], key: tuple) -> tuple[T, float]:
        """``work(model)``; returns its result and the seconds it spent compiling (0 on the fast path).

        ``key`` names what makes dynamo compile anew (train/eval mode, input shape): the first call with a new key
        is synchronized and timed as compile time. Any exception on such a call is taken as a compile failure:
        warn once, switch to eager, rerun ``work`` eagerly (a genuine error then raises from the eager run).
        """
        if not self.compiled or key in self._seen:
            return work(self.model), 0.0
        _synchronize(self.device)
        start = time.perf_counter()
        with self.guard():
            try:
                result = work(self.model)
            except Preempted:
                raise
            except Exception as error:  # noqa: BLE001 - dynamo / inductor raise many types; all mean "no compile"
                self.fall_back(error)
                result = work(self.model)  # the failed attempt and this eager rerun both count as compile time
        _synchronize(self.device)
        elapsed = time.perf_counter() - start
        self._seen.add(key)
        self.seconds += elapsed
        return result, elapsed

    def fall_back(self, error: BaseException) -> None:
        """Use the eager module from now on, with one warning line naming the error."""
        self.error = error_line(error)
        self.model = self.eager
        self.say(f"warning: torch.compile failed ({self.error}); training continues eagerly (training.compile=false)")

    def describe(self, setting: Any) -> dict[str, Any]:
        """The summary's ``compile`` record."""
        return {
            "setting": setting,
            "enabled": self.compiled,
            "mode": self.mode if self.enabled else None,
            "seconds": round(self.seconds, 3),
            "fallback_error": self.error,
        }
