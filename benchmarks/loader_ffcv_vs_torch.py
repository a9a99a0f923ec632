"""Loader-only speed: the ``ffcv`` backend against the ``torch`` backend on real ImageNet JPEGs, train augmentation.

The 102 real sample JPEGs (``../shared/data/imagenet-sample``) are repeated (hard links) into an ImageFolder tree
of a few thousand files under a temporary folder. The torch backend reads that tree (the original JPEGs); FFCV
reads a .beton of the same samples written at max-res 256 (long side shrunk with OpenCV INTER_AREA, re-encoded as
JPEG quality 90: what ``tools/convert.py --max-res 256 --write-mode jpg`` stores, except that the tool shrinks with
Lanczos; written here directly with
:func:`loaders.ffcv_writer.write_beton`, one decode per distinct image, so the set-up takes seconds). Both yield
ImageNet training batches at 224 px (RandomResizedCrop + flip, normalized, channels-last float32 on the CPU).

* ``ffcv``: the FFCV backend (``loaders/ffcv.py``: contract, copies out of FFCV's reused buffers, watchdog);
* ``ffcv-bare``: FFCV's own ``Loader`` with the same pipeline, RANDOM order, no wrapper (the upper bound);
* ``torch/<w>w``: the torch backend with ``w`` DataLoader workers (PIL decode + torchvision transforms).

The first epoch of each FFCV loader includes numba's JIT compilation: it is reported separately
(``compile_seconds``), then every loader is timed over whole epochs; rounds interleave the loaders so that load
from other processes hits all alike, and the median round counts. Images/s (wall clock) and images per CPU-second
of this process and its children are reported; ratios are within this one run.

    .venv/bin/python benchmarks/loader_ffcv_vs_torch.py --copies 30 --rounds 3 --out benchmarks/cpu-2core/ffcv.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import LoaderSpec, build_loader  # noqa: E402
from loaders.datasets import imagenet_samples  # noqa: E402
from loaders.ffcv import import_backend  # noqa: E402
from tools.bench.data import make_sample_tree  # noqa: E402
from tools.bench.monitor import process_tree_cpu_seconds as cpu_seconds  # noqa: E402
from train.files import write_json_atomic  # noqa: E402


def write_ffcv(tree: Path, out: Path, max_res: int, write_mode: str, workers: int) -> Path:
    """``out/ffcv/train.beton`` of the tree's samples (same order and labels as the ImageFolder)."""
    from PIL import Image

    _, writer = import_backend()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import resizer

    paths, labels, _ = imagenet_samples(tree / "train")
    decoded: dict[str, np.ndarray] = {}
    samples = []
    for path, label in zip(paths, labels):
        name = Path(path).stem.rsplit("_", 1)[0]  # <stem>_<k>.JPEG: copies share one decode
        if name not in decoded:
            decoded[name] = resizer(np.asarray(Image.open(path).convert("RGB")), max_res)
        samples.append((decoded[name], label))
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_res, jpeg_quality=90),
        "label": IntField(),
    }
    return writer.write_beton(out / "ffcv" / "train.beton", samples, fields, workers=workers, chunksize=100)


class BareFfcv:
    """FFCV's own Loader with the backend's pipeline: no contract, no copies, no watchdog."""

    def __init__(self, beton: Path, batch_size: int, workers: int, image_size: int) -> None:
        pipeline, _ = import_backend()
        from ffcv.loader import Loader, OrderOption

        config = pipeline.PipelineConfig(
            beton=str(beton), stamp=(0, 0), train=True, resized=True, image_size=image_size, crop_scale=(0.08, 1.0),
            crop_ratio=(0.75, 4 / 3), val_ratio=image_size / 256, augment="imagenet",
            mean=tuple(255 * m for m in (0.485, 0.456, 0.406)), std=tuple(255 * s for s in (0.229, 0.224, 0.225)),
            device="cpu", normalize_dtype="float32", workers=workers, os_cache=True,
        )  # fmt: skip
        threads = torch.get_num_threads()
        self.loader = Loader(
            str(beton), batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM, drop_last=True,
            pipelines={"image": pipeline.image_operations(config), "label": pipeline.label_operations(config)},
        )  # fmt: skip
        torch.set_num_threads(threads)
        self.compile_seconds: float | None = None

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        threads = torch.get_num_threads()
        try:
            yield from self.loader
        finally:
            torch.set_num_threads(threads)  # FFCV sets torch's (global) thread count from its epoch thread


