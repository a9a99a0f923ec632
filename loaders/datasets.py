"""Data set definitions shared by every loader and by ``tools/convert.py``.

One place says, per data set: number of classes, image size, normalization, splits and their sizes, where
the files live, and the class map. Nothing here depends on a loader backend.

* ``synthetic``: built in, procedurally generated and deterministic (no download), CIFAR-100-shaped
  (100 classes of 32x32 RGB) and learnable: every class is a random colour grating pattern, every sample a
  randomly shifted, contrast-jittered, noisy copy of it. 20,000 / 2,000 / 2,000 samples, or sized with
  ``data.synthetic_size=N`` (N training samples, N/4 in val and test: 40000 gives CIFAR-100's split sizes).
* ``cifar100``: torchvision's CIFAR-100 files under ``<root>/cifar-100-python``; ``train`` / ``val`` are a seeded
  80/20 split of the official training set (as the original), ``test`` is the official test set.
* ``imagenet``: ImageFolder trees ``<root>/train/<wnid>/*`` and ``<root>/val/<wnid>/*``; class index = position
  of the wnid in sorted order (torchvision's ImageFolder). ImageNet's test labels are not public, so ``test``
  is the official validation set (``val`` and ``test`` report the same images).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from loaders.errors import LoaderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int  # training resolution
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    in_memory: bool  # small uint8 arrays (synthetic, CIFAR) rather than JPEG files


DATASETS: dict[str, DatasetInfo] = {
    "synthetic": DatasetInfo("synthetic", 100, 32, CIFAR100_MEAN, CIFAR100_STD, True),
    "cifar100": DatasetInfo("cifar100", 100, 32, CIFAR100_MEAN, CIFAR100_STD, True),
    "imagenet": DatasetInfo("imagenet", 1000, 224, IMAGENET_MEAN, IMAGENET_STD, False),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise LoaderError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise LoaderError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------- synthetic

SYNTHETIC_SIZES = {"train": 20_000, "val": 2_000, "test": 2_000}
# CIFAR-100's train / val / test proportions (40,000 / 10,000 / 10,000 after the 80/20 split)
CIFAR100_EVAL_FRACTION = 0.25
SYNTHETIC_SEED = 20_251_125
_SPLIT_OFFSET = {"train": 1, "val": 2, "test": 3}


@lru_cache(maxsize=1)
def _synthetic_prototypes(num_classes: int = 100, size: int = 32) -> np.ndarray:
    """Per-class float32 patterns (num_classes, size, size, 3) in [0, 1]: two colour gratings each."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    protos = np.empty((num_classes, size, size, 3), np.float32)
    for k in range(num_classes):
        img = np.zeros((size, size, 3), np.float32)
        for _ in range(2):
            theta = rng.uniform(0, np.pi)
            freq = rng.uniform(1.0, 4.0) * 2 * np.pi / size
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
            colour = rng.uniform(-1, 1, 3)
            img += wave[..., None] * colour[None, None, :]
        img += rng.uniform(-0.5, 0.5, 3)[None, None, :]  # class colour cast
        lo, hi = img.min(), img.max()
        protos[k] = (img - lo) / max(hi - lo, 1e-6)
    return protos


