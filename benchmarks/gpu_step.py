"""The GPU training step on its own: the ``ours`` DN layer against BatchNorm+ReLU and its memory floor, and whole
ResNet steps with and without DN, eager and compiled (issue 18's figures and targets, in one results.json).

1. The layer: forward + backward of ``ours`` (p = 0.5, power 2) eager, compiled (``torch.compile`` of the torch
   path) and as the Triton kernel (``divnorm.build_divnorm({"type": "ours", "kernel": "triton"}, C)``; recorded
   as skipped, with the reason, while ``build_divnorm`` does not know the ``kernel`` key), against
   ``BatchNorm2d + ReLU`` (eager and compiled), at the four ResNet-50 stage shapes in bf16 channels-last. The
   memory floor is the time to move the bytes the layer must move at the least (5 passes over the tensor:
   read x, write y; read x and dy, write dx) at the device-to-device copy bandwidth measured here with a big
   ``copy_``.
2. The models: ResNet-18 (32 px layout, batch 512, 100 classes) and ResNet-50 (224 px, batch 256, 1000 classes),
   without DN and with ``ours`` after every conv (``model.divnorm_specs.type = ours``, ``asact`` false), eager and
   compiled (``torch.compile`` default mode), bf16 autocast, channels-last, SGD (fused where available) on one
   fixed batch already on the GPU: images/s.

Timing: CUDA events around each repeat of a few calls, after warm-up (the first call, which compiles, is timed
apart as ``first_call_seconds``); the median over repeats. Every item runs under its own cap and the whole run
under ``--time-cap``: an item that fails or runs over is recorded with the reason and the run goes on; items
left when the time is spent are recorded as skipped. results.json (and results.md) are rewritten after every
item, so a killed run keeps what it measured. Needs neither DALI nor FFCV.

    python benchmarks/gpu_step.py --out DIR [--time-cap 230] [--parts layer,models]
    python benchmarks/gpu_step.py --out DIR --dry-run   # on the CPU: tiny shapes, eager, a few iterations

Compiling is most of the run's time on a fresh machine (ResNet-50 a minute or more, each shape of the layer
seconds). ``--warm-cache`` compiles instead of measuring: the compiled items only (and the Triton kernel), one call
each, which fills inductor's on-disk caches (FX graph, AOTAutograd, Triton kernels). Several such processes split
by ``--models`` / ``--divnorms`` / ``--shapes`` run side by side, and the measuring run after them then compiles
from the cache (its ``compile_seconds`` are then warm; the warm runs' own are the cold ones).
benchmarks/gpu/device_session.sh does this (``STEP_WARM=1``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

from divnorm import build_divnorm, pool_size  # noqa: E402
from divnorm.fused_bn import fusion_applies, relu_divnorm_batchnorm  # noqa: E402
from train.files import write_json_atomic, write_text_atomic  # noqa: E402

STAGE_SHAPES = [(256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]
DRY_SHAPES = [(2, 64, 8, 8), (2, 128, 4, 4)]
# (model, image size, batch, classes): issue 18's two networks; the dry run shrinks them
MODELS = [("resnet50", 224, 256, 1000), ("resnet18", 32, 512, 100)]
DRY_MODELS = [("resnet50", 16, 2, 10), ("resnet18", 16, 2, 10)]  # the small-input layouts, shrunk
DN_SPECS = {"type": "ours", "p": 0.5, "power": 2}
PASSES = 5  # forward: read x, write y; backward: read x and dy, write dx
LAYER_TARGET_MS = 0.70
TARGETS = {"floor": 1.5, "resnet50_dn": 0.85, "resnet18_dn": 0.90, "resnet50_compile": 1.4}
# --divnorms: the models part's DN settings. ours_fused: divnorm_specs.fuse_bn=auto, every conv unit's ReLU -> DN ->
# BatchNorm as one function (compiled: the torch function inductor fuses; eager: the Triton kernels);
# ours_fused_kernel: the Triton kernels in the compiled model too (kernel=triton).
DIVNORMS = {
    "nonorm": {"type": "nonorm"},
    "ours": {"type": "ours"},
    "ours_fused": {"type": "ours", "fuse_bn": "auto"},
    "ours_fused_kernel": {"type": "ours", "fuse_bn": True, "kernel": "triton"},
}


class ItemTimeout(Exception):
    """An item ran over its cap (raised in the main thread by SIGALRM)."""


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise :class:`ItemTimeout` in the block after ``seconds`` (SIGALRM; main thread only, else no cap)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise ItemTimeout(f"over its cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """The run's time cap and each item's: an item gets ``min(item_cap, time left)`` and is skipped when less
    than ``min_seconds`` is left."""

    def __init__(self, total: float, item_cap: float, min_seconds: float = 5.0) -> None:
        self.deadline = time.monotonic() + total
        self.item_cap, self.min_seconds = item_cap, min_seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``work()``'s fields with ``status`` ``ok``, or ``skipped`` / ``failed`` with the reason; never raises
        (but Ctrl-C)."""
        left = self.left()
        if left < self.min_seconds:
            return {"status": "skipped", "reason": f"the run's time cap was spent ({left:.0f} s left)"}
        started = time.perf_counter()
        try:
            with time_cap(min(self.item_cap, left)):
                fields = work()
            item = {"status": "ok", "reason": "", **fields}
        except Skip as why:
            item = {"status": "skipped", "reason": str(why)}
        except ItemTimeout as error:
            item = {"status": "failed", "reason": f"timeout: {error}"}
        except Exception as error:  # noqa: BLE001 - a benchmark records a broken item and goes on
            tail = traceback.format_exc().strip().splitlines()[-6:]
            item = {"status": "failed", "reason": f"{type(error).__name__}: {error}"[:600], "traceback": tail}
        item["seconds"] = round(time.perf_counter() - started, 2)
        cleanup()
        return item


