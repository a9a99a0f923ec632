"""Where the DALI backend's samples come from: a Python-side index of every sample, read batch by batch.

The DALI loader feeds its pipeline through one batch-mode ``external_source`` whose batches are the exact
index lists of :func:`loaders.base.shard_indices`, so every rank reads the contract's samples in the contract's
order (the same order as the torch backend), whatever the source. A source turns a list of sample indices
into ``(data, labels)``:

* :class:`FileSource` - a plain ImageFolder tree: file names, read by the pipeline (class map of
  :func:`loaders.datasets.imagenet_samples`, identical to torchvision's ImageFolder);
* :class:`TarSource` - the webdataset shards of ``tools/convert.py`` (``<key>.jpg`` + ``<key>.cls``): members
  sliced out of memory-mapped tars at the offsets of the ``.idx`` files (the wds2idx format DALI's
  ``fn.readers.webdataset`` reads), so no tar header is parsed at run time;
* :class:`ArraySource` - uint8 HWC arrays (CIFAR-100 / synthetic), from the tool's ``images.npy`` /
  ``labels.npy`` or straight from :func:`loaders.datasets.array_dataset` (via :mod:`loaders.arrays`).

Nothing here imports DALI: this module is plain numpy and testable anywhere.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loaders.arrays import load_split_arrays, subset_size
from loaders.base import LoaderError, LoaderSpec
from loaders.datasets import dataset_info, imagenet_samples, imagenet_split_dir

CONVERT_HINT = "write it with `python tools/convert.py {dataset} --format dali --out OUT` and pass OUT as the data dir"


class SampleSource:
    """A random-access list of samples; ``read(indices)`` returns one batch of ``(data, labels)``."""

    # "path": data is a (B, L) uint8 array of NUL-padded file names, read by DALI's fn.io.file.read;
    # "jpeg": a list of 1-D uint8 arrays of encoded images; "array": one (B, H, W, 3) uint8 array
    kind = "jpeg"
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, indices: np.ndarray) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
        raise NotImplementedError

    def subset(self, count: int) -> SampleSource:
        """The first ``count`` samples (the ``subset`` option)."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def name(self, index: int) -> str:
        """A human-readable name of sample ``index`` (its file, or shard and key)."""
        return f"sample {index}"

    def encoded(self, index: int) -> bytes | None:
        """The encoded file of sample ``index`` (None for array sources)."""
        return None

    def find_undecodable(self, indices: np.ndarray) -> str | None:
        """Name of the first sample among ``indices`` that PIL cannot decode (to explain a DALI decode error)."""
        import io

        from PIL import Image

        for index in indices:
            try:
                encoded = self.encoded(int(index))
                if encoded is None:
                    return None
                with Image.open(io.BytesIO(encoded)) as image:
                    image.load()
            except Exception:  # noqa: BLE001 - any failure (unreadable, undecodable) marks the file
                return self.name(int(index))
        return None


