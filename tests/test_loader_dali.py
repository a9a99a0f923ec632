"""The DALI backend on real DALI (CPU pipeline here, the mixed pipeline where a GPU exists).

Data: the real ImageNet sample (ImageFolder tree and the webdataset shards tools/convert.py writes from it) and
small uint8 arrays written in the tool's CIFAR layout. Counting tests use arrays whose label is the sample index,
so the labels a loader yields are the sample indices it read.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI is not installed (bash tools/setup.sh)")

from loaders import build_loader  # noqa: E402
from loaders.base import LoaderError, LoaderSpec, samples_per_rank, shard_indices  # noqa: E402
from loaders.datasets import IMAGENET_STD, dataset_info, imagenet_samples, synthetic_arrays  # noqa: E402
from tests.contract import assert_loader_contract, collect_epoch  # noqa: E402

SIZE = 64  # ImageNet tests decode the real JPEGs but resize to 64 px: the contract is about structure


@pytest.fixture(scope="session")
def dali_shards(imagenet_tree, tmp_path_factory) -> Path:
    """tools/convert.py's DALI output for the sample tree (several shards per split, to cross shard borders)."""
    from tools.convert import main

    out = tmp_path_factory.mktemp("converted")
    args = ["imagenet", "--src", str(imagenet_tree), "--out", str(out), "--format", "dali"]
    assert main([*args, "--shard-size", "2000000", "--workers", "1"]) == 0
    assert len(list((out / "dali" / "val").glob("shard-*.idx"))) > 1
    return out


def _write_arrays(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """The tool's CIFAR layout: root/dali/<split>/images.npy + labels.npy, manifest.json last."""
    folder = root / "dali"
    for split, (images, labels) in splits.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        np.save(folder / split / "images.npy", images)
        np.save(folder / split / "labels.npy", labels)
    counts = {split: len(labels) for split, (_, labels) in splits.items()}
    manifest = {"tool_version": "test", "dataset": "synthetic", "format": "dali", "counts": counts}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="session")
def indexed_arrays(tmp_path_factory) -> Path:
    """90 synthetic images whose label is their index (unique), as train and val splits."""
    images, _ = synthetic_arrays("val", size=90)
    labels = np.arange(90, dtype=np.int64)
    return _write_arrays(tmp_path_factory.mktemp("indexed"), {"train": (images, labels), "val": (images, labels)})


def _spec(dataset: str, split: str, train: bool, data_dir=None, **kwargs) -> LoaderSpec:
    options = kwargs.pop("options", {})
    return LoaderSpec(dataset, split, kwargs.pop("batch_size", 16), train, data_dir=data_dir, options=options, **kwargs)


# ------------------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize(
    ("source", "train", "world_size"),
    [("folder", True, 1), ("folder", False, 2), ("shards", True, 2), ("shards", False, 1)],
)
def test_contract_imagenet(imagenet_tree, dali_shards, source, train, world_size):
    data_dir = imagenet_tree if source == "folder" else dali_shards
    n = len(imagenet_samples(imagenet_tree / "val")[0])
    for rank in range(world_size):
        spec = _spec("imagenet", "train" if train else "val", train, data_dir, image_size=SIZE, rank=rank,
                     world_size=world_size, batch_size=16 if train else 24)  # fmt: skip
        loader = build_loader("dali", spec)
        assert_loader_contract(loader, spec, n, num_classes=1000)
        loader.close()


@pytest.mark.parametrize(("train", "world_size"), [(True, 1), (False, 2), (True, 2)])
def test_contract_synthetic_without_conversion(train, world_size):
    # no data dir: the in-memory synthetic arrays feed the pipeline (batch-mode external source)
    for rank in range(world_size):
        spec = _spec("synthetic", "val", train, rank=rank, world_size=world_size, batch_size=128,
                     options={"subset": 1000})  # fmt: skip
        assert_loader_contract(build_loader("dali", spec), spec, 1000, num_classes=100)