def time_epoch(loader, epoch: int) -> tuple[float, float, float, int]:
    """(images per wall second, images per CPU second, seconds to the first batch, images) of one epoch."""
    loader.set_epoch(epoch)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    first = None
    count = 0
    for images, _ in loader:
        if first is None:
            first = time.perf_counter() - start
        count += images.shape[0]
    wall = time.perf_counter() - start
    return count / wall, count / max(cpu_seconds() - cpu_start, 1e-9), first or 0.0, count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=30, help="times each of the 102 JPEGs is repeated")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-res", type=int, default=256, help="long side of the images in the .beton")
    parser.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "proportion"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="FFCV threads")
    parser.add_argument("--torch-workers", default=str(os.cpu_count() or 1), help="torch worker counts, e.g. 1,2,3")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per loader (median reported)")
    parser.add_argument("--no-bare", action="store_true", help="skip FFCV's own Loader (saves one compilation)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="a data option of the ffcv loader"
    )
    args = parser.parse_args(argv)
    torch_workers = [int(w) for w in args.torch_workers.split(",") if w.strip()]

    with tempfile.TemporaryDirectory(prefix="ffcv-bench-") as tmp:
        tmp = Path(tmp)
        files, _ = make_sample_tree(tmp / "tree", args.copies, val_copies=0, link=True)
        if files < args.batch_size:  # training drops the last partial batch: an epoch would be empty
            parser.error(f"{files} images, not one batch of {args.batch_size}: more --copies or a smaller --batch-size")
        started = time.perf_counter()
        beton = write_ffcv(tmp / "tree", tmp / "out", args.max_res, args.write_mode, args.workers)
        write_seconds = time.perf_counter() - started

        def spec(name: str, workers: int) -> LoaderSpec:
            data_dir = tmp / ("out" if name == "ffcv" else "tree")
            options = dict(item.split("=", 1) for item in args.option) if name == "ffcv" else {}
            return LoaderSpec("imagenet", "train", args.batch_size, True, data_dir=str(data_dir), workers=workers,
                              image_size=args.image_size, options=options)  # fmt: skip

        loaders: dict = {}
        warmup: dict[str, dict] = {}
        started = time.perf_counter()
        loaders["ffcv"] = build_loader("ffcv", spec("ffcv", args.workers))
        setup = time.perf_counter() - started
        if not args.no_bare:
            loaders["ffcv-bare"] = BareFfcv(beton, args.batch_size, args.workers, args.image_size)
        for w in torch_workers:
            loaders[f"torch/{w}w"] = build_loader("torch", spec("torch", w))
        for name, loader in loaders.items():  # warm-up epoch: JIT compilation, worker start, page cache
            rate, _, first, count = time_epoch(loader, 0)
            warmup[name] = {"first_batch_seconds": round(first, 2), "epoch_images_per_second": round(rate)}
        warmup["ffcv"].update(
            setup_seconds=round(setup, 2),
            compile_seconds=round(loaders["ffcv"].compile_seconds, 2),
            warmup_seconds=round(loaders["ffcv"].warmup_seconds, 2),
        )
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        cpu_rates: dict[str, list[float]] = {name: [] for name in loaders}
        for round_ in range(args.rounds):
            for name, loader in loaders.items():
                wall, cpu, _, count = time_epoch(loader, round_ + 1)
                rates[name].append(wall)
                cpu_rates[name].append(cpu)
        for loader in loaders.values():
            if hasattr(loader, "close"):
                loader.close()

    median = {name: statistics.median(values) for name, values in rates.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu_rates.items()}
    torch_names = [name for name in median if name.startswith("torch/")]
    best = max(torch_names, key=median.get)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "images_per_epoch": count,
        "beton_write_seconds": round(write_seconds, 2),
        "warmup": warmup,
        "images_per_second": {name: round(v) for name, v in median.items()},
        "rounds": {name: [round(v) for v in values] for name, values in rates.items()},
        "images_per_cpu_second": {name: round(v, 1) for name, v in cpu_median.items()},
        "load_average": os.getloadavg(),
        "best_torch": best,
        "ffcv_vs_best_torch": round(median["ffcv"] / median[best], 2),
    }
    if "ffcv-bare" in median:
        result["ffcv_bare_vs_best_torch"] = round(median["ffcv-bare"] / median[best], 2)
        result["wrapper_keeps"] = round(median["ffcv"] / median["ffcv-bare"], 3)
    for name, value in median.items():
        print(f"{name:>10}: {value:>9,.0f} images/s  {cpu_median[name]:>9,.1f} images/CPU-s")
    print(f"ffcv compile (first batch of the first epoch): {warmup['ffcv']['compile_seconds']} s; "
          f"loader set-up {warmup['ffcv']['setup_seconds']} s")  # fmt: skip
    print(f"ffcv / best torch ({best}): {result['ffcv_vs_best_torch']}x", end="")
    if "ffcv-bare" in median:
        print(f"; bare ffcv / best torch: {result['ffcv_bare_vs_best_torch']}x; wrapper keeps "
              f"{result['wrapper_keeps']:.1%} of bare FFCV")  # fmt: skip
    else:
        print()
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
