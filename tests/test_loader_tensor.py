"""The tensor-resident ``gpu`` backend: contract, order, augmentation statistics, equality with the torch backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from loaders import LoaderError, LoaderSpec, build_loader
from loaders.arrays import check_fits
from loaders.base import shard_indices
from loaders.datasets import CIFAR100_MEAN, CIFAR100_STD, array_dataset
from loaders.tensor import WindowStore, pad_crop_flip
from loaders.transforms import ArrayTransform, Normalizer, pil_to_uint8
from tests.contract import assert_loader_contract, collect_epoch

SUBSET = 600


def spec_for(data_dir, **overrides) -> LoaderSpec:
    settings = dict(
        dataset="synthetic", split="val", batch_size=64, train=True, data_dir=str(data_dir), options={"subset": SUBSET}
    )
    settings.update(overrides)
    return LoaderSpec(**settings)


def reference_batch(images: np.ndarray, indices, offsets, flips) -> torch.Tensor:
    """The torch backend's per-sample PIL ops and device normalizer applied with the given offsets and flips."""
    crops = []
    for i, (dy, dx), flip in zip(indices.tolist(), offsets.tolist(), flips.tolist()):
        crops.append(pil_to_uint8(ArrayTransform.apply(Image.fromarray(images[i]), dy, dx, flip)))
    return Normalizer(CIFAR100_MEAN, CIFAR100_STD, device=torch.device("cpu"))(torch.stack(crops))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_contract_order_and_sharding(train, world_size, synthetic_raw_dir):
    labels = torch.from_numpy(np.load(synthetic_raw_dir / "dali" / "val" / "labels.npy"))
    per_rank = []
    for rank in range(world_size):
        spec = spec_for(synthetic_raw_dir, train=train, rank=rank, world_size=world_size)
        loader = build_loader("gpu", spec)
        assert_loader_contract(loader, spec, SUBSET, 100)
        _, seen = collect_epoch(loader, 5)
        expected = shard_indices(SUBSET, spec, 5)[: loader.num_samples]  # the contract's order, sample by sample
        assert torch.equal(torch.cat(seen), labels[expected])
        per_rank.append(set(expected.tolist()))
    if world_size == 2:
        assert not per_rank[0] & per_rank[1], "ranks saw the same samples"
        if not train:
            assert per_rank[0] | per_rank[1] == set(range(SUBSET)), "evaluation must cover the set once"


def test_reads_the_arrays_without_a_converted_folder():
    """No data_dir: the synthetic set comes straight from loaders.datasets; evaluation returns it unchanged."""
    images, labels = array_dataset("synthetic", "test")
    spec = LoaderSpec("synthetic", "test", batch_size=50, train=False, options={"subset": 120})
    loader = build_loader("gpu", spec)
    batches, batch_labels = collect_epoch(loader)
    assert [len(y) for y in batch_labels] == [50, 50, 20]
    assert torch.equal(torch.cat(batch_labels), torch.from_numpy(labels[:120]))
    expected = Normalizer(CIFAR100_MEAN, CIFAR100_STD, device=torch.device("cpu"))(torch.tensor(images[:120]))
    assert torch.equal(torch.cat(batches), expected)


def test_every_offset_and_flip_occurs(synthetic_raw_dir):
    loader = build_loader("gpu", spec_for(synthetic_raw_dir, batch_size=100))
    offsets, flips = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for _ in loader:
            offsets.append(loader.last_augmentation[1])
            flips.append(loader.last_augmentation[2])
    offsets, flips = torch.cat(offsets), torch.cat(flips)
    assert len(offsets) == 3 * 600
    assert int(offsets.min()) == -4 and int(offsets.max()) == 4
    assert {tuple(o) for o in offsets.tolist()} == {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)}
    assert 0.4 < flips.float().mean() < 0.6
    # the draws are seeded by (seed, epoch, rank): the same epoch repeats them, the next one differs
    loader.set_epoch(1)
    first = [loader.last_augmentation[1].clone() for _ in loader]
    loader.set_epoch(1)
    again = [loader.last_augmentation[1].clone() for _ in loader]
    assert torch.equal(torch.cat(first), torch.cat(again)) and torch.equal(torch.cat(first), offsets[600:1200])
    assert not torch.equal(offsets[:600], offsets[600:1200])


@pytest.mark.parametrize("augment", ["standard", "original"])
def test_batch_equals_torch_backend_with_the_same_offsets_and_flips(augment, synthetic_raw_dir):
    images = np.load(synthetic_raw_dir / "dali" / "val" / "images.npy")
    loader = build_loader("gpu", spec_for(synthetic_raw_dir, options={"subset": SUBSET, "augment": augment}))
    loader.set_epoch(2)
    for batch_number, (batch, _) in enumerate(loader):
        indices, offsets, flips = loader.last_augmentation
        if augment == "original":
            assert not offsets.any(), "the original preset only flips"
        assert torch.equal(batch, reference_batch(images, indices, offsets, flips))
        if batch_number == 2:
            break