# ------------------------------------------------------------------------------------------ exact counting


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [89, 90])
def test_eval_sees_every_sample_once(indexed_arrays, world_size, n):
    seen = []
    for rank in range(world_size):
        spec = _spec("synthetic", "val", False, indexed_arrays, rank=rank, world_size=world_size, batch_size=8,
                     options={"subset": n})  # fmt: skip
        loader = build_loader("dali", spec)
        _, labels = collect_epoch(loader)
        got = torch.cat(labels)
        assert len(got) == loader.num_samples == samples_per_rank(n, spec)
        assert torch.equal(got, shard_indices(n, spec)), "rank r reads r, r + W, ... in order"
        seen.append(got)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(n))


@pytest.mark.parametrize("world_size", [1, 2])
def test_train_follows_the_contract_permutation(indexed_arrays, world_size):
    n, batch = 89, 8
    per_rank = []
    for rank in range(world_size):
        spec = _spec("synthetic", "train", True, indexed_arrays, rank=rank, world_size=world_size, batch_size=batch,
                     options={"subset": n})  # fmt: skip
        loader = build_loader("dali", spec)
        for epoch in (0, 1):
            _, labels = collect_epoch(loader, epoch)
            assert all(len(y) == batch for y in labels)
            expected = shard_indices(n, spec, epoch)[: samples_per_rank(n, spec)]
            assert torch.equal(torch.cat(labels), expected), "not the epoch's permutation (or a partial batch)"
        per_rank.append(set(torch.cat(labels).tolist()))
    if world_size == 2:
        assert not per_rank[0] & per_rank[1], "ranks overlap"


def test_epoch_left_early_restarts_cleanly(indexed_arrays):
    spec = _spec("synthetic", "val", False, indexed_arrays, batch_size=8, options={"prefetch": 3})
    loader = build_loader("dali", spec)
    for _, labels in loader:
        assert torch.equal(labels, torch.arange(8))
        break  # leaves prefetched batches behind
    _, labels = collect_epoch(loader)
    assert torch.equal(torch.cat(labels), torch.arange(90))
    # batches stay valid while held (zero-copy DLPack outputs must not be overwritten by later batches)
    held = list(loader)
    assert torch.equal(torch.cat([y for _, y in held]), torch.arange(90))
    assert torch.equal(torch.cat([x for x, _ in held]), torch.cat(collect_epoch(loader)[0]))


# ------------------------------------------------------------------------------------------ pixel values


def test_val_batches_match_torch_backend(imagenet_tree):
    """Same real JPEGs, resize 256 + centre crop 224: labels identical, pixels within 2 grey levels."""
    kwargs = {"batch_size": 34, "workers": 0}
    dali_x, dali_y = collect_epoch(build_loader("dali", _spec("imagenet", "val", False, imagenet_tree, **kwargs)))
    torch_x, torch_y = collect_epoch(build_loader("torch", _spec("imagenet", "val", False, imagenet_tree, **kwargs)))
    assert torch.equal(torch.cat(dali_y), torch.cat(torch_y))
    # in grey levels of the 0-255 source image: both decode with libjpeg-turbo and resize with an antialiased
    # linear filter at torchvision's exact sizes and offsets, so only rounding differs (measured: max 1, mean 0.16)
    levels = (torch.cat(dali_x) - torch.cat(torch_x)).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert levels.shape == (102, 3, 224, 224)
    assert float(levels.max()) <= 2.0 and float(levels.mean()) <= 0.5, (float(levels.max()), float(levels.mean()))


def test_train_antialias_off_changes_only_the_resize_filter(imagenet_tree):
    """data.dali_train_antialias=false: the same crops and flips (same seed), shrunk without the antialiasing
    filter: the pixels differ (aliasing), the picture does not (per-image channel means agree)."""

    def epoch(flag):
        spec = _spec("imagenet", "train", True, imagenet_tree, image_size=SIZE, batch_size=34,
                     options={"dali_train_antialias": flag})  # fmt: skip
        images, labels = collect_epoch(build_loader("dali", spec))
        scale = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255  # back to grey levels
        return torch.cat(images) * scale, torch.cat(labels)

    smooth, smooth_y = epoch(True)
    aliased, aliased_y = epoch("false")  # the loader also takes the string an API caller may pass
    assert torch.equal(smooth_y, aliased_y)
    levels = (smooth - aliased).abs()
    means = (smooth.mean(dim=(2, 3)) - aliased.mean(dim=(2, 3))).abs()
    # measured at 64 px: mean pixel difference 7.2 grey levels; per-image channel means within 1.0 (mean 0.16)
    assert float(levels.mean()) > 3.0, float(levels.mean())
    assert float(means.max()) < 2.5, float(means.max())


