"""Sources of the in-memory data sets (synthetic, CIFAR-100) for the torch and gpu loaders.

A split comes either from the conversion tool's raw output (``OUT/dali/<split>/images.npy`` + ``labels.npy``,
uint8 HWC images and int64 labels; ``spec.data_dir`` may be ``OUT`` or ``OUT/dali``) or, when no converted
folder is given, straight from :func:`loaders.datasets.array_dataset`. The ``subset`` option keeps the first N
samples. :func:`check_fits` refuses a set too large for the memory it would live in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loaders.base import LoaderError, LoaderSpec
from loaders.datasets import array_dataset, dataset_info

# memory the training step itself needs beside a resident data set (activations, workspace, allocator slack)
MEMORY_MARGIN_BYTES = 1 << 30
MEMORY_MARGIN_FRACTION = 0.10


def converted_split_dir(data_dir: str | Path | None, split: str) -> Path | None:
    """``<data_dir>[/dali]/<split>`` when it holds ``images.npy``; None when ``data_dir`` is not a converted folder."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    for folder in (root / "dali" / split, root / split):
        if (folder / "images.npy").is_file():
            return folder
    return None


def subset_size(spec: LoaderSpec, n: int) -> int:
    """``n`` cut to the ``subset`` option (the first N samples of the split), validated."""
    subset = spec.option("subset")
    if subset is None:
        return n
    if isinstance(subset, bool) or not isinstance(subset, int) or subset < 1:
        raise LoaderError(f"data.subset must be a positive integer or null, got {subset!r}")
    return min(int(subset), n)


def _is_converted_root(data_dir: str | Path | None) -> bool:
    if data_dir is None:
        return False
    root = Path(data_dir)
    return (root / "manifest.json").is_file() or (root / "dali" / "manifest.json").is_file()


def load_split_arrays(spec: LoaderSpec, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, H, W, 3), int64 labels (N,)) of ``spec``'s split, cut to ``subset``.

    ``mmap=True`` maps converted ``.npy`` files instead of reading them (the caller decides when to copy).
    """
    info = dataset_info(spec.dataset)
    folder = converted_split_dir(spec.data_dir, spec.split)
    if folder is not None:
        images = np.load(folder / "images.npy", mmap_mode="r" if mmap else None)
        labels = np.load(folder / "labels.npy")
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(labels) != len(images):
            raise LoaderError(
                f"{folder} does not hold uint8 images (N, H, W, 3) and N labels "
                f"(images {images.dtype} {images.shape}, labels {labels.shape}); rewrite it with tools/convert.py"
            )
    elif _is_converted_root(spec.data_dir):
        raise LoaderError(
            f"split {spec.split!r} not found in the converted folder {spec.data_dir}: expected "
            f"{Path(spec.data_dir)}/dali/{spec.split}/images.npy; write it with tools/convert.py {spec.dataset}"
        )
    elif info.in_memory:
        images, labels = array_dataset(
            spec.dataset, spec.split, spec.data_dir, spec.download, spec.seed, spec.option("synthetic_size")
        )
    else:
        raise LoaderError(
            f"{spec.dataset} has no in-memory arrays: convert it with tools/convert.py or use an ImageFolder loader"
        )
    n = subset_size(spec, len(labels))
    return images[:n], np.asarray(labels[:n], np.int64)


def available_bytes(device: torch.device) -> int:
    """Free memory where a resident data set would live: free GPU memory, or available RAM on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(nbytes: int, device: torch.device, what: str, available: int | None = None) -> None:
    """Raise :class:`LoaderError` naming the sizes when ``nbytes`` plus a margin exceeds free memory."""
    free = available_bytes(device) if available is None else int(available)
    margin = max(MEMORY_MARGIN_BYTES, int(MEMORY_MARGIN_FRACTION * free))
    if nbytes + margin > free:
        where = "GPU memory" if device.type == "cuda" else "RAM"
        raise LoaderError(
            f"{what} needs {nbytes / 2**20:,.0f} MiB resident, but only {free / 2**20:,.0f} MiB of {where} is free "
            f"(keeping {margin / 2**20:,.0f} MiB for training): the gpu loader is for small data sets; use "
            "--loader torch, dali or ffcv, or data.subset=N"
        )