class Skip(Exception):
    """An item that cannot run here (the reason is the message)."""


def cleanup() -> None:
    """Drop compiled graphs and cached blocks between items, so one item's memory is not the next one's."""
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int, calls: int) -> dict:
    """Median milliseconds per call of ``fn`` over ``repeats`` groups of ``calls`` (CUDA events on a GPU, the
    host clock on the CPU), after ``warmup`` calls; the first call (the compile, if any) is timed apart."""
    started = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - started
    for _ in range(max(0, warmup - 1)):
        fn()
    synchronize(device)
    per_call: list[float] = []
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        marks[0].record()
        for index in range(repeats):
            for _ in range(calls):
                fn()
            marks[index + 1].record()
        marks[-1].synchronize()
        per_call = [a.elapsed_time(b) / calls for a, b in zip(marks, marks[1:])]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call.append((time.perf_counter() - t0) * 1000 / calls)
    return {
        "ms": round(statistics.median(per_call), 4),
        "ms_min": round(min(per_call), 4),
        "ms_max": round(max(per_call), 4),
        "repeats": repeats,
        "calls_per_repeat": calls,
        "first_call_seconds": round(first, 6),
    }


# ------------------------------------------------------------------------------------------------ the layer


def kernel_key_supported() -> tuple[bool, str]:
    """Whether ``build_divnorm`` takes the ``kernel`` key (issue 18's Triton switch), and its message if not."""
    try:
        build_divnorm({**DN_SPECS, "kernel": "torch"}, 64)
    except ValueError as error:
        if "kernel" in str(error):
            return False, str(error)
        raise
    return True, ""


