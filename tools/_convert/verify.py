"""``--verify``: read every sample of a converted output back with the real DALI / FFCV readers.

Checks, against the format folder's ``manifest.json``: every listed file exists with its byte size and sha256;
the reader yields exactly ``counts[split]`` samples; their label histogram equals ``per_class[split]``; for
ImageNet the labels arrive in sorted class order (the ImageFolder order the shards were written in); and every
image decodes (DALI: ``fn.decoders.image`` on the CPU; FFCV: its JPEG / raw decoder in the ``Loader``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tools._convert import files
from tools._convert.ffcv_writer import verify_beton


def _compare(problems: list[str], where: str, manifest: dict, split: str, count: int, histogram: Counter) -> None:
    expected = manifest["counts"].get(split)
    if count != expected:
        problems.append(f"{where}: read {count} samples, manifest says {expected}")
    want = {str(k): v for k, v in manifest["per_class"].get(split, {}).items()}
    got = {str(k): v for k, v in sorted(histogram.items())}
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:5]
        problems.append(f"{where}: labels differ from the manifest's per-class counts (classes {', '.join(diff)})")


def _dali_webdataset(split_dir: Path, workers: int) -> tuple[int, Counter, bool]:
    from nvidia.dali import fn, pipeline_def, types

    tars = sorted(split_dir.glob("shard-*.tar"))
    batch = 32

    @pipeline_def(batch_size=batch, num_threads=max(1, workers), device_id=None, prefetch_queue_depth=1)
    def pipeline():
        jpegs, labels = fn.readers.webdataset(
            paths=[str(t) for t in tars],
            index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            random_shuffle=False,
            pad_last_batch=True,
            name="reader",
        )
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), labels

    pipe = pipeline()
    pipe.build()
    size = pipe.epoch_size("reader")
    histogram, labels_seen = Counter(), []
    for step in range(math.ceil(size / batch)):
        images, labels = pipe.run()
        for i in range(min(batch, size - step * batch)):  # the padded tail repeats the last sample
            image = np.asarray(images.at(i))
            if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
                raise RuntimeError(f"sample {step * batch + i} decoded to shape {image.shape}")
            labels_seen.append(int(bytes(np.asarray(labels.at(i))).decode("ascii")))
    histogram.update(labels_seen)
    ordered = all(b >= a for a, b in zip(labels_seen, labels_seen[1:]))
    return len(labels_seen), histogram, ordered


def _dali_arrays(split_dir: Path) -> tuple[int, Counter, bool]:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipeline():
        images = fn.readers.numpy(file_root=str(split_dir), files=["images.npy"], name="images")
        labels = fn.readers.numpy(file_root=str(split_dir), files=["labels.npy"], name="labels")
        return images, labels

    pipe = pipeline()
    pipe.build()
    images, labels = (np.asarray(t.at(0)) for t in pipe.run())
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise RuntimeError(f"images.npy holds {images.dtype} {images.shape}, expected uint8 (N, 32, 32, 3)")
    if labels.shape != (len(images),):
        raise RuntimeError(f"labels.npy has shape {labels.shape} for {len(images)} images")
    return len(images), Counter(labels.tolist()), True


def verify_format(
    folder: Path, fmt: str, workers: int, stall_timeout: float, progress: Callable[[int], None]
) -> tuple[list[str], str]:
    """(problems, summary) of one format folder; no problems means every check passed."""
    manifest = files.read_json(folder / "manifest.json")
    if manifest is None:
        return [f"{folder}/manifest.json is missing or unreadable: the conversion did not finish"], ""
    problems: list[str] = []
    for record in manifest["files"]:
        if not files.matches_record(folder / record["path"], record):
            problems.append(f"{fmt}: {record['path']} is missing or its size / sha256 differs from the manifest")
    parts = []
    for split in sorted(manifest["counts"]):
        where = f"{fmt} {split}"
        try:
            if fmt == "ffcv":
                result = verify_beton(folder / f"{split}.beton", workers, stall_timeout, progress)
                count, histogram = result["count"], Counter({int(k): v for k, v in result["per_class"].items()})
                ordered = result["ordered"]
            elif manifest.get("layout") == "arrays":
                count, histogram, ordered = _dali_arrays(folder / split)
            else:
                count, histogram, ordered = _dali_webdataset(folder / split, workers)
        except Exception as error:  # a reader error is a verification failure, reported in one line
            problems.append(f"{where}: reading failed: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        _compare(problems, where, manifest, split, count, histogram)
        if manifest["dataset"] == "imagenet" and not ordered:
            problems.append(f"{where}: labels are not in sorted class order")
        parts.append(f"{split} {count}")
    return problems, f"{fmt}: {', '.join(parts)} samples read back, {len(manifest['files'])} files checksummed"