def test_webdataset_shards_read_like_the_folder(imagenet_tree, dali_shards):
    folder = collect_epoch(build_loader("dali", _spec("imagenet", "val", False, imagenet_tree, image_size=SIZE)))
    # "test" reads the official val images; the data dir may be OUT or OUT/dali
    spec = _spec("imagenet", "test", False, dali_shards / "dali", image_size=SIZE)
    shards = collect_epoch(build_loader("dali", spec))
    assert torch.equal(torch.cat(folder[1]), torch.cat(shards[1]))
    assert torch.equal(torch.cat(folder[0]), torch.cat(shards[0]))  # same JPEG bytes, same pipeline


def test_cifar_pad_crop_and_flip_are_exact(indexed_arrays):
    """Every training image is its source shifted by an integer in [-4, 4]^2 with zero fill, maybe mirrored."""
    images = np.load(indexed_arrays / "dali" / "train" / "images.npy")
    info = dataset_info("synthetic")
    spec = _spec("synthetic", "train", True, indexed_arrays, batch_size=30)
    batches, labels = collect_epoch(build_loader("dali", spec))
    mean, std = np.array(info.mean) * 255, np.array(info.std) * 255
    shifts, flips = set(), 0
    for x, y in zip(batches, labels):
        out = x.permute(0, 2, 3, 1).numpy() * std + mean  # back to 0-255 HWC
        for image, index in zip(out, y.tolist()):
            padded = np.pad(images[index].astype(np.float64), ((4, 4), (4, 4), (0, 0)))
            match = None
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    window = padded[4 + dy : 36 + dy, 4 + dx : 36 + dx]
                    for flip in (False, True):
                        candidate = window[:, ::-1] if flip else window
                        if np.abs(candidate - image).max() < 1e-3:
                            match = (dy, dx, flip)
            assert match is not None, f"sample {index} is not a pad-4 crop (+ flip) of its source"
            shifts.add(match[:2])
            flips += match[2]
    assert len(shifts) > 20 and 0 < flips < 90, "crops or flips are not random"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_match_float32(indexed_arrays, dtype):
    base = _spec("synthetic", "val", False, indexed_arrays, batch_size=45)
    reference = torch.cat(collect_epoch(build_loader("dali", base))[0])
    for channels_last in (True, False):
        spec = _spec("synthetic", "val", False, indexed_arrays, batch_size=45, dtype=dtype, channels_last=channels_last)
        images = collect_epoch(build_loader("dali", spec))[0]
        assert all(x.dtype == dtype for x in images)
        if channels_last:
            assert all(x.is_contiguous(memory_format=torch.channels_last) for x in images)
        else:
            assert all(x.is_contiguous() for x in images)
        tolerance = 0.02 if dtype == torch.bfloat16 else 2e-3
        assert torch.allclose(torch.cat(images).float(), reference, atol=tolerance, rtol=0.01)


# ------------------------------------------------------------------------------------------ errors, devices


def test_cpu_pipeline_is_chosen_and_logged(indexed_arrays, caplog):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto picks the mixed pipeline")
    with caplog.at_level(logging.INFO, logger="loaders.dali"):
        loader = build_loader("dali", _spec("synthetic", "val", False, indexed_arrays))
    assert loader.device_kind == "cpu" and loader.config.device_id is None
    assert "CPU (device_id=None)" in caplog.text


