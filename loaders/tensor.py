"""The ``gpu`` backend: the whole split resident on the training device, augmented there in batches.

For CIFAR-sized data the fastest loader is no loader (the approach of the CIFAR-10 speed records): the split
lives on the device as one uint8 tensor, each epoch's order is the contract's
:func:`loaders.base.epoch_permutation` moved to the device, and each batch is one gather plus one fused
normalize into the training dtype, channels-last. There are no workers and no host-to-device copies after
construction; without a GPU the same code runs on the CPU.

How one gather does pad-crop *and* flip (:class:`WindowStore`): the images are stored zero-padded by 4 pixels,
and, when the preset flips, a second time mirrored. Any crop of any sample, flipped or not, is then a
(size, size, 3) window of that storage, fixed strides, differing only in where it starts. A strided view that
has one such window per start offset turns the batch into ``index_select`` of n start offsets: one copy of
the batch's bytes, no per-pixel index (about 100x faster on a CPU than gathering pixels). The price is memory:
(1 + 8/32)^2 = 1.56x the raw set for padding, times 2 for the mirror (CIFAR-100 train: 480 MB).

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
from loaders.transforms import PAD, Normalizer, batch_threads, check_augment

_COPY_CHUNK = 8192  # samples per host-to-device copy while building the resident tensor


class WindowStore:
    """uint8 images (N, size, size, 3) on a device, stored so that every crop + flip is one strided window."""

    def __init__(self, images: np.ndarray | torch.Tensor, *, pad: int, mirror: bool, device: torch.device) -> None:
        n, size = int(images.shape[0]), int(images.shape[1])
        self.n, self.size, self.pad, self.mirror = n, size, pad, mirror
        self.stored = size + 2 * pad
        image_bytes = self.stored * self.stored * 3
        copies = 2 if mirror else 1
        # the tail keeps the last windows of the strided view inside the storage
        self.data = torch.zeros(copies * n * image_bytes + image_bytes, dtype=torch.uint8, device=device)
        grid = self.data[: copies * n * image_bytes].view(copies, n, self.stored, self.stored, 3)
        inner = slice(pad, pad + size)
        for start in range(0, n, _COPY_CHUNK):
            chunk = images[start : start + _COPY_CHUNK]
            chunk = torch.from_numpy(np.array(chunk)) if isinstance(chunk, np.ndarray) else chunk
            chunk = chunk.to(device)
            stop = start + len(chunk)
            grid[0, start:stop, inner, inner] = chunk
            if mirror:
                grid[1, start:stop, inner, self.stored - pad - size : self.stored - pad] = chunk.flip(2)
        # windows[s] = the (size, size, 3) image whose first byte is data[s]
        self.windows = self.data.as_strided((copies * n * image_bytes, size, size, 3), (1, 3 * self.stored, 3, 1))

    @staticmethod
    def nbytes(n: int, size: int, *, pad: int, mirror: bool) -> int:
        """Bytes a store of ``n`` images takes (what the memory check asks for)."""
        stored = size + 2 * pad
        return ((2 if mirror else 1) * n + 1) * stored * stored * 3

    def gather(self, indices: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """uint8 (n, size, size, 3): sample ``indices[i]`` cropped at ``offsets[i]`` = (dy, dx), then flipped.

        ``out[y, x] = image[y + dy, x + dx]`` (zero outside the image), mirrored left-right where ``flips``.
        Offsets must lie in ``[-pad, pad]`` and flips need ``mirror``: not checked here, since a check would be a
        CPU-GPU sync point per batch (:func:`pad_crop_flip` checks).
        """
        stored = self.stored
        # a flipped crop at (dy, dx) is the mirrored image's crop at (dy, -dx)
        dx = torch.where(flips, -offsets[:, 1], offsets[:, 1])
        image = indices + flips.long() * self.n
        starts = ((image * stored + offsets[:, 0] + self.pad) * stored + dx + self.pad) * 3
        return self.windows.index_select(0, starts)


def pad_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Batched pad-4 crop + flip of a uint8 (n, H, W, 3) batch: the twin of ``ArrayTransform.apply``."""
    if offsets.numel() and int(offsets.abs().max()) > PAD:
        raise ValueError(f"crop offsets must lie in [-{PAD}, {PAD}]")
    store = WindowStore(images, pad=PAD, mirror=True, device=images.device)
    return store.gather(torch.arange(len(images), device=images.device), offsets, flips)