def copy_bandwidth(device: torch.device, gib: float, args: argparse.Namespace) -> dict[str, Any]:
    """Device-to-device bandwidth of a big ``copy_`` (bytes read + bytes written per second)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    timing = time_calls(lambda: dst.copy_(src), device, warmup=args.warmup, repeats=args.repeats, calls=args.calls)
    moved = 2 * n * 2
    return {"bytes_per_copy": moved, **timing, "gb_per_second": round(moved / (timing["ms"] / 1000) / 1e9, 1)}


class BatchNormReLU(nn.Sequential):
    """The layer DN replaces in the usual conv unit: BatchNorm2d then ReLU."""

    def __init__(self, num_channels: int) -> None:
        super().__init__(nn.BatchNorm2d(num_channels), nn.ReLU())


class UnitTail(nn.Module):
    """A conv unit after its conv: ReLU -> BatchNorm (``dn=None``, the no-DN tail) or ReLU -> ``ours`` ->
    BatchNorm, layer by layer or fused (``fuse_bn``, as :class:`models.layers.ConvUnit` decides it; ``kernel``:
    the DN layer's key, which also picks the fused implementation)."""

    def __init__(self, num_channels: int, dn: bool, fuse_bn: bool | str = False, kernel: str = "auto") -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.dn = build_divnorm({**DN_SPECS, "kernel": kernel}, num_channels) if dn else None
        self.norm = nn.BatchNorm2d(num_channels)
        self.fuse_bn = fuse_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dn is None:
            return self.norm(self.act(x))
        if fusion_applies(self.fuse_bn, self.act, self.dn, self.norm, x):
            return relu_divnorm_batchnorm(x, self.dn, self.norm, relu=True)
        return self.norm(self.dn(self.act(x)))


def kernel_tail(num_channels: int) -> nn.Module:
    """The fused ReLU -> DN -> BatchNorm Triton kernels: on CUDA, or on the CPU under Triton's interpreter (the dry
    run); skipped elsewhere."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise Skip("the fused ReLU-DN-BatchNorm kernels need a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")
    return UnitTail(num_channels, dn=True, fuse_bn=True, kernel="triton")


def layer_item(
    build: Callable[[], nn.Module], shape, dtype, device, args, *, compiled: bool, reference=None, profile=False
):
    """Forward + backward of the layer ``build()`` makes on a (channels-last) tensor of ``shape``; with ``profile``
    (on a GPU, ``--profile-calls`` > 0) also the GPU's busy and idle time a call, from the profiler."""

    def work() -> dict[str, Any]:
        if compiled and args.dry_run:
            raise Skip("dry run: eager only (compiling on the CPU needs minutes)")
        layer = build().to(device)
        forward = torch.compile(layer, dynamic=False) if compiled else layer
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, device=device, generator=generator).to(dtype, memory_format=torch.channels_last)
        x.requires_grad_(True)
        dy = torch.randn(shape, device=device, generator=generator).to(dtype, memory_format=torch.channels_last)

        def call() -> None:
            x.grad = None
            forward(x).backward(dy)

        fields = time_calls(call, device, warmup=args.warmup, repeats=args.repeats, calls=args.calls)
        if profile and device.type == "cuda" and args.profile_calls > 0:
            try:  # the timing above stands whatever the profiler does
                fields["gpu"] = gpu_busy(call, device, args.profile_calls)
            except Exception as error:  # noqa: BLE001 - recorded, not raised
                fields["gpu"] = {"error": f"{type(error).__name__}: {error}"[:300]}
        if reference is not None:  # the same input through the eager torch path: the variants must agree
            with torch.no_grad():
                diff = (forward(x).float() - reference().to(device)(x).float()).abs().max()
            fields["max_abs_diff_vs_eager"] = round(float(diff), 5)
        return fields

    return work


def gpu_busy(call: Callable[[], None], device: torch.device, calls: int) -> dict[str, Any]:
    """Per call, from ``calls`` calls under the CUDA profiler: ``busy_ms`` (a kernel or copy running), ``idle_ms``
    (the GPU waiting for the host between them) and ``span_ms``. Where ``idle_ms`` is large the wall time measures
    the host (Python, dispatch, launches), not the kernels."""
    from tools.bench.gpu_profile import profile_steps

    def one() -> int:
        call()
        return 1

    summary = profile_steps(one, calls, lambda: synchronize(device))
    return {
        "calls": calls,
        "busy_ms": summary.get("training_ms"),
        "idle_ms": summary.get("idle_ms"),
        "span_ms": summary.get("wall_ms"),
    }


