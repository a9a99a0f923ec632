"""Loader-only speed: the ``dali`` backend against the ``torch`` backend on real ImageNet JPEGs, train augmentation.

The 102 real sample JPEGs (``../shared/data/imagenet-sample``) are repeated (hard links) into an ImageFolder tree of
a few thousand files under a temporary folder; every loader reads the same tree with ImageNet training
augmentation at 224 px (RandomResizedCrop + flip, normalized, channels-last float32 on the CPU). Compared:

* ``dali``: the DALI backend (``loaders/dali.py``), CPU pipeline, ``dali_threads`` threads; ``dali-no-antialias``:
  the same with ``data.dali_train_antialias=false`` (training crops resized without the antialiasing filter);
* ``dali-bare``: a bare DALI pipeline (``readers.file`` -> ``decoders.image_random_crop`` -> ``resize`` ->
  ``crop_mirror_normalize`` -> ``DALIGenericIterator``), the upper bound the wrapper must not lose, with DALI's
  default executor; ``dali-bare-dynamic``: the same with the dynamic executor, which the wrapper uses;
* ``dali-bare-fastest``: ``dali-bare-dynamic`` with every CPU speed knob DALI offers for this graph, whatever it does
  to the pixels (resize not antialiased, libjpeg-turbo's fast integer IDCT): the ceiling of DALI's CPU operators;
* ``torch``: the torch backend (PIL decode + torchvision transforms in DataLoader workers).

Each loader is timed over whole epochs after a warm-up epoch; rounds interleave the loaders so that load from
other processes hits all alike, and the median round counts. Images/s (wall clock) and images per CPU-second of
this process and its children are reported; ratios are within this one run.

``--images synthetic`` reads generated photo-sized JPEGs instead (``tools.bench.data.make_synthetic_jpeg_tree``:
a smooth random colour field plus ``--synthetic-noise``, ``--synthetic-size``), for comparison with figures
quoted on synthetic JPEGs.

    .venv/bin/python benchmarks/loader_dali_vs_torch.py --copies 20 --rounds 3 --out benchmarks/cpu-2cpu/dali.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import LoaderSpec, build_loader  # noqa: E402
from loaders.datasets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tools.bench.data import make_sample_tree, make_synthetic_jpeg_tree  # noqa: E402
from tools.bench.monitor import process_tree_cpu_seconds as cpu_seconds  # noqa: E402
from train.files import write_json_atomic, write_text_atomic  # noqa: E402


def bare_train_graph(jpegs, size: int, stages: int = 3, antialias: bool = True, fast_idct: bool = False):
    """The hand-written CPU train graph: fused decode + random crop, resize (linear, antialiased), normalize to
    float HWC with a random flip; ``stages`` < 3 stops after the decode (1) or the resize (2). ``antialias=False``
    and ``fast_idct=True`` trade pixel fidelity for speed."""
    from nvidia.dali import fn, types

    images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB, use_fast_idct=fast_idct)
    if stages >= 2:
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=antialias)
    if stages >= 3:
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="HWC",
            mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD],
            mirror=fn.random.coin_flip(),
        )
    return images


class BareDali:
    """The bare DALI pipeline: what a hand-written script gets, no contract (DALI's own shuffle and sharding)."""

    def __init__(
        self,
        root: Path,
        batch_size: int,
        threads: int,
        size: int = 224,
        prefetch: int = 2,
        dynamic: bool = False,
        fastest: bool = False,
    ) -> None:
        from nvidia.dali import fn
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = Pipeline(
            batch_size=batch_size,
            num_threads=threads,
            device_id=None,
            seed=1,
            prefetch_queue_depth=prefetch,
            exec_dynamic=dynamic,
        )
        with pipe:
            jpegs, labels = fn.readers.file(file_root=str(root / "train"), random_shuffle=True, name="reader")
            graph = bare_train_graph(jpegs, size, antialias=not fastest, fast_idct=fastest)
            pipe.set_outputs(graph, labels)
        self.iterator = DALIGenericIterator(
            pipe, ["x", "y"], reader_name="reader", last_batch_policy=LastBatchPolicy.DROP, auto_reset=True
        )

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for batch in self.iterator:
            yield batch[0]["x"].permute(0, 3, 1, 2), batch[0]["y"].view(-1).long()


def time_epoch(loader, epoch: int) -> tuple[float, float, int]:
    loader.set_epoch(epoch)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    count = 0
    for images, _ in loader:
        count += images.shape[0]
    wall = time.perf_counter() - start
    return count / wall, count / max(cpu_seconds() - cpu_start, 1e-9), count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", choices=("sample", "synthetic"), default="sample",
                        help="the real ImageNet sample JPEGs (repeated), or synthetic photo-sized JPEGs")  # fmt: skip
    parser.add_argument("--copies", type=int, default=30, help="copies of each of the 102 sample JPEGs")
    parser.add_argument("--synthetic-count", type=int, default=3000, help="synthetic JPEGs (--images synthetic)")
    parser.add_argument("--synthetic-size", default="500x375", help="WIDTHxHEIGHT of the synthetic JPEGs")
    parser.add_argument("--synthetic-noise", type=float, default=8.0, help="pixel noise sigma of the synthetic JPEGs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="torch workers = DALI threads")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per loader (median reported)")
    parser.add_argument("--prefetch", type=int, default=2, help="data.prefetch: DALI queue depth, DataLoader factor")
    parser.add_argument("--loaders", default="dali,dali-bare,torch")
    parser.add_argument("--out", type=Path, help="write the results as JSON (and a Markdown table beside it)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dali-bench-") as tmp:
        root = Path(tmp)
        if args.images == "synthetic":
            width, height = (int(v) for v in args.synthetic_size.split("x"))
            files, mean_kib = make_synthetic_jpeg_tree(
                root, args.synthetic_count, (width, height), noise=args.synthetic_noise
            )
            images = f"{files} synthetic JPEGs, {width}x{height}, quality 90, 4:2:0, "
            images += f"noise sigma {args.synthetic_noise:g}, mean {mean_kib:.0f} KiB"
        else:
            files, _ = make_sample_tree(root, args.copies, val_copies=0, link=True)
            images = f"the 102 real ImageNet sample JPEGs x {args.copies} (hard links)"
        if files < args.batch_size:  # training drops the last partial batch: an epoch would be empty
            parser.error(f"{files} images, not one batch of {args.batch_size}: more --copies or a smaller --batch-size")
        loaders = {}
        for name in args.loaders.split(","):
            if name.startswith("dali-bare"):
                if name not in ("dali-bare", "dali-bare-dynamic", "dali-bare-fastest"):
                    parser.error(f"unknown loader {name!r}")
                dynamic, fastest = name != "dali-bare", name == "dali-bare-fastest"
                loaders[name] = BareDali(
                    root, args.batch_size, args.workers, prefetch=args.prefetch, dynamic=dynamic, fastest=fastest
                )
                continue
            options = {"dali_threads": args.workers, "dali_device": "cpu", "prefetch": args.prefetch}
            backend = name
            if name == "dali-no-antialias":
                backend, options["dali_train_antialias"] = "dali", False
            spec = LoaderSpec("imagenet", "train", args.batch_size, True, data_dir=str(root), workers=args.workers,
                              options=options)  # fmt: skip
            loaders[name] = build_loader(backend, spec)
        for loader in loaders.values():  # warm-up: worker start, page cache, allocator
            time_epoch(loader, 0)
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in loaders}
        for round_number in range(args.rounds):
            for name, loader in loaders.items():
                results[name].append(time_epoch(loader, 1 + round_number))
                print(f"round {round_number}: {name:10s} {results[name][-1][0]:8.1f} images/s", flush=True)

    summary = {
        name: {
            "images_per_s": statistics.median(r[0] for r in runs),
            "images_per_cpu_s": statistics.median(r[1] for r in runs),
            "images_per_epoch": runs[0][2],
            "rounds": [round(r[0], 1) for r in runs],
        }
        for name, runs in results.items()
    }
    baseline = summary.get("torch", {}).get("images_per_s")
    cpu_baseline = summary.get("torch", {}).get("images_per_cpu_s")
    for entry in summary.values():
        entry["vs_torch"] = round(entry["images_per_s"] / baseline, 3) if baseline else None
        # per CPU-second moves less than wall clock when other processes load the machine
        entry["cpu_vs_torch"] = round(entry["images_per_cpu_s"] / cpu_baseline, 3) if cpu_baseline else None
    report = {
        "benchmark": "loader-only, ImageNet train augmentation at 224 px, float32 channels-last on the CPU",
        "command": "python benchmarks/loader_dali_vs_torch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__,
        },  # fmt: skip
        "files": files,
        "images": images,
        "batch_size": args.batch_size,
        "workers_or_threads": args.workers,
        "prefetch": args.prefetch,
        "results": summary,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        write_json_atomic(args.out, report)
        lines = ["| loader | images/s | vs torch | images per CPU-s | vs torch |", "|---|---:|---:|---:|---:|"]
        for name, entry in summary.items():
            lines.append(f"| {name} | {entry['images_per_s']:.1f} | {entry['vs_torch']:.2f}x | "
                         f"{entry['images_per_cpu_s']:.1f} | {entry['cpu_vs_torch']:.2f}x |")  # fmt: skip
        text = f"{report['benchmark']}; {images}\n\n`{report['command']}`\n\n" + "\n".join(lines) + "\n"
        write_text_atomic(args.out.with_suffix(".md"), text)
    return report


if __name__ == "__main__":
    main()
