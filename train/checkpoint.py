"""Checkpoints: atomic writes, a reader that runs no code, full training state for ``--resume``, RNG states.

``last.pt`` holds everything needed to continue exactly at an epoch boundary (or, after a preemption, at the batch
inside the epoch it names: train/preempt.py): model, optimizer, GradScaler,
schedule state, the next epoch (which is also the loader's ``set_epoch`` value), best-so-far bookkeeping and
the RNG states of Python, NumPy, torch CPU and CUDA. Every file is written to a temporary name in the same
folder and moved into place with ``os.replace``, so an interruption (Ctrl-C, a killed job) leaves either the
old file or the new one, never half of one.

Everything the trainer writes holds only tensors, numbers, strings, ``None`` and lists / dicts of them (RNG
states included, see :func:`rng_state`), so every file loads with ``torch.load(..., weights_only=True)`` and
:func:`load` reads nothing else: a file whose unpickling would call anything more (a foreign or planted pickle)
is refused with a :class:`CheckpointError` naming the file and what it asked for, before any of it runs.
Checkpoints of the first format (RNG states as NumPy arrays and Python tuples) still load, through the same
restricted unpickler with NumPy's plain-array rebuild allowed; ``python -m train.checkpoint upgrade PATH...``
rewrites them in the current format. See docs/safety.md.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# how torch.save's zip writer reports a failed write (full disk, RLIMIT_FSIZE)
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "failed writing")


class CheckpointError(Exception):
    """A checkpoint that is refused (it would need code to load) or cannot be read (truncated, not a torch file)."""


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


# What the first checkpoint format needs beyond plain data: NumPy's RNG state as an ndarray. These three rebuild
# an array from a dtype, a shape and raw bytes (the allowlist PyTorch documents for NumPy arrays), plus the uint32
# dtype class the RNG keys carry; nothing else.
_LEGACY_GLOBALS = frozenset({"numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct"})


def _legacy_safe_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core  # NumPy 2 moved it; pickles name whichever wrote them
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _needed_globals(path: Path, error: Exception) -> list[str]:
    """Names of the callables a refused pickle asks for, read from its opcodes (nothing is run)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a torch zip file: fall back to the unpickler's own complaint
        found = re.findall(r"GLOBAL ([\w.]+)", str(error))
    # numpy.core.* (NumPy 1) and numpy._core.* (NumPy 2) name the same function
    return sorted({name.replace("numpy.core.", "numpy._core.") for name in found})


def _torch_load(path: Path, legacy: bool) -> Any:
    with warnings.catch_warnings():
        # a foreign pickle protocol makes torch warn before it refuses; the refusal is the message that matters
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
        if not legacy:
            return torch.load(path, map_location="cpu", weights_only=True)
        with torch.serialization.safe_globals(_legacy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True`` (tensors are moved by ``load_state_dict``).

    Raises :class:`CheckpointError` (one line naming the file) for a file that would need code to load, or that
    is truncated or not a checkpoint; nothing in a refused file runs. First-format files (NumPy RNG states) load
    too, their RNG states converted to the current form in memory.
    """
    path = Path(path)
    try:
        value = _torch_load(path, legacy=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as error:  # noqa: BLE001 - every way a file can fail to load becomes one line
        if not isinstance(error, pickle.UnpicklingError):
            raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(error)})") from None
        needed = _needed_globals(path, error)
        if not needed or not set(needed) <= _LEGACY_GLOBALS:
            calls = ", ".join(needed)
            reason = f"loading it would call {calls}" if needed else f"not plain data ({_first_line(error)})"
            raise CheckpointError(
                f"refused {path}: {reason}; checkpoints of this trainer hold only tensors, numbers, strings, lists "
                "and dicts, and nothing in this file was run. Load only files you trust, never with weights_only=False"
            ) from None
        try:
            value = _torch_load(path, legacy=True)
        except Exception as again:  # noqa: BLE001
            raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(again)})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a {type(value).__name__}, not a checkpoint of this trainer (a dict)")
    if isinstance(value.get("rng"), list):
        value["rng"] = [_plain_rng(state) if isinstance(state, Mapping) else state for state in value["rng"]]
    return value


def _first_line(error: BaseException) -> str:
    """The telling sentence of a torch / pickle error (torch's weights-only and zip errors are paragraphs)."""
    text = str(error)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if marker else text).splitlines() if line.strip()]
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return first if marker else f"{type(error).__name__}: {first}".rstrip(": ")


def rng_state() -> dict[str, Any]:
    """RNG states of Python, NumPy, torch (CPU and every CUDA device), as tensors, numbers and dicts only.

    Python's Mersenne Twister state (625 words < 2**32) and NumPy's (624 words) are int64 tensors, so the
    checkpoint holding them loads with ``weights_only=True``; :func:`set_rng_state` restores them exactly.
    """
    version, words, gauss = random.getstate()
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain_rng(state: Mapping[str, Any]) -> dict[str, Any]:
    """A first-format RNG state (Python tuple, NumPy tuple with an ndarray) in the current form; others as is."""
    state = dict(state)
    python, numpy_state = state.get("python"), state.get("numpy")
    if isinstance(python, tuple):
        version, words, gauss = python
        state["python"] = {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss}
    if isinstance(numpy_state, tuple):
        algorithm, keys, pos, has_gauss, cached = numpy_state
        state["numpy"] = {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the first format's tuples are accepted too)."""
    state = _plain_rng(state)
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(int(w) for w in python["state"].tolist()), python["gauss"]))
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (numpy_state["algorithm"], keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    )
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
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}  # one copy


def upgrade(path: str | os.PathLike) -> bool:
    """Rewrite a first-format checkpoint in the current one (atomically); False when it already was current."""
    path = Path(path)
    try:
        _torch_load(path, legacy=False)
        return False
    except Exception:  # noqa: BLE001 - load() below says precisely why, or converts it
        pass
    atomic_save(load(path), path)  # load() refuses anything beyond the first format's NumPy arrays
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m train.checkpoint upgrade PATH...``: convert first-format checkpoints in place."""
    parser = argparse.ArgumentParser(
        prog="python -m train.checkpoint",
        description="Rewrite checkpoints of the first format (NumPy RNG states) so that they load with "
        "torch.load(..., weights_only=True). Files that would need code to load are refused, not converted.",
    )
    parser.add_argument("command", choices=["upgrade"])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="last.pt / best.pt / conv1.pt / samples.pt files")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths:
        try:
            print(f"{path}: {'upgraded' if upgrade(path) else 'already current'}")
        except CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
