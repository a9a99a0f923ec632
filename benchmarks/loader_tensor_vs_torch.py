"""Loader-only speed: the tensor-resident ``gpu`` backend against the ``torch`` backend, CIFAR-100 train augmentation.

Both read the same CIFAR-sized uint8 arrays (synthetic, written in the conversion tool's raw layout
``<tmp>/dali/train/images.npy``) and yield normalized, channels-last, pad-4-cropped and flipped training batches
on the device. Each loader is timed over whole epochs (its workers started and warmed up first); the rounds
interleave the loaders so that load from other processes hits all of them alike, and the median round counts.
Speed is reported as images/s (wall clock) and as ratios within this one run; images per CPU-second (this
process and its DataLoader workers) is reported beside it, since it moves less when other processes load the
machine.

    .venv/bin/python benchmarks/loader_tensor_vs_torch.py                     # CPU, workers 0..4
    .venv/bin/python benchmarks/loader_tensor_vs_torch.py --device cuda --samples 50000 --out result.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders import LoaderSpec, build_loader  # noqa: E402
from loaders.datasets import synthetic_arrays  # noqa: E402
from tools.bench.monitor import process_tree_cpu_seconds as cpu_seconds  # noqa: E402
from train.files import write_json_atomic  # noqa: E402


def write_arrays(root: Path, samples: int) -> None:
    """CIFAR-shaped synthetic training arrays in the conversion tool's raw layout."""
    images, labels = synthetic_arrays("train", size=samples)
    folder = root / "dali" / "train"
    folder.mkdir(parents=True)
    np.save(folder / "images.npy", images)
    np.save(folder / "labels.npy", labels)


def time_epoch(loader, epoch: int, device: torch.device) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of one full epoch (CUDA sync at the end)."""
    loader.set_epoch(epoch)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    count = 0
    for images, _ in loader:
        count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start), count / max(cpu_seconds() - cpu_start, 1e-9)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50_000, help="training set size (CIFAR-100: 50,000)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", default="0,1,2,3,4", help="torch backend worker counts to try")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per loader (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads of the main process (default: torch's)"
    )
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        # on a machine that other processes load, OpenMP threads that spin-wait for a descheduled sibling cost
        # more than they gain: one thread is then the fair setting for every loader alike
        torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]

    with tempfile.TemporaryDirectory() as tmp:
        write_arrays(Path(tmp), args.samples)

        def spec(w: int) -> LoaderSpec:
            return LoaderSpec(
                "synthetic", "train", args.batch_size, train=True, data_dir=tmp, device=device,
                dtype=getattr(torch, args.dtype), workers=w, options={"augment": "standard"},
            )  # fmt: skip

        loaders = {f"torch/{w}w": build_loader("torch", spec(w)) for w in workers}
        loaders["gpu"] = build_loader("gpu", spec(0))
        for loader in loaders.values():  # warm-up: start workers, fault in pages, first allocations
            time_epoch(loader, 0, device)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        cpu_rates: dict[str, list[float]] = {name: [] for name in loaders}
        for round_ in range(args.rounds):
            for name, loader in loaders.items():
                wall, cpu = time_epoch(loader, round_ + 1, device)
                rates[name].append(wall)
                cpu_rates[name].append(cpu)
        for loader in loaders.values():
            loader.close()

    median = {name: statistics.median(values) for name, values in rates.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu_rates.items()}
    torch_names = [name for name in median if name.startswith("torch/")]
    best = max(torch_names, key=median.get)
    result = {
        "machine": {"cpus": os.cpu_count(), "device": str(device), "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "images_per_second": {name: round(v) for name, v in median.items()},
        "rounds": {name: [round(v) for v in values] for name, values in rates.items()},
        "images_per_cpu_second": {name: round(v) for name, v in cpu_median.items()},
        "load_average": os.getloadavg(),
        "best_torch": best,
        "ratio_vs_best_torch": round(median["gpu"] / median[best], 2),
    }
    if "torch/2w" in median:
        result["ratio_vs_torch_2_workers"] = round(median["gpu"] / median["torch/2w"], 2)
    for name, value in median.items():
        print(f"{name:>10}: {value:>12,.0f} images/s  {cpu_median[name]:>12,.0f} images/CPU-s")
    print(f"gpu loader / torch best ({best}): {result['ratio_vs_best_torch']}x", end="")
    print(f"; / torch 2 workers: {result.get('ratio_vs_torch_2_workers')}x")
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
