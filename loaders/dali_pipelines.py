"""DALI pipeline graphs of the DALI backend: JPEG (ImageNet) and uint8-array (CIFAR / synthetic), train and eval.

One function, :func:`build_pipeline`, defines the graph from a :class:`PipelineConfig`; the same definition
serves the CPU pipeline (``device_id=None``, libjpeg-turbo decoding, CPU operators) and the GPU pipeline
(``mixed`` nvJPEG / hardware decoding, GPU operators), so the GPU graph can be defined and ``serialize()``-d on
a machine without a GPU (the test suite does this to guard the headline path).

Graphs (mean/std in 0-255 units, output fp16 or fp32, layout HWC or CHW):

* Decoding in a GPU pipeline: ``mixed`` (nvJPEG + the hardware decoder), or with ``decode="cpu"``
  libjpeg-turbo on DALI's CPU threads, the decoded (cropped) images then moved to the GPU for resize and
  normalization.
* JPEG train: ``decoders.image_random_crop`` (fused decode + RandomResizedCrop window, area ``crop_scale``,
  aspect ``crop_ratio``) -> ``resize`` to ``image_size`` (linear, antialiased as torchvision's; not antialiased
  with ``train_antialias=False``) -> ``crop_mirror_normalize`` with a coin-flip mirror.
* JPEG eval: ``decoders.image`` -> ``resize`` shorter side to ``val_resize`` -> centre crop ``image_size``
  (torchvision's sizes and offsets to the pixel) -> ``crop_mirror_normalize``.
  ImageNet training always uses the random-resized-crop graph (the ``augment`` preset is for CIFAR-style sets,
  as in the torch backend).
* Array train, augment ``standard``: zero-pad 4 + random crop (an integer offset in [-4, 4] per axis, as
  torchvision's ``RandomCrop(32, padding=4)``) + flip; ``original``: flip only; ``none``: normalize only; an
  ``image_size`` other than the stored one resizes after augmentation (as the torch backend).
* Array eval: normalize only (the original's flip at evaluation was a defect).

Import this module only after checking that DALI is installed (:mod:`loaders.dali` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import Pipeline

# Preallocation for the mixed decoder, the values of NVIDIA's ResNet-50 example (ImageNet-sized JPEGs): avoids
# reallocations during the first epoch.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
CIFAR_PADDING = 4


@dataclass(frozen=True)
class PipelineConfig:
    """Everything the graph depends on (no paths: samples arrive through ``source``)."""

    kind: str  # "path" (file names) | "jpeg" (encoded bytes) | "array" (uint8 HWC)
    train: bool
    batch_size: int
    num_threads: int
    device: str  # "cpu" | "gpu"
    device_id: int | None  # None for a CPU-only pipeline (or to define a GPU graph without a GPU)
    image_size: int
    mean: tuple[float, float, float]  # 0-1 units
    std: tuple[float, float, float]
    fp16: bool = False  # output float16 (else float32)
    layout: str = "HWC"  # "HWC" (handed to torch as NCHW channels-last) or "CHW"
    augment: str = "standard"  # standard | original | none
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    val_resize: int = 256
    hw_decoder_load: float = 0.65
    train_antialias: bool = True  # False: training resizes skip the antialiasing filter (faster, aliased pixels)
    decode: str = "mixed"  # GPU pipelines: "mixed" (nvJPEG / hardware decoder) or "cpu" (libjpeg-turbo, then .gpu())
    prefetch: int = 2
    seed: int = 42
    source_size: int = 32  # array sources: stored image side


def _decoder_kwargs(config: PipelineConfig) -> dict:
    if config.device == "gpu" and config.decode == "mixed":
        return {
            "device": "mixed",
            "hw_decoder_load": float(config.hw_decoder_load),
            "device_memory_padding": DEVICE_MEMORY_PADDING,
            "host_memory_padding": HOST_MEMORY_PADDING,
        }
    return {"device": "cpu"}


def _normalize(images, config: PipelineConfig, mirror=None):
    kwargs = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if config.fp16 else types.FLOAT,
        output_layout=config.layout,
        mean=[255.0 * m for m in config.mean],
        std=[255.0 * s for s in config.std],
        **kwargs,
    )


def _jpeg_graph(jpegs, config: PipelineConfig):
    decoder = _decoder_kwargs(config)
    if config.train:
        images = fn.decoders.image_random_crop(
            jpegs,
            output_type=types.RGB,
            random_area=list(config.crop_scale),
            random_aspect_ratio=list(config.crop_ratio),
            num_attempts=10,
            adjust_orientation=False,  # as PIL / torchvision, which ignore the EXIF orientation
            **decoder,
        )
        images = _to_device(images, config)
        images = fn.resize(
            images,
            resize_x=config.image_size,
            resize_y=config.image_size,
            interp_type=types.INTERP_LINEAR,
            antialias=config.train_antialias,
        )
        return _normalize(images, config, mirror=fn.random.coin_flip(probability=0.5))
    images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False, **decoder)
    images = _to_device(images, config)
    return _normalize(_resize_center_crop(jpegs, images, config), config)


def _to_device(images, config: PipelineConfig):
    """Decoded on the CPU for a GPU pipeline (``decode="cpu"``): move to the GPU before resizing."""
    return images.gpu() if config.device == "gpu" and config.decode == "cpu" else images


def _resize_center_crop(jpegs, images, config: PipelineConfig):
    """torchvision's ``Resize(val_resize)`` + ``CenterCrop(image_size)`` geometry, computed per sample in DALI.

    The output sizes and crop offsets are torchvision's to the pixel (long side ``int(val_resize * long /
    short)``, offsets ``round((new - crop) / 2)`` with round-half-to-even), so only the decoder and the resize
    filter differ from the torch backend; ``resize_shorter`` + a centred ``crop_pos`` would be off by one pixel
    on half of the images.
    """
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False, dtype=types.INT32)  # (H, W, C) of the file
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    new_height = (config.val_resize * height) // short
    new_width = (config.val_resize * width) // short
    images = fn.resize(
        images,
        resize_x=fn.cast(new_width, dtype=types.FLOAT),
        resize_y=fn.cast(new_height, dtype=types.FLOAT),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    size = config.image_size
    anchor = fn.stack(_round_half_even_half(new_height - size), _round_half_even_half(new_width - size))
    return fn.slice(
        images,
        anchor,
        [size, size],
        axis_names="HW",
        normalized_anchor=False,
        normalized_shape=False,
        out_of_bounds_policy="pad",
        fill_values=0,
    )


def _round_half_even_half(difference):
    """Python's ``int(round(difference / 2))`` for a non-negative integer DALI node (banker's rounding)."""
    half = difference // 2
    odd = difference - 2 * half
    return half + odd * (half - 2 * (half // 2))


def _array_graph(images, config: PipelineConfig):
    if config.device == "gpu":
        images = images.gpu()
    mirror = None
    size = config.source_size
    if config.train and config.augment == "standard":
        # integer offsets in [-pad, pad] per axis; the window reads zeros outside the image (= zero padding)
        offsets = [float(v) for v in range(-CIFAR_PADDING, CIFAR_PADDING + 1)]
        anchor = fn.random.uniform(values=offsets, shape=[2])
        images = fn.slice(
            images,
            anchor,
            [float(size), float(size)],
            axis_names="HW",
            normalized_anchor=False,
            normalized_shape=False,
            out_of_bounds_policy="pad",
            fill_values=0,
        )
    if config.train and config.augment in ("standard", "original"):
        mirror = fn.random.coin_flip(probability=0.5)
    if config.image_size != size:  # after augmentation, as the torch backend
        images = fn.resize(
            images,
            resize_x=config.image_size,
            resize_y=config.image_size,
            interp_type=types.INTERP_LINEAR,
            antialias=config.train_antialias or not config.train,
        )
    return _normalize(images, config, mirror=mirror)


def build_pipeline(config: PipelineConfig, source: Callable[[], tuple], checkpoint: bytes | None = None) -> Pipeline:
    """Define (not build) the DALI pipeline of ``config``; ``source()`` returns one batch ``(data, labels)``.

    ``source`` raises ``StopIteration`` at the end of an epoch; the loader resets the pipeline before the
    next one. Outputs: images (``config.layout``), labels int64 (one scalar per sample). Training pipelines
    track their RNG states (``enable_checkpointing``; DALI: no cost) so that a resumed run continues them from
    ``checkpoint`` (``Pipeline.checkpoint()`` of an earlier pipeline of the same config).
    """
    pipe = Pipeline(
        batch_size=config.batch_size,
        num_threads=config.num_threads,
        device_id=config.device_id,
        seed=config.seed,
        prefetch_queue_depth=config.prefetch,
        # the dynamic executor keeps an output buffer alive while torch holds it (DLPack, zero-copy)
        exec_dynamic=True,
        enable_checkpointing=config.train,
        checkpoint=checkpoint if config.train else None,
    )
    with pipe:
        data, labels = fn.external_source(
            source=source,
            num_outputs=2,
            batch=True,
            dtype=[types.UINT8, types.INT64],
            layout=["HWC" if config.kind == "array" else "", ""],
            # the source's arrays are used in place; the loader's feeder keeps them alive until consumed
            no_copy=True,
        )
        if config.kind == "path":
            data = fn.io.file.read(data)  # NUL-terminated file names -> file bytes, on DALI's threads
        images = _array_graph(data, config) if config.kind == "array" else _jpeg_graph(data, config)
        if config.device == "gpu":
            labels = labels.gpu()
        pipe.set_outputs(images, labels)
    return pipe
