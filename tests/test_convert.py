"""tools/convert.py end to end: real JPEGs plus planted bad files through the real DALI and FFCV readers.

One conversion of the ImageNet sample (train split, 102 real JPEGs + planted odd and broken files) is shared by
the round-trip tests; the interruption test kills a second conversion part-way, resumes it and compares.
Pixel bounds: FFCV raw samples equal the source after the same resize exactly; JPEG-stored samples (FFCV jpg
pages, re-encoded DALI members, quality 90 with 4:2:0 chroma) are at least 27 dB PSNR from it (the sample's worst
measured 28.8 dB); DALI members kept as the source bytes at least 40 dB (measured: identical to Pillow's decode).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from loaders.ffcv_import import import_ffcv
from tests.conftest import REPO, build_imagefolder, imagenet_sample_dir, imagenet_sample_rows
from tools._convert.images import FFCV_MIN_SIDE, BadImage, decode, fit_within, jpeg_frame

MAX_RES = 256
SHARD = "512KiB"
CONVERT = [sys.executable, str(REPO / "tools/convert.py")]


# ------------------------------------------------------------------------------------------------ helpers


def plant_files(root: Path) -> dict[str, tuple[Path, int | None]]:
    """Odd-but-valid and broken files in the train class folders: name -> (path, label or None if skipped)."""
    train = root / "train"
    classes = sorted(p.name for p in train.iterdir())
    real = sorted((train / classes[0]).iterdir())[0].read_bytes()
    planted = {}

    def put(index: int, name: str, data: bytes, good: bool) -> None:
        path = train / classes[index] / name
        path.write_bytes(data)
        planted[name] = (path, index if good else None)

    def jpeg(image: Image.Image, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", **kwargs)
        return buffer.getvalue()

    put(1, "bad_truncated.JPEG", real[: len(real) // 2], False)
    put(2, "bad_empty.JPEG", b"", False)
    put(3, "bad_text.JPEG", b"this is not an image\n", False)
    gradient = np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(gradient).save(png, "PNG")
    put(4, "odd_png.JPEG", png.getvalue(), True)
    put(5, "odd_cmyk.JPEG", jpeg(Image.open(io.BytesIO(real)).convert("CMYK"), quality=95), True)
    put(6, "odd_1px.JPEG", jpeg(Image.new("RGB", (1, 1), (200, 30, 60)), quality=95), True)
    yy, xx = np.mgrid[0:3750, 0:5000]
    big = np.stack([xx * 255 // 5000, yy * 255 // 3750, (xx + yy) * 255 // 8750], -1).astype(np.uint8)
    put(7, "odd_5000px.JPEG", jpeg(Image.fromarray(big), quality=90), True)
    rotated = Image.open(io.BytesIO(real))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    put(8, "odd_exif6.JPEG", jpeg(rotated, quality=95, exif=exif.tobytes()), True)
    (train / classes[9] / "notes.txt").write_text("not a sample\n")
    return planted


def expected_samples(root: Path, max_res: int | None) -> list[tuple[Path, int, np.ndarray]]:
    """(path, label, RGB pixels after the documented resize) of every good train file, in ImageFolder order."""
    train = root / "train"
    out = []
    for label, wnid in enumerate(sorted(p.name for p in train.iterdir())):
        for path in sorted((train / wnid).iterdir()):
            if path.suffix != ".JPEG" or path.name.startswith("bad_"):
                continue
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            w, h = image.size
            if max_res and max(w, h) > max_res:
                s = max_res / max(w, h)
                image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
            out.append((path, label, np.asarray(image)))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def convert(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CONVERT, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False
    )


def dali_read(split_dir: Path) -> tuple[list[np.ndarray], list[int]]:
    """Every sample of a split's webdataset shards through a real DALI CPU pipeline (reader + decoder)."""
    from nvidia.dali import fn, pipeline_def, types

    tars = sorted(split_dir.glob("shard-*.tar"))

    @pipeline_def(batch_size=16, num_threads=2, device_id=None)
    def pipeline():
        jpegs, cls = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["jpg", "cls"], random_shuffle=False, pad_last_batch=True, name="reader",
        )  # fmt: skip
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), cls

    pipe = pipeline()
    pipe.build()
    size = pipe.epoch_size("reader")
    images, labels = [], []
    while len(labels) < size:
        batch_images, batch_labels = pipe.run()
        for i in range(min(16, size - len(labels))):
            images.append(np.array(batch_images.at(i)))
            labels.append(int(bytes(np.asarray(batch_labels.at(i))).decode()))
    return images, labels