def test_user_errors_are_one_clear_message(imagenet_tree, dali_shards, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(LoaderError, match="dali_device=gpu but DALI sees no CUDA GPU"):
            build_loader("dali", _spec("imagenet", "val", False, imagenet_tree, options={"dali_device": "gpu"}))
    with pytest.raises(LoaderError, match="dali_device must be one of"):
        build_loader("dali", _spec("imagenet", "val", False, imagenet_tree, options={"dali_device": "tpu"}))
    with pytest.raises(LoaderError, match="dali_decode must be one of"):
        build_loader("dali", _spec("imagenet", "val", False, imagenet_tree, options={"dali_decode": "nvjpeg"}))
    with pytest.raises(LoaderError, match="dali_decode=mixed needs the GPU pipeline"):
        options = {"dali_device": "cpu", "dali_decode": "mixed"}
        build_loader("dali", _spec("imagenet", "val", False, imagenet_tree, options=options))
    with pytest.raises(LoaderError, match="dali_train_antialias must be true or false"):
        build_loader("dali", _spec("imagenet", "train", True, imagenet_tree, options={"dali_train_antialias": "no"}))
    with pytest.raises(LoaderError, match="crop_scale"):
        build_loader("dali", _spec("imagenet", "train", True, imagenet_tree, options={"crop_scale": [0.5]}))
    with pytest.raises(LoaderError, match="needs --data-dir"):
        build_loader("dali", _spec("imagenet", "val", False, None))
    # a shard whose index is gone
    broken = tmp_path / "broken"
    (broken / "dali" / "val").mkdir(parents=True)
    for name in ("shard-00000.tar", "manifest.json"):
        source = dali_shards / "dali" / ("val/" + name if name.endswith(".tar") else name)
        target = broken / "dali" / ("val/" + name if name.endswith(".tar") else name)
        target.write_bytes(source.read_bytes())
    with pytest.raises(LoaderError, match="missing index .*wds2idx"):
        build_loader("dali", _spec("imagenet", "val", False, broken))
    # a truncated shard (its index reaches past its end): one line, not numpy's ValueError at the first batch
    source = dali_shards / "dali" / "val"
    shutil.copytree(source.parent, broken / "dali", dirs_exist_ok=True)
    shard = broken / "dali" / "val" / "shard-00000.tar"
    shard.write_bytes(shard.read_bytes()[:20000])
    with pytest.raises(LoaderError, match="shard-00000.tar has 20000 bytes but its index reaches byte"):
        build_loader("dali", _spec("imagenet", "val", False, broken))
    # a file that is not a JPEG: the message names it
    tree = tmp_path / "corrupt"
    (tree / "val" / "n0").mkdir(parents=True)
    (tree / "val" / "n1").mkdir(parents=True)
    first = sorted((imagenet_tree / "val").iterdir())[0]
    (tree / "val" / "n0" / "a.JPEG").write_bytes(next(first.iterdir()).read_bytes())
    (tree / "val" / "n1" / "b.JPEG").write_bytes(b"not a jpeg" * 100)
    loader = build_loader("dali", _spec("imagenet", "val", False, tree, batch_size=2))
    with pytest.raises(LoaderError, match=r"cannot decode image .*b\.JPEG"):
        collect_epoch(loader)
    # DALI missing: the error says how to install it
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(LoaderError, match="tools/setup.sh"):
        build_loader("dali", _spec("imagenet", "val", False, imagenet_tree))


def test_gpu_graphs_serialize_without_a_gpu():
    """The mixed/GPU graphs are defined with device_id=None and serialized: misspelt arguments or device
    mismatches fail here even on a CPU-only machine."""
    from loaders.dali_pipelines import PipelineConfig, build_pipeline

    def source():
        raise StopIteration

    for kind, train, size in [("jpeg", True, 224), ("jpeg", False, 224), ("array", True, 32), ("array", False, 64)]:
        config = PipelineConfig(kind=kind, train=train, batch_size=8, num_threads=2, device="gpu", device_id=None,
                                image_size=size, mean=(0.5,) * 3, std=(0.25,) * 3, fp16=True)  # fmt: skip
        serialized = build_pipeline(config, source).serialize()
        assert isinstance(serialized, bytes) and len(serialized) > 200
        assert b"gpu" in serialized
        if kind == "jpeg":
            assert b"mixed" in serialized, "ImageNet decoding must run on the GPU (nvJPEG / hardware decoder)"
    # decode="cpu": libjpeg-turbo on the CPU threads, resize + normalize on the GPU
    for train in (True, False):
        config = PipelineConfig(kind="jpeg", train=train, batch_size=8, num_threads=2, device="gpu", device_id=None,
                                decode="cpu", image_size=224, mean=(0.5,) * 3, std=(0.25,) * 3)  # fmt: skip
        serialized = build_pipeline(config, source).serialize()
        assert b"mixed" not in serialized and b"gpu" in serialized


# ------------------------------------------------------------------------------------------ GPU (real)


@pytest.mark.gpu
def test_mixed_pipeline_on_gpu(imagenet_tree, dali_shards):
    device = torch.device("cuda")
    for data_dir in (imagenet_tree, dali_shards):
        spec = _spec("imagenet", "train", True, data_dir, device=device, dtype=torch.float16, batch_size=32)
        loader = build_loader("dali", spec)
        assert loader.device_kind == "gpu"
        assert_loader_contract(loader, spec, 102, num_classes=1000)
    gpu = _spec("imagenet", "val", False, imagenet_tree, device=device, batch_size=34)
    cpu = _spec("imagenet", "val", False, imagenet_tree, batch_size=34)
    gpu_x, gpu_y = collect_epoch(build_loader("dali", gpu))
    cpu_x, cpu_y = collect_epoch(build_loader("dali", cpu))
    assert all(x.is_cuda and y.is_cuda for x, y in zip(gpu_x, gpu_y))
    assert torch.equal(torch.cat(gpu_y).cpu(), torch.cat(cpu_y))
    # nvJPEG / the hardware decoder and libjpeg-turbo differ in IDCT and chroma upsampling
    levels = (torch.cat(gpu_x).cpu() - torch.cat(cpu_x)).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert float(levels.mean()) <= 2.0, float(levels.mean())


@pytest.mark.gpu
def test_gpu_outputs_are_held_until_the_work_on_them_ran(imagenet_tree):
    """A GPU pipeline's batches stay referenced until the CUDA work queued on them has run, then go: while the
    stream is busy they are held, once it is idle at most the last one is."""
    device = torch.device("cuda")
    spec = _spec("imagenet", "train", True, imagenet_tree, device=device, dtype=torch.float16, batch_size=16)
    loader = build_loader("dali", spec)
    big = torch.randn(4096, 4096, device=device)
    for index, (images, _labels) in enumerate(loader):
        for _ in range(20):  # keep the stream busy with work queued after this batch's own
            big = big @ big * 1e-3 + images.float().mean()
        if index >= 2:
            assert len(loader._held._queued) >= 1  # the earlier batches' work cannot all have run yet
    torch.cuda.synchronize()
    loader._held.finish(device)
    assert len(loader._held._queued) <= 1 and loader._held._pending is None
    loader.close()


@pytest.mark.gpu
def test_cpu_decoding_in_the_gpu_pipeline(imagenet_tree, dali_shards):
    """data.dali_decode=cpu: the contract holds, and validation pixels match the CPU pipeline's (same decoder,
    resize on the GPU instead of the CPU)."""
    device = torch.device("cuda")
    options = {"dali_decode": "cpu"}
    spec = _spec("imagenet", "train", True, dali_shards, device=device, dtype=torch.float16, batch_size=32,
                 options=options)  # fmt: skip
    loader = build_loader("dali", spec)
    assert loader.device_kind == "gpu" and loader.config.decode == "cpu"
    assert_loader_contract(loader, spec, 102, num_classes=1000)
    gpu = _spec("imagenet", "val", False, imagenet_tree, device=device, batch_size=34, options=options)
    cpu = _spec("imagenet", "val", False, imagenet_tree, batch_size=34)
    gpu_x, gpu_y = collect_epoch(build_loader("dali", gpu))
    cpu_x, cpu_y = collect_epoch(build_loader("dali", cpu))
    assert torch.equal(torch.cat(gpu_y).cpu(), torch.cat(cpu_y))
    levels = (torch.cat(gpu_x).cpu() - torch.cat(cpu_x)).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert float(levels.mean()) <= 0.5, float(levels.mean())


@pytest.mark.gpu
def test_gpu_arrays_and_cpu_pipeline_to_cuda(indexed_arrays):
    device = torch.device("cuda")
    for mode in ("gpu", "cpu"):
        spec = _spec("synthetic", "train", True, indexed_arrays, device=device, batch_size=8,
                     options={"dali_device": mode})  # fmt: skip
        loader = build_loader("dali", spec)
        assert loader.device_kind == mode
        assert_loader_contract(loader, spec, 90, num_classes=100)


# ------------------------------------------------------------------------------------------ training


def test_loader_auto_trains_from_a_converted_folder(dali_shards, imagenet_tree, tmp_path, capsys):
    """The README's `python -m train imagenet ... --data-dir <tools/convert.py output> --loader auto`: torch cannot
    read the shards, so with no tuned file, or a tuned file that names torch, auto takes the DALI loader, says why,
    and the run trains; an ImageFolder tree still falls back to torch."""
    from train.__main__ import main
    from train.config import load_config
    from train.data import resolve_loader_name

    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"imagenet": {"loader": "torch", "data": {"loader": "torch", "workers": 1}}}))
    messages: list[str] = []
    overrides = ["data.loader=auto", f"data.tuned_path={tuned}"]
    config = load_config("imagenet", "alexnet", [*overrides, f"data.path={dali_shards}"])
    assert resolve_loader_name(config, "imagenet", messages.append) == "dali"
    assert messages[-1] == (
        f"loader auto: the tuned torch loader reads ImageFolder trees, not the tools/convert.py output at "
        f"{dali_shards}; using dali instead, the format of the conversion at {dali_shards}"
    )
    config = load_config("imagenet", "alexnet", [*overrides, f"data.path={imagenet_tree}"])
    assert resolve_loader_name(config, "imagenet", messages.append) == "torch"

    argv = ["imagenet", "alexnet", "auto-converted", "--data-dir", str(dali_shards), "--loader", "auto", "--device",
            "cpu", "--epochs", "1", f"data.tuned_path={tmp_path / 'none.json'}", "data.image_size=32",
            "data.batch_size=32", f"logging.runs_dir={tmp_path / 'runs'}", "checkpoint.save_last=false",
            "checkpoint.save_best=false", "logging.progress_bar=off"]  # fmt: skip
    assert main(argv) == 0
    assert "no tuned settings" in capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "auto-converted" / "summary.json").read_text())
    assert summary["loader"] == "dali" and summary["epochs"] == 1


