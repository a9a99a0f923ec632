"""Fuzzed inputs: corrupted real JPEGs through tools/convert.py and the torch loader; fuzzed config overrides.

The JPEG corpus is built from real ImageNet sample files with a seeded generator: bit flips and truncations in the
header (APPn / DQT / SOF), in the Huffman tables (DHT) and in the entropy-coded data, wrong markers, bad segment
lengths, and absurd frame sizes (1 x 60000, 60000 x 1, 60000 x 60000, 0 x 0) written into real and tiny files.
Every file must come out either converted or listed as skipped with a reason, in both formats alike, with no worker
crash or hang (the conversion runs under a time limit and ``--verify`` reads every stored sample back with the
real DALI / FFCV readers). The torch loader must read each file or fail with a one-line error naming it.
Config overrides are fuzzed against the real schema: every one gives a resolved config or one ``error:`` line
with exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, imagenet_sample_dir, imagenet_sample_rows
from tools._convert.images import BadImage, decode

SEED = 20260421
SOURCES = 6  # real sample JPEGs that get corrupted (each gives ~18 variants)
CONVERT = [sys.executable, str(REPO / "tools/convert.py")]


# ------------------------------------------------------------------------------------------- JPEG structure


def jpeg_layout(data: bytes) -> tuple[list[tuple[int, int, int]], int, int]:
    """(segments as (marker, start, end) up to and including SOS, entropy data start, entropy data end).

    ``start`` is the offset of the segment's 0xFF, ``end`` the offset just past its payload; the entropy-coded
    data runs from the end of the SOS header to the final EOI (progressive files: all later scans included).
    """
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    segments, i = [], 2
    while True:
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segments.append((marker, i, i + 2 + length))
        i += 2 + length
        if marker == 0xDA:
            break
    end = data.rindex(b"\xff\xd9")
    return segments, i, end


def _flip(data: bytes, positions: list[int], rng: random.Random) -> bytes:
    out = bytearray(data)
    for position in positions:
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def _with_frame_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF header claiming ``width`` x ``height`` (the data stay those of the real size)."""
    segments, _, _ = jpeg_layout(data)
    sof = next(start for marker, start, _ in segments if 0xC0 <= marker <= 0xC2)
    out = bytearray(data)
    out[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    out[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(out)


def corrupted_variants(data: bytes, rng: random.Random) -> dict[str, bytes]:
    """Seeded corruptions of one real JPEG: name -> bytes."""
    segments, scan, end = jpeg_layout(data)
    header = range(2, segments[-1][1])  # everything before the SOS marker
    dht = [(start, stop) for marker, start, stop in segments if marker == 0xC4]
    sof = next((start, stop) for marker, start, stop in segments if 0xC0 <= marker <= 0xC2)
    dqt = next((start, stop) for marker, start, stop in segments if marker == 0xDB)
    table = dht[rng.randrange(len(dht))]
    variants = {
        "header_flip1": _flip(data, [rng.choice(header)], rng),
        "header_flip8": _flip(data, rng.sample(header, 8), rng),
        "header_trunc": data[: rng.randrange(2, segments[-1][1])],
        "sof_flip": _flip(data, [rng.randrange(sof[0] + 4, sof[1])], rng),
        "dht_flip": _flip(data, rng.sample(range(table[0] + 4, table[1]), 3), rng),
        "dht_trunc": data[: rng.randrange(table[0] + 4, table[1])],
        # code-length counts far above 256 codes: an impossible Huffman table
        "dht_counts": data[: table[0] + 5] + b"\xff" * 16 + data[table[0] + 21 :],
        "dht_removed": data[: table[0]] + data[table[1] :],
        "ecs_flip1": _flip(data, [rng.randrange(scan, end)], rng),
        "ecs_flip64": _flip(data, rng.sample(range(scan, end), 64), rng),
        "ecs_trunc_early": data[: scan + (end - scan) // 20],
        "ecs_trunc_late": data[: rng.randrange(scan + (end - scan) // 2, end)],
        "ecs_zeros": data[:scan] + bytes(end - scan) + data[end:],
        "no_eoi": data[:end],
        # the SOF marker turned into lossless (C3), arithmetic-coded (C9) and JPEG-LS (F7) frames
        "sof_lossless": data[: sof[0] + 1] + b"\xc3" + data[sof[0] + 2 :],
        "sof_arithmetic": data[: sof[0] + 1] + b"\xc9" + data[sof[0] + 2 :],
        "sof_jpegls": data[: sof[0] + 1] + b"\xf7" + data[sof[0] + 2 :],
        "marker_random": _flip(data, [rng.choice(segments[:-1])[1] + 1], rng),
        "dqt_length_zero": data[: dqt[0] + 2] + b"\x00\x00" + data[dqt[0] + 4 :],
        "dqt_length_huge": data[: dqt[0] + 2] + b"\xff\xff" + data[dqt[0] + 4 :],
        "size_1x60000": _with_frame_size(data, 1, 60000),
        "size_60000x60000": _with_frame_size(data, 60000, 60000),
    }
    # keep a seeded share of the variants per source, so the corpus stays small but covers every kind over sources
    names = sorted(variants)
    keep = set(rng.sample(names, 16)) | {"size_1x60000", "size_60000x60000", "ecs_flip1", "dht_counts"}
    return {name: variants[name] for name in names if name in keep}


def tiny_jpeg_variants() -> dict[str, bytes]:
    """A real 8x8 JPEG (a few hundred bytes) claiming absurd frame sizes."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (30, 120, 200)).save(buffer, "JPEG", quality=90)
    tiny = buffer.getvalue()
    sizes = {"1x60000": (1, 60000), "60000x1": (60000, 1), "60000x60000": (60000, 60000), "0x0": (0, 0),
             "65535x65535": (65535, 65535)}  # fmt: skip
    return {f"tiny_{name}": _with_frame_size(tiny, *size) for name, size in sizes.items()}


def build_corpus(root: Path) -> dict[Path, str]:
    """``root/train/<wnid>/<file>``: the corrupted variants and the untouched sources; path -> variant kind."""
    rng = random.Random(SEED)
    rows = rng.sample(sorted(imagenet_sample_rows(), key=lambda r: r["file"]), SOURCES)
    corpus: dict[Path, str] = {}
    for row in rows:
        data = (imagenet_sample_dir() / row["file"]).read_bytes()
        folder = root / "train" / row["wnid"]
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(row["file"]).stem
        for name, variant in {"original": data, **corrupted_variants(data, rng)}.items():
            path = folder / f"{stem}__{name}.JPEG"
            path.write_bytes(variant)
            corpus[path] = name
    folder = root / "train" / rows[0]["wnid"]
    for name, variant in tiny_jpeg_variants().items():
        path = folder / f"{name}.JPEG"
        path.write_bytes(variant)
        corpus[path] = name
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[Path, str]]:
    root = tmp_path_factory.mktemp("fuzz-jpeg")
    return root, build_corpus(root)


def test_corpus_is_seeded_and_covers_every_kind(corpus, tmp_path):
    root, files = corpus
    again = build_corpus(tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in again) == sorted(p.relative_to(root) for p in files)
    assert all(p.read_bytes() == (root / p.relative_to(tmp_path)).read_bytes() for p in again)
    kinds = set(files.values())
    assert {"original", "size_1x60000", "size_60000x60000", "tiny_60000x60000", "ecs_flip1", "dht_counts"} <= kinds
    assert any(k.startswith("header_") for k in kinds) and any(k.startswith("dht_") for k in kinds)
    assert any(k.startswith("ecs_") for k in kinds) and any(k.startswith("sof_") for k in kinds)


# ---------------------------------------------------------------------------------------------- conversion


def _convert(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*CONVERT, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)


def _outcome(out: Path, fmt: str, files: dict[Path, str]) -> tuple[set[str], dict[str, str]]:
    """(converted file names, skipped file name -> reason) from a format's manifest."""
    manifest = json.loads((out / fmt / "manifest.json").read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    names = {p.name for p in files}
    assert set(skipped) <= names
    converted = names - set(skipped)
    assert manifest["counts"]["train"] == len(converted), f"{fmt}: counts do not add up"
    return converted, skipped


@pytest.mark.timeout(600)
def test_corrupted_jpegs_convert_or_skip_with_a_reason(corpus, tmp_path):
    """Every corrupted file is converted or skipped with a reason; both formats agree; no crash, no hang."""
    from loaders.ffcv_import import import_ffcv

    root, files = corpus
    formats = ["dali"]
    try:
        import_ffcv()
        formats.append("ffcv")
    except Exception:  # noqa: BLE001 - FFCV not installed: DALI only
        pass
    outcomes = {}
    for fmt in formats:
        # DALI keeps each plain JPEG's own bytes (no --max-res), so its decoder meets every accepted corruption
        extra = ["--max-res", "64"] if fmt == "ffcv" else []
        run = _convert("imagenet", "--src", str(root), "--out", str(tmp_path), "--split", "train", "--format", fmt,
                       "--workers", "2", "--shard-size", "256KiB", "--verify", *extra, timeout=280)  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert "verify: PASS" in run.stdout and "Traceback" not in run.stderr, run.stdout + run.stderr
        outcomes[fmt] = _outcome(tmp_path, fmt, files)
    converted, skipped = outcomes["dali"]
    for fmt, (other_converted, other_skipped) in outcomes.items():
        assert other_converted == converted, f"{fmt} and dali disagree: {sorted(other_converted ^ converted)}"
        assert all(reason.strip() for reason in other_skipped.values())
    originals = {p.name for p, kind in files.items() if kind == "original"}
    assert originals <= converted  # untouched sources always convert
    absurd = {p.name for p, kind in files.items() if "60000x60000" in kind or "65535" in kind or kind == "tiny_0x0"}
    assert absurd <= set(skipped), sorted(absurd - set(skipped))
    print(
        f"\nfuzz corpus: {len(files)} files ({len(files) - len(originals)} corrupted), formats {'+'.join(formats)}: "
        f"converted {len(converted) - len(originals)} corrupted (+{len(originals)} originals), skipped {len(skipped)}"
    )
    for name, reason in sorted(skipped.items()):
        print(f"  skipped {name}: {reason}")


def test_torch_loader_reads_or_names_the_file(corpus):
    """Each corpus file through the torch loader's dataset: a picture, or one LoaderError line naming the file."""
    from loaders import LoaderError, LoaderSpec, build_loader

    root, files = corpus
    spec = LoaderSpec("imagenet", "train", batch_size=4, train=True, data_dir=str(root), workers=0, image_size=32)
    loader = build_loader("torch", spec)
    failed = []
    for index, path in enumerate(loader.samples.paths):
        try:
            image, _label = loader.samples[(index, 0)]
        except LoaderError as error:
            message = str(error)
            assert path in message and "\n" not in message and "Traceback" not in message, message
            failed.append(Path(path).name)
            continue
        assert tuple(image.shape) == (32, 32, 3), (path, image.shape)  # uint8 HWC before batching
    originals = {p.name for p, kind in files.items() if kind == "original"}
    assert failed and not originals & set(failed)
    # the loader refuses exactly the files the converter skips (its full decode: the FFCV writer's verdict)
    unusable = set()
    for path in files:
        try:
            decode(path.read_bytes())
        except BadImage:
            unusable.add(path.name)
    assert set(failed) == unusable, sorted(set(failed) ^ unusable)
    print(f"\ntorch loader: {len(files)} files, {len(failed)} refused with a LoaderError naming the file")


@pytest.mark.timeout(120)
def test_torch_loader_workers_fail_with_one_line(corpus, tmp_path):
    """The whole corpus through the DataLoader with 2 workers: one LoaderError line naming a corpus file."""
    from loaders import LoaderError, LoaderSpec, build_loader

    root, files = corpus
    spec = LoaderSpec("imagenet", "train", batch_size=8, train=True, data_dir=str(root), workers=2, image_size=32)
    loader = build_loader("torch", spec)
    try:
        with pytest.raises(LoaderError) as caught:
            for _ in loader:
                pass
    finally:
        loader.close()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert any(str(p) in message for p in files), message


# ------------------------------------------------------------------------------------------ config overrides


def _json_value(rng: random.Random, depth: int = 0) -> str:
    """A random override value as text: JSON of any type (NaN / Infinity too), bare words, broken JSON."""
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return str(rng.choice([0, 1, -1, 2, 7, -(2**31), 2**63, 10**30, 256]))
    if kind == 1:
        return rng.choice(["0.5", "-0.0", "1e308", "1e-320", "NaN", "Infinity", "-Infinity", "3.25", "1e999"])
    if kind == 2:
        return rng.choice(["true", "false", "null", "None", "True", "FALSE", "nan"])
    if kind == 3:
        return rng.choice(["", "abc", "ours", "cosine", "a=b", "'", '"', "\\", "ü", "{", "[", "[1,", "}{", " "])
    if kind == 4:
        return json.dumps(rng.choice(["torch", "gpu", "input_size", "", "x" * 300, "../../etc", "cuda:0"]))
    if kind == 5:
        return rng.choice(["[]", "{}", "[1]", "[0.08, 1.0]", "[1, 2, 3]", '["a", "b"]', "[true, false]", "[null]"])
    if kind in (6, 7):
        items = ", ".join(_json_value(rng, depth + 1) for _ in range(rng.randrange(4)))
        return f"[{items}]"
    keys = ["lr", "type", "relu", "x", "", "divnorm_specs", "p", "1", "a.b", "a-b"]
    items = ", ".join(f"{json.dumps(rng.choice(keys))}: {_json_value(rng, depth + 1)}" for _ in range(rng.randrange(4)))
    return "{" + items + "}"


def _fuzz_key(rng: random.Random, keys: list[str], sections: list[str]) -> str:
    """A random override key: valid, typo'd, too deep, a section, garbage; dotted or dashed."""
    key = rng.choice(keys)
    kind = rng.randrange(7)
    if kind == 1:  # a typo in one part
        parts = key.split(".")
        i = rng.randrange(len(parts))
        word = parts[i]
        j = rng.randrange(len(word) + 1)
        parts[i] = word[:j] + rng.choice("xz_") + word[j + 1 :]
        key = ".".join(parts)
    elif kind == 2:  # deeper than the schema
        key = f"{key}.{rng.choice(['x', 'type', '0', 'lr'])}"
    elif kind == 3:
        key = rng.choice(sections)
    elif kind == 4:
        key = rng.choice(["", ".", "..", "a..b", "model.", ".model", "ü", "model..relu", " ", "data.path.x.y"])
    if rng.random() < 0.3:
        key = key.replace(".", "-")
    return key.lstrip("-")  # a leading dash is an option to argparse, not an override


def fuzzed_overrides(count: int, seed: int = SEED) -> list[list[str]]:
    """``count`` seeded override lists (1-3 items each) built against the real config schema."""
    from train.config import _sections, defaults, flatten

    rng = random.Random(seed)
    schema = flatten(defaults())
    keys, sections = sorted(schema), sorted(_sections(defaults()))
    numeric = [k for k, v in schema.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    numbers = ["0", "-1", "-0.5", "0.5", "1", "3", "1000000", "1e-12", "-1e9", "2.5"]
    cases = []
    for _ in range(count):
        items = []
        for _ in range(rng.randrange(1, 4)):
            roll = rng.random()
            if roll < 0.05:
                items.append(_fuzz_key(rng, keys, sections))  # no '=' at all
            elif roll < 0.45:  # a well-typed number for a numeric key: only its range can be wrong
                items.append(f"{rng.choice(numeric)}={rng.choice(numbers)}")
            else:
                items.append(f"{_fuzz_key(rng, keys, sections)}={_json_value(rng)}")
        cases.append(items)
    return cases


def _build_training_parts(config: dict) -> None:
    """What a run builds from the optimizer / schedule / loss settings before its first step, on a tiny model:
    an accepted config must not fail here with a traceback from torch."""
    import torch
    from torch import nn

    from train.schedule import LrSchedule, build_optimizer

    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, config["optimizer"], float(config["optimizer"]["lr"]))
    schedule = LrSchedule(optimizer, config["lr_scheduler"], float(config["optimizer"]["lr"]), 3, 4)
    criterion = nn.CrossEntropyLoss(label_smoothing=float(config["training"]["label_smoothing"]))
    for step in range(12):
        schedule.step(step)
        loss = criterion(model(torch.ones(4, 3)), torch.tensor([0, 1, 0, 1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    schedule.end_epoch(loss.item())


def test_fuzzed_overrides_give_a_config_or_one_error_line(capsys, tmp_path):
    """300 seeded override lists through the CLI entry point: exit 0 with a JSON config, or exit 2 with exactly
    one ``error:`` line; never an exception (a traceback) or another exit code."""
    from train.__main__ import main

    errors = 0
    for items in fuzzed_overrides(300):
        argv = ["synthetic", "alexnet", "fuzz", *items, f"logging.runs_dir={tmp_path}", "--print-config"]
        try:
            code = main(argv)
        except BaseException as error:  # noqa: BLE001 - any escape is the defect being looked for
            pytest.fail(f"{items!r} raised {type(error).__name__}: {error}")
        out, err = capsys.readouterr()
        if code == 0:
            config = json.loads(out)
            assert isinstance(config, dict) and not err, (items, err)
            try:
                _build_training_parts(config)
            except Exception as error:  # noqa: BLE001 - an accepted config that fails later is the defect
                pytest.fail(f"{items!r} was accepted but building the run failed: {type(error).__name__}: {error}")
            continue
        errors += 1
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (items, code, err)
    assert 100 < errors < 290  # both paths are exercised: refusals and accepted configs that must build
    print(f"\nconfig fuzz: 300 override lists, {errors} one-line errors (exit 2), {300 - errors} valid configs")


@pytest.mark.timeout(120)
def test_fuzzed_overrides_through_a_real_process(tmp_path):
    """A few invalid fuzzed overrides via ``python -m train``: exit 2, one stderr line, no traceback."""
    from train.__main__ import main

    picked = []
    for items in fuzzed_overrides(300, seed=SEED + 1):
        argv = ["synthetic", "alexnet", "fuzz", *items, f"logging.runs_dir={tmp_path}", "--print-config"]
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            if main(argv) == 2:
                picked.append(items)
        if len(picked) == 3:
            break
    for items in picked:  # without --print-config: the run itself must refuse before any work
        argv = [sys.executable, "-m", "train", "synthetic", "alexnet", "fuzz", *items, f"logging.runs_dir={tmp_path}"]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=100, cwd=REPO, check=False)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (items, run.stderr)
        assert "Traceback" not in run.stderr and not (tmp_path / "fuzz").exists()
