"""Where the CPU time of ImageNet training augmentation goes: DALI's CPU operators against PIL + torchvision.

One thread, the 102 real sample JPEGs (``../shared/data/imagenet-sample``) held in memory, each stage timed as
the best of ``--repeats`` passes over all of them (the minimum is the figure least moved by other processes on a
shared machine). DALI stages are measured as nested pipelines (decode; decode + resize; decode + resize +
normalize), each stage's cost being the difference; the PIL/torchvision stages are timed one by one on the same
images with the same kind of crop window. Costs are CPU milliseconds per image on one core.

The point is what it says about ``loader_dali_vs_torch.py``: the two loaders do the same work per image (decode,
resize an area-0.08..1 crop to 224 px, antialiased, normalize), so at equal cores the ratio of their throughputs
is the ratio of these per-image costs plus what each adds around them (the torch loader's worker IPC and
collation, DALI's copy into torch), whatever a wrapper does. ``work_ratio_vs_torch`` gives that ratio as built,
with DALI's resize free, and with DALI's resize not antialiased.

    .venv/bin/python benchmarks/dali_cpu_stage_costs.py --out benchmarks/cpu-2cpu/dali_cpu_stage_costs.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loaders.datasets import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from train.files import write_json_atomic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader_dali_vs_torch import bare_train_graph  # noqa: E402  the same graph as the bare loader


def best_ms_per_image(step, images: int, repeats: int) -> float:
    step()  # warm-up (allocations, first-call set-up)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return min(times) / images * 1e3


def dali_costs(encoded: list[np.ndarray], size: int, repeats: int) -> dict[str, float]:
    from nvidia.dali import fn, pipeline_def

    batch = len(encoded)

    def source():
        return encoded

    def build(stages: int, antialias: bool = True):
        @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=1, exec_async=False,
                      exec_pipelined=False)  # fmt: skip
        def pipe():
            jpegs = fn.external_source(source=source, batch=True)
            if stages == 0:
                return jpegs
            return bare_train_graph(jpegs, size, stages, antialias)

        p = pipe()
        p.build()
        return lambda: p.run()

    t = [best_ms_per_image(build(stages), batch, repeats) for stages in range(4)]
    no_antialias = best_ms_per_image(build(2, antialias=False), batch, repeats)
    return {
        "decode_random_crop": t[1] - t[0],
        "resize_antialiased": t[2] - t[1],
        "resize_no_antialias": no_antialias - t[1],
        "crop_mirror_normalize_float": t[3] - t[2],
        "total": t[3] - t[0],
    }


def torch_costs(encoded: list[np.ndarray], size: int, repeats: int) -> dict[str, float]:
    from torchvision.transforms import v2

    batch = len(encoded)
    rng = np.random.default_rng(1)
    decoded: list[Image.Image] = []
    boxes = []
    for data in encoded:
        image = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
        decoded.append(image)
        width, height = image.size
        # an area-uniform(0.08, 1) square-ish window, as RandomResizedCrop draws on average
        side = math.sqrt(rng.uniform(0.08, 1.0) * width * height)
        boxes.append((0, 0, min(width, int(side)), min(height, int(side))))
    resized = [image.resize((size, size), Image.BILINEAR, box=box) for image, box in zip(decoded, boxes)]
    to_tensor = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip

    def decode():
        for data in encoded:
            Image.open(io.BytesIO(data.tobytes())).convert("RGB")

    def resize():
        for image, box in zip(decoded, boxes):
            image.resize((size, size), Image.BILINEAR, box=box)

    def normalize():
        for image in resized:
            to_tensor(image)

    costs = {
        "decode_full": best_ms_per_image(decode, batch, repeats),
        "resize_antialiased": best_ms_per_image(resize, batch, repeats),
        "to_tensor_normalize_float": best_ms_per_image(normalize, batch, repeats),
    }
    costs["total"] = sum(costs.values())
    return costs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, help="a folder of JPEGs, searched recursively (default: the real sample, IMAGENET_SAMPLE)"
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, help="write the result as JSON")
    args = parser.parse_args(argv)

    if args.data is None:
        from tests.conftest import imagenet_sample_dir

        try:
            args.data = imagenet_sample_dir()
        except FileNotFoundError as error:
            raise SystemExit(f"error: {error}; or pass --data") from None
    torch.set_num_threads(1)
    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    if not files:
        raise SystemExit(f"error: no JPEG files under {args.data}")
    encoded = [np.frombuffer(p.read_bytes(), dtype=np.uint8) for p in files]
    report = {
        "benchmark": f"CPU ms per image on one core, ImageNet train augmentation at {args.size} px, "
        f"{len(files)} real JPEGs, best of {args.repeats} passes",
        "command": "python benchmarks/dali_cpu_stage_costs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
        },  # fmt: skip
        "dali": dali_costs(encoded, args.size, args.repeats),
        "torch": torch_costs(encoded, args.size, args.repeats),
    }
    dali, tv = report["dali"], report["torch"]
    without_resize = dali["total"] - dali["resize_antialiased"]
    report["work_ratio_vs_torch"] = {  # torch's per-image work over DALI's (the torch loader adds IPC on top)
        "as_built": tv["total"] / dali["total"],
        "dali_resize_free": tv["total"] / without_resize,
        "dali_without_antialias": tv["total"] / (without_resize + dali["resize_no_antialias"]),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        write_json_atomic(args.out, report)
    return report


if __name__ == "__main__":
    main()
