"""Memory traffic of the compiled conv-unit tail, counted by inductor: no DN, DN layer by layer, DN fused.

A training step of ``ReLU -> BatchNorm``, ``ReLU -> ours -> BatchNorm`` (three layers) and the same as one torch
function (``divnorm.fused_bn``, ``fuse_bn=true`` on the torch path) is compiled with inductor, forward and
backward, and inductor's own count of the bytes its kernels read and write (``num_bytes_accessed``, the sum over
scheduled nodes, as ``TORCH_LOGS=inductor_metrics`` prints it) is reported in passes over the input tensor. These
tails are memory-bound, so the passes are what their time follows. Counted, not timed: it runs on the CPU (what
inductor's C++ backend fuses) and, on a GPU, counts what its Triton backend fuses. The Triton kernels of
``fuse_bn`` are not inductor's; their count is written down in divnorm/triton_fused_bn.py (8 passes by design).

    python benchmarks/fused_bn_traffic.py --out DIR [--shape 8,256,28,28] [--device cpu]
    python benchmarks/fused_bn_traffic.py --out DIR --model resnet18 [--batch 64]   # a whole training step
    python benchmarks/fused_bn_traffic.py --out DIR --model resnet50 --image-size 224 --batch 8

``--model`` counts a whole network's compiled training step (forward + backward, bf16 autocast, channels-last;
the convolutions are counted by their inputs and outputs) without DN, with ``ours`` as layers and with
``fuse_bn=true`` on the torch function.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

from divnorm import build_divnorm  # noqa: E402
from divnorm.fused_bn import relu_divnorm_batchnorm  # noqa: E402
from train.files import write_json_atomic, write_text_atomic  # noqa: E402

VARIANTS = {
    "relu_bn": "ReLU -> BatchNorm (no DN)",
    "relu_ours_bn_layers": "ReLU -> ours -> BatchNorm, three layers (the torch path)",
    "relu_ours_bn_function": "ReLU -> ours -> BatchNorm, one torch function (divnorm.fused_bn)",
}


class Tail(nn.Module):
    def __init__(self, channels: int, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.dn = build_divnorm({"type": "ours", "kernel": "torch"}, channels)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "relu_bn":
            return self.norm(torch.relu(x))
        if self.variant == "relu_ours_bn_layers":
            return self.norm(self.dn(torch.relu(x)))
        return relu_divnorm_batchnorm(x, self.dn, self.norm, relu=True)


def counted(run: Callable[[], None]) -> int:
    """Bytes inductor's kernels move in ``run()``: compiled from scratch (a cached graph is loaded, not counted)."""
    import torch._inductor.config as inductor_config
    from torch._inductor import metrics

    torch._dynamo.reset()
    metrics.reset()
    with inductor_config.patch(force_disable_caches=True):
        torch.manual_seed(0)
        run()
    return metrics.num_bytes_accessed


