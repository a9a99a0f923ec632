"""What a conversion reads: the samples of each split, the class map, and fingerprints for resuming.

Data set definitions come from :mod:`loaders.datasets` (ImageFolder order and class indices for ImageNet, the
seeded CIFAR-100 split, the built-in synthetic set), so converted outputs hold exactly the samples, in exactly the
order and with exactly the labels, that the torch loader reads.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loaders.datasets import (
    IMAGE_EXTENSIONS,
    SPLITS,
    array_dataset,
    cifar100_class_names,
    dataset_info,
    imagenet_samples,
    imagenet_split_dir,
)
from loaders.errors import LoaderError


class ConvertError(RuntimeError):
    """A user-facing conversion problem: the message says what is wrong and how to fix it."""


@dataclass
class SplitSource:
    """The samples of one split, in output order."""

    split: str
    labels: list[int]
    paths: list[str] = field(default_factory=list)  # image files (ImageNet); empty for array data sets
    relpaths: list[str] = field(default_factory=list)  # the same, relative to --src (manifest, fingerprints)
    sizes: list[int] = field(default_factory=list)
    stamps: list[str] = field(default_factory=list)  # "size:mtime_ns" per file, for resume checks
    images: np.ndarray | None = None  # uint8 (N, 32, 32, 3) for array data sets
    ignored: list[dict[str, str]] = field(default_factory=list)  # non-image files found in class folders
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def source_bytes(self) -> int:
        return sum(self.sizes) if self.paths else (0 if self.images is None else int(self.images.nbytes))

    def skip(self, index: int, reason: str, strict: bool) -> dict[str, object]:
        """The manifest entry of an unusable source file, or (``--strict``) a ConvertError naming it."""
        if strict:
            raise ConvertError(f"{self.paths[index]}: {reason} (--strict stops here)")
        return {"index": index, "path": self.relpaths[index], "reason": reason}

    def fingerprint(self, start: int = 0, end: int | None = None) -> str:
        """sha256 over the identity (path, size, mtime, label) of samples ``start:end``."""
        digest = hashlib.sha256()
        end = len(self) if end is None else end
        if self.paths:
            for i in range(start, end):
                digest.update(f"{self.relpaths[i]}\t{self.stamps[i]}\t{self.labels[i]}\n".encode())
        else:
            digest.update(np.ascontiguousarray(self.images[start:end]).tobytes())
            digest.update(np.asarray(self.labels[start:end], np.int64).tobytes())
        return digest.hexdigest()


def splits_to_write(dataset: str, split: str) -> list[str]:
    """The splits a ``--split`` value names; ImageNet's ``test`` is its ``val`` folder, written once as ``val``."""
    if split == "all":
        return ["train", "val"] if dataset == "imagenet" else list(SPLITS)
    if split not in SPLITS:
        raise ConvertError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}, all")
    return ["val"] if dataset == "imagenet" and split == "test" else [split]


def class_names_from_root(root: Path) -> dict[str, str]:
    """wnid -> human name from LABELS.tsv, synset_words.txt or LOC_synset_mapping.txt at ``root`` (first found)."""
    labels_tsv = root / "LABELS.tsv"
    if labels_tsv.is_file():
        with open(labels_tsv, newline="") as f:
            rows = csv.DictReader(f, delimiter="\t")
            if rows.fieldnames and {"wnid", "name"} <= set(rows.fieldnames):
                return {row["wnid"]: row["name"] for row in rows}
    for name in ("synset_words.txt", "LOC_synset_mapping.txt"):
        path = root / name
        if path.is_file():
            names = {}
            with open(path) as f:
                for line in f:
                    wnid, _, text = line.strip().partition(" ")
                    if wnid:
                        names[wnid] = text.strip() or wnid
            return names
    return {}