def test_torch_and_the_benchmark_on_a_converted_folder(dali_shards, imagenet_tree, tmp_path):
    """The torch loader cannot read a tools/convert.py output: its error says so and how to read it. The benchmark,
    given one as --data, gives the torch loader the source its manifest names, or says why it cannot."""
    from tools.bench.data import prepare_data

    hint = rf"tools/convert.py output \(dali\): read it with --loader dali .*{imagenet_tree.name}"
    with pytest.raises(LoaderError, match=hint):
        build_loader("torch", _spec("imagenet", "val", False, dali_shards))
    plan = prepare_data("imagenet", str(dali_shards), ["torch", "dali"], tmp_path / "cache")
    assert plan.data_dirs == {"torch": str(imagenet_tree.resolve()), "dali": str(dali_shards)}
    assert plan.unavailable == {} and plan.conversions == []
    moved = tmp_path / "moved" / "dali"  # a conversion whose source is not on this machine
    moved.mkdir(parents=True)
    manifest = json.loads((dali_shards / "dali" / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**manifest, "source": str(tmp_path / "gone")}))
    plan = prepare_data("imagenet", str(moved.parent), ["torch", "dali", "ffcv"], tmp_path / "cache")
    assert sorted(plan.unavailable) == ["ffcv", "torch"] and plan.data_dirs["dali"] == str(moved.parent)
    assert f"its source ({tmp_path / 'gone'}) is not on this machine" in plan.unavailable["torch"]


@pytest.mark.slow
def test_short_training_run_with_dali_learns(tmp_path):
    """`python -m train synthetic alexnet ... --loader dali` on the CPU pipeline: validation far above chance."""
    from train.__main__ import main

    argv = ["synthetic", "alexnet", "dali-learns", "data.subset=1024", "data.batch_size=64", "data.eval_batch_size=256",
            "data.image_size=16", "optimizer.lr=0.02", 'lr_scheduler.name="none"', f"logging.runs_dir={tmp_path}",
            "checkpoint.save_last=false", "checkpoint.save_best=false",  # 230 MB checkpoint writes: not the subject
            "--epochs", "2", "--loader", "dali", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "dali-learns" / "summary.json").read_text())
    assert summary["loader"] == "dali" and summary["epochs"] == 2
    lines = [json.loads(line) for line in (tmp_path / "dali-learns" / "metrics.jsonl").read_text().splitlines()]
    assert [line["train"]["samples"] for line in lines] == [1024, 1024]  # exact counts through the trainer
    # 100 classes: chance is 1 %
    assert summary["val"]["top1"] > 10.0, summary["val"]
