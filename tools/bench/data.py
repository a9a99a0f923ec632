"""Where each loader reads from: ``--data`` resolved per loader, conversion into a cache where a format is missing,
and the repeated ImageNet sample tree used for the committed CPU results.

``--data`` may be a source data set (an ImageFolder root for ImageNet, the folder holding
``cifar-100-python/`` for CIFAR-100) or an output folder of ``tools/convert.py`` (``OUT`` with ``OUT/ffcv`` and/or
``OUT/dali``; the torch loader then reads the ImageFolder tree the conversion's manifest names as its source, where
that tree is on this machine). The synthetic set needs nothing. Where the DALI or FFCV loader needs a converted
ImageNet that ``--data`` does not hold, :func:`prepare_data` runs ``tools/convert.py`` into a cache folder once and
times it; the time is reported apart from the throughput.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loaders.datasets import conversion_manifest

REPO = Path(__file__).resolve().parents[2]
CONVERT = REPO / "tools" / "convert.py"
# which converted format each loader reads for a JPEG data set (the torch loader decodes the source itself)
FORMAT_OF_LOADER = {"dali": "dali", "ffcv": "ffcv"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "divnorm-trainer" / "benchmark"


def has_format(root: Path, fmt: str) -> bool:
    """True when ``root`` (or ``root/<fmt>``) holds a finished conversion in ``fmt`` (its manifest, written last)."""
    return conversion_manifest(root, (fmt,)) is not None


def is_converted(root: Path) -> bool:
    return conversion_manifest(root) is not None


@dataclass
class DataPlan:
    """The folder each loader gets as ``spec.data_dir``, and the conversions made to get there."""

    data_dirs: dict[str, str | None] = field(default_factory=dict)
    conversions: list[dict[str, Any]] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # loader -> why it cannot read this data


def check_data(dataset: str, data: str | None) -> None:
    """Fail early, with the fix, when ``--data`` cannot hold ``dataset``."""
    if dataset == "synthetic":
        return
    if data is None:
        what = "an ImageFolder root (train/<wnid>/*.JPEG)" if dataset == "imagenet" else "the CIFAR-100 root"
        raise SystemExit(f"benchmark: --dataset {dataset} needs --data: {what} or a tools/convert.py output folder")
    root = Path(data)
    if not root.is_dir():
        raise SystemExit(f"benchmark: --data {data} is not a folder")
    if dataset == "imagenet" and not (root / "train").is_dir() and not is_converted(root):
        raise SystemExit(
            f"benchmark: --data {data} holds neither train/<wnid>/ folders (ImageFolder) nor a tools/convert.py "
            "output (ffcv/ or dali/ with manifest.json)"
        )


def _cache_folder(cache: Path, dataset: str, source: Path) -> Path:
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    return cache / f"{dataset}-{source.name}-{digest}"


def convert(dataset: str, source: Path, out: Path, fmt: str, timeout: float = 3600) -> dict[str, Any]:
    """Run ``tools/convert.py`` for one format; the record of what it did and how long it took."""
    record: dict[str, Any] = {"dataset": dataset, "format": fmt, "source": str(source), "out": str(out)}
    if not CONVERT.is_file():
        return {**record, "status": "skipped", "reason": "tools/convert.py is not in this checkout", "seconds": None}
    command = [sys.executable, str(CONVERT), dataset, "--src", str(source), "--out", str(out), "--format", fmt]
    record["command"] = " ".join(command)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**record, "status": "failed", "reason": f"conversion ran over {timeout:.0f} s", "seconds": timeout}
    seconds = round(time.perf_counter() - started, 2)
    if done.returncode != 0 or not has_format(out, fmt):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {
            **record,
            "status": "failed",
            "reason": " | ".join(tail) or f"exit {done.returncode}",
            "seconds": seconds,
        }
    return {**record, "status": "ok", "reason": "", "seconds": seconds}


def prepare_data(dataset: str, data: str | None, loaders: list[str], cache: Path | None) -> DataPlan:
    """Resolve ``--data`` per loader, converting ImageNet into ``cache`` for DALI / FFCV where needed.

    In-memory data sets (synthetic, CIFAR-100) are read by every loader straight from their arrays, so they are
    never converted here.
    """
    plan = DataPlan()
    for loader in loaders:
        plan.data_dirs[loader] = data
    if dataset != "imagenet" or data is None:
        return plan
    root = Path(data)
    cache = cache or default_cache_dir()
    if (root / "train").is_dir():
        source, named = root, None
    else:  # a conversion: its torch settings (and missing formats) read the ImageFolder tree its manifest names
        named = (conversion_manifest(root) or {}).get("source")
        source = Path(named) if named and (Path(named) / "train").is_dir() else None
    if "torch" in loaders and source != root:
        if source is not None:
            plan.data_dirs["torch"] = str(source)
            print(f"benchmark: the torch loader reads the conversion's source {source}", file=sys.stderr)
        else:
            plan.unavailable["torch"] = (
                f"the torch loader reads ImageFolder trees; --data {data} is a tools/convert.py output and its source "
                f"({named or 'not in its manifest'}) is not on this machine"
            )
    for loader in loaders:
        fmt = FORMAT_OF_LOADER.get(loader)
        if fmt is None or has_format(root, fmt):
            continue
        if source is None:
            plan.unavailable[loader] = f"--data {data} has no {fmt} conversion and no ImageFolder source to make one"
            continue
        out = _cache_folder(cache, dataset, source)
        if has_format(out, fmt):
            plan.conversions.append(
                {
                    "dataset": dataset,
                    "format": fmt,
                    "source": str(source),
                    "out": str(out),
                    "status": "cached",
                    "reason": "reused an earlier conversion",
                    "seconds": 0.0,
                }
            )
        else:
            print(f"benchmark: converting {source} to {fmt} in {out} (timed separately)", file=sys.stderr)
            record = convert(dataset, source, out, fmt)
            plan.conversions.append(record)
            if record["status"] != "ok":
                plan.unavailable[loader] = f"conversion to {fmt} {record['status']}: {record['reason']}"
                continue
        plan.data_dirs[loader] = str(out)
    return plan


def make_sample_tree(
    dest: Path, copies: int, source: Path | None = None, val_copies: int = 1, link: bool = False
) -> tuple[int, int]:
    """An ImageFolder tree of the real ImageNet sample repeated ``copies`` times in train/ (``val_copies`` in val/,
    none when 0).

    Files are ``<stem>_<k>.JPEG``: real copies by default, so reading them costs what reading distinct files costs;
    hard links with ``link`` (where the file system allows), for benchmarks that only need many file names.
    ``source`` defaults to the sample the tests use (``IMAGENET_SAMPLE`` or ``../shared/data/imagenet-sample``).
    Returns (train files, val files).
    """
    if source is None:
        from tests.conftest import imagenet_sample_dir

        source = imagenet_sample_dir()
    labels = source / "LABELS.tsv"
    if not labels.is_file():
        raise SystemExit(f"benchmark: {source} is not the ImageNet sample (no LABELS.tsv)")
    with open(labels) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    counts = []
    for split, n in (("train", copies), ("val", val_copies)):
        total = 0
        for row in rows if n else ():
            folder = dest / split / row["wnid"]
            folder.mkdir(parents=True, exist_ok=True)
            stem, suffix = os.path.splitext(row["file"])
            for k in range(n):
                target = folder / f"{stem}_{k:03d}{suffix}"
                if not target.exists():
                    _place(source / row["file"], target, link)
                total += 1
        counts.append(total)
    return counts[0], counts[1]


def _place(source: Path, target: Path, link: bool) -> None:
    if link:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy
    shutil.copyfile(source, target)


def make_synthetic_jpeg_tree(
    dest: Path,
    count: int,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    classes: int = 10,
    seed: int = 0,
    noise: float = 8.0,
) -> tuple[int, float]:
    """An ImageFolder tree ``dest/train/<class>/`` of ``count`` synthetic JPEGs, ``size`` = (width, height).

    Each image is a smooth random colour field (a 16 x 12 random image upscaled bicubically) plus Gaussian noise
    (sigma ``noise``), encoded by the converter's ``encode_jpeg`` (baseline, 4:2:0) at ``quality``: photo-like
    file sizes and decode cost, but not real photographs. File ``index`` depends on ``(seed, index)`` only; files
    already present are kept (written atomically, so a present file is whole). Returns (files, mean file size in
    KiB).
    """
    import numpy as np
    from PIL import Image

    from tools._convert.files import write_bytes_atomic
    from tools._convert.images import encode_jpeg

    width, height = size
    total_bytes = 0
    for index in range(count):
        target = dest / "train" / f"class{index % classes:03d}" / f"synthetic_{index:06d}.JPEG"
        if not target.exists():
            rng = np.random.default_rng((seed, index))  # per file: the same image whichever files exist
            coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float64)
            if noise:
                field += rng.normal(0.0, noise, size=field.shape)
            encoded = encode_jpeg(Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)), quality)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(target, encoded)
        total_bytes += target.stat().st_size
    return count, total_bytes / max(count, 1) / 1024