def class_map(dataset: str, src: Path | None, wnids: list[str] | None = None) -> list[dict[str, object]]:
    """The manifest's ``classes``: ``[{"index", "wnid", "name"}]`` (CIFAR / synthetic use names as wnids)."""
    if dataset == "imagenet":
        names = class_names_from_root(src) if src else {}
        return [{"index": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(wnids or [])]
    if dataset == "cifar100":
        labels = cifar100_class_names(src)
        return [{"index": i, "wnid": n, "name": n} for i, n in enumerate(labels)]
    count = dataset_info(dataset).num_classes
    return [{"index": i, "wnid": f"class{i:03d}", "name": f"class{i:03d}"} for i in range(count)]


def _ignored_files(split_dir: Path, classes: list[str]) -> tuple[list[dict[str, str]], list[str]]:
    """Non-image files in the class folders (listed as skipped) and the names of empty class folders."""
    ignored, empty = [], []
    for wnid in classes:
        folder = split_dir / wnid
        if not folder.is_dir():
            continue
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        if not any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries):
            empty.append(wnid)
        for entry in entries:
            if not entry.name.lower().endswith(IMAGE_EXTENSIONS) or not entry.is_file():
                rel = f"{split_dir.name}/{wnid}/{entry.name}"
                ignored.append({"path": rel, "reason": "not an image file (name has no image extension)"})
    return ignored, empty


def imagenet_source(src: Path, split: str, subset: int | None) -> tuple[SplitSource, list[str]]:
    """One ImageNet split from an ImageFolder tree, and its class list (sorted wnids)."""
    try:
        split_dir = imagenet_split_dir(src, split)
        paths, labels, classes = imagenet_samples(split_dir)
    except LoaderError as error:
        raise ConvertError(str(error).replace("--data-dir", "--src")) from None
    ignored, empty = _ignored_files(split_dir, classes)
    notes = []
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        notes.append(
            f"{split}: {len(empty)} class folder(s) hold no images ({shown}); their class indices are kept so "
            "labels still match the torch loader, but the split has no sample of them"
        )
    if subset is not None:
        paths, labels = paths[:subset], labels[:subset]
    if not paths:
        raise ConvertError(f"no images found in {split_dir}/<wnid>/ (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    sizes, stamps = [], []
    for path in paths:
        stat = os.stat(path)
        sizes.append(stat.st_size)
        stamps.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    relpaths = [Path(p).relative_to(src).as_posix() for p in paths]
    source = SplitSource(split, list(labels), list(paths), relpaths, sizes, stamps, ignored=ignored, notes=notes)
    return source, classes


def array_source(dataset: str, split: str, src: Path | None, download: bool, subset: int | None) -> SplitSource:
    """One split of an in-memory data set (uint8 HWC arrays)."""
    try:
        images, labels = array_dataset(dataset, split, src, download=download)
    except LoaderError as error:
        raise ConvertError(str(error).replace("--data-dir", "--src")) from None
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    return SplitSource(split, [int(v) for v in labels], images=np.ascontiguousarray(images))


def load_sources(
    dataset: str, src: Path | None, split: str, subset: int | None, download: bool
) -> tuple[list[SplitSource], list[dict[str, object]]]:
    """Every split to convert and the class map, or :class:`ConvertError` naming the fix."""
    dataset_info_or_error(dataset)
    if dataset == "imagenet":
        if src is None:
            raise ConvertError("imagenet needs --src PATH: the folder holding train/<wnid>/*.JPEG and val/<wnid>/")
        if not src.is_dir():
            raise ConvertError(f"--src {src} does not exist or is not a folder")
        sources, classes = [], None
        for name in splits_to_write(dataset, split):
            if split == "all" and not (src / name).is_dir():
                raise ConvertError(f"{src} has no {name}/ folder; pass --split train (or val) to convert one split")
            source, classes = imagenet_source(src, name, subset)
            sources.append(source)
        return sources, class_map(dataset, src, classes)
    if dataset == "cifar100" and src is not None and not src.is_dir() and not download:
        raise ConvertError(f"--src {src} does not exist; pass --download to fetch CIFAR-100 into it")
    sources = [array_source(dataset, name, src, download, subset) for name in splits_to_write(dataset, split)]
    return sources, class_map(dataset, src)


def dataset_info_or_error(dataset: str) -> None:
    try:
        dataset_info(dataset)
    except LoaderError as error:
        raise ConvertError(str(error)) from None
