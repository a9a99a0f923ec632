"""Measure one setting: warm-up (reported on its own), then timed windows of loader batches or training steps.

Three modes share one clock:

* ``loader``: iterate the loader and touch each batch cheaply (one element of images and labels is added to a
  device-side checksum: no ``.item()``, no host sync per step);
* ``train``: real training steps of the model (AMP, channels-last, ``torch.compile`` where the setting says so)
  fed by the loader;
* ``upper_bound``: the same training steps on one fixed batch already on the device: the compute-only ceiling.

``torch.compile`` compiles on the first call, so the compile time lands in the first step and with it in the
warm-up, never in the timed windows; a compiled setting also reports that first step as ``compile_seconds``.
A model that fails to compile fails its setting (the record says why) rather than being timed eager under a
compiled label.

On a GPU the windows are timed with CUDA events recorded at their boundaries and read after one final
synchronisation, so nothing inside the timed region waits for the GPU; on the CPU the host clock times them.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

from tools.bench.gpu_profile import profile_steps
from tools.bench.monitor import ResourceMonitor
from tools.bench.settings import Setting, make_record
from train.streams import running_on, training_stream


class WindowClock:
    """Marks window boundaries on the host clock and, on a GPU, with CUDA events (no per-step sync)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.host: list[float] = []
        self.events: list[torch.cuda.Event] = []

    def mark(self) -> None:
        self.host.append(time.perf_counter())
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def durations(self) -> list[float]:
        """Seconds of each window: GPU-side between events on a GPU (after one sync), host-side on the CPU."""
        if self.cuda:
            self.events[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.events, self.events[1:])]
        return [b - a for a, b in zip(self.host, self.host[1:])]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_forever(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches across epoch boundaries (each epoch reshuffled), as a training run sees them."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        produced = 0
        for batch in loader:
            produced += 1
            yield batch
        if produced == 0:
            raise RuntimeError(
                f"the loader yields no batch: {loader.dataset_size} samples are fewer than one batch of "
                f"{loader.batch_size}; use a smaller --batch-sizes or more data"
            )
        epoch += 1


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 / AMX on x86, BF16 on Arm).

    Without it PyTorch emulates bf16 convolutions: on this project's AVX2 build machine one AlexNet step at
    batch 64 took 184 s under bf16 autocast against 8 s in fp32, so ``auto`` falls back to fp32 there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def amp_dtype(setting: Setting, device: torch.device) -> torch.dtype | None:
    """The autocast dtype. ``auto``: on a GPU bf16 where supported (no loss scaling needed), else fp16; on the
    CPU bf16 where the CPU has native bf16, else None (fp32)."""
    choice = setting.amp
    if choice == "off":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if choice == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


