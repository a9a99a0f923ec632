"""Transform presets shared by the torch and gpu loaders: per-sample PIL ops and the on-device normalizer.

Per-sample side (DataLoader workers): every random draw comes from :func:`sample_rng`, a generator seeded by
(seed, epoch, sample index), so augmentation does not depend on the worker count or on which worker ran a
sample, and a resumed run at an epoch boundary sees the same crops as an uninterrupted one.

The tensor-resident loader (:mod:`loaders.tensor`) applies the same crops and flips to whole batches and gives
exactly what :meth:`ArrayTransform.apply` gives for the same offsets and flips. A crop offset ``(dy, dx)`` in
``[-pad, pad]^2`` means ``out[y, x] = image[y + dy, x + dx]`` with zeros outside the image: torchvision's
``RandomCrop(size, padding=pad)`` picking top-left ``(dy + pad, dx + pad)`` of the zero-padded image. The flip
is applied after the crop.

:class:`Normalizer` turns uint8 NHWC batches into normalized NCHW images of the training dtype on the device
(cheaper there than in workers: a uint8 batch is a quarter of the bytes of a float one to copy).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from loaders.base import LoaderError

PAD = 4  # pixels of zero padding of the CIFAR "standard" random crop
AUGMENT_PRESETS = ("standard", "original", "none")


def check_augment(augment: str) -> str:
    """Validate the ``data.augment`` preset name."""
    if augment not in AUGMENT_PRESETS:
        raise LoaderError(f"data.augment must be one of {', '.join(AUGMENT_PRESETS)}, got {augment!r}")
    return augment


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random generator of one sample in one epoch (independent of workers and batch position)."""
    # distinct odd multipliers keep (seed, epoch, index) triples apart; Random() hashes the int with SHA-512
    return random.Random(seed * 2_654_435_761 + epoch * 40_503 * 1_000_003 + index)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 (H, W, 3) tensor (the layout workers hand over)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette and alpha images become plain RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")


# ------------------------------------------------------------------------------------------ per-sample presets


class ArrayTransform:
    """CIFAR-style preset: ``standard`` (pad-4 random crop + flip), ``original`` (flip only), ``none``.

    Evaluation never augments (the original's flip at evaluation was a defect). ``image_size`` other than the
    stored size resizes after augmentation (bilinear, antialiased).
    """

    def __init__(self, *, train: bool, augment: str = "standard", image_size: int | None = None) -> None:
        self.augment = check_augment(augment) if train else "none"
        self.image_size = image_size

    def draw(self, rng: random.Random) -> tuple[int, int, bool]:
        """Crop offset (dy, dx) and flip of one sample."""
        if self.augment == "none":
            return 0, 0, False
        dy = dx = 0
        if self.augment == "standard":
            dy, dx = rng.randint(-PAD, PAD), rng.randint(-PAD, PAD)
        return dy, dx, rng.random() < 0.5

    @staticmethod
    def apply(image: Image.Image, dy: int, dx: int, flip: bool) -> Image.Image:
        """Crop at offset (dy, dx) with zero fill outside the image, then flip: exact torchvision semantics."""
        if dy or dx:
            # a crop box that leaves the image fills with zeros, which is RandomCrop's zero padding
            image = TF.crop(image, dy, dx, image.height, image.width)
        return TF.hflip(image) if flip else image

    def __call__(self, array: np.ndarray, rng: random.Random) -> torch.Tensor:
        image = Image.fromarray(array)
        image = self.apply(image, *self.draw(rng))
        if self.image_size is not None and self.image_size != image.height:
            image = TF.resize(image, [self.image_size, self.image_size], InterpolationMode.BILINEAR, antialias=True)
        return pil_to_uint8(image)


def random_resized_crop_params(
    rng: random.Random, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` drawing from ``rng``: (top, left, height, width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the central crop of the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageNetTrainTransform:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip, on an RGB PIL image."""

    def __init__(self, *, size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> None:
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        top, left, h, w = random_resized_crop_params(rng, image.width, image.height, self.scale, self.ratio)
        image = TF.resized_crop(
            image, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True
        )
        if rng.random() < 0.5:
            image = TF.hflip(image)
        return pil_to_uint8(image)


class ImageNetEvalTransform:
    """Resize the shorter side to ``resize`` then center-crop ``size``."""

    def __init__(self, *, resize: int, size: int) -> None:
        self.resize, self.size = resize, size

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        image = TF.resize(image, self.resize, InterpolationMode.BILINEAR, antialias=True)
        return pil_to_uint8(TF.center_crop(image, [self.size, self.size]))


# ------------------------------------------------------------------------------------------ on the device


@contextlib.contextmanager
def batch_threads(device: torch.device) -> Iterator[None]:
    """Run a batch's tensor ops on one intra-op thread when the device is the CPU, then restore the setting.

    A CPU loader step is a few memory-bound ops on ~1.5 million elements; split across OpenMP threads each
    ends in a barrier, and on a loaded machine a descheduled sibling makes the others spin: measured 10-20x
    slower than one thread. One thread still makes >300,000 CIFAR images/s, far above what a CPU trains on,
    and leaves the model's threads alone. (OpenMP's thread count is per calling thread; toggling costs < 1 us.)
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Normalizer:
    """uint8 (N, H, W, 3) -> normalized (N, 3, H, W) of ``dtype``, channels-last (or contiguous NCHW)."""

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        image_size: int | None = None,
    ) -> None:
        std_t = torch.tensor(std, dtype=torch.float32)
        # (x / 255 - mean) / std == x * scale + bias, one fused multiply-add per pixel
        self.scale = (1.0 / (255.0 * std_t)).to(device)
        self.bias = (-torch.tensor(mean, dtype=torch.float32) / std_t).to(device)
        self.dtype, self.channels_last, self.image_size = dtype, channels_last, image_size
        self._tiled_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def _tiled(self, pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
        # per-channel constants repeated over a whole HWC image: the multiply-add then runs over one long
        # contiguous row per image (vectorized) instead of broadcasting over an innermost dimension of 3,
        # which is about 5x slower on a CPU
        if self._tiled_cache is None or self._tiled_cache[0].numel() != 3 * pixels:
            self._tiled_cache = (self.scale.repeat(pixels), self.bias.repeat(pixels))
        return self._tiled_cache

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n, height, width, _ = images.shape
        scale, bias = self._tiled(height * width)
        out = images.reshape(n, -1).float()
        torch.addcmul(bias, out, scale, out=out)
        # NHWC permuted to NCHW *is* the channels-last memory format: no copy
        out = out.view(n, height, width, 3).permute(0, 3, 1, 2)
        if self.image_size is not None and self.image_size != width:
            out = F.interpolate(out, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
            out = out.contiguous(memory_format=torch.channels_last)
        out = out.to(self.dtype)
        return out if self.channels_last else out.contiguous()