def synthetic_arrays(split: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic set's ``split`` as (uint8 images (N, 32, 32, 3), int64 labels (N,)), deterministic.

    ``size`` overrides the number of samples (tests and benchmarks use small or large sets). The arrays are
    generated once per process and split / size (train, val and test of one size are kept): a run that builds a
    split's loader twice (a resumed or repeated run in one process, the test suite's many short runs) skips the
    ~2-5 s of generating 20,000 images. The images come back read-only (every loader copies what it keeps), the
    labels as a fresh copy.
    """
    check_split(split)
    images, labels = _synthetic_arrays(split, SYNTHETIC_SIZES[split] if size is None else int(size))
    return images, labels.copy()


@lru_cache(maxsize=len(SYNTHETIC_SIZES))
def _synthetic_arrays(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SYNTHETIC_SEED + _SPLIT_OFFSET[split])
    protos = _synthetic_prototypes()
    labels = np.arange(n, dtype=np.int64) % protos.shape[0]
    rng.shuffle(labels)
    images = np.empty((n, 32, 32, 3), np.uint8)
    chunk = 4096
    for start in range(0, n, chunk):
        lab = labels[start : start + chunk]
        m = len(lab)
        shifts = rng.integers(-4, 5, size=(m, 2))
        contrast = rng.uniform(0.6, 1.4, size=(m, 1, 1, 1)).astype(np.float32)
        noise = 0.12 * rng.standard_normal(size=(m, 32, 32, 3), dtype=np.float32)
        # circular shift per sample (translation the network must tolerate), as one gather
        rows = (np.arange(32)[None, :] - shifts[:, :1]) % 32
        cols = (np.arange(32)[None, :] - shifts[:, 1:]) % 32
        batch = protos[lab[:, None, None], rows[:, :, None], cols[:, None, :]]
        batch = (batch - 0.5) * contrast + 0.5 + noise
        images[start : start + m] = np.clip(batch * 255.0 + 0.5, 0, 255).astype(np.uint8)
    images.flags.writeable = False  # shared by every caller of this process
    return images, labels


# ----------------------------------------------------------------------------------------------- CIFAR-100

CIFAR_FOLDER = "cifar-100-python"
CIFAR_TRAIN_FRACTION = 0.8


def cifar100_missing_message(root: str | os.PathLike | None) -> str:
    where = Path(root or "data").resolve() / CIFAR_FOLDER
    return (
        f"CIFAR-100 not found: looked for {where}/train and {where}/test. "
        "Pass --download to fetch it (169 MB, needs internet), or point --data-dir at the folder that holds "
        f"{CIFAR_FOLDER}/."
    )


def cifar100_split_indices(seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Seeded 80/20 split of the 50,000 official training images into (train, val) indices."""
    order = np.random.default_rng(seed).permutation(50_000)
    cut = int(50_000 * CIFAR_TRAIN_FRACTION)
    return np.sort(order[:cut]), np.sort(order[cut:])


