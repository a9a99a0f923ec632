"""The loader contract every data backend implements.

A loader is built from a :class:`LoaderSpec` and, iterated, yields ``(images, labels)`` already on the training
device:

* ``images``: ``spec.dtype`` (float32, or the AMP dtype), normalized with the dataset's mean/std, shape
  ``(N, 3, H, W)`` in ``torch.channels_last`` memory format when ``spec.channels_last`` (NCHW otherwise);
* ``labels``: int64, shape ``(N,)``, class indices of :mod:`loaders.datasets` (sorted-wnid order for ImageNet).

Sample counts are exact and identical for every backend (see :func:`shard_indices`):

* training (``spec.train``): each epoch draws a fresh permutation (seeded by ``seed`` and the epoch), the tail
  that does not divide evenly by the world size is dropped, rank ``r`` takes every ``world_size``-th sample
  starting at ``r``, and the last partial batch is dropped;
* evaluation: no shuffle, rank ``r`` takes samples ``r, r + world_size, ...``, nothing is dropped or padded,
  so the ranks together see every sample exactly once; the last batch may be partial.

``len(loader)`` is the number of batches per epoch on this rank, ``loader.num_samples`` the number of samples
per epoch on this rank, ``set_epoch(e)`` selects the epoch's shuffle. Backend objects (DALI iterators, FFCV
loaders, DataLoader workers) never leave the loader.

Resuming inside an epoch (a preempted run, see docs/preemption.md): ``set_epoch(e, start_batch=k)`` makes the next
iteration yield batches ``k, k + 1, ...`` of epoch ``e``, the very batches (samples, order and augmentation) an
iteration from the start would yield there, without decoding the first ``k``. Where a backend's augmentation
draws from a stream that lives in the backend (DALI's operator RNGs), ``state_dict()`` returns that stream's
position after the last batch handed out and ``load_state_dict`` puts a new loader there; backends whose
randomness is a function of (seed, epoch, sample) return ``{}``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from loaders.errors import LoaderError  # noqa: F401 - re-exported: loaders.base.LoaderError is the same class


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a backend needs to build a loader for one split.

    ``options`` carries the config's ``data`` section (backend settings such as ``dali_device``,
    ``hw_decoder_load``, ``os_cache``, ``batches_ahead``); backends read it with :meth:`option`.
    """

    dataset: str  # "synthetic" | "cifar100" | "imagenet"
    split: str  # "train" | "val" | "test"
    batch_size: int
    train: bool  # augment + shuffle + drop the last partial batch
    data_dir: str | None = None  # source data set or converted output folder
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    channels_last: bool = True
    image_size: int | None = None  # None: the dataset's default (32 or 224)
    workers: int = 2  # DataLoader workers / DALI threads / FFCV workers
    seed: int = 42
    rank: int = 0
    world_size: int = 1
    download: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, key: str, default: Any = None) -> Any:
        """A backend setting from the config's data section, or ``default``."""
        value = self.options.get(key, default) if self.options else default
        return default if value is None else value

    def flag(self, key: str, default: bool) -> bool:
        """A true/false backend setting; the strings ``"true"`` / ``"false"`` count, anything else is an error."""
        value = self.option(key, default)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise LoaderError(f"data-{key} must be true or false, got {value!r}")
        return value


class Loader(ABC):
    """Base class of every backend; see the module docstring for the contract."""

    def __init__(self, spec: LoaderSpec, dataset_size: int) -> None:
        self.spec = spec
        self.dataset_size = dataset_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def num_samples(self) -> int:
        """Samples per epoch on this rank (exact)."""
        return samples_per_rank(self.dataset_size, self.spec)

    def __len__(self) -> int:
        return batches_per_epoch(self.dataset_size, self.spec)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the shuffle of ``epoch`` (call before iterating); the next iteration starts at batch
        ``start_batch`` of it (0: the whole epoch; later iterations start at 0 again unless set anew)."""
        if not 0 <= int(start_batch) <= len(self):
            raise LoaderError(f"start_batch {start_batch} is outside the epoch's {len(self)} batches")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def take_start_batch(self) -> int:
        """The batch the iteration starting now begins at (consumed: the one after begins at 0)."""
        start, self.start_batch = self.start_batch, 0
        return start

    def state_dict(self) -> dict[str, Any]:
        """Backend stream state after the last batch handed out (``{}``: nothing beyond seed, epoch, batch)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Continue the backend's streams from :meth:`state_dict` of an earlier loader (before iterating)."""

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers, pipelines and memory (optional)."""


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of epoch ``epoch``: identical on every rank and every backend that can use it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def shard_indices(n: int, spec: LoaderSpec, epoch: int = 0) -> torch.Tensor:
    """Sample indices this rank reads in ``epoch`` (before dropping a partial training batch)."""
    if spec.train:
        order = epoch_permutation(n, spec.seed, epoch)
        usable = n - n % spec.world_size
        return order[spec.rank : usable : spec.world_size]
    return torch.arange(spec.rank, n, spec.world_size)


def samples_per_rank(n: int, spec: LoaderSpec) -> int:
    if spec.train:
        per_rank = n // spec.world_size
        return per_rank - per_rank % spec.batch_size
    return len(range(spec.rank, n, spec.world_size))


def batches_per_epoch(n: int, spec: LoaderSpec) -> int:
    if spec.train:
        return (n // spec.world_size) // spec.batch_size
    return math.ceil(samples_per_rank(n, spec) / spec.batch_size)


def to_memory_format(images: torch.Tensor, spec: LoaderSpec) -> torch.Tensor:
    """Apply the contract's memory format (a no-op when the tensor already has it)."""
    if spec.channels_last:
        return images.contiguous(memory_format=torch.channels_last)
    return images.contiguous()
