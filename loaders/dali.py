"""The DALI backend (``--loader dali``): fused JPEG decode + augmentation in DALI, batches handed to torch.

Sources (see :mod:`loaders.dali_sources`): the webdataset shards of ``tools/convert.py``, a plain ImageFolder
tree, the tool's CIFAR arrays, or (no converted folder) the in-memory synthetic / CIFAR-100 arrays. Graphs (see
:mod:`loaders.dali_pipelines`): RandomResizedCrop + flip for ImageNet training, resize-256 + centre crop for
evaluation, pad-crop + flip for CIFAR.

How it keeps the loader contract exactly:

* **Counts and order.** The pipeline is fed by one batch-mode ``external_source`` whose batches are the index
  lists of :func:`loaders.base.shard_indices`: rank ``r`` reads exactly the contract's samples, in the same
  order as the torch backend (``epoch_permutation`` for training, ``r, r + W, ...`` for evaluation), the last
  partial training batch is never fed and the last evaluation batch is simply smaller (DALI accepts variable
  batch sizes up to ``batch_size``). DALI's own readers shard contiguously (``shard_id`` blocks), which gives
  other per-rank counts than the contract's strided rule whenever the data set does not divide evenly, and
  shuffle within a buffer rather than by a global permutation, hence the external source. What it feeds is
  cheap: file names for an ImageFolder (the pipeline reads the files itself, ``fn.io.file.read``), zero-copy
  views of the memory-mapped shards for webdataset tars, gathered uint8 arrays for CIFAR-style sets.
* **Epochs.** The pipeline is built once; the source raises ``StopIteration`` at the end of the epoch's plan
  and the pipeline is ``reset()`` before the next one. An epoch left early (``break``) is drained (at most
  ``prefetch`` batches) so the next epoch starts clean.
* **Resuming inside an epoch.** ``set_epoch(e, start_batch=k)`` feeds the plan from batch ``k`` on (nothing before
  it is read or decoded). The augmentation draws come from DALI's per-operator RNGs, whose position depends on how
  many batches the pipeline has produced since it was built, so training pipelines are built with
  ``enable_checkpointing``: :meth:`DaliLoader.state_dict` holds DALI's own checkpoint of those RNGs after the last
  batch handed out (prefetched batches not counted) and :meth:`DaliLoader.load_state_dict` builds the pipeline
  from it, which continues the streams exactly (at epoch boundaries as well as inside an epoch).
* **Output.** ``crop_mirror_normalize`` writes fp16 (``spec.dtype`` float16 or bfloat16) or fp32 in NHWC; torch
  receives it through DLPack (zero-copy: the dynamic executor keeps the buffer alive while torch holds it, and the
  loader holds a GPU batch's outputs until the CUDA work queued on them has run, :class:`_HeldOutputs`) and
  ``permute(0, 3, 1, 2)`` makes it an NCHW channels-last view without a copy. DALI has no bfloat16 output, so
  bfloat16 is produced as float16 and converted by torch (on the training device). With
  ``channels_last=False`` DALI writes CHW directly.
* **Device.** ``data.dali_device``: ``auto`` runs ``mixed`` decoding (nvJPEG + the hardware JPEG decoder,
  ``hw_decoder_load``) and GPU operators when DALI sees a GPU and ``spec.device`` is CUDA, the CPU pipeline
  (``device_id=None``) otherwise, and logs the choice; ``gpu`` without a GPU is a :class:`LoaderError`. A CPU
  pipeline feeding a CUDA device copies each batch with ``non_blocking=True``. ``data.dali_decode=cpu`` keeps
  the GPU pipeline but decodes (and crops) on DALI's CPU threads, leaving the SMs to training
  (:func:`choose_decode`).

Threads: ``data.dali_threads`` (default ``workers``); prefetch queue depth: ``data.prefetch``; ``data.subset``
keeps the first N samples of the split. ``data.dali_train_antialias=false`` resizes training crops without the
antialiasing filter (DALI's CPU resize does ~25 % less work; the pixels alias where a crop is shrunk, and differ
from the torch backend's); evaluation always antialiases.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from loaders.base import Loader, LoaderError, LoaderSpec, shard_indices
from loaders.dali_sources import SampleSource, open_source
from loaders.datasets import check_split, dataset_info

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the dali loader needs NVIDIA DALI: run `bash tools/setup.sh`, or "
    "`.venv/bin/pip install 'nvidia-dali-cuda130==2.4.0'`"
)
DEVICE_CHOICES = ("auto", "cpu", "gpu")
DECODE_CHOICES = ("auto", "mixed", "cpu")
AUGMENT_CHOICES = ("standard", "original", "none")
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require_dali() -> None:
    """Import DALI or raise a :class:`LoaderError` that says how to install it."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise LoaderError(INSTALL_HINT) from None