def test_pad_crop_flip_matches_pil_for_every_offset():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    grid = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    offsets = torch.tensor(grid * 4)
    flips = torch.tensor([False] * 162 + [True] * 162)
    indices = torch.tensor(([0] * 81 + [1] * 81) * 2)
    batch = pad_crop_flip(torch.from_numpy(images)[indices], offsets, flips)
    for k in range(len(indices)):
        image = Image.fromarray(images[int(indices[k])])
        expected = pil_to_uint8(ArrayTransform.apply(image, *offsets[k].tolist(), bool(flips[k])))
        assert torch.equal(batch[k], expected), (offsets[k], flips[k])
    with pytest.raises(ValueError, match=r"\[-4, 4\]"):
        pad_crop_flip(torch.from_numpy(images), torch.tensor([[5, 0], [0, 0]]), torch.tensor([False, False]))


def test_store_size_accounts_for_padding_and_mirror():
    assert WindowStore.nbytes(50_000, 32, pad=4, mirror=True) == (2 * 50_000 + 1) * 40 * 40 * 3
    assert WindowStore.nbytes(10, 32, pad=0, mirror=False) == 11 * 32 * 32 * 3
    store = WindowStore(np.zeros((10, 32, 32, 3), np.uint8), pad=0, mirror=False, device=torch.device("cpu"))
    assert store.data.numel() == WindowStore.nbytes(10, 32, pad=0, mirror=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtype_layout_and_resize(dtype, synthetic_raw_dir):
    spec = spec_for(synthetic_raw_dir, dtype=dtype, channels_last=False, image_size=48, options={"subset": 128})
    loader = build_loader("gpu", spec)
    assert_loader_contract(loader, spec, 128, 100)
    images, _ = next(iter(loader))
    assert images.shape == (64, 3, 48, 48) and images.is_contiguous() and images.dtype == dtype


def test_same_order_and_eval_pixels_as_torch_backend(synthetic_raw_dir):
    for train in (True, False):
        torch_loader = build_loader("torch", spec_for(synthetic_raw_dir, train=train, workers=0))
        tensor_loader = build_loader("gpu", spec_for(synthetic_raw_dir, train=train))
        x0, y0 = collect_epoch(torch_loader, 4)
        x1, y1 = collect_epoch(tensor_loader, 4)
        assert torch.equal(torch.cat(y0), torch.cat(y1))
        if not train:
            assert torch.equal(torch.cat(x0), torch.cat(x1))


def test_refuses_imagenet_and_sets_that_do_not_fit(tmp_path):
    with pytest.raises(LoaderError, match="small data sets"):
        build_loader("gpu", LoaderSpec("imagenet", "train", batch_size=8, train=True, data_dir=str(tmp_path)))
    with pytest.raises(LoaderError, match=r"needs 458 MiB resident, but only 1,000 MiB of RAM is free"):
        check_fits(WindowStore.nbytes(50_000, 32, pad=4, mirror=True), torch.device("cpu"), "cifar100", 1000 * 2**20)
    check_fits(10 * 2**20, torch.device("cpu"), "tiny", 2000 * 2**20)  # fits: no error


def test_missing_cifar100_and_missing_converted_split(tmp_path):
    with pytest.raises(LoaderError, match="--download"):
        build_loader("gpu", LoaderSpec("cifar100", "train", batch_size=8, train=True, data_dir=str(tmp_path)))
    (tmp_path / "dali").mkdir()
    (tmp_path / "dali" / "manifest.json").write_text("{}")
    with pytest.raises(LoaderError, match="tools/convert.py"):
        build_loader("gpu", LoaderSpec("cifar100", "test", batch_size=8, train=False, data_dir=str(tmp_path)))


def test_cpu_batches_leave_the_thread_setting_alone(synthetic_raw_dir):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = build_loader("gpu", spec_for(synthetic_raw_dir, options={"subset": 128}))
        for _ in loader:
            assert torch.get_num_threads() == 2, "the loader must restore the thread count before yielding"
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cuda_contract_and_same_batches_as_cpu(synthetic_raw_dir):
    spec = spec_for(synthetic_raw_dir, device=torch.device("cuda"))
    cuda = build_loader("gpu", spec)
    assert_loader_contract(cuda, spec, SUBSET, 100)
    images = np.load(synthetic_raw_dir / "dali" / "val" / "images.npy")
    cuda.set_epoch(1)
    batch, _ = next(iter(cuda))
    indices, offsets, flips = (t.cpu() for t in cuda.last_augmentation)
    torch.testing.assert_close(batch.cpu(), reference_batch(images, indices, offsets, flips))