def draw_crop_flip(
    n: int, generator: torch.Generator, *, augment: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets (n, 2) int64 in [-PAD, PAD] and flips (n,) bool for the ``augment`` preset."""
    if augment == "standard":
        offsets = torch.randint(-PAD, PAD + 1, (n, 2), generator=generator, device=device)
    else:
        offsets = torch.zeros(n, 2, dtype=torch.int64, device=device)
    if augment in ("standard", "original"):
        flips = torch.rand(n, generator=generator, device=device) < 0.5
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=device)
    return offsets, flips


class TensorLoader(Loader):
    """Tensor-resident backend (``--loader gpu``); see the module docstring.

    After each batch, ``last_augmentation`` holds ``(indices, offsets, flips)`` of that batch: the sample
    indices into the split, the crop offsets (n, 2) in ``[-4, 4]`` and the flips (n,), so that a batch can be
    reproduced with :func:`pad_crop_flip` or the torch backend's per-sample ops.
    """

    def __init__(self, spec: LoaderSpec) -> None:
        info = dataset_info(spec.dataset)
        if not info.in_memory and converted_split_dir(spec.data_dir, spec.split) is None:
            raise LoaderError(
                "the gpu loader keeps the whole data set in device memory and is for small data sets (synthetic, "
                f"cifar100, converted CIFAR-sized arrays); {spec.dataset} does not fit: use --loader dali, ffcv "
                "or torch"
            )
        self.augment = check_augment(spec.option("augment", "standard")) if spec.train else "none"
        images, labels = load_split_arrays(spec, mmap=True)
        n, height, width, _ = images.shape
        if height != width:
            raise LoaderError(f"the gpu loader needs square images, the arrays hold {height}x{width}")
        super().__init__(spec, n)
        pad, mirror = (PAD if self.augment == "standard" else 0), self.augment != "none"
        stored = height + 2 * pad
        check_fits(
            WindowStore.nbytes(n, height, pad=pad, mirror=mirror) + 8 * n,
            spec.device,
            f"{spec.dataset} {spec.split} ({n:,} x {stored} x {stored} x 3 uint8{', and mirrored' if mirror else ''})",
        )
        self.store = WindowStore(images, pad=pad, mirror=mirror, device=spec.device)
        self.labels = torch.from_numpy(np.array(labels, np.int64)).to(spec.device)
        self.normalizer = Normalizer(
            info.mean,
            info.std,
            device=spec.device,
            dtype=spec.dtype,
            channels_last=spec.channels_last,
            image_size=spec.image_size,
        )
        self.last_augmentation: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _generator(self) -> torch.Generator:
        # augmentation is seeded by (seed, epoch, rank): a resumed run repeats the crops of the lost epoch
        seed = (self.spec.seed * 1_000_003 + self.epoch) * 65_537 + self.spec.rank + 1
        return torch.Generator(device=self.spec.device).manual_seed(seed)

    def epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's ``(indices, offsets, flips)`` for all ``num_samples`` samples, on the device.

        Drawn in one go per epoch (seeded by seed, epoch and rank), so batch ``k`` is rows ``k*B:(k+1)*B`` whoever
        builds it: this iterator, a resumed run starting mid-epoch, or the CUDA-graph step (train/graphed.py),
        which reads its batch from static copies of these tensors.
        """
        spec, device = self.spec, self.spec.device
        order = shard_indices(self.dataset_size, spec, self.epoch)[: self.num_samples].to(device, non_blocking=True)
        offsets, flips = draw_crop_flip(len(order), self._generator(), augment=self.augment, device=device)
        return order, offsets, flips

    def make_batch(
        self, indices: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized images and labels of one batch: one gather + one fused normalize (no host sync)."""
        images = self.normalizer(self.store.gather(indices, offsets, flips))
        return images, self.labels.index_select(0, indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spec, device = self.spec, self.spec.device
        order, all_offsets, all_flips = self.epoch_plan()  # a resumed epoch skips rows, drawn all the same
        for start in range(self.take_start_batch() * spec.batch_size, self.num_samples, spec.batch_size):
            with batch_threads(device):
                rows = slice(start, start + spec.batch_size)
                indices, offsets, flips = order[rows], all_offsets[rows], all_flips[rows]
                images, labels = self.make_batch(indices, offsets, flips)
            self.last_augmentation = (indices, offsets, flips)
            yield images, labels

    def close(self) -> None:
        """Free the resident data set."""
        self.store = None
        self.labels = torch.empty(0, dtype=torch.int64)
