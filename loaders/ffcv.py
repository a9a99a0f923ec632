"""FFCV backend (``--loader ffcv``): .beton files decoded by FFCV's JIT-compiled CPU pipeline, on CPU or GPU.

Reads ``tools/convert.py``'s output (``OUT/ffcv/<split>.beton`` + ``manifest.json``; ImageNet's ``test`` reads
``val.beton``). For the in-memory sets (synthetic, cifar100) with no .beton it writes a cached .beton of the
split's arrays (:func:`loaders.arrays.load_split_arrays`: converted ``.npy`` files or the built-in / downloaded
set) once, under ``<data_dir>/ffcv-cache`` or ``~/.cache/divnorm-trainer/ffcv``, and reuses it.

Pipelines (see :mod:`loaders.ffcv_pipeline`): ImageNet train = ``RandomResizedCropRGBImageDecoder`` (``crop_scale``
/ ``crop_ratio``) + flip; validation = ``CenterCropRGBImageDecoder`` with ratio ``image_size / val_resize``; 32-px
sets = raw pixels, pad-4 random crop + flip (``augment``). Normalization: for float32 channels-last CPU batches (the
CPU default) FFCV yields uint8 and one numba pass normalizes it into the loader's own output buffer (a lookup
table per channel; it also replaces the copy out of FFCV's reused buffer); other CPU dtypes use FFCV's
``NormalizeImage`` before ``ToTensor`` (after it FFCV 1.0.2 hangs, issue #396); on the GPU it runs after
``ToDevice`` with cupy, or with torch ops on the device when cupy is missing or the dtype is bfloat16.

Order: evaluation reads rank ``r``'s samples ``r, r + W, ...`` in order; training on one process uses FFCV's
QUASI_RANDOM order (``data.order`` = "random" selects the contract's :func:`loaders.base.epoch_permutation`
instead); under DDP every rank follows the contract's per-epoch permutation shard, which is the
``DistributedSampler`` scheme FFCV's ``distributed=True`` uses, minus its padding (FFCV pads ranks with repeated
samples and needs an initialized process group). Counts are exact per the contract. ``subset`` keeps the first
N samples of the split.

Batches are tensors of our own that stay valid as long as the caller keeps them (FFCV hands out views of buffers
it reuses ``batches_ahead + 2`` batches later): each is copied out into memory recycled only once nothing
references it any more (:class:`OutputPool`). FFCV's first batch costs ~10 s of numba compilation here:
compiled pipelines are cached per process and shared by every loader with the same decoding, and the first
batch's latency is reported as ``warmup_seconds`` (``compile_seconds`` when this loader compiled it).
A failure inside FFCV's thread raises :class:`loaders.ffcv_pipeline.FfcvWorkerError` within a fraction of a
second instead of hanging (``ffcv_timeout`` seconds, default 300, bound a thread that stalls without dying).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loaders.arrays import load_split_arrays, subset_size
from loaders.base import Loader, LoaderError, LoaderSpec, samples_per_rank, shard_indices
from loaders.datasets import check_split, dataset_info
from loaders.ffcv_import import INSTALL_HINT, import_ffcv
from loaders.transforms import batch_threads

AUGMENTS = ("standard", "original", "none")
ORDERS = ("auto", "quasi_random", "random")


def import_backend():
    """Import FFCV (through :mod:`loaders.ffcv_pipeline` and :mod:`loaders.ffcv_writer`) or raise a LoaderError
    saying how to install it. FFCV is imported through :func:`loaders.ffcv_import.import_ffcv` (4 s faster; it keeps
    torch's thread count, which ``import ffcv`` sets to 1)."""
    try:
        import_ffcv()
        from loaders import ffcv_pipeline, ffcv_writer
    except ImportError as error:
        raise LoaderError(INSTALL_HINT.format(error=error)) from error
    return ffcv_pipeline, ffcv_writer


def default_cache_dir() -> Path:
    """Where cached .beton files of the in-memory sets go when no data dir is given (or it is read-only)."""
    override = os.environ.get("DIVNORM_CACHE_DIR")
    if override:
        return Path(override) / "ffcv"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "divnorm-trainer" / "ffcv"


def read_manifest(folder: Path) -> dict | None:
    """``folder/manifest.json`` of an FFCV conversion, or None when ``folder`` holds none."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LoaderError(f"{path} is unreadable ({error}); rerun tools/convert.py") from error
    return manifest if manifest.get("format") == "ffcv" else None


def converted_beton(spec: LoaderSpec) -> Path | None:
    """The .beton of ``spec``'s split: ``data_dir`` = OUT or OUT/ffcv of tools/convert.py (manifest checked), a
    folder holding ``<split>.beton``, or a .beton file."""
    if not spec.data_dir:
        return None
    root = Path(spec.data_dir)
    if root.suffix == ".beton":
        if not root.is_file():
            raise LoaderError(f"{root} does not exist")
        return root
    file_split = "val" if spec.dataset == "imagenet" and spec.split == "test" else spec.split
    for folder in (root / "ffcv", root):
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        if manifest.get("dataset") != spec.dataset:
            raise LoaderError(
                f"{folder} holds a converted {manifest.get('dataset')!r} data set, not {spec.dataset!r}; "
                "point --data-dir at the right conversion"
            )
        beton = folder / f"{file_split}.beton"
        if not beton.is_file():
            raise LoaderError(
                f"{beton} is missing (the conversion in {folder} has {sorted(manifest.get('counts', {}))}); "
                f"rerun tools/convert.py {spec.dataset} with split {file_split}"
            )
        counts = manifest.get("counts")
        if isinstance(counts, dict) and file_split not in counts:  # being converted now, or left by another run
            raise LoaderError(
                f"{beton} is not listed in {folder}/manifest.json (it lists {sorted(counts)}): its conversion did "
                f"not finish; rerun tools/convert.py {spec.dataset} with --split {file_split}"
            )
        expected = {f["path"]: f.get("bytes") for f in manifest.get("files", [])}.get(beton.name)
        if expected is not None and beton.stat().st_size != expected:
            raise LoaderError(
                f"{beton} has {beton.stat().st_size} bytes, the manifest says {expected}: the file is truncated "
                "or from another conversion; rerun tools/convert.py"
            )
        return beton
    for folder in (root / "ffcv", root):  # .beton files without a manifest (written by hand or by other tools)
        if (folder / f"{file_split}.beton").is_file():
            return folder / f"{file_split}.beton"
    return None


def progressive_resolution(epoch: int, start_res: int, end_res: int, start_epoch: int, end_epoch: int) -> int:
    """ffcv-imagenet's ramp: ``start_res`` until ``start_epoch``, then linear to ``end_res`` at ``end_epoch``,
    in multiples of 32 pixels."""
    if epoch <= start_epoch:
        return int(start_res)
    if epoch >= end_epoch:
        return int(end_res)
    value = np.interp(epoch, [start_epoch, end_epoch], [start_res, end_res])
    return int(np.round(value / 32)) * 32


class OutputPool:
    """CPU output batches, recycled only once nothing references their memory any more.

    A fresh 77 MB batch (128 x 224 x 224 x 3 float32) costs ~150 ms of page faults on this VM, ten times the copy
    out of FFCV's buffer: allocating one per batch halved the loader's rate. A slot is handed out again only when
    the storage's use count is back to the pool's own reference, so a batch the caller (or autograd, or a view of
    it) still holds is never overwritten; such slots simply stay out of rotation. Without torch's use-count hook
    every batch gets fresh memory.
    """

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self.slots: list[tuple[torch.Tensor, int]] = []  # (full-batch tensor, use count when only we hold it)
        self._count = getattr(torch._C, "_storage_Use_Count", None)

    def _users(self, tensor: torch.Tensor) -> int:
        return self._count(tensor.untyped_storage()._cdata)

    def take(self, shape: torch.Size, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
        """A tensor of ``shape`` (batch first) whose memory nobody else uses."""
        if self._count is None:
            return torch.empty(shape, dtype=dtype, memory_format=memory_format)
        for index, (slot, alone) in enumerate(self.slots):
            if self._users(slot) != alone:
                continue  # still in use by the caller
            fits = slot.shape[1:] == shape[1:] and slot.shape[0] >= shape[0] and slot.dtype == dtype
            if fits and slot.is_contiguous(memory_format=memory_format):
                return slot[: shape[0]]
            del self.slots[index]  # an idle slot of another size (progressive resolution, last batch): drop it
            break
        tensor = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        if len(self.slots) < self.limit:
            self.slots.append((tensor, self._users(tensor)))
        return tensor[: shape[0]]  # a view: the caller's reference must show in the storage's use count


class FfcvLoader(Loader):
    """The FFCV backend of the loader contract (:mod:`loaders.base`)."""

    def __init__(self, spec: LoaderSpec) -> None:
        started = time.perf_counter()
        check_split(spec.split)
        info = dataset_info(spec.dataset)
        pipeline_module, writer_module = import_backend()
        device = torch.device(spec.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LoaderError(f"device {device} requested but CUDA is not available; use --device cpu")
        image_size = int(spec.image_size or info.image_size)
        # 32-px sets at another size: resized after decoding, like the torch backend (bilinear, antialiased)
        self.resize_to = image_size if info.in_memory and image_size != 32 else None
        augment = str(spec.option("augment", "standard"))
        if augment not in AUGMENTS:
            raise LoaderError(f"unknown data.augment {augment!r}; choose one of: {', '.join(AUGMENTS)}")
        order = str(spec.option("order", "auto"))
        if order not in ORDERS:
            raise LoaderError(f"unknown data.order {order!r}; choose one of: {', '.join(ORDERS)}")
        if order == "quasi_random" and spec.world_size > 1:
            raise LoaderError("data.order quasi_random is single-process only (FFCV); use auto or random under DDP")
        self.progressive = spec.flag("progressive_resolution", False) and spec.train
        if self.progressive and info.in_memory:
            raise LoaderError("data.progressive_resolution is for ImageNet; 32-px sets are not resized")

        beton = converted_beton(spec)
        if beton is None:
            if not info.in_memory:
                raise LoaderError(
                    f"--loader ffcv reads .beton files: convert first with `python tools/convert.py {spec.dataset} "
                    "... --format ffcv --out OUT` and pass --data-dir OUT"
                )
            beton = self._cached_beton(spec, writer_module)
        self.beton = beton

        if spec.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LoaderError(f"--loader ffcv yields float32, float16 or bfloat16 images, not {spec.dtype}")
        # FFCV's NormalizeImage makes float32 or float16 (numpy has no bfloat16: float32, then a cast); on a GPU
        # it needs cupy, else the loader normalizes the uint8 batch with torch ops on the device
        ffcv_dtype = "float16" if spec.dtype == torch.float16 else "float32"
        self.normalize_in_torch = device.type == "cuda" and (
            spec.dtype == torch.bfloat16 or not pipeline_module.cupy_available()
        )
        # float32 channels-last on the CPU (the CPU training default): FFCV hands over uint8 and one numba pass
        # normalizes it straight into our own output buffer (no float32 pass in FFCV, no float32 copy after it)
        self.normalize_on_host = (
            device.type == "cpu" and spec.dtype == torch.float32 and spec.channels_last and not self.resize_to
        )
        normalize_dtype = "uint8" if self.normalize_in_torch or self.normalize_on_host else ffcv_dtype
        stat = beton.stat()
        self.config = pipeline_module.PipelineConfig(
            beton=str(beton.resolve()),
            stamp=(stat.st_size, stat.st_mtime_ns),
            train=spec.train,
            resized=not info.in_memory,
            image_size=32 if info.in_memory else image_size,  # decoded size: other sizes are resized afterwards
            crop_scale=tuple(float(v) for v in spec.option("crop_scale", (0.08, 1.0))),
            crop_ratio=tuple(float(v) for v in spec.option("crop_ratio", (0.75, 4 / 3))),
            val_ratio=image_size / float(spec.option("val_resize", 256)),
            augment=augment if info.in_memory else "imagenet",
            mean=tuple(255.0 * m for m in info.mean),
            std=tuple(255.0 * s for s in info.std),
            device=str(device),
            normalize_dtype=normalize_dtype,
            workers=pipeline_module.effective_workers(spec.workers),
            os_cache=spec.flag("os_cache", True),
        )
        self.pipeline, self.built_pipeline = pipeline_module.compiled_pipeline(self.config)
        super().__init__(spec, subset_size(spec, self.pipeline.num_samples))
        self.order = order
        self.batches_ahead = max(1, int(spec.option("batches_ahead", 3)))
        self.timeout = float(spec.option("ffcv_timeout", 300.0))
        self._quasi_random = None
        if spec.train and spec.world_size == 1 and order in ("auto", "quasi_random"):
            indices = np.arange(self.dataset_size, dtype=np.uint64)
            self._quasi_random = self.pipeline.quasi_random_order(indices, spec.seed, spec.batch_size)
            # FFCV shuffles this table in place on every sample_order(): each epoch starts from a copy of the
            # original, so an epoch's order depends on (seed, epoch) only, as a resumed run needs
            self._pages = self._quasi_random.page_to_samples_array.copy()
        self._mean = torch.tensor(info.mean, device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(info.std, device=device).view(1, 3, 1, 1) * 255.0
        self._outputs = OutputPool()
        self._normalize_into = pipeline_module.normalize_into
        self._table = pipeline_module.normalize_table(self.config.mean, self.config.std)
        self.setup_seconds = time.perf_counter() - started
        self.warmup_seconds: float | None = None  # first batch of the first epoch (includes compilation if first)
        self.compile_seconds: float = 0.0  # the part of warm-up this loader paid for compiling its pipeline

    @staticmethod
    def _cached_beton(spec: LoaderSpec, writer_module) -> Path:
        # the whole split (tools/convert.py's raw arrays, or built in / downloaded): every ``subset`` of it then
        # shares one .beton, hence one compiled pipeline
        whole = dataclasses.replace(spec, options={**(spec.options or {}), "subset": None})
        images, labels = load_split_arrays(whole)
        candidates = [Path(spec.data_dir) / "ffcv-cache"] if spec.data_dir else []
        candidates.append(default_cache_dir())
        for index, cache_dir in enumerate(candidates):
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                return writer_module.cached_array_beton(spec.dataset, spec.split, images, labels, cache_dir)
            except PermissionError:
                if index == len(candidates) - 1:
                    raise LoaderError(
                        f"cannot write the FFCV cache in {cache_dir}: set DIVNORM_CACHE_DIR to a writable folder"
                    ) from None
        raise AssertionError("unreachable")

    def resolution(self, epoch: int) -> int:
        """Training resolution of ``epoch`` (the progressive ramp when enabled, else ``image_size``)."""
        if not self.progressive:
            return self.config.image_size
        s = self.spec
        return progressive_resolution(
            epoch,
            int(s.option("progressive_start_res", 160)),
            int(s.option("progressive_end_res", 192)),
            int(s.option("progressive_start_epoch", 0)),
            int(s.option("progressive_end_epoch", 10)),
        )

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample ids this rank reads in ``epoch``, already cut to the contract's count."""
        spec, n = self.spec, self.dataset_size
        if self._quasi_random is not None:
            self._quasi_random.page_to_samples_array = self._pages.copy()
            order = self._quasi_random.sample_order(epoch)
        else:
            order = shard_indices(n, spec, epoch).numpy()
        return np.ascontiguousarray(order[: samples_per_rank(n, spec)], dtype=np.uint64)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        resolution = self.resolution(self.epoch) if self.config.resized else None
        started = time.perf_counter()
        # a resumed epoch reads from its batch start_batch on: the batches (and their augmentation, drawn from the
        # batch and the sample: loaders.ffcv_augment) are those of the whole epoch from there
        order = self.epoch_order(self.epoch)[self.take_start_batch() * self.spec.batch_size :]
        epoch = self.pipeline.epoch(order, self.spec.batch_size, self.batches_ahead, self.timeout, resolution)
        try:
            for index, outputs in enumerate(epoch):
                images, labels = self._finish(outputs[self.pipeline.image_index], outputs[self.pipeline.label_index])
                if index == 0 and self.warmup_seconds is None:
                    self._record_warmup(time.perf_counter() - started)
                yield images, labels
        finally:
            epoch.close()  # lets FFCV's thread end when the consumer stops early

    def _record_warmup(self, seconds: float) -> None:
        self.warmup_seconds = seconds
        if not self.pipeline.compiled:  # this loader ran the pipeline's first batch: it paid the compilation
            self.compile_seconds = seconds
            self.pipeline.first_batch_seconds = seconds

    def _finish(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensors of our own in the contract's dtype, layout and normalization (FFCV reuses its buffers)."""
        spec = self.spec
        memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        with batch_threads(images.device):  # memory-bound passes: OpenMP barriers cost more than they give
            if self.normalize_in_torch or self.resize_to:  # these make new tensors anyway
                images = images.float()
                if self.normalize_in_torch:  # uint8 on the GPU: math in float32, then the AMP dtype
                    images = (images - self._mean) / self._std
                if self.resize_to:
                    size = (self.resize_to, self.resize_to)
                    images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
                images = images.to(dtype=spec.dtype, memory_format=memory_format)
            elif self.normalize_on_host:
                output = self._outputs.take(images.shape, torch.float32, memory_format)
                if not self._normalize_into(images, self._table, output):  # an unexpected layout: torch ops
                    output.copy_(images).sub_(self._mean).div_(self._std)
                images = output
            elif images.device.type == "cpu":
                output = self._outputs.take(images.shape, spec.dtype, memory_format)
                images = output.copy_(images)  # dtype cast (float32 -> bfloat16) and layout in the same pass
            else:  # normalized by FFCV on the GPU; CUDA's caching allocator makes a fresh tensor cheap there
                images = images.to(dtype=spec.dtype, memory_format=memory_format, copy=True)
        labels = labels.reshape(-1).to(dtype=torch.int64, copy=True)
        return images, labels

    def close(self) -> None:
        """Nothing to release per loader: the compiled pipeline stays cached for the next loader."""
