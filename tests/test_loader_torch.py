"""The ``torch`` backend: contract, exact order and sharding, the real ImageNet sample, presets, clear errors."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from loaders import LoaderError, LoaderSpec, build_loader
from loaders.base import shard_indices
from loaders.datasets import IMAGENET_MEAN, IMAGENET_STD, array_dataset, imagenet_samples
from loaders.transforms import ArrayTransform, random_resized_crop_params
from tests.conftest import imagenet_sample_rows
from tests.contract import assert_loader_contract, collect_epoch

SUBSET = 600  # samples of the synthetic val split: small enough to keep every test fast


def synthetic_spec(**overrides) -> LoaderSpec:
    settings = dict(dataset="synthetic", split="val", batch_size=64, train=True, workers=0, options={"subset": SUBSET})
    settings.update(overrides)
    return LoaderSpec(**settings)


def to_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo the normalization: normalized float NCHW -> uint8 NHWC (exact for float32 batches)."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((images.float() * std_t + mean_t) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_contract_and_sharding(train, world_size, synthetic_raw_dir):
    all_labels = np.load(synthetic_raw_dir / "dali" / "val" / "labels.npy")
    labels_per_rank = []
    for rank in range(world_size):
        spec = synthetic_spec(train=train, rank=rank, world_size=world_size, data_dir=str(synthetic_raw_dir))
        loader = build_loader("torch", spec)
        assert_loader_contract(loader, spec, SUBSET, 100)
        _, labels = collect_epoch(loader, 3)
        seen = torch.cat(labels)
        # the order is the contract's, sample by sample
        expected = shard_indices(SUBSET, spec, 3)[: loader.num_samples]
        assert torch.equal(seen, torch.from_numpy(all_labels)[expected])
        labels_per_rank.append(expected)
    if world_size == 2:
        a, b = (set(x.tolist()) for x in labels_per_rank)
        assert not a & b, "ranks saw the same samples"
        if not train:
            assert a | b == set(range(SUBSET)), "evaluation must cover the set once across ranks"


def test_subset_keeps_the_first_samples():
    images, labels = array_dataset("synthetic", "val")
    spec = synthetic_spec(train=False, batch_size=7, options={"subset": 10})
    loader = build_loader("torch", spec)
    batches, batch_labels = collect_epoch(loader)
    assert [len(y) for y in batch_labels] == [7, 3]
    assert torch.equal(torch.cat(batch_labels), torch.from_numpy(labels[:10]))
    # evaluation does not augment: the uint8 pixels come back unchanged
    from loaders.datasets import CIFAR100_MEAN, CIFAR100_STD

    assert torch.equal(to_uint8(torch.cat(batches), CIFAR100_MEAN, CIFAR100_STD), torch.tensor(images[:10]))


@pytest.mark.timeout(120)
def test_workers_persist_and_do_not_change_the_batches(synthetic_raw_dir):
    """Two persistent workers give exactly the in-process batches (augmentation is seeded per sample)."""
    data_dir = str(synthetic_raw_dir)
    in_process = build_loader("torch", synthetic_spec(data_dir=data_dir, options={"subset": 256}))
    with_workers = build_loader(
        "torch", synthetic_spec(data_dir=data_dir, workers=2, options={"subset": 256, "prefetch": 2})
    )
    try:
        for epoch in (0, 1):
            x0, y0 = collect_epoch(in_process, epoch)
            x1, y1 = collect_epoch(with_workers, epoch)
            assert torch.equal(torch.cat(y0), torch.cat(y1))
            assert torch.equal(torch.cat(x0), torch.cat(x1))
            if epoch == 0:
                pids = [w.pid for w in with_workers._dataloader._iterator._workers]
        assert [w.pid for w in with_workers._dataloader._iterator._workers] == pids, "workers were restarted"
        assert all(w.is_alive() for w in with_workers._dataloader._iterator._workers)
    finally:
        with_workers.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtype_and_plain_nchw(dtype, synthetic_raw_dir):
    spec = synthetic_spec(dtype=dtype, channels_last=False, data_dir=str(synthetic_raw_dir), options={"subset": 128})
    loader = build_loader("torch", spec)
    assert_loader_contract(loader, spec, 128, 100)
    images, _ = next(iter(loader))
    assert images.is_contiguous() and images.dtype == dtype


def test_standard_preset_is_torchvision_pad_crop_flip():
    """Crop offset (dy, dx) + flip equals torchvision's zero-padded crop at (dy + 4, dx + 4), then flip."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    padded = TF.pad(image, 4)
    for dy, dx, flip in [(-4, -4, False), (4, 4, True), (-1, 3, True), (0, 0, False), (2, -4, False)]:
        ours = np.array(ArrayTransform.apply(image, dy, dx, flip))
        reference = TF.crop(padded, dy + 4, dx + 4, 32, 32)
        reference = np.array(TF.hflip(reference) if flip else reference)
        assert np.array_equal(ours, reference), (dy, dx, flip)


def test_presets_draw_what_they_promise():
    draws = {preset: ArrayTransform(train=True, augment=preset) for preset in ("standard", "original", "none")}
    rng = random.Random(0)
    standard = [draws["standard"].draw(rng) for _ in range(3000)]
    assert {(dy, dx) for dy, dx, _ in standard} == {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)}
    assert {f for *_, f in standard} == {True, False}
    original = [draws["original"].draw(rng) for _ in range(200)]
    assert {(dy, dx) for dy, dx, _ in original} == {(0, 0)} and {f for *_, f in original} == {True, False}
    assert {draws["none"].draw(rng) for _ in range(50)} == {(0, 0, False)}
    # evaluation never augments, whatever the preset (the original's flip at evaluation was a defect)
    assert ArrayTransform(train=False, augment="standard").draw(rng) == (0, 0, False)
    with pytest.raises(LoaderError, match="data.augment must be one of"):
        ArrayTransform(train=True, augment="heavy")