def cifar100_arrays(
    split: str, root: str | os.PathLike | None, download: bool = False, seed: int = 42
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100 ``split`` as (uint8 images (N, 32, 32, 3), int64 fine labels (N,))."""
    check_split(split)
    root = Path(root or "data")
    official = "test" if split == "test" else "train"
    if download:
        from torchvision.datasets import CIFAR100

        CIFAR100(str(root), train=official == "train", download=True)
    path = root / CIFAR_FOLDER / official
    if not path.is_file():
        raise LoaderError(cifar100_missing_message(root))
    entry = read_cifar_pickle(path)
    images = np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(entry["fine_labels"], np.int64)
    if split != "test":
        train_idx, val_idx = cifar100_split_indices(seed)
        idx = train_idx if split == "train" else val_idx
        images, labels = images[idx], labels[idx]
    return np.ascontiguousarray(images), labels


def cifar100_class_names(root: str | os.PathLike | None) -> list[str]:
    path = Path(root or "data") / CIFAR_FOLDER / "meta"
    if not path.is_file():
        return [str(i) for i in range(100)]
    return list(read_cifar_pickle(path)["fine_label_names"])


# What the CIFAR-100 python files need beyond plain data: NumPy's array rebuild (NumPy 1 and 2 spellings), and
# _codecs.encode, which a protocol-2 pickle written by Python 3 uses for bytes. These build an array from a dtype,
# a shape and raw bytes, or bytes from a string, and run no other code.
_CIFAR_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def read_cifar_pickle(path: str | os.PathLike) -> dict:
    """A CIFAR-100 python file (a pickle) read with only NumPy's array rebuild allowed: a file that asks for any
    other callable (a planted or foreign pickle would run it) is a :class:`LoaderError` and nothing in it runs."""
    import pickle

    class DataOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) not in _CIFAR_GLOBALS:
                raise LoaderError(
                    f"refused {path}: loading it would call {module}.{name}, which the CIFAR-100 files never need; "
                    "nothing in it was run. Replace the folder with the official files (--download)"
                )
            if module == "numpy.core.multiarray":  # NumPy 1's name for what NumPy 2 keeps in numpy._core
                module = "numpy._core.multiarray" if hasattr(np, "_core") else module
            return super().find_class(module, name)

    try:
        with open(path, "rb") as f:
            entry = DataOnly(f, encoding="latin1").load()
    except LoaderError:
        raise
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise LoaderError(f"{path} is not a readable CIFAR-100 file ({type(error).__name__}: {error})") from None
    if not isinstance(entry, dict):
        raise LoaderError(f"{path} is not a CIFAR-100 file (it holds a {type(entry).__name__}, not a dict)")
    return entry


def synthetic_split_size(split: str, train_size: int | None = None) -> int:
    """Samples in the synthetic set's ``split``: the built-in 20,000 / 2,000 / 2,000 when ``train_size`` is None,
    else ``train_size`` training samples and a quarter of that in val and in test, CIFAR-100's proportions
    (``data.synthetic_size=40000`` gives CIFAR-100's 40,000 / 10,000 / 10,000)."""
    check_split(split)
    if train_size is None:
        return SYNTHETIC_SIZES[split]
    if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
        raise LoaderError(f"data.synthetic_size must be a positive integer or null, got {train_size!r}")
    return train_size if split == "train" else max(1, round(train_size * CIFAR100_EVAL_FRACTION))


def array_dataset(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 42,
    synthetic_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Uint8 HWC arrays of an in-memory data set (``synthetic`` or ``cifar100``); ``synthetic_size`` sizes the
    synthetic set (see :func:`synthetic_split_size`), CIFAR-100 has its own sizes."""
    if name == "synthetic":
        return synthetic_arrays(split, synthetic_split_size(split, synthetic_size))
    if name == "cifar100":
        return cifar100_arrays(split, root, download=download, seed=seed)
    raise LoaderError(f"{name!r} is not an in-memory data set (synthetic, cifar100)")


# ------------------------------------------------------------------------------------------------ ImageNet

IMAGENET_LAYOUT = "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (torchvision ImageFolder layout)"


def imagenet_split_dir(root: str | os.PathLike | None, split: str) -> Path:
    """Folder of ``split`` in an ImageNet ImageFolder tree (``test`` is the official ``val``)."""
    check_split(split)
    if root is None:
        raise LoaderError(f"ImageNet needs --data-dir: expected {IMAGENET_LAYOUT}")
    folder = Path(root) / ("train" if split == "train" else "val")
    if not folder.is_dir():
        message = f"ImageNet split {split!r} not found: looked for {folder}; expected {IMAGENET_LAYOUT}"
        conversion = conversion_manifest(root)
        if conversion is not None:
            message += (
                f"; {root} is a tools/convert.py output ({conversion.get('format')}): read it with "
                f"--loader {conversion.get('format')} (or auto), or give the torch loader its source "
                f"{conversion.get('source')}"
            )
        raise LoaderError(message)
    return folder


def conversion_manifest(root: str | os.PathLike, formats: tuple[str, ...] = ("dali", "ffcv")) -> dict | None:
    """The manifest of a tools/convert.py output in one of ``formats`` at ``root`` (``OUT``, or ``OUT/<format>``;
    in the order of ``formats``), or None where ``root`` holds none (or none that parses)."""
    import json

    root = Path(root)
    for folder in (*(root / fmt for fmt in formats), root):
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("format") in formats:
            return manifest
    return None


def imagenet_classes(split_dir: str | os.PathLike) -> list[str]:
    """Sorted wnid folder names of the tree that holds ``split_dir``: index i is class i.

    The class list comes from ``train/`` when it exists (so a val folder that lacks a class cannot shift the
    indices), else from ``split_dir`` itself; on the full data set this is torchvision's ImageFolder order.
    """
    split_dir = Path(split_dir)
    train_dir = split_dir.parent / "train"
    source = train_dir if train_dir.is_dir() else split_dir
    classes = sorted(e.name for e in os.scandir(source) if e.is_dir())
    if not classes:
        raise LoaderError(f"no class folders in {source}; expected {IMAGENET_LAYOUT}")
    return classes


def imagenet_samples(split_dir: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, classes) of an ImageFolder split, files sorted within each class."""
    classes = imagenet_classes(split_dir)
    paths: list[str] = []
    labels: list[int] = []
    for index, wnid in enumerate(classes):
        folder = Path(split_dir) / wnid
        if not folder.is_dir():
            continue
        files = sorted(e.path for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(files)
        labels.extend([index] * len(files))
    return paths, labels, classes
