"""Checkpoints: atomic writes, full training state for ``--resume``, RNG states, conv1 weights.

``last.pt`` holds everything needed to continue exactly at an epoch boundary: model, optimizer, GradScaler,
schedule state, the next epoch (which is also the loader's ``set_epoch`` value), best-so-far bookkeeping and
the RNG states of Python, NumPy, torch CPU and CUDA. Every file is written to a temporary name in the same
folder and moved into place with ``os.replace``, so an interruption (Ctrl-C, a killed job) leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# how torch.save's zip writer reports a failed write (full disk, RLIMIT_FSIZE)
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "failed writing")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file-size limit, no permission); the old file is intact."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then ``os.replace`` (all or nothing).

    A failed write (torch reports a full disk as ``[enforce fail at inline_container.cc] unexpected pos``)
    removes the temp file and raises :class:`CheckpointWriteError`, which names the file and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, RuntimeError) and not any(w in str(error) for w in _TORCH_WRITE_FAILURES):
            raise  # not a write failure (an unpicklable object, say)
        free = shutil.disk_usage(path.parent).free / 2**20
        reason = "the write stopped short" if "unexpected pos" in str(error) else str(error)
        raise CheckpointWriteError(
            f"could not write {path} ({reason}; {free:,.0f} MiB free on its disk). The previous {path.name}, if "
            "any, is untouched: free some space or set logging.runs_dir to a disk with room, then rerun (with "
            "--resume where the run folder holds a last.pt)"
        ) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU (tensors are moved by ``load_state_dict``)."""
    # weights_only=False: the checkpoint holds RNG states (NumPy arrays, Python tuples) written by this trainer
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    """RNG states of Python, NumPy, torch (CPU and every CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with one value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first ``Conv2d`` in module order: the network's conv1, whose filters people plot."""
    for module in unwrap(model).modules():
        if isinstance(module, nn.Conv2d):
            return module
    return None


def conv1_weight(model: nn.Module) -> torch.Tensor | None:
    conv = first_conv(model)
    return None if conv is None else conv.weight.detach().float().cpu().clone()


def save_conv1(path: str | os.PathLike, weights: Mapping[str, torch.Tensor | None]) -> None:
    """``conv1.pt``: a dict with the conv1 filters at ``initial``, ``best`` and ``final`` (those known so far)."""
    atomic_save({k: v for k, v in weights.items() if v is not None}, path)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unwrapped model (no ``module.`` / ``_orig_mod.`` prefixes), on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
