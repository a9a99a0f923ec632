"""The FFCV backend on real FFCV (CPU): contract, exact order and counts, pixels, labels, failures, warm-up.

Every test has a timeout: FFCV blocks forever on errors in its threads unless our watchdog catches them. Compiled
pipelines are cached per process (each new one costs ~10 s of numba compilation), so the tests share them: one
32-px train pipeline, one 32-px eval pipeline, one ImageNet train and one ImageNet eval pipeline (+ fp16 and the
planted failure).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import loaders
from loaders import build_loader
from loaders.base import LoaderError, LoaderSpec, shard_indices
from loaders.datasets import array_dataset, dataset_info, imagenet_samples
from loaders.ffcv_import import import_ffcv
from tests.conftest import REPO
from tests.contract import assert_loader_contract, collect_epoch

_THREADS = torch.get_num_threads()
try:
    ffcv = import_ffcv()  # what the loader uses: restores torch's thread count
except ImportError:
    pytest.skip("FFCV not installed (bash tools/setup.sh)", allow_module_level=True)

from loaders.ffcv_pipeline import FfcvWorkerError  # noqa: E402 - after the FFCV check
from loaders.ffcv_writer import BetonWriteError, write_beton  # noqa: E402

SYNTHETIC_SUBSET = 1536  # samples the 32-px tests read (the cached .beton holds the whole split)


def spec_for(dataset: str, split: str, batch_size: int, train: bool, data_dir, **kwargs) -> LoaderSpec:
    options = {"subset": kwargs.pop("subset", None), **kwargs.pop("options", {})}
    return LoaderSpec(dataset, split, batch_size, train, data_dir=str(data_dir), workers=2, options=options, **kwargs)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """Data dir of the synthetic set: the loader writes its cached .beton files under ``ffcv-cache/``."""
    return tmp_path_factory.mktemp("ffcv-synthetic")


@pytest.fixture(scope="session")
def imagenet_ffcv(imagenet_tree, tmp_path_factory) -> Path:
    """tools/convert.py's FFCV output for the real 102-JPEG sample: OUT/ffcv/{train,val}.beton + manifest.json."""
    out = tmp_path_factory.mktemp("imagenet-converted")
    command = [sys.executable, str(REPO / "tools/convert.py"), "imagenet", "--src", str(imagenet_tree), "--out",
               str(out), "--format", "ffcv", "--workers", "2"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return out


def test_import_ffcv_keeps_threads_and_changes_only_the_mode_table():
    """The fast import: torch's thread count survives, FFCV's mode table is a plain dict with FFCV's values, and
    no other module kept the stand-in for numba's typed Dict. Checked in a fresh process (this one imported FFCV)."""
    code = (
        "import sys, torch, numba.typed; torch.set_num_threads(2)\n"
        "from loaders.ffcv_import import import_ffcv\n"
        "import_ffcv()\n"
        "import ffcv.fields.rgb_image as r, ffcv.memory_managers.base as m\n"
        "assert torch.get_num_threads() == 2, torch.get_num_threads()\n"
        "assert type(r.IMAGE_MODES) is dict and r.IMAGE_MODES == {'jpg': 0, 'raw': 1}, r.IMAGE_MODES\n"
        "assert numba.typed.Dict is not dict and m.Dict is numba.typed.Dict\n"
        "leaks = [n for n, x in list(sys.modules.items()) if getattr(x, 'Dict', None) is dict and n != r.__name__]\n"
        "assert not leaks, leaks\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
    assert torch.get_num_threads() == _THREADS


@pytest.mark.timeout(120)
def test_ordered_writer_matches_ffcvs_own_writer_byte_for_byte(tmp_path):
    """OrderedBetonWriter (what tools/convert.py fills) against FFCV's DatasetWriter on the same samples: the same
    file, byte for byte, whether images go through RGBImageField.encode here (raw) or arrive pre-encoded with only
    their place returned, the bytes written by another hand (JPEG, encoded by tools/_convert/images like FFCV
    does). Sizes are mixed so that samples overflow FFCV's 2 MiB minimum page several times."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import encode_jpeg
    from ffcv.writer import DatasetWriter

    from loaders.ffcv_writer import JPG, RAW, EncodedImage, OrderedBetonWriter
    from tools._convert.images import Decoded, ffcv_image

    rng = np.random.default_rng(3)
    sizes = [(int(h), int(w)) for h, w in rng.integers(8, 400, (40, 2))] + [(600, 500), (1, 2000)]
    images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes[:-1]] + [np.zeros((8, 2000, 3), np.uint8)]
    labels = list(range(len(images)))
    page = 2 << 20

    def fields(mode: str) -> dict:
        return {"image": RGBImageField(write_mode=mode, jpeg_quality=90), "label": IntField()}

    def external(path, offset: int, data: bytes) -> None:  # another process writing its share of the file
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    for mode in ("raw", "raw-mixed", "jpg"):
        theirs, ours = tmp_path / f"ffcv-{mode}.beton", tmp_path / f"ours-{mode}.beton"
        kind = mode.split("-")[0]
        DatasetWriter(str(theirs), fields(kind), page_size=page, num_workers=1).from_indexed_dataset(
            list(zip(images, labels)), chunksize=7
        )
        with OrderedBetonWriter(str(ours), fields(kind), capacity=len(images) + 3, page_size=page) as writer:
            for index, (image, label) in enumerate(zip(images, labels)):
                height, width = image.shape[:2]
                if mode == "raw":  # through RGBImageField.encode, bytes written (batched) by the writer
                    assert writer.add((image, label)) == []
                elif mode == "raw-mixed":  # pre-encoded: every third sample's bytes written by someone else
                    data = image.tobytes()
                    if index % 3:
                        assert writer.add((EncodedImage(RAW, height, width, len(data), data), label)) == []
                    else:
                        [(offset, size)] = writer.add((EncodedImage(RAW, height, width, len(data)), label))
                        external(ours, offset, data)
                else:
                    stored = ffcv_image(Decoded(Image.fromarray(image), False, False, (width, height)), 0, "jpg",
                                        0.5, 90, 0)[2]  # fmt: skip
                    assert np.array_equal(stored, encode_jpeg(image, 90)), "not the JPEG FFCV would store"
                    [(offset, size)] = writer.add((EncodedImage(JPG, height, width, stored.nbytes), label))
                    external(ours, offset, stored.tobytes())
        assert ours.read_bytes() == theirs.read_bytes(), mode


# ------------------------------------------------------------------------------------------- 32-px data sets


@pytest.mark.timeout(240)
def test_train_contract_one_and_two_ranks(synthetic_dir):
    threads = torch.get_num_threads()
    spec = spec_for("synthetic", "train", 128, True, synthetic_dir, subset=SYNTHETIC_SUBSET)
    loader = build_loader("ffcv", spec)
    assert torch.get_num_threads() == threads, "import ffcv / Loader() changed torch's thread count"
    assert_loader_contract(loader, spec, SYNTHETIC_SUBSET, 100)
    assert torch.get_num_threads() == threads, "FFCV's epoch thread changed torch's thread count"
    assert loader.warmup_seconds > 0 and loader.compile_seconds in (0.0, loader.warmup_seconds)
    # one process, QUASI_RANDOM: 1536 = 12 batches, so every sample is read exactly once per epoch
    _, labels = array_dataset("synthetic", "train")
    expected = np.bincount(labels[:SYNTHETIC_SUBSET], minlength=100)
    for epoch in (0, 1):
        seen = torch.cat(collect_epoch(loader, epoch)[1]).numpy()
        assert np.array_equal(np.bincount(seen, minlength=100), expected)

    # two ranks (no process group needed): the contract's permutation shard, exactly, on the same compiled pipeline
    for rank in (0, 1):
        ranked = spec_for("synthetic", "train", 100, True, synthetic_dir, subset=SYNTHETIC_SUBSET - 1, rank=rank,
                          world_size=2)  # fmt: skip
        loader = build_loader("ffcv", ranked)
        assert loader.compile_seconds == 0.0, "a second loader with the same decoding must not recompile"
        assert_loader_contract(loader, ranked, SYNTHETIC_SUBSET - 1, 100)
        for epoch in (0, 3):
            order = shard_indices(SYNTHETIC_SUBSET - 1, ranked, epoch)[: loader.num_samples].numpy()
            got = torch.cat(collect_epoch(loader, epoch)[1]).numpy()
            assert np.array_equal(got, labels[order])


@pytest.mark.timeout(240)
def test_eval_contract_order_and_exact_pixels(synthetic_dir):
    images, labels = array_dataset("synthetic", "val")
    info = dataset_info("synthetic")
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    for world_size in (1, 2):
        for rank in range(world_size):
            spec = spec_for("synthetic", "val", 96, False, synthetic_dir, rank=rank, world_size=world_size)
            loader = build_loader("ffcv", spec)
            assert_loader_contract(loader, spec, len(labels), 100)
            batches, got = collect_epoch(loader)
            assert np.array_equal(torch.cat(got).numpy(), labels[rank::world_size])
            # raw pixels, no augmentation at evaluation: normalization undone gives the stored bytes back
            pixels = (torch.cat(batches) * std + mean) * 255.0
            stored = torch.tensor(images[rank::world_size]).permute(0, 3, 1, 2).float()
            assert (pixels - stored).abs().max() < 1e-3

    # other layouts and dtypes: NCHW contiguous and bfloat16 reuse the float32 pipeline, float16 has its own
    base = torch.cat(collect_epoch(build_loader("ffcv", spec_for("synthetic", "val", 96, False, synthetic_dir)))[0])
    for dtype, channels_last, tolerance in ((torch.float32, False, 0), (torch.bfloat16, True, 2e-2),
                                            (torch.float16, True, 2e-3)):  # fmt: skip
        spec = spec_for("synthetic", "val", 96, False, synthetic_dir, dtype=dtype, channels_last=channels_last)
        loader = build_loader("ffcv", spec)
        assert_loader_contract(loader, spec, len(labels), 100)
        out = torch.cat(collect_epoch(loader)[0])
        assert out.dtype == dtype and out.is_contiguous() != channels_last
        assert torch.allclose(out.float(), base, atol=tolerance, rtol=tolerance)


@pytest.mark.timeout(60)
def test_batches_stay_valid_and_memory_is_recycled_only_when_free(synthetic_dir):
    spec = spec_for("synthetic", "val", 64, False, synthetic_dir, subset=640, options={"batches_ahead": 1})
    loader = build_loader("ffcv", spec)
    kept = list(loader)  # no clone: FFCV itself reuses its buffers after batches_ahead + 2 batches
    fresh = collect_epoch(loader)[0]
    assert all(torch.equal(a, b) for (a, _), b in zip(kept, fresh))
    assert len({x.data_ptr() for x, _ in kept}) == len(kept)
    del kept
    # batches the caller drops are recycled; a batch the caller still references (here through a view) is not
    pointers, view = set(), None
    for index, (images, _) in enumerate(loader):
        pointers.add(images.data_ptr())
        if index == 0:
            view, expected = images[1:3], images[1:3].clone()
    assert len(pointers) < len(loader)
    assert torch.equal(view, expected) and torch.equal(view, fresh[0][1:3])


@pytest.mark.timeout(120)
def test_planted_pipeline_failure_raises_within_seconds(synthetic_dir, monkeypatch):
    from dataclasses import replace

    from ffcv.pipeline.operation import Operation

    from loaders import ffcv_pipeline

    class FailOnSecondBatch(Operation):
        """A pipeline stage that raises, as a broken augmentation or a decoder error would."""

        def generate_code(self):
            calls = [0]

            def fail(images, _):
                calls[0] += 1
                if calls[0] == 2:
                    raise RuntimeError("planted failure in the pipeline")
                return images

            return fail

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=False), None

    real = ffcv_pipeline.image_operations
    monkeypatch.setattr(ffcv_pipeline, "image_operations", lambda config: [*real(config), FailOnSecondBatch()])
    ffcv_pipeline.clear_pipeline_cache()
    try:
        loader = build_loader("ffcv", spec_for("synthetic", "val", 50, False, synthetic_dir, subset=500))
        iterator = iter(loader)
        next(iterator)  # compiles (~10 s) and delivers the first batch
        started = time.monotonic()
        with pytest.raises(FfcvWorkerError, match="planted failure in the pipeline") as caught:
            next(iterator)
        assert time.monotonic() - started < 5.0
        assert "batch 1" in str(caught.value) and ".beton" in str(caught.value)
    finally:
        ffcv_pipeline.clear_pipeline_cache()  # the next tests get pipelines without the planted stage


@pytest.mark.timeout(60)
def test_writer_worker_failure_raises_and_leaves_no_file(tmp_path):
    from ffcv.fields import IntField, RGBImageField

    class Broken:
        def __len__(self):
            return 40

        def __getitem__(self, index):
            if index == 17:
                raise ValueError("planted failure at sample 17")
            return np.zeros((8, 8, 3), np.uint8), index

    started = time.monotonic()
    with pytest.raises(BetonWriteError, match="planted failure at sample 17"):
        write_beton(tmp_path / "x.beton", Broken(), {"image": RGBImageField(), "label": IntField()}, workers=2,
                    chunksize=5)  # fmt: skip
    assert time.monotonic() - started < 20
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(60)
def test_cached_beton_is_written_once_and_reused(synthetic_dir):
    spec = spec_for("synthetic", "val", 96, False, synthetic_dir)
    first = build_loader("ffcv", spec).beton
    stamp = first.stat().st_mtime_ns
    assert first.parent == synthetic_dir / "ffcv-cache" and first.suffix == ".beton"
    assert build_loader("ffcv", spec).beton == first and first.stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------------- ImageNet


@pytest.mark.timeout(400)  # includes the conversion fixture
def test_imagenet_labels_match_manifest_and_pixels_match_torch(imagenet_ffcv, imagenet_tree):
    manifest = json.loads((imagenet_ffcv / "ffcv" / "manifest.json").read_text())
    spec = spec_for("imagenet", "test", 32, False, imagenet_ffcv)  # test reads val.beton
    loader = build_loader("ffcv", spec)
    assert loader.beton.name == "val.beton"
    assert_loader_contract(loader, spec, manifest["counts"]["val"], len(manifest["classes"]))
    images, labels = collect_epoch(loader)
    labels = torch.cat(labels).numpy()
    counts = dict(zip(*np.unique(labels, return_counts=True)))
    assert {str(k): int(v) for k, v in counts.items()} == manifest["per_class"]["val"]
    _, expected, classes = imagenet_samples(imagenet_tree / "val")
    assert labels.tolist() == expected and [c["wnid"] for c in manifest["classes"]] == classes

    # the torch backend's validation transform (resize 256 + centre crop 224, PIL antialiased bilinear) from the
    # original JPEGs vs FFCV's (centre crop 224/256 of the shorter side, then OpenCV INTER_AREA to 224) from a
    # re-encoded JPEG (quality 90, long side <= 512). The geometry is the same; the resampling order and kernel
    # are not, which alone gives ~4.5/255 mean |difference| on textured images (measured from the original
    # pixels); FFCV's JPEG round trip (4:2:0 chroma) also shifts red and blue by ~-1.2 on average (0 with raw
    # storage). Stated tolerance, in 0..255 units per image: channel means within 3, pixel correlation > 0.85,
    # mean |difference| median < 7 and max < 22.
    torch_spec = LoaderSpec("imagenet", "val", 32, False, data_dir=str(imagenet_tree), workers=0)
    reference = torch.cat(collect_epoch(build_loader("torch", torch_spec))[0])
    std = torch.tensor(dataset_info("imagenet").std).view(1, 3, 1, 1)
    ours, reference = torch.cat(images) * std * 255.0, reference * std * 255.0  # same mean: it cancels out
    channel_means = (ours.mean(dim=(2, 3)) - reference.mean(dim=(2, 3))).abs().amax(dim=1)
    assert float(channel_means.max()) < 3.0, channel_means.sort().values[-5:]
    flat_ours, flat_ref = ours.flatten(1), reference.flatten(1)
    correlation = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(flat_ours, flat_ref)])
    assert float(correlation.min()) > 0.85, correlation.sort().values[:5]
    diff = (ours - reference).abs().mean(dim=(1, 2, 3))
    assert float(diff.median()) < 7.0 and float(diff.max()) < 22.0, diff.sort().values[-5:]


@pytest.mark.timeout(400)  # includes the conversion fixture
def test_imagenet_train_contract_and_progressive_resolution(imagenet_ffcv):
    spec = spec_for("imagenet", "train", 16, True, imagenet_ffcv, image_size=224)
    loader = build_loader("ffcv", spec)
    assert_loader_contract(loader, spec, 102, 102)
    options = {"progressive_resolution": True, "progressive_start_res": 160, "progressive_end_res": 224,
               "progressive_start_epoch": 0, "progressive_end_epoch": 2}  # fmt: skip
    ramp = build_loader("ffcv", spec_for("imagenet", "train", 16, True, imagenet_ffcv, options=options))
    assert ramp.compile_seconds == 0.0  # the ramp reuses the compiled 224-px pipeline: sizes need no recompiling
    for epoch, size in ((0, 160), (1, 192), (2, 224), (5, 224)):
        images, _ = collect_epoch(ramp, epoch)
        assert {tuple(x.shape[2:]) for x in images} == {(size, size)}, epoch
    # the shared pipeline goes back to 224 for a loader without the ramp
    assert collect_epoch(loader, 5)[0][0].shape[2:] == (224, 224)


# ------------------------------------------------------------------------------------------- errors, no FFCV


@pytest.mark.timeout(300)  # includes the conversion fixture
def test_loader_auto_reads_the_ffcv_conversion(imagenet_ffcv, tmp_path):
    """`--loader auto` on tools/convert.py's FFCV output with no tuned file: FFCV (torch cannot read a .beton),
    whether --data-dir names the output folder, its ffcv folder or a .beton."""
    from train.config import load_config
    from train.data import resolve_loader_name

    messages: list[str] = []
    beton = imagenet_ffcv / "ffcv" / "train.beton"
    for path in (imagenet_ffcv, imagenet_ffcv / "ffcv", beton):
        overrides = ["data.loader=auto", f"data.tuned_path={tmp_path / 'none.json'}", f"data.path={path}"]
        config = load_config("imagenet", "resnet18", overrides)
        assert resolve_loader_name(config, "imagenet", messages.append) == "ffcv"
    assert messages[-1].endswith(f"using ffcv, the format of the conversion at {beton}")


@pytest.mark.timeout(300)  # includes the conversion fixture
def test_clear_errors(imagenet_tree, imagenet_ffcv, monkeypatch):
    with pytest.raises(LoaderError, match="tools/convert.py imagenet"):
        build_loader("ffcv", spec_for("imagenet", "val", 8, False, imagenet_tree))
    with pytest.raises(LoaderError, match="not 'cifar100'"):
        build_loader("ffcv", spec_for("cifar100", "val", 8, False, imagenet_ffcv))
    with pytest.raises(LoaderError, match="augment"):
        build_loader("ffcv", spec_for("synthetic", "train", 8, True, imagenet_tree, options={"augment": "strong"}))
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if FFCV were not installed
    monkeypatch.delitem(sys.modules, "loaders.ffcv_pipeline")
    monkeypatch.delattr(loaders, "ffcv_pipeline")
    with pytest.raises(LoaderError, match="bash tools/setup.sh"):
        build_loader("ffcv", spec_for("synthetic", "val", 8, False, imagenet_tree))


# -------------------------------------------------------------------------------------------------- trainer


@pytest.mark.timeout(600)
def test_short_training_run_with_ffcv_learns(synthetic_dir, tmp_path):
    from train.__main__ import main

    # the cheapest real run: DN AlexNet at 16 px (the 32-px images resized after decoding), 384 samples, 3 epochs;
    # the 32-px FFCV pipelines compiled by the tests above are reused (same .beton, same decoding)
    argv = ["synthetic", "alexnet", "ffcv-learns", "data.subset=384", "data.batch_size=32", "data.eval_batch_size=384",
            "data.image_size=16", "model.divnorm_specs.type=ours", "optimizer.lr=0.02", "lr_scheduler.name=none",
            "checkpoint.save_last=false", "checkpoint.save_best=false",  # 230 MB checkpoint writes: not the subject
            f"data.path={synthetic_dir}", f"logging.runs_dir={tmp_path}", "--epochs", "3", "--loader", "ffcv",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    folder = tmp_path / "ffcv-learns"
    summary = json.loads((folder / "summary.json").read_text())
    epochs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert summary["loader"] == "ffcv" and [e["train"]["samples"] for e in epochs] == [384] * 3
    losses = [e["train"]["loss"] for e in epochs]
    assert losses[-1] < losses[0] - 0.5, losses  # chance level is ln(100) = 4.6; measured 5.1 -> 3.6
    assert epochs[-1]["val"]["top1"] > 5.0 and epochs[-1]["val"]["loss"] < epochs[0]["val"]["loss"], epochs


# ------------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # FFCV's cupy NormalizeImage / torch ops on the GPU
def test_cuda_eval_batches_match_cpu(synthetic_dir, dtype):
    labels = array_dataset("synthetic", "val")[1]
    cpu = build_loader("ffcv", spec_for("synthetic", "val", 96, False, synthetic_dir))
    spec = spec_for("synthetic", "val", 96, False, synthetic_dir, device=torch.device("cuda"), dtype=dtype)
    cuda = build_loader("ffcv", spec)
    assert_loader_contract(cuda, spec, len(labels), 100)
    (x0, y0), (x1, y1) = collect_epoch(cpu), collect_epoch(cuda)
    images = torch.cat(x1)
    assert images.device.type == "cuda" and images.dtype == dtype
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(torch.cat(y0), torch.cat(y1).cpu())
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(images.float().cpu(), torch.cat(x0), atol=tolerance, rtol=tolerance)


@pytest.mark.gpu
@pytest.mark.timeout(400)  # includes the conversion fixture
def test_cuda_imagenet_train_and_eval(imagenet_ffcv):
    """ImageNet on the GPU: crop decoders on the CPU, normalization on the device (cupy fp16); eval pixels equal
    the CPU loader's up to fp16 rounding, train batches keep the contract."""
    device = torch.device("cuda")
    spec = spec_for("imagenet", "train", 16, True, imagenet_ffcv, image_size=224, device=device, dtype=torch.float16)
    assert_loader_contract(build_loader("ffcv", spec), spec, 102, 102)
    cpu = build_loader("ffcv", spec_for("imagenet", "val", 34, False, imagenet_ffcv))
    half = {"device": device, "dtype": torch.float16}
    cuda = build_loader("ffcv", spec_for("imagenet", "val", 34, False, imagenet_ffcv, **half))
    (x0, y0), (x1, y1) = collect_epoch(cpu), collect_epoch(cuda)
    assert torch.equal(torch.cat(y0), torch.cat(y1).cpu())
    images = torch.cat(x1)
    assert images.device.type == "cuda" and images.dtype == torch.float16
    torch.testing.assert_close(images.float().cpu(), torch.cat(x0), atol=2e-2, rtol=2e-3)