def bytes_accessed(variant: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Inductor's byte count of the forward graph and the backward graph of one training step of ``variant``."""
    outputs: list[torch.Tensor] = []

    def forward() -> None:
        tail = Tail(shape[1], variant).to(device)
        x = torch.randn(shape, device=device).to(dtype, memory_format=torch.channels_last).requires_grad_()
        outputs.append(torch.compile(tail)(x))

    forward_bytes = counted(forward)
    from torch._inductor import metrics

    before = metrics.num_bytes_accessed  # the backward compiles at its first call, below
    outputs[0].backward(torch.randn_like(outputs[0]))
    counts = [forward_bytes, metrics.num_bytes_accessed - before]
    tensor_bytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
    return {
        "description": VARIANTS[variant],
        "forward_bytes": counts[0],
        "backward_bytes": counts[1],
        "forward_passes": round(counts[0] / tensor_bytes, 2),
        "backward_passes": round(counts[1] / tensor_bytes, 2),
        "passes": round(sum(counts) / tensor_bytes, 2),
    }


MODEL_VARIANTS = {
    "nonorm": ({"type": "nonorm"}, "no DN"),
    "ours": ({"type": "ours", "kernel": "torch"}, "ours after every conv, layers"),
    "ours_fused": ({"type": "ours", "kernel": "torch", "fuse_bn": True}, "ours, fuse_bn=true (the torch function)"),
}


def model_bytes(name: str, variant: str, batch: int, device: torch.device, image_size: int = 32) -> dict[str, Any]:
    """Inductor's byte count of one compiled training step (forward + backward) of a network (32 px: the CIFAR
    layout, 100 classes; larger: the ImageNet layout, 1000 classes)."""
    import models

    specs, description = MODEL_VARIANTS[variant]
    classes = 100 if image_size <= 64 else 1000

    def step() -> None:
        net = models.create_model(name, num_classes=classes, model_config={"divnorm_specs": specs},
                                  image_size=image_size)  # fmt: skip
        net = net.to(device, memory_format=torch.channels_last).train()
        images = torch.randn(batch, 3, image_size, image_size, device=device)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, classes, (batch,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(torch.compile(net)(images), labels)
        loss.backward()

    return {"description": description, "gb": round(counted(step) / 1e9, 3)}


def model_markdown(result: dict[str, Any]) -> str:
    size = result.get("image_size", 32)  # files written before --image-size are 32 px
    lines = [
        f"# Compiled {result['model']} training step: bytes inductor's kernels move",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Device {result['device']}, torch {result['torch']}, {size} px {'CIFAR' if size <= 64 else 'ImageNet'} "
        f"layout, batch {result['batch']}, bf16 "
        "autocast, channels-last; forward + backward, the convolutions counted by their inputs and outputs.",
        "",
        "| network | GB per step | vs no DN |",
        "|---|---:|---:|",
    ]
    base = result["variants"]["nonorm"]["gb"]
    for item in result["variants"].values():
        lines.append(f"| {item['description']} | {item['gb']:.3f} | {item['gb'] / base:.2f}x |")
    return "\n".join(lines) + "\n"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Compiled unit tail: bytes inductor's kernels move per training step",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Device {result['device']}, torch {result['torch']}, shape {tuple(result['shape'])} {result['dtype']} "
        "channels-last. One pass = the bytes of the input tensor once.",
        "",
        "| variant | forward passes | backward passes | total | vs no DN |",
        "|---|---:|---:|---:|---:|",
    ]
    base = result["variants"]["relu_bn"]["passes"]
    for item in result["variants"].values():
        lines.append(
            f"| {item['description']} | {item['forward_passes']:.2f} | {item['backward_passes']:.2f} | "
            f"{item['passes']:.2f} | {item['passes'] / base:.2f}x |"
        )
    lines += ["", "The fused Triton kernels (`fuse_bn` on CUDA): 3 forward + 5 backward = 8 passes, by construction."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    p.add_argument("--shape", default="8,256,28,28", help="N,C,H,W of the conv output (default 8,256,28,28)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--model", choices=("resnet18", "resnet50", "alexnet", "vgg16"), help="count a whole network")
    p.add_argument("--batch", type=int, default=64, help="--model: images per step (default 64)")
    p.add_argument("--image-size", type=int, default=32, help="--model: 32 (CIFAR layout) or e.g. 224 (ImageNet)")
    args = p.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split(","))
    if len(shape) != 4:
        p.error(f"--shape takes N,C,H,W, not {args.shape!r}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    from torch._inductor import compile_fx

    # inductor counts the bytes only while its metrics log is on: on, but written nowhere
    metrics_log = compile_fx.inductor_metrics_log
    metrics_log.setLevel(logging.INFO)
    metrics_log.propagate = False
    metrics_log.addHandler(logging.NullHandler())
    command = shlex.join(["python", "benchmarks/fused_bn_traffic.py", *(sys.argv[1:] if argv is None else argv)])
    if args.model:
        result = {
            "benchmark": "fused_bn_traffic",
            "command": command,
            "device": str(device),
            "torch": torch.__version__,
            "model": args.model,
            "batch": args.batch,
            "image_size": args.image_size,
            "variants": {
                name: model_bytes(args.model, name, args.batch, device, args.image_size) for name in MODEL_VARIANTS
            },
        }
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.model if args.image_size == 32 else f"{args.model}-{args.image_size}px"
        write_json_atomic(args.out / f"{stem}.json", result)
        write_text_atomic(args.out / f"{stem}.md", model_markdown(result))
        print(model_markdown(result))
        return 0
    result: dict[str, Any] = {
        "benchmark": "fused_bn_traffic",
        "command": command,
        "device": str(device),
        "torch": torch.__version__,
        "shape": list(shape),
        "dtype": args.dtype,
        "variants": {name: bytes_accessed(name, shape, dtype, device) for name in VARIANTS},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", result)
    write_text_atomic(args.out / "results.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
