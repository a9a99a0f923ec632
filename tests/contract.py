"""The shared loader-contract check: every backend's tests call :func:`assert_loader_contract`."""

from __future__ import annotations

import math

import torch

from loaders.base import Loader, LoaderSpec, batches_per_epoch, samples_per_rank


def collect_epoch(loader: Loader, epoch: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """All (images, labels) batches of one epoch, cloned (backends may reuse buffers)."""
    loader.set_epoch(epoch)
    images, labels = [], []
    for x, y in loader:
        images.append(x.clone())
        labels.append(y.clone())
    return images, labels


def assert_loader_contract(loader: Loader, spec: LoaderSpec, dataset_size: int, num_classes: int) -> None:
    """Dtype, layout, normalization, label range, exact counts and per-epoch reshuffle of one loader."""
    assert len(loader) == batches_per_epoch(dataset_size, spec)
    assert loader.num_samples == samples_per_rank(dataset_size, spec)
    images, labels = collect_epoch(loader, 0)
    assert len(images) == len(loader), "batches per epoch differ from len(loader)"
    assert sum(len(y) for y in labels) == loader.num_samples, "samples per epoch are not exact"
    size = spec.image_size
    for x, y in zip(images, labels):
        assert x.device.type == spec.device.type and y.device.type == spec.device.type
        assert x.dtype == spec.dtype, f"images are {x.dtype}, expected {spec.dtype}"
        assert y.dtype == torch.int64 and y.ndim == 1 and len(y) == len(x)
        assert x.ndim == 4 and x.shape[1] == 3, f"images must be NCHW, got {tuple(x.shape)}"
        if size is not None:
            assert x.shape[2:] == (size, size)
        if spec.channels_last:
            assert x.is_contiguous(memory_format=torch.channels_last), "images are not channels-last"
        assert torch.isfinite(x.float()).all()
        assert int(y.min()) >= 0 and int(y.max()) < num_classes
    if spec.train:
        assert all(len(y) == spec.batch_size for y in labels), "training must drop the last partial batch"
    else:
        assert all(len(y) == spec.batch_size for y in labels[:-1])
    # normalized: a whole epoch has roughly zero mean and unit spread per channel
    pixels = torch.cat([x.float().permute(1, 0, 2, 3).reshape(3, -1) for x in images], dim=1)
    mean, std = pixels.mean(dim=1), pixels.std(dim=1)
    assert mean.abs().max() < 1.0 and float(std.min()) > 0.3 and float(std.max()) < 3.0, (mean, std)
    if spec.train and len(loader) > 1:
        _, labels_next = collect_epoch(loader, 1)
        assert not torch.equal(torch.cat(labels), torch.cat(labels_next)), "set_epoch did not reshuffle"
    assert math.isclose(loader.num_samples, sum(len(y) for y in labels))
