"""Where a training setting's GPU time goes, per image: the step's kernels, the loader's, and the idle gaps.

After a GPU training setting's timed windows, ``--profile-steps N`` (default 20) more steps run under
``torch.profiler`` with CUDA activities (CUPTI sees every kernel of the process, DALI's and FFCV's included). Each
kernel, copy and memset is attributed by the thread that launched it: the measuring thread (the training step,
and whatever the loader does in that thread: the torch loader's copy to the device, DALI's fp16 -> bf16 cast) is
*training*, every other thread (DALI's executor, FFCV's transfer thread) is the *loader*. A GPU event whose launch
the trace did not record goes by its stream: training's where the training thread launched other work on that
stream, else the loader's. Per image of the profiled steps (``gpu_profile`` in the record):

* ``wall_ms``: the GPU span of the profiled steps (first GPU event to last) / images, ~1000 / images per second;
* ``training_ms``: time with a training kernel or copy running (union of their intervals);
* ``loader_ms``: the loader's kernels and copies summed (the GPU time they take, however they overlap), split into
  ``loader_kernel_ms`` and ``loader_copy_ms``; ``loader_beside_training_ms``: the time both ran at once;
* ``idle_ms``: time with nothing running: the step waiting for data or for the host.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any

GPU_CATEGORIES = {"kernel": "kernel", "gpu_memcpy": "copy", "gpu_memset": "copy"}
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


def union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merged, sorted, disjoint ``(start, end)`` intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: Iterable[tuple[float, float]]) -> float:
    """Summed durations (for merged intervals from :func:`union`: the time covered)."""
    return sum(end - start for start, end in intervals)


def intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Intersection of two merged interval lists (see :func:`union`)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def summarize(trace: dict[str, Any], training_tid: int, images: int) -> dict[str, Any]:
    """Per-image GPU time of a Chrome trace (``torch.profiler``'s export) whose training thread is
    ``training_tid``; see the module docstring for the fields. Times in the trace are microseconds."""
    events = trace.get("traceEvents", [])
    launched_by = {
        e["args"]["correlation"]: e.get("tid")
        for e in events
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
    }
    gpu_events = [e for e in events if e.get("cat") in GPU_CATEGORIES and e.get("ph") == "X"]
    launcher = [launched_by.get(e.get("args", {}).get("correlation")) for e in gpu_events]
    training_streams = {e.get("args", {}).get("stream") for e, tid in zip(gpu_events, launcher) if tid == training_tid}
    spans: dict[str, list[tuple[float, float]]] = {"training": [], "loader_kernel": [], "loader_copy": []}
    for e, tid in zip(gpu_events, launcher):
        start = float(e["ts"])
        interval = (start, start + float(e.get("dur", 0.0)))
        unrecorded_on_training_stream = tid is None and e.get("args", {}).get("stream") in training_streams
        if tid == training_tid or unrecorded_on_training_stream:
            spans["training"].append(interval)
        else:
            spans[f"loader_{GPU_CATEGORIES[e['cat']]}"].append(interval)
    every = [iv for group in spans.values() for iv in group]
    if not every or images <= 0:
        return {"images": images, "gpu_events": 0}
    wall = max(end for _, end in every) - min(start for start, _ in every)
    training = union(spans["training"])
    loader = union(spans["loader_kernel"] + spans["loader_copy"])
    per_image = 1000.0 * images  # microseconds -> milliseconds per image
    kernels, copies = length(spans["loader_kernel"]), length(spans["loader_copy"])  # summed, overlaps and all
    return {
        "images": images,
        "gpu_events": len(every),
        "wall_ms": round(wall / per_image, 4),
        "training_ms": round(length(training) / per_image, 4),
        "loader_ms": round((kernels + copies) / per_image, 4),
        "loader_kernel_ms": round(kernels / per_image, 4),
        "loader_copy_ms": round(copies / per_image, 4),
        "loader_beside_training_ms": round(length(intersection(training, loader)) / per_image, 4),
        "idle_ms": round(max(0.0, wall - length(union(training + loader))) / per_image, 4),
    }


def profile_steps(consume: Callable[[], int], steps: int, synchronize: Callable[[], None]) -> dict[str, Any]:
    """Run ``steps`` calls of ``consume`` (one training step each, returning its images) under the CUDA profiler
    and summarize the trace (:func:`summarize`), the calling thread being the training thread."""
    from torch.profiler import ProfilerActivity, profile

    synchronize()
    images = 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            images += consume()
        synchronize()
    fd, path = tempfile.mkstemp(suffix=".json", prefix="divnorm-gpu-profile-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.remove(path)
    return summarize(trace, threading.get_native_id(), images)


def gpu_time_table(records: list[dict[str, Any]], describe: Callable[[dict[str, Any]], str]) -> list[str]:
    """results.md's section: each profiled training setting's GPU time per image (see the module docstring)."""
    rows = [r for r in records if r.get("status") == "ok" and (r.get("gpu_profile") or {}).get("gpu_events")]
    if not rows:
        return []
    lines = [
        "## GPU time per image beside training",
        "",
        "From `--profile-steps` steps after the timed windows (`torch.profiler`, CUDA activities), attributed by the "
        "launching thread: the step's thread is training, every other thread is the loader (DALI's executor, "
        "FFCV's transfers). ms per image; `loader` sums the loader's kernels and copies, `beside` is the time both "
        "ran at once, `idle` the time nothing ran.",
        "",
        "| setting | img/s | wall | training busy | loader (kernels + copies) | loader beside training | idle |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: -r["images_per_second"]):
        p = r["gpu_profile"]
        loader = f"{p['loader_ms']:.4f} ({p['loader_kernel_ms']:.4f} + {p['loader_copy_ms']:.4f})"
        lines.append(
            f"| {describe(r)} | {r['images_per_second']:,.0f} | {p['wall_ms']:.4f} | {p['training_ms']:.4f} | "
            f"{loader} | {p['loader_beside_training_ms']:.4f} | {p['idle_ms']:.4f} |"
        )
    return lines + [""]
