"""The ``gpu`` backend: the whole split resident on the training device, augmented there in batches.

For CIFAR-sized data the fastest loader is no loader (the approach of the CIFAR-10 speed records): the split
lives on the device as one uint8 tensor (zero-padded by 4 pixels when the ``standard`` preset crops), each
epoch's order is the contract's :func:`loaders.base.epoch_permutation` moved to the device, and each batch is
one gather that applies the per-sample crop offsets and flips at once, then one fused normalize into the
training dtype, channels-last. There are no workers and no host-to-device copies after construction; on a CPU
the same code runs on the CPU.

Sources: synthetic, CIFAR-100 and the conversion tool's raw arrays (``OUT/dali/<split>/images.npy``); ImageNet
is refused (it does not fit), and so is any set whose bytes plus a margin exceed the free device memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from loaders.arrays import check_fits, converted_split_dir, load_split_arrays
from loaders.base import Loader, LoaderError, LoaderSpec, shard_indices
from loaders.datasets import dataset_info
from loaders.transforms import PAD, Normalizer, check_augment, crop_flip_index, draw_crop_flip

_COPY_CHUNK = 8192  # samples per host-to-device copy while building the resident tensor


class TensorLoader(Loader):
    """Tensor-resident backend (``--loader gpu``); see the module docstring.

    After each batch, ``last_augmentation`` holds ``(indices, offsets, flips)`` of that batch: the sample
    indices into the split, the crop offsets (n, 2) in ``[-4, 4]`` and the flips (n,), so that callers can
    reproduce a batch with :func:`loaders.transforms.pad_crop_flip` or the per-sample torch-backend ops.
    """

    def __init__(self, spec: LoaderSpec) -> None:
        info = dataset_info(spec.dataset)
        if not info.in_memory and converted_split_dir(spec.data_dir, spec.split) is None:
            raise LoaderError(
                f"the gpu loader keeps the whole data set in device memory and is for small data sets (synthetic, "
                f"cifar100, converted CIFAR-sized arrays); {spec.dataset} does not fit: use --loader dali, ffcv "
                "or torch"
            )
        self.augment = check_augment(spec.option("augment", "standard")) if spec.train else "none"
        images, labels = load_split_arrays(spec, mmap=True)
        n, height, width, _ = images.shape
        if height != width:
            raise LoaderError(f"the gpu loader needs square images, the arrays hold {height}x{width}")
        super().__init__(spec, n)
        self.size = height
        self.pad = PAD if self.augment == "standard" else 0
        self.stored = height + 2 * self.pad
        nbytes = n * self.stored * self.stored * 3 + n * 8
        check_fits(
            nbytes,
            spec.device,
            f"{spec.dataset} {spec.split} ({n:,} x {self.stored} x {self.stored} x 3 uint8 + labels)",
        )
        self.images = self._resident(images)  # (n * stored * stored, 3): one row per pixel, gathered per batch
        self.labels = torch.from_numpy(np.ascontiguousarray(labels)).to(spec.device)
        self.normalizer = Normalizer(
            info.mean,
            info.std,
            device=spec.device,
            dtype=spec.dtype,
            channels_last=spec.channels_last,
            image_size=spec.image_size,
        )
        self.last_augmentation: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _resident(self, images: np.ndarray) -> torch.Tensor:
        """Copy the uint8 split to the device (zero-padded when cropping), in chunks to bound host memory."""
        n, pad, device = len(images), self.pad, self.spec.device
        resident = torch.zeros(n, self.stored, self.stored, 3, dtype=torch.uint8, device=device)
        for start in range(0, n, _COPY_CHUNK):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + _COPY_CHUNK]))
            resident[start : start + len(chunk), pad : pad + self.size, pad : pad + self.size] = chunk.to(device)
        return resident.view(-1, 3)

    def _generator(self) -> torch.Generator:
        # augmentation is seeded by (seed, epoch, rank): a resumed run repeats the crops of the lost epoch
        seed = (self.spec.seed * 1_000_003 + self.epoch) * 65_537 + self.spec.rank + 1
        return torch.Generator(device=self.spec.device).manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spec, device, size = self.spec, self.spec.device, self.size
        order = shard_indices(self.dataset_size, spec, self.epoch)[: self.num_samples].to(device, non_blocking=True)
        generator = self._generator()
        for start in range(0, self.num_samples, spec.batch_size):
            rows = order[start : start + spec.batch_size]
            offsets, flips = draw_crop_flip(len(rows), generator, augment=self.augment, device=device)
            index = crop_flip_index(rows, offsets, flips, size, self.stored)
            images = self.images.index_select(0, index).view(len(rows), size, size, 3)
            self.last_augmentation = (rows, offsets, flips)
            yield self.normalizer(images), self.labels.index_select(0, rows)

    def close(self) -> None:
        """Free the resident data set."""
        self.images = torch.empty(0, 3, dtype=torch.uint8)
        self.labels = torch.empty(0, dtype=torch.int64)