def test_random_resized_crop_params_respect_scale_and_ratio():
    rng = random.Random(1)
    for width, height in [(500, 375), (200, 900), (64, 64)]:
        for _ in range(300):
            top, left, h, w = random_resized_crop_params(rng, width, height, (0.08, 1.0), (3 / 4, 4 / 3))
            assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
            if (width, height) != (200, 900):  # a tall image may need the central-crop fallback
                assert 0.06 <= h * w / (width * height) <= 1.0
                assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_missing_cifar100_says_how_to_get_it(tmp_path):
    with pytest.raises(LoaderError, match="--download") as error:
        build_loader("torch", synthetic_spec(dataset="cifar100", data_dir=str(tmp_path)))
    assert str(tmp_path) in str(error.value)


def test_bad_subset_is_a_clear_error():
    with pytest.raises(LoaderError, match="data.subset must be a positive integer"):
        build_loader("torch", synthetic_spec(options={"subset": -3}))


# ---------------------------------------------------------------------------------------- the real ImageNet sample


@pytest.fixture(scope="module")
def imagenet_eval(imagenet_tree):
    """One evaluation epoch over the 102 real JPEGs (decoded once for the module)."""
    spec = LoaderSpec("imagenet", "val", batch_size=32, train=False, data_dir=str(imagenet_tree), workers=0)
    loader = build_loader("torch", spec)
    images, labels = collect_epoch(loader)
    return loader, spec, torch.cat(images), torch.cat(labels)


def test_imagenet_eval_matches_torchvision_and_handles_grayscale(imagenet_tree, imagenet_eval):
    loader, spec, images, labels = imagenet_eval
    rows = imagenet_sample_rows()
    assert len(loader) == 4 and loader.num_samples == len(rows) == 102
    assert images.shape == (102, 3, 224, 224) and images.is_contiguous(memory_format=torch.channels_last)
    paths, expected_labels, classes = imagenet_samples(imagenet_tree / "val")
    assert labels.tolist() == expected_labels and classes == sorted({row["wnid"] for row in rows})
    pixels = to_uint8(images, IMAGENET_MEAN, IMAGENET_STD)
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    grayscale = 0
    for i, path in enumerate(paths):
        with Image.open(path) as file:
            mode = file.mode
            # every grayscale file and every 8th other one against torchvision (decoding all doubles the time)
            if mode == "L" or i % 8 == 0:
                expected = reference(file.convert("RGB")).permute(1, 2, 0)
                assert torch.equal(pixels[i], expected), path
        if mode == "L":
            grayscale += 1
            assert torch.equal(pixels[i, ..., 0], pixels[i, ..., 1]) and torch.equal(
                pixels[i, ..., 1], pixels[i, ..., 2]
            )
        else:
            assert not torch.equal(pixels[i, ..., 0], pixels[i, ..., 1])
    assert grayscale == 3


def test_imagenet_contract_train_and_eval(imagenet_tree, imagenet_eval):
    _, eval_spec, images, _ = imagenet_eval
    pixels = images.float().permute(1, 0, 2, 3).reshape(3, -1)
    assert pixels.mean(dim=1).abs().max() < 1.0 and float(pixels.std(dim=1).min()) > 0.3
    spec = LoaderSpec(
        "imagenet", "train", batch_size=16, train=True, data_dir=str(imagenet_tree), workers=0, image_size=64,
        options={"subset": 48, "crop_scale": [0.25, 1.0]},
    )  # fmt: skip
    assert_loader_contract(build_loader("torch", spec), spec, 48, 1000)


@pytest.mark.timeout(120)
def test_corrupt_image_names_the_file(imagenet_tree, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(imagenet_tree / "val", root / "val")
    broken = sorted((root / "val").iterdir())[0] / "broken.JPEG"
    broken.write_bytes(b"not a jpeg at all")
    spec = LoaderSpec("imagenet", "val", batch_size=8, train=False, data_dir=str(root), workers=1)
    loader = build_loader("torch", spec)
    try:
        with pytest.raises(LoaderError) as error:
            collect_epoch(loader)
    finally:
        loader.close()
    message = str(error.value)
    assert "broken.JPEG" in message and "remove or replace" in message and "Traceback" not in message


def test_missing_imagenet_names_the_layout(tmp_path):
    with pytest.raises(LoaderError, match="ImageFolder layout"):
        build_loader("torch", LoaderSpec("imagenet", "train", batch_size=8, train=True, data_dir=str(tmp_path)))


# ------------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cuda_batches_equal_cpu_batches():
    cpu = build_loader("torch", synthetic_spec(options={"subset": 256}))
    cuda = build_loader("torch", synthetic_spec(device=torch.device("cuda"), workers=2, options={"subset": 256}))
    spec = synthetic_spec(device=torch.device("cuda"), options={"subset": 256})
    assert_loader_contract(cuda, spec, 256, 100)
    x0, y0 = collect_epoch(cpu, 2)
    x1, y1 = collect_epoch(cuda, 2)
    assert torch.equal(torch.cat(y0), torch.cat(y1).cpu())
    torch.testing.assert_close(torch.cat(x0), torch.cat(x1).cpu())
    cuda.close()