def ffcv_read(beton: Path) -> tuple[list[np.ndarray], list[int], list[int]]:
    """(pixels, labels, modes) of every sample, read with FFCV's Reader and decoded by its own libffcv imdecode."""
    import_ffcv()  # keeps torch's thread count
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    meta = reader.metadata
    image_col = meta[f"f{reader.field_names.index('image')}"]
    label_col = meta[f"f{reader.field_names.index('label')}"]
    sizes = {int(p): int(s) for p, s in zip(reader.alloc_table["ptr"], reader.alloc_table["size"])}
    data = np.memmap(beton, np.uint8, mode="r")
    images, modes = [], []
    for field in image_col:
        ptr, h, w = int(field["data_ptr"]), int(field["height"]), int(field["width"])
        raw = np.asarray(data[ptr : ptr + sizes[ptr]])
        if field["mode"] == 0:  # jpg
            out = np.zeros((h, w, 3), np.uint8)
            imdecode(raw, out, h, w, h, w, 0, 0, 1, 1, False, False)
        else:
            out = raw.reshape(h, w, 3)
        images.append(out)
        modes.append(int(field["mode"]))
    return images, [int(v) for v in label_col], modes


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    root = build_imagefolder(tmp_path_factory.mktemp("convert-src"), splits=("train",))
    return root, plant_files(root)


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory) -> Path:
    """The uninterrupted reference conversion: both formats, FFCV proportion (raw and JPEG pages)."""
    out = tmp_path_factory.mktemp("convert-out")
    run = convert(
        "imagenet", "--src", str(tree[0]), "--out", str(out), "--split", "train", "--format", "both",
        "--max-res", str(MAX_RES), "--write-mode", "proportion", "--shard-size", SHARD, "--workers", "2",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "converted imagenet" in run.stdout and "skipped 4" in run.stdout, run.stdout
    return out


# -------------------------------------------------------------------------------------------------- tests


def test_image_rules_unit():
    assert fit_within((5000, 3750), 256) == (256, 192) and fit_within((100, 80), 256) == (100, 80)
    assert fit_within((4000, 1), 256) == (256, 1)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG", progressive=True)
    assert jpeg_frame(buffer.getvalue())[:3] == (0xC2, 8, 3)
    sixteen = io.BytesIO()
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(sixteen, "PNG")
    assert decode(sixteen.getvalue()).image.getpixel((0, 0)) == (156, 156, 156)  # 40000 >> 8, not clipped
    with pytest.raises(BadImage, match="empty"):
        decode(b"")


def test_validation_at_one_eighth_scale_judges_like_a_full_decode(tree):
    """DALI copy mode validates plain JPEGs with a 1/8-scale decode (``pixels=False``): the same verdict, size and
    plainness as a full decode on every planted file (truncated, empty, text, PNG, CMYK, 1 px, 5000 px, EXIF) and
    on real sample JPEGs; files that need their pixels are decoded fully either way."""
    files = sorted(p for p in (tree[0] / "train").rglob("*.JPEG") if p.name.startswith(("bad_", "odd_")))
    files += sorted((tree[0] / "train").rglob("*.JPEG"))[:12]
    assert len(files) >= 20
    for path in files:
        data = path.read_bytes()
        outcomes = []
        for pixels in (True, False):
            try:
                decoded = decode(data, None, pixels=pixels)
                outcomes.append((decoded.plain_jpeg, decoded.source_size, decoded.image is None))
            except BadImage as error:
                outcomes.append(str(error))
        full, scaled = outcomes
        if isinstance(full, str) or not full[0]:  # a bad file, or one whose pixels are needed: same outcome
            assert scaled == full, path.name
        else:  # a plain JPEG: same size, no pixels decoded at full scale
            assert scaled == (True, full[1], True), path.name


@pytest.mark.timeout(300)
def test_manifest_lists_counts_classes_and_skipped(tree, converted):
    root, planted = tree
    expected = expected_samples(root, MAX_RES)
    for fmt in ("dali", "ffcv"):
        manifest = json.loads((converted / fmt / "manifest.json").read_text())
        assert manifest["format"] == fmt and manifest["counts"] == {"train": len(expected)} == {"train": 107}
        labels = [label for _, label, _ in expected]
        assert manifest["per_class"]["train"] == {str(k): labels.count(k) for k in sorted(set(labels))}
        rows = {r["wnid"]: r["name"] for r in imagenet_sample_rows()}
        assert [c["wnid"] for c in manifest["classes"]] == sorted(rows)
        assert [c["index"] for c in manifest["classes"]] == list(range(len(rows)))
        reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
        assert set(reasons) == {"bad_truncated.JPEG", "bad_empty.JPEG", "bad_text.JPEG", "notes.txt"}
        assert "truncated" in reasons["bad_truncated.JPEG"] and "empty" in reasons["bad_empty.JPEG"]
        for record in manifest["files"]:
            path = converted / fmt / record["path"]
            assert path.stat().st_size == record["bytes"]
        assert not list((converted / fmt).rglob("*.tmp"))
    assert all(planted[n][1] is not None for n in planted if n.startswith("odd_"))


@pytest.mark.timeout(300)
def test_dali_shards_round_trip(tree, converted):
    expected = expected_samples(tree[0], MAX_RES)
    images, labels = dali_read(converted / "dali" / "train")
    assert labels == [label for _, label, _ in expected]
    plain = 0
    for (path, _, want), got in zip(expected, images):
        assert got.shape == want.shape, path.name
        stored_as_is = path.name == "odd_1px.JPEG" or not path.name.startswith("odd_")
        kept = stored_as_is and max(Image.open(path).size) <= MAX_RES
        plain += kept
        assert psnr(got, want) >= (40 if kept else 27), (path.name, psnr(got, want))
    manifest = json.loads((converted / "dali" / "manifest.json").read_text())
    assert manifest["reencoded"]["train"] == len(expected) - plain


@pytest.mark.timeout(120)
def test_dali_shard_bytes_index_and_headers(tree, converted):
    from wds2idx import IndexCreator

    root, planted = tree
    shards = sorted((converted / "dali" / "train").glob("shard-*.tar"))
    assert len(shards) > 3
    members = {}
    for shard in shards:
        reference = shard.with_suffix(".ref")
        with IndexCreator(str(shard), str(reference), verbose=False) as creator:
            creator.create_index()
        assert reference.read_bytes() == shard.with_suffix(".idx").read_bytes()  # DALI's own wds2idx output
        reference.unlink()
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                assert (info.mtime, info.uid, info.gid, info.uname, info.mode) == (0, 0, 0, "", 0o644)
                members[info.name] = tar.extractfile(info).read()
    keys = sorted({name.split(".")[0] for name in members})
    assert keys == [f"{i:08d}" for i in range(107)]
    expected = expected_samples(root, MAX_RES)
    small_plain = [i for i, (p, _, _) in enumerate(expected) if p.name == "odd_1px.JPEG"]
    small_plain += [
        i for i, (p, _, _) in enumerate(expected) if not p.name.startswith("odd_") and max(Image.open(p).size) < 200
    ]
    for i in small_plain:  # a plain JPEG that needs no resize is stored as the source bytes
        assert members[f"{i:08d}.jpg"] == expected[i][0].read_bytes()
        assert members[f"{i:08d}.cls"] == str(expected[i][1]).encode()
    cmyk = next(i for i, (p, _, _) in enumerate(expected) if p.name == "odd_cmyk.JPEG")
    assert Image.open(io.BytesIO(members[f"{cmyk:08d}.jpg"])).mode == "RGB"


@pytest.mark.timeout(300)
def test_ffcv_round_trip_raw_exact_jpeg_bounded(tree, converted):
    expected = expected_samples(tree[0], MAX_RES)
    images, labels, modes = ffcv_read(converted / "ffcv" / "train.beton")
    assert labels == [label for _, label, _ in expected]
    assert 0 < sum(m == 0 for m in modes) < len(modes), "proportion mode should store some JPEG, some raw"
    for (path, _, want), got, mode in zip(expected, images, modes):
        height, width = want.shape[:2]
        if min(height, width) < FFCV_MIN_SIDE:  # stored enlarged (nearest) so that FFCV's crop decoders can read it
            size = (max(width, FFCV_MIN_SIDE), max(height, FFCV_MIN_SIDE))
            want = np.asarray(Image.fromarray(want).resize(size, Image.Resampling.NEAREST))
        assert got.shape == want.shape, path.name
        if mode == 1:  # raw
            assert np.array_equal(got, want), path.name
        else:
            assert psnr(got, want) >= 27, (path.name, psnr(got, want))


@pytest.mark.timeout(300)
def test_ffcv_loader_reads_every_planted_sample(tree, converted):
    """The real FFCV loader decodes the whole converted tree, 1-px and 5000-px images included (no abort)."""
    from loaders import build_loader
    from loaders.base import LoaderSpec

    spec = LoaderSpec("imagenet", "train", batch_size=16, train=False, data_dir=str(converted), workers=1)
    loader = build_loader("ffcv", spec)
    labels = torch.cat([y.clone() for _, y in loader])
    assert labels.tolist() == [label for _, label, _ in expected_samples(tree[0], MAX_RES)]


@pytest.mark.timeout(420)
def test_kill_minus_9_then_rerun_matches_uninterrupted(tree, converted, tmp_path):
    out = tmp_path / "out"
    args = [
        "imagenet", "--src", str(tree[0]), "--out", str(out), "--split", "train", "--format", "both",
        "--max-res", str(MAX_RES), "--write-mode", "proportion", "--shard-size", SHARD, "--workers", "2",
    ]  # fmt: skip
    process = subprocess.Popen([*CONVERT, *args], cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    third = out / "dali" / "train" / "shard-00002.tar"
    deadline = time.monotonic() + 180
    while not third.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert third.exists(), "the conversion never reached its third shard"
    assert not (out / "dali" / "manifest.json").exists() and not (out / "ffcv" / "manifest.json").exists()
    first = out / "dali" / "train" / "shard-00000.tar"
    first_mtime = first.stat().st_mtime_ns
    rerun = convert(*args, "--verify", timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "verify: PASS" in rerun.stdout.splitlines()[-1]
    assert first.stat().st_mtime_ns == first_mtime, "a finished shard was rewritten instead of kept"
    want = json.loads((converted / "dali" / "manifest.json").read_text())
    got = json.loads((out / "dali" / "manifest.json").read_text())
    assert got == want  # counts, class map, skipped, and every shard's size and sha256
    for record in want["files"]:
        assert (out / "dali" / record["path"]).read_bytes() == (converted / "dali" / record["path"]).read_bytes()
    ffcv_want = json.loads((converted / "ffcv" / "manifest.json").read_text())
    ffcv_got = json.loads((out / "ffcv" / "manifest.json").read_text())
    assert ffcv_got == ffcv_want  # FFCV files are deterministic too: the same bytes, so the same sha256
    assert (out / "ffcv" / "train.beton").read_bytes() == (converted / "ffcv" / "train.beton").read_bytes()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_ffcv_worker_failure_fails_fast_instead_of_hanging(tree, tmp_path, fault):
    """A worker that raises or is killed while preparing FFCV samples: a clear error within seconds, nothing that
    looks finished."""
    env = dict(os.environ, DIVNORM_CONVERT_FAULT=f"{fault}:5")
    started = time.monotonic()
    run = convert("imagenet", "--src", str(tree[0]), "--out", str(tmp_path), "--split", "train", "--format", "ffcv",
                  "--subset", "16", "--write-mode", "raw", "--workers", "2", env=env, timeout=150)  # fmt: skip
    assert run.returncode == 2, run.stderr
    want = "planted fault at source file 5" if fault == "raise" else "worker process died"
    assert run.stderr.startswith("error: ") and want in run.stderr, run.stderr
    assert time.monotonic() - started < 60
    assert sorted(p.name for p in (tmp_path / "ffcv").iterdir()) == [".convert-state"], "nothing may look finished"
    assert not list(tmp_path.rglob("*.beton*"))


@pytest.mark.timeout(180)
def test_ffcv_bytes_do_not_depend_on_the_worker_count(tree, converted, tmp_path):
    """One writer in source order: the .beton written by 1 worker is byte-identical to the 2-worker reference."""
    run = convert(
        "imagenet", "--src", str(tree[0]), "--out", str(tmp_path), "--split", "train", "--format", "ffcv",
        "--max-res", str(MAX_RES), "--write-mode", "proportion", "--workers", "1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "ffcv" / "train.beton").read_bytes() == (converted / "ffcv" / "train.beton").read_bytes()
    got = json.loads((tmp_path / "ffcv" / "manifest.json").read_text())
    want = json.loads((converted / "ffcv" / "manifest.json").read_text())
    assert got["files"] == want["files"] and got["skipped"] == want["skipped"]


@pytest.mark.timeout(180)
def test_ffcv_without_max_res_sizes_pages_for_the_largest_image(tmp_path):
    """``--max-res 0`` keeps every picture whole: a size pass finds the largest, FFCV's pages grow to hold it,
    and the raw samples come back exactly."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src" / "train" / "n0001"
    src.mkdir(parents=True)
    pictures = {"a.JPEG": (1800, 1200), "b.JPEG": (40, 30), "c.JPEG": (300, 200)}  # 1800x1200 raw: 6.5 MB
    for name, (width, height) in pictures.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).save(src / name, quality=90)
    run = convert("imagenet", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--split", "train",
                  "--format", "ffcv", "--max-res", "0", "--write-mode", "raw", "--workers", "2")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    beton = tmp_path / "out" / "ffcv" / "train.beton"
    import_ffcv()
    from ffcv.reader import Reader

    assert Reader(str(beton)).page_size == 16 << 20  # a JPEG of it may take up to 2x raw: 13 MB, next power of 2
    images, labels, modes = ffcv_read(beton)
    assert labels == [0, 0, 0] and modes == [1, 1, 1]
    for name, got in zip(sorted(pictures), images):
        assert np.array_equal(got, np.asarray(Image.open(src / name).convert("RGB"))), name


@pytest.mark.timeout(60)
def test_decode_worker_death_fails_fast_instead_of_hanging(tree, monkeypatch):
    """A decode worker killed mid-chunk (OOM killer, a decoder crash) fails the conversion within seconds."""
    from tools._convert import pool
    from tools._convert.sources import ConvertError

    real = pool.process_file
    monkeypatch.setattr(pool, "process_file", lambda index: os._exit(9) if index == 20 else real(index))
    paths = sorted(str(p) for p in (tree[0] / "train").rglob("*.JPEG"))[:48]
    started = time.monotonic()
    with pytest.raises(ConvertError, match="worker process died"):
        list(pool.decode_files(paths, [0] * len(paths), 0, 2, pool.Payload("dali", None, 90)))
    assert time.monotonic() - started < 30
    # the same pool, undisturbed and under a parent SIGTERM handler like convert.main's, finishes in order
    monkeypatch.setattr(pool, "process_file", real)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results = list(pool.decode_files(paths, [0] * len(paths), 0, 2, None))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [r.index for r in results] == list(range(len(paths)))


@pytest.mark.timeout(120)
def test_strict_stops_and_names_the_file(tree, tmp_path):
    run = convert("imagenet", "--src", str(tree[0]), "--out", str(tmp_path), "--split", "train", "--format", "dali",
                  "--strict", "--workers", "1")  # fmt: skip
    assert run.returncode == 2 and "bad_truncated.JPEG" in run.stderr and "--strict" in run.stderr, run.stderr
    assert not (tmp_path / "dali" / "manifest.json").exists()


def test_clear_messages_for_user_mistakes(tmp_path, capsys):
    from tools.convert import main

    assert main(["imagenet", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["imagenet", "--out", str(tmp_path / "o")]) == 2
    assert "needs --src" in capsys.readouterr().err
    (tmp_path / "src" / "train" / "n0001").mkdir(parents=True)
    assert main(["imagenet", "--src", str(tmp_path / "src"), "--split", "train", "--out", str(tmp_path / "o")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["synthetic", "--out", str(tmp_path / "o"), "--split", "nope"]) == 2
    assert "unknown split" in capsys.readouterr().err
    assert main(["synthetic", "--out", str(tmp_path / "nothing"), "--verify-only"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_synthetic_arrays_both_formats(tmp_path):
    from loaders.datasets import synthetic_arrays

    run = convert("synthetic", "--out", str(tmp_path), "--split", "val", "--subset", "64", "--format", "both",
                  "--workers", "2")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    images, labels = synthetic_arrays("val")
    assert np.array_equal(np.load(tmp_path / "dali" / "val" / "images.npy"), images[:64])
    assert np.array_equal(np.load(tmp_path / "dali" / "val" / "labels.npy"), labels[:64])
    got, got_labels, modes = ffcv_read(tmp_path / "ffcv" / "val.beton")
    assert set(modes) == {1} and got_labels == labels[:64].tolist()
    assert all(np.array_equal(a, b) for a, b in zip(got, images[:64]))
    manifest = json.loads((tmp_path / "dali" / "manifest.json").read_text())
    assert manifest["layout"] == "arrays" and manifest["counts"] == {"val": 64}
    rerun = convert("synthetic", "--out", str(tmp_path), "--split", "val", "--subset", "64", "--format", "dali",
                    "--verify")  # fmt: skip
    assert rerun.returncode == 0 and "verify: PASS" in rerun.stdout, rerun.stdout + rerun.stderr


def test_empty_class_folder_keeps_indices_and_says_so(tmp_path):
    from tools._convert.sources import load_sources

    for wnid in ("n001", "n002", "n003"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
    for wnid in ("n001", "n003"):
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / wnid / "a.JPEG")
    (tmp_path / "LABELS.tsv").write_text("file\twnid\timagenet_index\tname\na.JPEG\tn003\t2\tthird\n")
    sources, classes = load_sources("imagenet", tmp_path, "train", None, False)
    assert sources[0].labels == [0, 2] and [c["wnid"] for c in classes] == ["n001", "n002", "n003"]
    assert classes[2]["name"] == "third" and classes[1]["name"] == "n002"
    assert any("n002" in note and "no images" in note for note in sources[0].notes)


@pytest.mark.parametrize(
    "option, value",
    [("--max-res", "-5"), ("--compress-prob", "1.5"), ("--compress-prob", "nan"), ("--jpeg-quality", "0"),
     ("--jpeg-quality", "101"), ("--workers", "0"), ("--shard-size", "0"), ("--subset", "0"),
     ("--stall-timeout", "-1")],
)  # fmt: skip
def test_numeric_options_out_of_range_are_refused(tree, tmp_path, capsys, option, value):
    """A value out of range is a one-line user error before anything is written (``--max-res -5`` used to write
    every image as 1x1 and exit 0)."""
    from tools.convert import main

    out = tmp_path / "out"
    args = ["imagenet", "--src", str(tree[0]), "--out", str(out), "--split", "train", "--format", "dali"]
    assert main([*args, option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} must be") and err.count("\n") == 1, err
    assert not out.exists()


def _small_source(root: Path, splits=("train",)) -> Path:
    """``root/<split>/<wnid>/`` holding 3 real sample JPEGs, one per class."""
    rows = imagenet_sample_rows()[:3]
    for split in splits:
        for row in rows:
            (root / split / row["wnid"]).mkdir(parents=True, exist_ok=True)
            (root / split / row["wnid"] / row["file"]).write_bytes((imagenet_sample_dir() / row["file"]).read_bytes())
    return root


def test_out_and_source_may_not_overlap(tmp_path, capsys):
    """An ``--out`` inside the source tree used to become a 103rd class (its files listed as skipped images); a
    source inside ``--out``, the same folder, or a link into the tree are refused too, naming both folders."""
    from tools.convert import main

    src = _small_source(tmp_path / "src")
    (tmp_path / "link").symlink_to(src / "train")
    outer = tmp_path / "outer"
    nested = _small_source(outer / "data")
    cases = [
        (src, src / "train" / "zconv", "is inside --src"),
        (src, tmp_path / "link" / "zconv", "is inside --src"),
        (src, src, "is the --src folder"),
        (nested, outer, "is inside --out"),
    ]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for source, out, says in cases:
        assert main(["imagenet", "--src", str(source), "--out", str(out), "--format", "dali", "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert says in err and str(source) in err and str(out) in err and err.count("\n") == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    # beside the tree is fine, and the same folder name elsewhere is not mistaken for it
    assert main(["imagenet", "--src", str(src), "--out", str(tmp_path / "src-conv"), "--format", "dali",
                 "--split", "train", "--workers", "1"]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "src-conv" / "dali" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 3} and manifest["skipped"] == [] and len(manifest["classes"]) == 3


def test_out_that_is_a_file_is_a_user_error(tmp_path, capsys):
    from tools.convert import main

    src = _small_source(tmp_path / "src")
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    for out, says in ((afile, f"--out {afile} is a file, not a folder"), (afile / "sub", f"{afile} is a file")):
        assert main(["imagenet", "--src", str(src), "--out", str(out), "--format", "dali", "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Errno" not in err and err.count("\n") == 1, err
        assert main(["imagenet", "--out", str(out), "--verify-only"]) == 2
        assert says in capsys.readouterr().err
    assert afile.read_text() == "keep me\n"


@pytest.mark.timeout(300)
def test_splits_converted_one_at_a_time_share_one_manifest(imagenet_tree, tmp_path, capsys, monkeypatch):
    """``--split train`` then ``--split val`` (both formats) leave the manifest one run of both splits writes, so
    ``--verify-only`` checks train too; different settings for the second split are refused, changing nothing;
    the loaders refuse a split folder the manifest does not list."""
    from loaders.base import LoaderSpec
    from loaders.dali_sources import open_source
    from loaders.errors import LoaderError
    from loaders.ffcv import converted_beton
    from tools._convert.pool import FAULT_ENV
    from tools.convert import main

    common = ["--src", str(imagenet_tree), "--format", "both", "--max-res", "64", "--subset", "12", "--workers", "2"]
    whole, apart = tmp_path / "whole", tmp_path / "apart"
    assert main(["imagenet", "--out", str(whole), *common]) == 0
    assert main(["imagenet", "--out", str(apart), *common, "--split", "train"]) == 0
    # a split folder outside the manifest (a conversion still running, or killed) is not read
    shutil.copytree(apart / "dali" / "train", apart / "dali" / "val")
    shutil.copyfile(apart / "ffcv" / "train.beton", apart / "ffcv" / "val.beton")
    spec = LoaderSpec("imagenet", "val", batch_size=4, train=False, data_dir=str(apart), workers=1)
    for read in (open_source, converted_beton):
        with pytest.raises(LoaderError, match="not listed in"):
            read(spec)
    shutil.rmtree(apart / "dali" / "val")
    (apart / "ffcv" / "val.beton").unlink()
    # a val run that fails part-way keeps train listed as it was (the manifest then lists the finished splits)
    train_only = {fmt: (apart / fmt / "manifest.json").read_bytes() for fmt in ("dali", "ffcv")}
    monkeypatch.setenv(FAULT_ENV, "raise:3")
    assert main(["imagenet", "--out", str(apart), *common, "--split", "val"]) == 2
    assert "planted fault" in capsys.readouterr().err
    assert {fmt: (apart / fmt / "manifest.json").read_bytes() for fmt in ("dali", "ffcv")} == train_only
    monkeypatch.delenv(FAULT_ENV)
    assert main(["imagenet", "--out", str(apart), *common, "--split", "val"]) == 0
    capsys.readouterr()
    for fmt in ("dali", "ffcv"):
        got, want = (json.loads((root / fmt / "manifest.json").read_text()) for root in (apart, whole))
        assert got["counts"] == {"train": 12, "val": 12} and got == want
    # another --max-res for val alone would leave train unlisted (or listed with the wrong settings): refused
    kept = {fmt: (apart / fmt / "manifest.json").read_bytes() for fmt in ("dali", "ffcv")}
    assert main(["imagenet", "--out", str(apart), *common, "--split", "val", "--max-res", "96"]) == 2
    err = capsys.readouterr().err
    assert "already holds split(s) train" in err and "max_res 64 -> 96" in err and err.count("\n") == 1, err
    assert {fmt: (apart / fmt / "manifest.json").read_bytes() for fmt in ("dali", "ffcv")} == kept
    # --verify-only now reads train too: a truncated train shard fails it
    shard = apart / "dali" / "train" / "shard-00000.tar"
    os.truncate(shard, shard.stat().st_size // 2)
    assert main(["imagenet", "--out", str(apart), "--format", "dali", "--verify-only", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "verify: FAIL" in out and "train/shard-00000.tar" in out, out
