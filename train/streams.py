"""``data.loader_priority``: a loader's GPU work below training's on the GPU, by running training on a
high-priority CUDA stream.

A loader that decodes or resizes on the GPU (DALI's nvJPEG and resize kernels, FFCV's normalization) launches its
kernels beside the training step's, and the GPU's block scheduler shares the SMs between them: on an H200, DALI's
mixed decoding fed ResNet-50 4.8x faster than it trained, yet cost training 7-8 % of its bound
(benchmarks/nvidia-h200-x1-16cpu/README.md). CUDA stream priorities decide which pending blocks the scheduler
starts first; they never pre-empt a running block. DALI 2.4 does not let a pipeline choose its streams' priority
(``default_cuda_stream_priority`` is deprecated and has no effect; its executor takes plain streams from a pool),
so the lever is the other side: ``low`` runs the training step on a stream of the highest priority the device
offers, and the loader's kernels (default priority) fill the SMs training leaves idle.

``same`` (default) changes nothing. ``low`` on the CPU changes nothing either and says so once. What runs on the
stream: the training and evaluation steps and the checkpoint copies, everything after the set-up (models, loaders
and resident data are made on the caller's stream, which the new stream waits for; the caller's stream waits for
it at the end).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRIORITY_CHOICES = ("same", "low")


def training_stream(device: torch.device, setting: str) -> torch.cuda.Stream | None:
    """The stream the training step runs on for ``data.loader_priority = setting``: a new stream of the device's
    highest priority for ``low`` on CUDA, else None (the caller's stream)."""
    if setting not in PRIORITY_CHOICES:
        raise ValueError(f"data.loader_priority must be one of {', '.join(PRIORITY_CHOICES)}, got {setting!r}")
    if setting == "same" or device.type != "cuda":
        return None
    _least, greatest = torch.cuda.Stream.priority_range()
    return torch.cuda.Stream(device, priority=greatest)


def describe(stream: torch.cuda.Stream | None, setting: str) -> str | None:
    """One log line for a ``low`` setting (what it did, or why it did nothing); None for ``same``."""
    if setting == "same":
        return None
    if stream is None:
        return "data.loader_priority=low: no effect without a CUDA device (training has the GPU to itself)"
    return f"data.loader_priority=low: training on a CUDA stream of priority {stream.priority} (the loader's: 0)"


@contextlib.contextmanager
def running_on(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Run the block's CUDA work on ``stream`` (nothing changes for None), ordered after everything the caller's
    stream had queued, and the caller's stream ordered after the block."""
    if stream is None:
        yield
        return
    caller = torch.cuda.current_stream(stream.device)
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        caller.wait_stream(stream)
