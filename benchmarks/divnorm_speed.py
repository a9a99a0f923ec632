"""Forward+backward speed of the ``ours`` divisive normalization against BatchNorm2d+ReLU and the original code.

The original research code summed each channel pool with a ``conv3d`` over a ones kernel; this project uses a
view + sum. This script times forward+backward of all three on one tensor (default (32, 256, 28, 28) fp32,
p = 0.5, so 16 pools of 16 channels), interleaving the candidates in every round (rotating their order) so
machine noise hits all of them alike, and reports medians and the ratios the issue sets as goals:

- DivisiveNorm2d <= 2.0x the time of BatchNorm2d + ReLU
- DivisiveNorm2d >= 1.5x faster than the original conv3d formulation

Usage: ``.venv/bin/python benchmarks/divnorm_speed.py [--rounds 15] [--shape 32 256 28 28] [--out FILE]``.
Writes a Markdown report (default ``benchmarks/divnorm_speed.md``) atomically and prints it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from divnorm import DivisiveNorm2d  # noqa: E402
from divnorm.grouped import grouped_divnorm_autograd  # noqa: E402
from train.files import write_text_atomic  # noqa: E402

GOAL_VS_BATCHNORM = 2.0
GOAL_VS_CONV3D = 1.5


class OriginalConv3dDivNorm(nn.Module):
    """The original code's formulation, kept only as the benchmark's baseline (fixed for odd P and the device).

    ``x^P`` gets a channel axis of 1, a ``conv3d`` with a (pool, 1, 1) ones kernel and stride (pool, 1, 1)
    sums each pool, and the per-pool denominator is expanded back to all channels before the division.
    """

    def __init__(self, num_channels: int, p: float = 0.5, power: float = 2.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.pool = 2 ** int(p * math.log2(num_channels))
        self.num_pools = num_channels // self.pool
        self.power, self.eps = power, eps
        self.gamma = nn.Parameter(torch.ones(self.num_pools))
        self.sigma = nn.Parameter(torch.ones(self.num_pools))
        self.register_buffer("ones", torch.ones(1, 1, self.pool, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.abs().pow(self.power).unsqueeze(1)
        pooled = F.conv3d(q, self.ones, stride=(self.pool, 1, 1))
        num = pooled + self.sigma.reshape(1, 1, -1, 1, 1) ** self.power + self.eps
        din = num / torch.exp(self.gamma).reshape(1, 1, -1, 1, 1)
        din = din.permute(0, 2, 1, 3, 4).expand(-1, -1, self.pool, -1, -1).reshape(x.shape)
        return q.squeeze(1) / din


class AutogradDivNorm(DivisiveNorm2d):
    """``DivisiveNorm2d`` without its hand-written backward (reshape + sum under plain autograd), for comparison."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grouped_divnorm_autograd(x, self.gamma, self.sigma, self.pool, self.power, self.eps)