class TrainStep:
    """One optimizer step of ``setting.model`` on a batch: forward under autocast, backward, SGD update."""

    def __init__(self, setting: Setting, device: torch.device, num_classes: int, resolution: int) -> None:
        import models  # the registry (imports divnorm); only train modes need it

        self.device = device
        self.dtype = amp_dtype(setting, device)
        model_config = {"divnorm_specs": {"type": setting.divnorm}}
        model = models.create_model(
            setting.model, num_classes=num_classes, model_config=model_config, image_size=resolution
        )
        self.model = model.to(device, memory_format=torch.channels_last).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and self.dtype == torch.float16)
        self.forward = self.model
        if setting.compile:  # mode None is torch.compile's default
            mode = None if setting.compile_mode == "default" else setting.compile_mode
            self.forward = torch.compile(self.model, mode=mode)
        self.loss_sum = torch.zeros((), device=device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = torch.nn.functional.cross_entropy(self.forward(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.loss_sum += loss.detach().float()  # stays on the device: no sync per step


def _spec(setting: Setting, device: torch.device):
    from loaders.base import LoaderSpec

    options: dict[str, Any] = {
        "loader": setting.loader,
        "workers": setting.workers,
        "batch_size": setting.batch_size,
        **setting.options,
    }
    if setting.dali_device:
        options["dali_device"] = setting.dali_device
    if setting.resolution:
        options["image_size"] = setting.resolution
    return LoaderSpec(
        dataset=setting.dataset,
        split="train",
        batch_size=setting.batch_size,
        train=True,
        data_dir=setting.data_dir,
        device=device,
        channels_last=True,
        image_size=setting.resolution,
        workers=setting.workers,
        seed=setting.seed,
        options=options,
    )


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"images_per_second": None}
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "images_per_second": round(statistics.median(ordered), 1),
        "images_per_second_min": round(ordered[0], 1),
        "images_per_second_max": round(ordered[-1], 1),
        "images_per_second_p25": round(quartiles[0], 1),
        "images_per_second_p75": round(quartiles[2], 1),
    }


def measure(setting: Setting) -> dict[str, Any]:
    """Run ``setting`` and return its record (status ``ok``); user-facing problems raise ``LoaderError``."""
    from loaders import build_loader
    from loaders.datasets import dataset_info

    cuda = setting.device == "gpu"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    info = dataset_info(setting.dataset)
    resolution = setting.resolution or info.image_size
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    monitor = ResourceMonitor(gpu=cuda).start()
    loader = None
    scope = contextlib.ExitStack()
    t_start = time.perf_counter()
    try:
        step = TrainStep(setting, device, info.num_classes, resolution) if setting.mode != "loader" else None
        if setting.mode == "upper_bound":
            generator = torch.Generator(device=device).manual_seed(setting.seed)
            images = torch.randn(setting.batch_size, 3, resolution, resolution, device=device, generator=generator)
            images = images.contiguous(memory_format=torch.channels_last)
            labels = torch.randint(0, info.num_classes, (setting.batch_size,), device=device, generator=generator)
            batches: Iterator = iter(lambda: (images, labels), None)
        else:
            loader = build_loader(setting.loader, _spec(setting, device))
            batches = batches_forever(loader)
        build_seconds = time.perf_counter() - t_start
        # data.loader_priority=low (train/streams.py): the training step on a high-priority stream, as the trainer
        if step is not None and setting.mode == "train":
            priority = str(setting.options.get("loader_priority", "same"))
            scope.enter_context(running_on(training_stream(device, priority)))
        checksum = torch.zeros((), device=device)
        waited = 0.0  # host seconds blocked in next(batches): the step waiting for its loader

        def consume() -> int:
            nonlocal checksum, waited
            asked = time.perf_counter()
            x, y = next(batches)
            waited += time.perf_counter() - asked
            if step is None:
                checksum += x[0, 0, 0, 0].float() + y[0].float()  # touch the batch, no host sync
            else:
                step(x, y)
            return y.shape[0]

        t_first = time.perf_counter()
        consume()
        synchronize(device)
        first_batch_seconds = time.perf_counter() - t_first
        warm_batches, warm_target = 1, setting.warmup_batches if step is None else setting.warmup_steps
        while warm_batches < warm_target or time.perf_counter() - t_first < setting.warmup_seconds:
            consume()
            warm_batches += 1
        synchronize(device)  # the one sync between warm-up and the timed region
        warmup_seconds = time.perf_counter() - t_start

        window_length = setting.seconds / max(1, setting.windows)
        clock = WindowClock(cuda)
        counts: list[int] = []
        monitor.begin_timed()
        waited = 0.0
        clock.mark()
        threads = torch.get_num_threads()
        for _ in range(max(1, setting.windows)):
            started, images_seen = time.perf_counter(), 0
            while images_seen == 0 or time.perf_counter() - started < window_length:
                images_seen += consume()
            clock.mark()
            counts.append(images_seen)
        durations = clock.durations()
        monitor.end_timed()
        timed_waited, host_seconds = waited, clock.host[-1] - clock.host[0]
        measured: dict[str, Any] = {
            **_spread([n / d for n, d in zip(counts, durations) if d > 0]),
            "windows": len(counts),
            "window_images_per_second": [round(n / d, 1) for n, d in zip(counts, durations) if d > 0],
            "timed_images": sum(counts),
            "timed_seconds": round(sum(durations), 3),
            "timing": "cuda_events" if cuda else "host_clock",
            "build_seconds": round(build_seconds, 3),
            "first_batch_seconds": round(first_batch_seconds, 3),
            "warmup_seconds": round(warmup_seconds, 3),
            "warmup_batches": warm_batches,
            "torch_threads": threads,
            "resolution": resolution,
        }
        if step is not None:
            # where a training setting's host time went: blocked on the loader (the rest is the step's dispatch, and
            # on a GPU the wait for the device, which the GPU profile splits further)
            measured["data_wait_percent"] = round(100.0 * timed_waited / max(host_seconds, 1e-9), 1)
            measured["data_wait_ms_per_image"] = round(1000.0 * timed_waited / max(sum(counts), 1), 4)
            # the first call of a compiled model compiles it: that step is the compile time (plus one step)
            measured["compile_seconds"] = round(first_batch_seconds, 3) if setting.compile else None
            measured["loss_finite"] = bool(torch.isfinite(step.loss_sum).item())  # one sync, at the end
            measured["amp_dtype"] = str(step.dtype).replace("torch.", "") if step.dtype else "fp32"
        else:
            measured["checksum_finite"] = bool(torch.isfinite(checksum).item())
        if cuda and step is not None and setting.profile_steps > 0:  # after the timing: CUPTI slows the steps
            try:
                measured["gpu_profile"] = profile_steps(consume, setting.profile_steps, lambda: synchronize(device))
            except RuntimeError as error:  # e.g. no CUPTI in the container: the throughput stands without it
                measured["gpu_profile"] = {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
        if loader is not None:
            measured["dataset_size"] = loader.dataset_size
        if cuda:
            measured["gpu_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            measured["gpu_memory_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    finally:
        scope.close()
        if loader is not None:
            loader.close()
        summary = monitor.stop()
    measured.update(summary)
    return make_record(setting, "ok", **measured)