def dali_gpu_count() -> int:
    """CUDA devices DALI can use (0 on a CPU-only machine; safe to call without a driver)."""
    from nvidia.dali.backend import GetCUDADeviceCount

    try:
        return int(GetCUDADeviceCount())
    except RuntimeError:
        return 0


def choose_device(spec: LoaderSpec) -> str:
    """``"gpu"`` (mixed decoding + GPU operators) or ``"cpu"`` (``device_id=None``) from ``data.dali_device``."""
    mode = str(spec.option("dali_device", "auto")).lower()
    if mode not in DEVICE_CHOICES:
        raise LoaderError(f"data-dali_device must be one of {', '.join(DEVICE_CHOICES)}, got {mode!r}")
    if mode == "cpu":
        return "cpu"
    gpus = dali_gpu_count()
    if mode == "gpu":
        if gpus == 0:
            raise LoaderError(
                "data-dali_device=gpu but DALI sees no CUDA GPU; use data-dali_device=auto (or cpu) on this machine"
            )
        if spec.device.type != "cuda":
            raise LoaderError(
                f"data-dali_device=gpu needs a CUDA training device, got {spec.device}; train on the GPU or use "
                "data-dali_device=cpu"
            )
        return "gpu"
    return "gpu" if gpus > 0 and spec.device.type == "cuda" else "cpu"


def choose_decode(spec: LoaderSpec, device_kind: str) -> str:
    """Where a GPU pipeline decodes JPEGs, from ``data.dali_decode``: ``"mixed"`` or ``"cpu"``.

    ``mixed`` (``auto`` on a GPU pipeline): nvJPEG + the hardware decoder. ``cpu``: libjpeg-turbo on DALI's CPU
    threads (fused decode + random-crop window), then the crop travels to the GPU, where resize and
    normalization run; the GPU's SMs then do no decoding, which matters when training keeps them busy and the
    machine has CPU cores to spare. A CPU pipeline always decodes on the CPU.
    """
    mode = str(spec.option("dali_decode", "auto")).lower()
    if mode not in DECODE_CHOICES:
        raise LoaderError(f"data-dali_decode must be one of {', '.join(DECODE_CHOICES)}, got {mode!r}")
    if device_kind == "cpu":
        if mode == "mixed":
            raise LoaderError(
                "data-dali_decode=mixed needs the GPU pipeline, but this run uses DALI's CPU pipeline; use "
                "data-dali_decode=auto (or cpu), or train on a GPU with data-dali_device=gpu"
            )
        return "cpu"
    return "cpu" if mode == "cpu" else "mixed"


def _pair(spec: LoaderSpec, key: str, default: tuple[float, float]) -> tuple[float, float]:
    value = spec.option(key, default)
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise LoaderError(f"data-{key} must be two numbers [low, high], got {value!r}") from None
    if not 0 < low <= high:
        raise LoaderError(f"data-{key} must satisfy 0 < low <= high, got {value!r}")
    return low, high


class _EpochFeeder:
    """The external source's callback: returns the planned batches of the current epoch, then StopIteration.

    The pipeline takes the returned arrays without copying them (``no_copy``), so the last few batches are kept
    referenced here until DALI is done with them (it is after ``prefetch`` further iterations).
    """

    def __init__(self, source: SampleSource, keep: int) -> None:
        self.source = source
        self.plan: list[np.ndarray] = []
        self.cursor = 0
        self._alive: deque = deque(maxlen=keep)

    def start(self, plan: list[np.ndarray]) -> None:
        self.plan, self.cursor = plan, 0

    def stop(self) -> None:
        self.plan, self.cursor = [], 0

    def __call__(self):
        if self.cursor >= len(self.plan):
            raise StopIteration
        indices = self.plan[self.cursor]
        self.cursor += 1
        try:
            batch = self.source.read(indices)
            self._alive.append(batch)
            return batch
        except OSError as error:
            raise LoaderError(f"cannot read a sample of {self.source.describe()}: {error}") from None