def time_forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, clock: Callable[[], float]) -> float:
    """Seconds (on ``clock``) for one forward + backward (input and parameter gradients) of ``layer`` on ``x``."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    start = clock()
    layer(x).backward(grad)
    return clock() - start


# Two ways to time, both reported: wall clock with torch's default threads (what a training step sees on an
# idle machine), and the thread's own CPU time with one thread, which time-slicing by other processes on a
# shared machine does not inflate (with 2+ threads, a descheduled thread stalls every kernel's barrier).
MODES = {
    "wall, default threads": (None, time.perf_counter),
    "CPU time, 1 thread": (1, time.thread_time),
}


def run(
    shape: tuple[int, int, int, int], rounds: int, warmup: int, channels_last: bool, mode: str
) -> dict[str, list[float]]:
    """Interleaved timings per candidate: ``{name: [seconds per round]}``."""
    threads, clock = MODES[mode]
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(shape, rounds, warmup, channels_last, clock)
    finally:
        torch.set_num_threads(default_threads)


def _run(shape, rounds, warmup, channels_last, clock) -> dict[str, list[float]]:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(True)
    grad = torch.randn(shape).contiguous(memory_format=fmt)
    channels = shape[1]
    candidates: dict[str, Callable[[], nn.Module]] = {
        "BatchNorm2d+ReLU": lambda: nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()),
        "DivisiveNorm2d (ours)": lambda: DivisiveNorm2d(channels, p=0.5, power=2.0, eps=0.0),
        "original conv3d": lambda: OriginalConv3dDivNorm(channels, p=0.5, power=2.0, eps=0.0),
        "DN, plain autograd": lambda: AutogradDivNorm(channels),
    }
    layers = {name: make().train() for name, make in candidates.items()}
    names = list(layers)
    for _ in range(warmup):
        for name in names:
            time_forward_backward(layers[name], x, grad, clock)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            times[name].append(time_forward_backward(layers[name], x, grad, clock))
    return times


def report(
    shape, rounds, warmup, results: dict[str, dict[str, list[float]]], command: str, load: tuple[float, float]
) -> str:
    """Markdown: per layout, median ms per candidate and the two goal ratios (ratio of medians and median of
    per-round ratios)."""
    lines = [
        "# Divisive normalization speed (CPU, forward + backward)",
        "",
        f"- command: `{command}`",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, Python {platform.python_version()}",
        f"- load average (1 min) {load[0]:.1f} before, {load[1]:.1f} after: other jobs shared the CPUs",
        f"- tensor {tuple(shape)} fp32, p = 0.5, power 2; {rounds} interleaved rounds after {warmup} warm-up",
        f"- goals: DN <= {GOAL_VS_BATCHNORM}x BatchNorm2d+ReLU; DN >= {GOAL_VS_CONV3D}x faster than conv3d",
        "",
        "| layout, clock | candidate | median ms | min ms |",
        "|---|---|---:|---:|",
    ]
    summary = []
    for layout, times in results.items():
        for name, values in times.items():
            lines.append(f"| {layout} | {name} | {1e3 * statistics.median(values):.1f} | {1e3 * min(values):.1f} |")
        dn, bn, c3 = times["DivisiveNorm2d (ours)"], times["BatchNorm2d+ReLU"], times["original conv3d"]
        vs_bn = statistics.median(dn) / statistics.median(bn)
        vs_c3 = statistics.median(c3) / statistics.median(dn)
        vs_bn_paired = statistics.median(d / b for d, b in zip(dn, bn))
        vs_c3_paired = statistics.median(c / d for c, d in zip(c3, dn))
        summary += [
            f"| {layout} | DN time / BN+ReLU time | {vs_bn:.2f} | {vs_bn_paired:.2f} | <= {GOAL_VS_BATCHNORM} | "
            f"{'met' if vs_bn <= GOAL_VS_BATCHNORM else 'MISSED'} |",
            f"| {layout} | conv3d time / DN time | {vs_c3:.2f} | {vs_c3_paired:.2f} | >= {GOAL_VS_CONV3D} | "
            f"{'met' if vs_c3 >= GOAL_VS_CONV3D else 'MISSED'} |",
        ]
    lines += [
        "",
        "| layout, clock | ratio | of medians | median per round | goal | |",
        "|---|---|---:|---:|---|---|",
        *summary,
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 256, 28, 28], metavar=("N", "C", "H", "W"))
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("divnorm_speed.md"))
    parser.add_argument("--no-write", action="store_true", help="print only, do not write the report file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    shape = tuple(args.shape)
    load_before = os.getloadavg()[0]
    results = {
        f"{layout}, {mode}": run(shape, args.rounds, args.warmup, layout == "channels-last", mode)
        for mode in MODES
        for layout in ("NCHW", "channels-last")
    }
    command = "python benchmarks/divnorm_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = (load_before, os.getloadavg()[0])
    text = report(shape, args.rounds, args.warmup, results, command.strip(), load)
    print(text)
    if not args.no_write:
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