def bench_layer(shape, device, dtype, args, budget: Budget, kernel_ok: tuple[bool, str]) -> dict[str, Any]:
    """Every variant of the layer at one shape, and the memory floor."""
    channels = shape[1]
    torch_specs = {**DN_SPECS, "kernel": "torch"} if kernel_ok[0] else dict(DN_SPECS)
    elements = shape[0] * shape[1] * shape[2] * shape[3]
    moved = PASSES * elements * torch.tensor([], dtype=dtype).element_size()
    entry: dict[str, Any] = {
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "pool_size": pool_size(channels, DN_SPECS["p"]),
        "bytes_moved": moved,
        "floor_ms": round(moved / (args.bandwidth_gbps * 1e9) * 1000, 4) if args.bandwidth_gbps else None,
        "variants": {},
    }

    def eager_torch() -> nn.Module:
        torch.manual_seed(0)
        return build_divnorm(torch_specs, channels)

    def triton() -> nn.Module:
        if not kernel_ok[0]:
            message = kernel_ok[1].split(";")[0]  # not the list of known keys
            raise Skip(
                f"build_divnorm does not take the 'kernel' key yet (the Triton kernel has not landed): {message}"
            )
        torch.manual_seed(0)
        return build_divnorm({**DN_SPECS, "kernel": "triton"}, channels)

    variants = {
        "ours_eager": layer_item(eager_torch, shape, dtype, device, args, compiled=False),
        "ours_triton": layer_item(
            triton, shape, dtype, device, args, compiled=False, reference=eager_torch, profile=True
        ),
        "ours_compiled": layer_item(
            eager_torch, shape, dtype, device, args, compiled=True, reference=eager_torch, profile=True
        ),
        "batchnorm_relu_eager": layer_item(lambda: BatchNormReLU(channels), shape, dtype, device, args, compiled=False),
        "batchnorm_relu_compiled": layer_item(
            lambda: BatchNormReLU(channels), shape, dtype, device, args, compiled=True
        ),
        # the whole unit tail after the conv, which is what a model runs: no DN, DN layer by layer, DN fused
        "tail_relu_bn_compiled": layer_item(
            lambda: UnitTail(channels, False), shape, dtype, device, args, compiled=True
        ),
        "tail_relu_ours_bn_compiled": layer_item(
            lambda: UnitTail(channels, True), shape, dtype, device, args, compiled=True
        ),
        "tail_function_compiled": layer_item(
            lambda: UnitTail(channels, True, fuse_bn=True, kernel="torch"), shape, dtype, device, args, compiled=True
        ),
        "tail_kernel": layer_item(
            lambda: kernel_tail(channels),
            shape,
            dtype,
            device,
            args,
            compiled=False,
            reference=lambda: UnitTail(channels, True),
            profile=True,
        ),
        "tail_kernel_compiled": layer_item(lambda: kernel_tail(channels), shape, dtype, device, args, compiled=True),
    }
    if args.warm_cache:  # only what compiles (the Triton kernel's JIT included)
        variants = {name: work for name, work in variants.items() if "compiled" in name or "triton" in name}
    kernels = {"ours_triton": "triton", "tail_kernel": "fused_bn", "tail_kernel_compiled": "fused_bn"}
    for name, work in variants.items():
        entry["variants"][name] = budget.run(work)
        entry["variants"][name]["kernel"] = kernels.get(name, "torch" if "ours" in name else None)
        yield_progress(args, f"layer {tuple(shape)} {name}", entry["variants"][name])
    return entry


# ------------------------------------------------------------------------------------------------ the models