class _HeldOutputs:
    """Keeps a GPU pipeline's outputs alive until the CUDA work that reads them has run.

    torch gets DALI's output buffers without a copy (DLPack). Once the last torch tensor of a batch is dropped, DALI
    may free the buffer in its own stream order and fill it with a later batch, while the training step that reads
    it (and, for fp16 input, saved it for its backward) can still be queued on the training stream: the host runs
    ahead of the GPU. So each batch's outputs stay referenced here until an event recorded on the consumer's
    stream when the *next* batch is handed out (by then the caller has queued its step on this one) has completed.
    """

    def __init__(self) -> None:
        self._pending = None  # the outputs of the batch the caller is working on
        self._queued: deque = deque()  # (event, outputs): released once the event has completed

    def hand_out(self, outputs, device: torch.device) -> None:
        self.finish(device)
        self._pending = outputs

    def finish(self, device: torch.device) -> None:
        """The caller is done queuing work on the pending batch: hold it until that work has run."""
        if self._pending is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._queued.append((event, self._pending))
            self._pending = None
        while self._queued and self._queued[0][0].query():
            self._queued.popleft()


class DaliLoader(Loader):
    """DALI pipeline behind the loader contract; see the module docstring."""

    def __init__(self, spec: LoaderSpec) -> None:
        require_dali()
        check_split(spec.split)
        info = dataset_info(spec.dataset)
        if spec.dtype not in OUTPUT_DTYPES:
            raise LoaderError(f"the dali loader outputs float32, float16 or bfloat16, not {spec.dtype}")
        augment = str(spec.option("augment", "standard"))
        if augment not in AUGMENT_CHOICES:
            raise LoaderError(f"data-augment must be one of {', '.join(AUGMENT_CHOICES)}, got {augment!r}")
        self.source = open_source(spec)
        super().__init__(spec, len(self.source))
        self.device_kind = choose_device(spec)
        device_id = None
        if self.device_kind == "gpu":
            device_id = spec.device.index if spec.device.index is not None else torch.cuda.current_device()
        from loaders.dali_pipelines import PipelineConfig

        source_size = int(self.source.images.shape[1]) if self.source.kind == "array" else info.image_size
        self.config = PipelineConfig(
            kind=self.source.kind,
            train=spec.train,
            batch_size=spec.batch_size,
            num_threads=max(1, int(spec.option("dali_threads", spec.workers) or 1)),
            device=self.device_kind,
            device_id=device_id,
            decode=choose_decode(spec, self.device_kind),
            image_size=int(spec.image_size or info.image_size),
            mean=info.mean,
            std=info.std,
            fp16=spec.dtype in (torch.float16, torch.bfloat16),
            layout="HWC" if spec.channels_last else "CHW",
            augment=augment,
            crop_scale=_pair(spec, "crop_scale", (0.08, 1.0)),
            crop_ratio=_pair(spec, "crop_ratio", (0.75, 4.0 / 3.0)),
            val_resize=int(spec.option("val_resize", 256)),
            hw_decoder_load=float(spec.option("hw_decoder_load", 0.65)),
            train_antialias=spec.flag("dali_train_antialias", True),
            prefetch=max(1, int(spec.option("prefetch", 2))),
            seed=(spec.seed * 1_009 + spec.rank) % (2**31 - 1),
            source_size=source_size,
        )
        if self.config.crop_scale[1] > 1:
            raise LoaderError(f"data-crop_scale is a fraction of the image area (<= 1), got {self.config.crop_scale}")
        log.info(
            "dali loader: %s pipeline (%s), %s, %d threads, batch %d, rank %d/%d",
            _describe_device(self.config),
            spec.split,
            self.source.describe(),
            self.config.num_threads,
            spec.batch_size,
            spec.rank,
            spec.world_size,
        )
        self._feeder = _EpochFeeder(self.source, keep=self.config.prefetch + 3)
        self._held = _HeldOutputs()
        self._pipe = None
        self._needs_reset = False
        self._active: Iterator | None = None
        self._restore: bytes | None = None  # a DALI checkpoint the next pipeline is built from

    # ------------------------------------------------------------------------------------------ epochs

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The index batches this rank reads in ``epoch`` (exactly the contract's samples and order)."""
        indices = shard_indices(self.dataset_size, self.spec, epoch).numpy()
        if self.spec.train:
            indices = indices[: self.num_samples]  # drop the last partial batch
        size = self.spec.batch_size
        return [indices[start : start + size] for start in range(0, len(indices), size)]

    def _pipeline(self):
        if self._pipe is None:
            from loaders.dali_pipelines import build_pipeline

            with warnings.catch_warnings():  # "DALI doesn't capture state of such 'source'": the plan is ours
                warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
                try:
                    self._pipe = build_pipeline(self.config, self._feeder, checkpoint=self._restore)
                    self._pipe.build()
                except (RuntimeError, ValueError) as error:
                    if self._restore is None:
                        raise
                    self._pipe = None
                    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                    raise LoaderError(
                        "cannot continue the DALI pipeline from the checkpoint's state (saved with other data.dali_* "
                        f"settings or another DALI version?): {first}; resume with the settings it was saved with"
                    ) from None
            self._restore = None
            self._needs_reset = False
        return self._pipe

    def state_dict(self) -> dict[str, Any]:
        """DALI's checkpoint of the training pipeline's RNGs after the last batch handed out (``{}`` for
        evaluation pipelines, which draw nothing)."""
        if not self.config.train:
            return {}
        if self._pipe is not None:
            return {"dali_checkpoint": self._pipe.checkpoint()}
        return {"dali_checkpoint": self._restore} if self._restore is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Build the next pipeline from ``state["dali_checkpoint"]`` (same config and DALI version)."""
        checkpoint = state.get("dali_checkpoint")
        if checkpoint is None or not self.config.train:
            return
        if self._active is not None:
            self._active.close()
        self._pipe, self._restore = None, bytes(checkpoint)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._active is not None:
            self._active.close()  # a previous epoch left early: drain it first
        self._active = self._run_epoch(self.epoch)
        return self._active

    def _run_epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.epoch_plan(epoch)[self.take_start_batch() :]
        self._feeder.start(plan)
        pipe = self._pipeline()
        if self._needs_reset:
            pipe.reset()
        self._needs_reset = True
        finished = False
        consumed = 0
        try:
            pipe.schedule_run()  # the first call fills the prefetch queue
            while True:
                try:
                    outputs = pipe.outputs()
                except StopIteration:
                    finished = True
                    return
                except RuntimeError as error:
                    failed = plan[consumed] if consumed < len(plan) else plan[-1]  # batches come out in order
                    raise LoaderError(_pipeline_error(error, self.source, failed)) from None
                consumed += 1
                batch = self._to_torch(outputs)
                if self.device_kind == "gpu":
                    self._held.hand_out(outputs, self.spec.device)
                del outputs
                pipe.schedule_run()  # the next batch is decoded while the caller trains on this one
                yield batch
        except GeneratorExit:
            raise  # the caller left the epoch early: drained below, the pipeline is reused
        except BaseException:
            self._pipe = None  # a failed pipeline is rebuilt, not reused
            raise
        finally:
            if not finished and self._pipe is not None:
                self._drain(pipe)
            self._held.finish(self.spec.device)
            self._active = None

    def _drain(self, pipe) -> None:
        """Consume what an epoch left early had prefetched and mark its end, so ``reset()`` restarts cleanly."""
        if self._pipe is not pipe:
            return  # closed or replaced meanwhile: nothing to drain
        try:
            while not pipe.empty():
                pipe.outputs()
            self._feeder.stop()
            pipe.schedule_run()  # the source raises StopIteration: the pipeline records the epoch's end
        except Exception:  # noqa: BLE001 - e.g. a pipeline torn down at interpreter exit: rebuild next time
            self._pipe = None

    def _to_torch(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        images_out, labels_out = outputs
        if self.device_kind == "gpu":
            with torch.cuda.device(self.config.device_id):
                images = torch.from_dlpack(images_out.as_tensor())
                labels = torch.from_dlpack(labels_out.as_tensor())
        else:
            images = torch.from_dlpack(images_out.as_tensor())
            labels = torch.from_dlpack(labels_out.as_tensor())
        if self.config.layout == "HWC":
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW channels-last: no copy
        labels = labels.reshape(-1)
        if images.device.type != self.spec.device.type:
            images = images.to(self.spec.device, non_blocking=True)
            labels = labels.to(self.spec.device, non_blocking=True)
        if images.dtype != self.spec.dtype:
            images = images.to(self.spec.dtype)  # bfloat16 from float16; keeps the channels-last strides
        return images, labels

    def close(self) -> None:
        """Stop the epoch in flight and release the pipeline's threads and buffers."""
        if self._active is not None:
            self._active.close()
        self._pipe = None


def _describe_device(config) -> str:
    if config.device == "cpu":
        return "CPU (device_id=None)"
    if config.kind == "array":
        return "GPU"
    return "GPU (mixed decoding)" if config.decode == "mixed" else "GPU (CPU decoding, GPU resize)"


def _pipeline_error(error: RuntimeError, source: SampleSource, indices: np.ndarray) -> str:
    """One clear message for a DALI failure: the undecodable file when there is one, else DALI's own reason."""
    bad = source.find_undecodable(indices)
    if bad is not None:
        return f"cannot decode image {bad}: remove or replace it (tools/convert.py skips undecodable files)"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    operator = next((line for line in lines if line.startswith("Error in")), "")
    reason = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("encountered")), "")
    detail = " ".join(part for part in (operator.rstrip(","), reason) if part) or (lines[0] if lines else "")
    return f"the DALI pipeline failed on a batch of {source.describe()}: {detail[:400]}"
