"""The ``torch`` backend: torchvision decoding and per-sample transforms in DataLoader workers.

Workers hand over uint8 HWC batches (a quarter of the bytes of float32, pinned when training on CUDA); the main
process copies them to the device without blocking, one batch ahead (on a side CUDA stream), and normalizes,
casts and lays them out channels-last there. A sampler that follows :func:`loaders.base.shard_indices` exactly
(a DistributedSampler with the contract's permutation) fixes the order and the per-rank counts; it hands each
worker ``(index, epoch)`` so that the sample's augmentation is seeded by the sample, not by the worker.

Sources: synthetic and CIFAR-100 arrays (:mod:`loaders.arrays`) with the ``standard`` / ``original`` / ``none``
presets, and ImageNet ImageFolder trees (RandomResizedCrop + flip; resize + center crop for evaluation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from loaders.arrays import load_split_arrays, subset_size
from loaders.base import Loader, LoaderError, LoaderSpec, samples_per_rank, shard_indices
from loaders.datasets import dataset_info, imagenet_samples, imagenet_split_dir
from loaders.transforms import (
    ArrayTransform,
    ImageNetEvalTransform,
    ImageNetTrainTransform,
    Normalizer,
    batch_threads,
    sample_rng,
    to_rgb,
)

_IMAGE_ERROR = "cannot read image"


class ArraySamples(Dataset):
    """Samples of uint8 HWC arrays; ``dataset[(index, epoch)]`` -> (uint8 (H, W, 3) tensor, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: ArrayTransform, seed: int) -> None:
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        return self.transform(self.images[index], sample_rng(self.seed, epoch, index)), int(self.labels[index])


class ImageFileSamples(Dataset):
    """Samples of image files, decoded with PIL and converted to RGB (grayscale, CMYK, palette, alpha)."""

    def __init__(self, paths: list[str], labels: list[int], transform: Callable, seed: int) -> None:
        self.paths, self.labels, self.transform, self.seed = paths, labels, transform, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        path = self.paths[index]
        try:
            with Image.open(path) as file:
                image = to_rgb(file)
                image.load()
        except Exception as error:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, struct.error,
            # DecompressionBombError (a forged 60000 x 60000 header), ... on bad files: each is this file's fault
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise LoaderError(f"{_IMAGE_ERROR} {path}: {reason}; remove or replace the file") from None
        return self.transform(image, sample_rng(self.seed, epoch, index)), self.labels[index]


class ShardSampler(Sampler):
    """Yields ``(index, epoch)`` for this rank's samples of the epoch: ``shard_indices`` cut to whole batches,
    from sample ``skip`` on (a resumed epoch skips the batches already trained, never reading them)."""

    def __init__(self, n: int, spec: LoaderSpec) -> None:
        self.n, self.spec, self.epoch, self.skip = n, spec, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def __len__(self) -> int:
        return samples_per_rank(self.n, self.spec) - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = shard_indices(self.n, self.spec, self.epoch)[self.skip : samples_per_rank(self.n, self.spec)]
        epoch = self.epoch
        return iter([(i, epoch) for i in indices.tolist()])


def _build_samples(spec: LoaderSpec) -> Dataset:
    info = dataset_info(spec.dataset)
    seed = spec.seed
    if info.in_memory:
        images, labels = load_split_arrays(spec)
        transform = ArrayTransform(
            train=spec.train, augment=spec.option("augment", "standard"), image_size=spec.image_size
        )
        return ArraySamples(images, labels, transform, seed)
    paths, labels, _ = imagenet_samples(imagenet_split_dir(spec.data_dir, spec.split))
    n = subset_size(spec, len(paths))
    paths, labels = paths[:n], labels[:n]
    if not paths:
        raise LoaderError(f"no images found under {imagenet_split_dir(spec.data_dir, spec.split)}")
    size = spec.image_size or info.image_size
    if spec.train:
        transform = ImageNetTrainTransform(
            size=size, scale=spec.option("crop_scale", (0.08, 1.0)), ratio=spec.option("crop_ratio", (0.75, 4 / 3))
        )
    else:
        transform = ImageNetEvalTransform(resize=spec.option("val_resize", 256), size=size)
    return ImageFileSamples(paths, labels, transform, seed)


class TorchLoader(Loader):
    """torchvision + DataLoader backend; see the module docstring."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.samples = _build_samples(spec)
        super().__init__(spec, len(self.samples))
        info = dataset_info(spec.dataset)
        self.sampler = ShardSampler(self.dataset_size, spec)
        self.normalizer = Normalizer(
            info.mean, info.std, device=spec.device, dtype=spec.dtype, channels_last=spec.channels_last
        )
        self.on_cuda = spec.device.type == "cuda"
        self._dataloader: DataLoader | None = None  # built on first use: construction starts no process

    def _loader(self) -> DataLoader:
        if self._dataloader is None:
            workers = max(0, int(self.spec.workers))
            self._dataloader = DataLoader(
                self.samples,
                batch_size=self.spec.batch_size,
                sampler=self.sampler,
                num_workers=workers,
                drop_last=self.spec.train,
                pin_memory=self.on_cuda and self.spec.flag("pin_memory", True),
                persistent_workers=workers > 0,
                prefetch_factor=int(self.spec.option("prefetch", 2)) if workers > 0 else None,
                # its own generator: the DataLoader draws its workers' base seed from it, not from the global
                # torch RNG, so dropout's stream does not depend on when an iteration starts (exact resumes)
                generator=torch.Generator().manual_seed(self.spec.seed),
            )
        return self._dataloader

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch, start_batch)
        self.sampler.set_epoch(epoch, start_batch * self.spec.batch_size)

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.spec.device, non_blocking=True)
        labels = labels.to(self.spec.device, non_blocking=True)
        with batch_threads(self.spec.device):
            return self.normalizer(images), labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(self.epoch, self.take_start_batch() * self.spec.batch_size)
        batches = iter(self._loader())
        stream = torch.cuda.Stream(self.spec.device) if self.on_cuda else None
        try:
            ahead = self._next(batches, stream)
            while ahead is not None:
                current = ahead
                if stream is not None:
                    # the copy + normalization ran on the side stream: make the compute stream wait for it, and
                    # tell the allocator these tensors are now used there
                    torch.cuda.current_stream(self.spec.device).wait_stream(stream)
                    for tensor in current:
                        tensor.record_stream(torch.cuda.current_stream(self.spec.device))
                ahead = self._next(batches, stream)  # the next batch is copied while the caller computes
                yield current
        except LoaderError as error:
            raise LoaderError(_clean_worker_message(error)) from None

    def _next(self, batches: Iterator, stream) -> tuple[torch.Tensor, torch.Tensor] | None:
        batch = next(batches, None)
        if batch is None:
            return None
        if stream is None:
            return self._to_device(*batch)
        with torch.cuda.stream(stream):
            return self._to_device(*batch)

    def close(self) -> None:
        """Stop the persistent workers."""
        loader, self._dataloader = self._dataloader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __del__(self) -> None:
        # at interpreter shutdown the workers may be torn down already
        with contextlib.suppress(Exception):
            self.close()


def _clean_worker_message(error: LoaderError) -> str:
    """A worker's LoaderError arrives wrapped with its traceback: keep only the user-facing last line."""
    text = str(error)
    if "Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return last.split("LoaderError: ", 1)[-1]