class FileSource(SampleSource):
    """Encoded image files on disk with their labels; the pipeline reads the files itself (``fn.io.file.read``).

    Handing DALI one small dense array of file names per batch, rather than the files' bytes, keeps the feed
    at a fraction of a millisecond and the reads on DALI's threads: feeding the bytes from Python cost the CPU
    pipeline ~20% of its throughput on 2 cores.
    """

    kind = "path"

    def __init__(self, paths: Sequence[str], labels: Sequence[int], root: str = "") -> None:
        self.paths = [os.path.abspath(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.root = root

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        names = [os.fsencode(self.paths[i]) for i in indices]
        table = np.zeros((len(names), max(map(len, names)) + 1), dtype=np.uint8)  # NUL-terminated rows
        for row, name in enumerate(names):
            table[row, : len(name)] = np.frombuffer(name, dtype=np.uint8)
        return table, self.labels[indices]

    def encoded(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def subset(self, count: int) -> FileSource:
        return FileSource(self.paths[:count], self.labels[:count], self.root)

    def describe(self) -> str:
        return f"ImageFolder {self.root} ({len(self)} files)"

    def name(self, index: int) -> str:
        return self.paths[index]


class TarSource(SampleSource):
    """Webdataset shards: per sample (shard, jpg offset, jpg size, cls offset, cls size) from the .idx files."""

    def __init__(self, shards: Sequence[str], entries: np.ndarray, root: str = "") -> None:
        self.shards = list(shards)
        self.entries = entries  # int64 (N, 5)
        self.root = root
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _map(self, shard: int) -> mmap.mmap:
        # mmaps are opened lazily and per process: slicing them is zero-copy and the OS page cache does the rest
        if shard not in self._maps:
            with open(self.shards[shard], "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[shard]

    def read(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        # views into the mmaps: DALI takes them without a copy (no_copy), the feeder keeps them alive meanwhile
        data, labels = [], np.empty(len(indices), dtype=np.int64)
        for k, i in enumerate(indices):
            shard, jpg_offset, jpg_size, cls_offset, cls_size = (int(v) for v in self.entries[i])
            mapped = self._map(shard)
            data.append(np.frombuffer(mapped, dtype=np.uint8, count=jpg_size, offset=jpg_offset))
            labels[k] = int(mapped[cls_offset : cls_offset + cls_size])
        return data, labels

    def encoded(self, index: int) -> bytes:
        shard, jpg_offset, jpg_size = (int(v) for v in self.entries[index][:3])
        return bytes(self._map(shard)[jpg_offset : jpg_offset + jpg_size])

    def subset(self, count: int) -> TarSource:
        return TarSource(self.shards, self.entries[:count], self.root)

    def describe(self) -> str:
        return f"webdataset shards {self.root} ({len(self.shards)} shards, {len(self)} samples)"

    def name(self, index: int) -> str:
        shard, jpg_offset = int(self.entries[index][0]), int(self.entries[index][1])
        return f"{self.shards[shard]} (member at byte {jpg_offset}, sample {index})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state


class ArraySource(SampleSource):
    """Uint8 (N, H, W, 3) images and int64 labels held in memory (or memory-mapped)."""

    kind = "array"

    def __init__(self, images: np.ndarray, labels: np.ndarray, origin: str = "") -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise LoaderError(
                f"{origin}: expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise LoaderError(f"{origin}: {len(images)} images but {len(labels)} labels; re-run tools/convert.py")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.origin = origin

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(self.images[indices]), self.labels[indices]

    def subset(self, count: int) -> ArraySource:
        return ArraySource(self.images[:count], self.labels[:count], self.origin)

    def describe(self) -> str:
        return f"{self.origin} arrays ({len(self)} images of {self.images.shape[1]}x{self.images.shape[2]})"


# --------------------------------------------------------------------------------------------- resolution


def find_converted_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The ``dali`` folder of a tools/convert.py output (``OUT`` or ``OUT/dali``), or None for raw data."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    for candidate in (root / "dali", root):
        manifest = candidate / "manifest.json"
        if manifest.is_file():
            try:
                fmt = json.loads(manifest.read_text()).get("format")
            except (OSError, ValueError) as error:
                raise LoaderError(f"unreadable manifest {manifest}: {error}; re-run tools/convert.py") from None
            if fmt == "dali":
                return candidate
    return None


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def parse_wds_index(index_path: str | os.PathLike) -> tuple[list[tuple[int, int, int, int]], list[str]]:
    """Parse one wds2idx ``.idx`` file: per sample (jpg offset, jpg size, cls offset, cls size), and keys.

    Format (DALI's ``wds2idx``, version v1.2): a header line ``v1.2 <count>``, then one line per sample of
    ``<ext> <offset> <size> <member name>`` groups, offsets pointing at the member's data (past its header).
    """
    with open(index_path) as f:
        header = f.readline().split()
        if len(header) != 2 or not header[0].startswith("v1"):
            raise LoaderError(f"{index_path} is not a webdataset index (header {header}); re-run tools/convert.py")
        rows, keys = [], []
        for line_number, line in enumerate(f, start=2):
            tokens = line.split()
            if not tokens:
                continue
            parts = {tokens[j]: tokens[j : j + 4] for j in range(0, len(tokens) - 3, 4)}
            if "jpg" not in parts or "cls" not in parts:
                raise LoaderError(
                    f"{index_path}:{line_number}: sample without both .jpg and .cls members ({sorted(parts)}); "
                    "re-run tools/convert.py"
                )
            _, jpg_offset, jpg_size, name = parts["jpg"]
            _, cls_offset, cls_size, _ = parts["cls"]
            rows.append((int(jpg_offset), int(jpg_size), int(cls_offset), int(cls_size)))
            keys.append(name.rsplit(".", 1)[0])
    if len(rows) != int(header[1]):
        raise LoaderError(f"{index_path}: header says {header[1]} samples, found {len(rows)}; re-run tools/convert.py")
    return rows, keys


def _tar_source(folder: Path, spec: LoaderSpec) -> TarSource:
    shards = sorted(folder.glob("shard-*.tar"))
    if not shards:
        raise LoaderError(f"no shard-*.tar files in {folder}; " + CONVERT_HINT.format(dataset=spec.dataset))
    table = []
    for shard_number, shard in enumerate(shards):
        index = shard.with_suffix(".idx")
        if not index.is_file():
            raise LoaderError(
                f"missing index {index} for {shard.name}; re-run tools/convert.py, or write it with "
                f"`.venv/bin/wds2idx {shard} {index}`"
            )
        rows, _ = parse_wds_index(index)
        end = max((max(a + b, c + d) for a, b, c, d in rows), default=0)
        if end > shard.stat().st_size:
            raise LoaderError(
                f"{shard} has {shard.stat().st_size} bytes but its index reaches byte {end}: the shard is truncated "
                "or from another conversion; re-run tools/convert.py (--verify checks every sample)"
            )
        table.extend((shard_number, *row) for row in rows)
    entries = np.asarray(table, dtype=np.int64).reshape(-1, 5)
    return TarSource([str(s) for s in shards], entries, str(folder))


def _webdataset_source(converted: Path, spec: LoaderSpec) -> TarSource:
    folder = converted / ("val" if spec.split == "test" else spec.split)  # ImageNet's test set is its val set
    if not folder.is_dir():
        hint = CONVERT_HINT.format(dataset=spec.dataset)
        raise LoaderError(f"split {spec.split!r} not found in {converted}; {hint}")
    manifest = read_manifest(converted)
    if manifest.get("dataset") not in (None, spec.dataset):
        held = manifest.get("dataset")
        raise LoaderError(f"{converted} holds {held!r}, not {spec.dataset!r}; pass the data dir of {spec.dataset}")
    counts = manifest.get("counts")
    if isinstance(counts, dict) and folder.name not in counts:  # being converted now, or left by another run
        raise LoaderError(
            f"{folder} is not listed in {converted}/manifest.json (it lists {sorted(counts)}): its conversion did "
            f"not finish; rerun tools/convert.py {spec.dataset} with --split {folder.name}"
        )
    source = _tar_source(folder, spec)
    expected = (counts or {}).get(folder.name)
    if expected is not None and int(expected) != len(source):
        raise LoaderError(
            f"{folder} holds {len(source)} samples but its manifest says {expected}: the conversion was "
            "interrupted or the files were changed; re-run tools/convert.py"
        )
    return source


def open_source(spec: LoaderSpec) -> SampleSource:
    """The sample source of ``spec``, cut to the ``subset`` option (the first N samples of the split).

    In-memory sets (synthetic, CIFAR-100) come from :func:`loaders.arrays.load_split_arrays` (the tool's
    ``images.npy`` memory-mapped, or the generated / downloaded arrays), exactly as the torch and gpu loaders
    read them; ImageNet from the tool's webdataset shards when ``data_dir`` is a converted folder, else from
    an ImageFolder tree.
    """
    if dataset_info(spec.dataset).in_memory:
        images, labels = load_split_arrays(spec, mmap=True)
        return ArraySource(images, labels, spec.dataset)
    converted = find_converted_dir(spec.data_dir)
    if converted is not None:
        source: SampleSource = _webdataset_source(converted, spec)
    else:
        split_dir = imagenet_split_dir(spec.data_dir, spec.split)
        paths, labels, _ = imagenet_samples(split_dir)
        if not paths:
            raise LoaderError(f"no images in {split_dir}; expected <wnid>/*.JPEG class folders")
        source = FileSource(paths, labels, str(split_dir))
    count = subset_size(spec, len(source))
    return source.subset(count) if count < len(source) else source
