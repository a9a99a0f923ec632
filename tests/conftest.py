"""Shared fixtures: the real ImageNet sample as an ImageFolder tree, GPU skipping, small synthetic sets."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def imagenet_sample_dir() -> Path:
    """The 102 real ImageNet JPEGs (``../shared/data/imagenet-sample``; override with IMAGENET_SAMPLE)."""
    candidates = [
        os.environ.get("IMAGENET_SAMPLE"),
        REPO.parent / "shared/data/imagenet-sample",
        Path("/work/shared/data/imagenet-sample"),
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "LABELS.tsv").is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "the real ImageNet sample is missing: expected ../shared/data/imagenet-sample/LABELS.tsv beside the "
        "repository, or set IMAGENET_SAMPLE to its folder"
    )


def imagenet_sample_rows() -> list[dict[str, str]]:
    with open(imagenet_sample_dir() / "LABELS.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def build_imagefolder(root: Path, splits=("train", "val")) -> Path:
    """Copy the sample into ``root/<split>/<wnid>/<file>`` (each split gets every image)."""
    src = imagenet_sample_dir()
    for split in splits:
        for row in imagenet_sample_rows():
            folder = root / split / row["wnid"]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / row["file"], folder / row["file"])
    return root


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory) -> Path:
    """An ImageFolder tree (train/ and val/) of the 102 real sample JPEGs, built once per session."""
    return build_imagefolder(tmp_path_factory.mktemp("imagenet-sample"))


@pytest.fixture(scope="session")
def synthetic_raw_dir(tmp_path_factory) -> Path:
    """The synthetic val split in the conversion tool's raw layout ``OUT/dali/val/images.npy`` + ``labels.npy``."""
    import numpy as np

    from loaders.datasets import array_dataset

    root = tmp_path_factory.mktemp("synthetic-converted")
    images, labels = array_dataset("synthetic", "val")
    (root / "dali" / "val").mkdir(parents=True)
    np.save(root / "dali" / "val" / "images.npy", images)
    np.save(root / "dali" / "val" / "labels.npy", labels)
    return root


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