def model_item(name: str, size: int, batch: int, classes: int, divnorm: str, compiled: bool, device, args):
    def work() -> dict[str, Any]:
        import models

        if compiled and args.dry_run:
            raise Skip("dry run: eager only (compiling on the CPU needs minutes)")
        torch.manual_seed(0)
        specs = DIVNORMS[divnorm]
        model = models.create_model(name, num_classes=classes, model_config={"divnorm_specs": specs}, image_size=size)
        model = model.to(device, memory_format=torch.channels_last).train()
        try:  # one kernel for the whole update where this torch has it (the trainer's choice on a GPU)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, fused=True)
            fused = True
        except (TypeError, RuntimeError):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
            fused = False
        forward = torch.compile(model) if compiled else model
        generator = torch.Generator(device=device).manual_seed(0)
        images = torch.randn(batch, 3, size, size, device=device, generator=generator)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, classes, (batch,), device=device, generator=generator)
        amp = args.amp_dtype

        def step() -> None:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(forward(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        timing = time_calls(step, device, warmup=args.warmup, repeats=args.repeats, calls=args.model_calls)
        fields = {"images_per_second": round(batch / (timing["ms"] / 1000), 1), "fused_sgd": fused, **timing}
        if compiled:
            fields["compile_seconds"] = timing["first_call_seconds"]  # the first step compiles
        if device.type == "cuda":
            fields["gpu_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        return fields

    return work


def bench_models(device, args, budget: Budget, result: dict[str, Any]) -> None:
    """Per model eager first (seconds), then compiled (a minute each for ResNet-50): when the time cap runs out,
    it takes as few figures as it can."""
    order = [(divnorm, compiled) for compiled in (False, True) for divnorm in DIVNORMS]
    for name, size, batch, classes in DRY_MODELS if args.dry_run else MODELS:
        if name not in args.models:
            continue
        for divnorm, compiled in order:
            dn = divnorm != "nonorm"
            if divnorm not in args.divnorms or (args.warm_cache and not compiled):
                continue
            record: dict[str, Any] = {
                "model": name,
                "resolution": size,
                "batch_size": batch,
                "num_classes": classes,
                "divnorm": divnorm,
                # the model's default kernel: Triton on CUDA once divnorm_specs.kernel (auto) exists, else torch
                "divnorm_kernel": None if not dn else "auto" if result["kernel_key_supported"] else "torch",
                "fuse_bn": DIVNORMS[divnorm].get("fuse_bn", False),
                "compile": compiled,
                "amp": str(args.amp_dtype).replace("torch.", "") if args.amp_dtype else "fp32",
            }
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            record.update(budget.run(model_item(name, size, batch, classes, divnorm, compiled, device, args)))
            result["models"].append(record)
            yield_progress(args, f"{name} {divnorm} {'compiled' if compiled else 'eager'}", record)
            write_results(result, args.out)


# ------------------------------------------------------------------------------------------------ targets


def _ok(item: dict[str, Any] | None, key: str) -> float | None:
    return item.get(key) if item and item.get("status") == "ok" else None


def _model(result: dict[str, Any], name: str, divnorm: str, compiled: bool) -> float | None:
    for record in result["models"]:
        if (record["model"], record["divnorm"], record["compile"]) == (name, divnorm, compiled):
            return _ok(record, "images_per_second")
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 18's targets, each with its measured value (None where an item did not run) and whether it is met."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, comparison: str, goal: float) -> None:
        met = None if value is None else (value <= goal if comparison == "<=" else value >= goal)
        rows.append({"name": name, "value": value, "comparison": comparison, "target": goal, "met": met})

    layers = result["layer"]
    if layers:
        head = layers[0]
        triton = _ok(head["variants"].get("ours_triton"), "ms")
        label = f"ours fwd+bwd {tuple(head['shape'])}"
        add(f"{label}, Triton, ms", triton, "<=", LAYER_TARGET_MS)
        busy = ((head["variants"].get("ours_triton") or {}).get("gpu") or {}).get("busy_ms")
        if busy is not None:  # the kernels alone, without the host's share of the wall time
            add(f"{label}, Triton, GPU busy ms (profiler)", busy, "<=", LAYER_TARGET_MS)
        add(f"{label}, Triton / memory floor", _ratio(triton, head.get("floor_ms")), "<=", TARGETS["floor"])
        for entry in layers[1:]:
            add(
                f"ours fwd+bwd {tuple(entry['shape'])}, Triton / compiled torch path",
                _ratio(
                    _ok(entry["variants"].get("ours_triton"), "ms"), _ok(entry["variants"].get("ours_compiled"), "ms")
                ),
                "<=",
                1.0,
            )
    for name, key in (("resnet50", "resnet50_dn"), ("resnet18", "resnet18_dn")):
        for divnorm, label in (
            ("ours", "DN"),
            ("ours_fused", "DN fused with BN"),
            ("ours_fused_kernel", "DN+BN kernels"),
        ):
            value = _ratio(_model(result, name, divnorm, True), _model(result, name, "nonorm", True))
            add(f"{name} {label} / no DN, compiled", value, ">=", TARGETS[key])
    value = _ratio(_model(result, "resnet50", "nonorm", True), _model(result, "resnet50", "nonorm", False))
    add("resnet50 compiled / eager upper bound", value, ">=", TARGETS["resnet50_compile"])
    return rows


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    """Figures the issue quotes that are not targets: DN's eager cost, the compiled layer against its floor."""
    out: dict[str, float | None] = {}
    for name in ("resnet50", "resnet18"):
        out[f"{name} DN / no DN, eager"] = _ratio(
            _model(result, name, "ours", False), _model(result, name, "nonorm", False)
        )
        out[f"{name} DN compiled / eager"] = _ratio(
            _model(result, name, "ours", True), _model(result, name, "ours", False)
        )
    for entry in result["layer"]:
        variants = entry["variants"]
        shape = tuple(entry["shape"])
        out[f"ours compiled / floor {shape}"] = _ratio(_ok(variants.get("ours_compiled"), "ms"), entry.get("floor_ms"))
        out[f"ours compiled / BatchNorm+ReLU compiled {shape}"] = _ratio(
            _ok(variants.get("ours_compiled"), "ms"), _ok(variants.get("batchnorm_relu_compiled"), "ms")
        )
        no_dn = _ok(variants.get("tail_relu_bn_compiled"), "ms")
        for key in ("tail_relu_ours_bn_compiled", "tail_function_compiled", "tail_kernel", "tail_kernel_compiled"):
            out[f"{key} / tail_relu_bn_compiled {shape}"] = _ratio(_ok(variants.get(key), "ms"), no_dn)
    return out


# ------------------------------------------------------------------------------------------------ files


def _cell(item: dict[str, Any] | None, key: str, fmt: str = "{:.3f}") -> str:
    if not item:
        return "–"
    if item.get("status") != "ok":
        return item.get("status", "–")
    return fmt.format(item[key])


def _ips(item: dict[str, Any] | None) -> str:
    """Images/s as the profiler prints them: one decimal below 100 (a CPU dry run), else thousands."""
    value = _ok(item, "images_per_second")
    if value is None:
        return item.get("status", "–") if item else "–"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def markdown(result: dict[str, Any]) -> str:
    """results.md: the layer table, the model table, the targets."""
    lines = [
        f"# The GPU step{' (dry run on the CPU)' if result['dry_run'] else ''}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- Device: {result['device_name']}; torch {torch.__version__}; {result['started']} UTC",
        f"- Copy bandwidth (device to device, read + write): {_cell(result['copy'], 'gb_per_second', '{:,.0f}')} GB/s",
        f"- `build_divnorm` takes `kernel`: {result['kernel_key_supported']}",
        "",
        "## `ours` layer forward + backward, ms (median)",
        "",
        "| shape | pool | floor | eager | compiled | Triton | BN+ReLU eager | BN+ReLU compiled |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tail_lines = [
        "",
        "## The unit tail after the conv, forward + backward, ms (median)",
        "",
        "ReLU -> BatchNorm compiled (no DN); ReLU -> ours -> BatchNorm compiled layer by layer; the same as one "
        "torch function (`fuse_bn`, `kernel=torch`) compiled; as the Triton kernels (`kernel=triton`), eager and "
        "inside a compiled module.",
        "",
        "| shape | no DN, compiled | DN layers, compiled | DN function, compiled | DN kernels | DN kernels, compiled "
        "| best DN / no DN |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in result["layer"]:
        v = entry["variants"]
        floor = f"{entry['floor_ms']:.3f}" if entry.get("floor_ms") else "–"
        cells = [_cell(v.get(k), "ms") for k in ("ours_eager", "ours_compiled", "ours_triton")]
        cells += [_cell(v.get(k), "ms") for k in ("batchnorm_relu_eager", "batchnorm_relu_compiled")]
        lines.append(f"| {tuple(entry['shape'])} | {entry['pool_size']} | {floor} | " + " | ".join(cells) + " |")
        keys = ("tail_relu_bn_compiled", "tail_relu_ours_bn_compiled", "tail_function_compiled", "tail_kernel",
                "tail_kernel_compiled")  # fmt: skip
        with_dn = [ms for k in keys[1:] if (ms := _ok(v.get(k), "ms")) is not None]
        ratio = _ratio(min(with_dn), _ok(v.get(keys[0]), "ms")) if with_dn else None
        tail_cells = [_cell(v.get(k), "ms") for k in keys] + [f"{ratio:.2f}" if ratio else "–"]
        tail_lines.append(f"| {tuple(entry['shape'])} | " + " | ".join(tail_cells) + " |")
    lines += tail_lines
    busy_lines = []
    for entry in result["layer"]:
        v = entry["variants"]
        cells = []
        for key in ("ours_triton", "ours_compiled", "tail_kernel"):
            gpu = (v.get(key) or {}).get("gpu") or {}
            busy, idle = gpu.get("busy_ms"), gpu.get("idle_ms")
            cells.append(_cell(v.get(key), "ms"))
            cells += ["–" if value is None else f"{value:.3f}" for value in (busy, idle)]
        if any(cell != "–" for cell in cells[1::3] + cells[2::3]):
            busy_lines.append(f"| {tuple(entry['shape'])} | " + " | ".join(cells) + " |")
    if busy_lines:
        lines += [
            "",
            "## Wall time against GPU time, forward + backward, ms a call",
            "",
            "Busy: a kernel or copy running (the profiler, `--profile-calls` calls); idle: the GPU waiting between "
            "them. Where idle is large the wall time measures the host (Python, dispatch, launches), not the kernels.",
            "",
            "| shape | Triton wall | busy | idle | compiled torch wall | busy | idle | DN+BN kernels wall | busy "
            "| idle |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *busy_lines,
        ]
    lines += [
        "",
        "## Training step on a fixed batch, images/s",
        "",
        "| model | px | batch | DN | eager | compiled | compiled / eager | compile s |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    keys = []
    for record in result["models"]:
        key = (record["model"], record["resolution"], record["batch_size"], record["divnorm"])
        if key not in keys:
            keys.append(key)
    for name, size, batch, divnorm in keys:
        found = {r["compile"]: r for r in result["models"] if (r["model"], r["divnorm"]) == (name, divnorm)}
        eager, compiled = found.get(False), found.get(True)
        ratio = _ratio(_ok(compiled, "images_per_second"), _ok(eager, "images_per_second"))
        lines.append(
            f"| {name} | {size} | {batch} | {divnorm} | {_ips(eager)} | "
            f"{_ips(compiled)} | {f'{ratio:.2f}x' if ratio else '–'} | "
            f"{_cell(compiled, 'compile_seconds', '{:.0f}')} |"
        )
    lines += ["", "## Targets", "", "| target | value | goal | met |", "|---|---:|---:|---|"]
    for row in result["targets"]:
        value = "–" if row["value"] is None else f"{row['value']:.3f}"
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        lines.append(f"| {row['name']} | {value} | {row['comparison']} {row['target']} | {met} |")
    failed = [
        (f"{k} {tuple(e['shape'])}", i)
        for e in result["layer"]
        for k, i in e["variants"].items()
        if i["status"] != "ok"
    ]
    failed += [
        (f"{r['model']} {r['divnorm']} compile={r['compile']}", r) for r in result["models"] if r["status"] != "ok"
    ]
    if failed:
        lines += ["", "## Not measured", ""] + [
            f"- {name}: {item['status']}, {item['reason']}" for name, item in failed
        ]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out: Path) -> None:
    """Targets and ratios from what is measured so far, then both files (atomic: a killed run leaves them whole)."""
    result["targets"] = targets(result)
    result["ratios"] = ratios(result)
    result["elapsed_seconds"] = round(time.monotonic() - result["started_monotonic"], 1)
    write_json_atomic(out / "results.json", {k: v for k, v in result.items() if k != "started_monotonic"})
    write_text_atomic(out / "results.md", markdown(result))


def yield_progress(args: argparse.Namespace, name: str, item: dict[str, Any]) -> None:
    what = f"{item['ms']:.3f} ms" if "ms" in item else item.get("reason", "")
    if "images_per_second" in item:
        what = f"{item['images_per_second']:,.0f} img/s"
    print(f"gpu_step: {name}: {item['status']} {what} ({item.get('seconds', 0):.1f} s)", flush=True)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    p.add_argument("--dry-run", action="store_true", help="on the CPU: tiny shapes and models, eager, few calls")
    p.add_argument("--parts", default="layer,models", help="comma list of layer, models")
    p.add_argument("--models", default="resnet50,resnet18", help="comma list of resnet50, resnet18")
    p.add_argument("--time-cap", type=float, default=230.0, help="seconds for the whole run (items after: skipped)")
    p.add_argument("--item-cap", type=float, default=150.0, help="seconds for one item (a compile included)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls first, the compiling one included (default 3, dry run 1)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per item (default 15, dry run 2)")
    p.add_argument("--calls", type=int, default=None, help="layer calls per repeat (default 10, dry run 2)")
    p.add_argument("--model-calls", type=int, default=None, help="training steps per repeat (default 4, dry run 1)")
    p.add_argument("--copy-gib", type=float, default=None, help="size of the bandwidth copy (default 4, dry run 0.01)")
    p.add_argument(
        "--profile-calls",
        type=int,
        default=5,
        help="on a GPU, calls of the Triton and compiled-torch layer items run again under the profiler for their "
        "GPU busy / idle time a call (0: none)",
    )
    p.add_argument(
        "--divnorms",
        default=",".join(DIVNORMS),
        help="comma list of nonorm, ours, ours_fused (fuse_bn=auto), ours_fused_kernel (fuse_bn with the Triton "
        "kernels) for the models part",
    )
    p.add_argument("--shapes", default=None, help="comma list of stage-shape indices for the layer part (default all)")
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="fill the compile caches: compiled items (and the Triton kernel) only, one call each, no copy",
    )
    args = p.parse_args(argv)
    dry = args.dry_run
    warm = args.warm_cache
    args.warmup = args.warmup or (1 if dry or warm else 3)
    args.repeats = args.repeats or (1 if warm else 2 if dry else 15)
    args.calls = args.calls or (1 if warm else 2 if dry else 10)
    args.model_calls = args.model_calls or (1 if dry or warm else 4)
    args.copy_gib = args.copy_gib or (0.01 if dry else 4.0)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    args.divnorms = [name.strip() for name in args.divnorms.split(",") if name.strip()]
    bad = (
        [x for x in args.parts if x not in ("layer", "models")]
        + [x for x in args.models if x not in ("resnet50", "resnet18")]
        + [x for x in args.divnorms if x not in DIVNORMS]
    )
    if bad:
        p.error(
            f"unknown part, model or divnorm {', '.join(bad)}; --parts takes layer,models, --models "
            f"resnet50,resnet18 and --divnorms {','.join(DIVNORMS)}"
        )
    shapes = DRY_SHAPES if dry else STAGE_SHAPES
    try:
        indices = [int(i) for i in args.shapes.split(",") if i.strip()] if args.shapes else range(len(shapes))
        args.shapes = [shapes[i] for i in indices]
    except (ValueError, IndexError):
        p.error(f"--shapes takes indices 0..{len(shapes) - 1} of {shapes}, not {args.shapes!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("gpu_step: no CUDA GPU here; use --dry-run to check the script on the CPU")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    # bf16 autocast and bf16 layer tensors on the GPU; fp32 on the CPU, where bf16 convolutions are emulated
    dtype = torch.bfloat16 if cuda else torch.float32
    args.amp_dtype = torch.bfloat16 if cuda else None
    if cuda:
        torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    kernel_ok = kernel_key_supported()
    budget = Budget(args.time_cap, args.item_cap, min_seconds=0.0 if args.dry_run else 5.0)
    result: dict[str, Any] = {
        "benchmark": "gpu_step",
        "command": shlex.join(["python", "benchmarks/gpu_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "dry_run": args.dry_run,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "time_cap_seconds": args.time_cap,
        "item_cap_seconds": args.item_cap,
        "settings": {
            "dtype": str(dtype).replace("torch.", ""),
            "memory_format": "channels_last",
            "divnorm": DN_SPECS,
            "repeats": args.repeats,
            "calls_per_repeat": args.calls,
            "model_steps_per_repeat": args.model_calls,
            "passes_for_floor": PASSES,
        },
        "kernel_key_supported": kernel_ok[0],
        "warm_cache": args.warm_cache,
        "copy": {},
        "layer": [],
        "models": [],
        "started_monotonic": time.monotonic(),
    }
    try:
        args.bandwidth_gbps = None
        if not args.warm_cache:
            result["copy"] = budget.run(lambda: copy_bandwidth(device, args.copy_gib, args))
            args.bandwidth_gbps = result["copy"].get("gb_per_second")
            yield_progress(args, "copy bandwidth", result["copy"])
        shapes = args.shapes
        # the headline shape first, then the models, then the other shapes: the targets' figures first
        if "layer" in args.parts:
            result["layer"].append(bench_layer(shapes[0], device, dtype, args, budget, kernel_ok))
            write_results(result, args.out)
        if "models" in args.parts:
            bench_models(device, args, budget, result)
        if "layer" in args.parts:
            for shape in shapes[1:]:
                result["layer"].append(bench_layer(shape, device, dtype, args, budget, kernel_ok))
                write_results(result, args.out)
    finally:
        result["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        write_results(result, args.out)
    for row in result["targets"]:
        print(f"gpu_step: target {row['name']}: {row['value']} ({row['comparison']} {row['target']}, met {row['met']})")
    print(f"gpu_step: wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
