"""DALI outputs: webdataset tar shards with their index files (ImageNet), uint8 arrays (CIFAR-100, synthetic).

ImageNet: ``<split>/shard-NNNNN.tar`` holds, per sample in sorted (class, file) order, ``<key>.jpg`` (the JPEG
bytes, see :mod:`tools._convert.images` for when they are re-encoded) then ``<key>.cls`` (the label as ASCII
decimal); ``key`` is the zero-padded sample number in the split. Tar headers are fixed (mtime 0, uid/gid 0, no
user names, mode 0644, USTAR), so the same input and settings give byte-identical shards. ``shard-NNNNN.idx`` is
the index ``fn.readers.webdataset(index_paths=...)`` reads, in the format of DALI's ``wds2idx`` tool: a line
``v1.2 <samples>``, then per sample ``<ext> <data offset> <size> <member name>`` for each of its members.

A shard closes once it reaches ``shard_size`` bytes. After the tar and index are renamed into place, a state
record (``.convert-state/<split>/shard-NNNNN.json``) stores their checksums, the source range they cover and
that range's fingerprint; a rerun keeps the longest prefix of shards whose records still match and resumes
after it, so an interrupted conversion ends byte-identical to an uninterrupted one.

CIFAR-100 / synthetic: ``<split>/images.npy`` (uint8 (N, 32, 32, 3) HWC) and ``<split>/labels.npy`` (int64 (N,)):
the whole split is one memory-mappable array, the fastest thing for a DALI ``external_source`` (or
``fn.readers.numpy``) to read; no decoding at all.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tools._convert import files
from tools._convert.images import stored_pixels
from tools._convert.pool import KEY_DIGITS, DecodePool, Payload, Result, mapped, stamp_key
from tools._convert.sources import SplitSource

STATE_DIR = ".convert-state"
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar's record size: archives are padded to a multiple of it, as GNU tar and tarfile do


@dataclass
class SplitResult:
    """What was written for one split (whether kept from an earlier run or written now)."""

    count: int = 0
    per_class: Counter = field(default_factory=Counter)
    files: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"index", "path", "reason"}
    reencoded: int = 0
    max_pixels: int = 0  # largest picture of a kept sample before any resize, in pixels FFCV would store
    written_bytes: int = 0  # bytes written by this run (kept files excluded)
    seconds: float = 0.0  # time this run spent on the split


class TarShardWriter:
    """One webdataset tar shard under a temporary name. This process lays it out (where each sample's members go,
    the index) and hashes it as it goes; the pool's workers copy the members' bytes into place
    (:meth:`DecodePool.write_out`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = files.tmp_path(path)
        self.tmp.write_bytes(b"")  # the workers open it for writing
        self.digest = hashlib.sha256()
        self.size = 0
        self.samples: list[list[tuple[str, int, int, str]]] = []

    def place(self, key: str, item: Result, members: memoryview) -> int:
        """Reserve room for a sample's ``members`` (already stamped with ``key``); the offset they go to."""
        base = self.size
        self.digest.update(members)
        self.size += len(members)
        self.samples.append(
            [
                ("jpg", base + _BLOCK, item.jpg_size, f"{key}.jpg"),
                ("cls", base + item.cls_header + _BLOCK, item.cls_size, f"{key}.cls"),
            ]
        )
        return base

    def close(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Finish the archive (end blocks and record padding: zeros), flush it to disk and rename it into place,
        write its index; return (tar record, idx record). Every member must be written by now."""
        end = self.size + 2 * _BLOCK
        padding = 2 * _BLOCK + (-end) % _RECORD
        self.digest.update(bytes(padding))
        os.truncate(self.tmp, self.size + padding)
        files.finish(self.tmp, self.path)
        lines = [f"v1.2 {len(self.samples)}"]
        lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample) for sample in self.samples]
        index = ("\n".join(lines) + "\n").encode()
        files.write_bytes_atomic(self.path.with_suffix(".idx"), index)
        tar_record = {"bytes": self.size + padding, "sha256": self.digest.hexdigest()}
        idx_record = {"bytes": len(index), "sha256": hashlib.sha256(index).hexdigest()}
        return tar_record, idx_record

    def abort(self) -> None:
        files.remove_quietly(self.tmp)


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def _kept_prefix(source: SplitSource, split_dir: Path, state_dir: Path, settings: dict) -> list[dict[str, Any]]:
    """State records of the leading shards that an earlier run completed with the same input and settings."""
    kept: list[dict[str, Any]] = []
    position = 0
    for number in range(len(list(state_dir.glob("shard-*.json")))):
        record = files.read_json(state_dir / f"{_shard_name(number)}.json")
        if not record or record.get("settings") != settings or record.get("start") != position:
            break
        end = record["end"]
        if end > len(source) or (record["final"] and end != len(source)):
            break
        if record["fingerprint"] != source.fingerprint(position, end):
            break
        tar = split_dir / f"{_shard_name(number)}.tar"
        if not files.matches_record(tar, record["tar"]) or not files.matches_record(
            tar.with_suffix(".idx"), record["idx"]
        ):
            break
        kept.append(record)
        position = end
    return kept


def _clear_from(split_dir: Path, state_dir: Path, number: int) -> None:
    """Delete shards ``number`` and later, their records, and any temporary leftovers."""
    for path in list(split_dir.glob("shard-*")) + list(state_dir.glob("shard-*")):
        stem = path.name.split(".")[0]
        if path.name.endswith(files.TMP_SUFFIX) or int(stem.split("-")[1]) >= number:
            path.unlink()


def write_webdataset_split(
    source: SplitSource,
    out: Path,
    settings: dict,
    *,
    workers: int,
    shard_size: int,
    strict: bool,
    progress: Callable[[int], None],
) -> SplitResult:
    """Write (or resume) the tar shards of one ImageNet split under ``out/<split>/``."""
    split_dir = out / source.split
    state_dir = out / STATE_DIR / source.split
    split_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    kept = _kept_prefix(source, split_dir, state_dir, settings)
    _clear_from(split_dir, state_dir, len(kept))
    result = SplitResult()
    for record in kept:
        _add_record(result, record, split_dir, out)
    position = kept[-1]["end"] if kept else 0
    progress(position)
    number, key, start = len(kept), result.count, position
    shard: TarShardWriter | None = None
    pending = SplitResult()  # what the open shard holds
    full: list[tuple] = []  # shards complete in the current chunk, closed once its bytes are written
    payload = Payload("dali", settings["max_res"], settings["jpeg_quality"])
    try:
        with DecodePool(source.paths, source.labels, position, workers, payload) as pool:
            for chunk, scratch in pool.chunks():
                targets: dict[str, list[tuple[int, int, int]]] = {}
                with mapped(scratch) as view:
                    for item in chunk:
                        progress(1)
                        if item.reason is not None:
                            pending.skipped.append(source.skip(item.index, item.reason, strict))
                            continue
                        if shard is None:
                            shard = TarShardWriter(split_dir / f"{_shard_name(number)}.tar")
                        name = f"{key:0{KEY_DIGITS}d}"
                        with view[item.offset : item.offset + item.nbytes] as members:
                            stamp_key(members, item.cls_header, name.encode("ascii"))
                            offset = shard.place(name, item, members)
                        targets.setdefault(str(shard.tmp), []).append((item.offset, item.nbytes, offset))
                        key += 1
                        label = source.labels[item.index]
                        pending.count += 1
                        pending.per_class[label] += 1
                        pending.reencoded += item.reencoded
                        pending.max_pixels = max(pending.max_pixels, stored_pixels(item.width, item.height))
                        if shard.size >= shard_size:
                            full.append((shard, number, start, item.index + 1, False, pending))
                            shard, pending, number, start = None, SplitResult(), number + 1, item.index + 1
                pool.write_out(scratch, list(targets.items()))  # a worker copies the chunk's members into place
                if full:
                    pool.wait_writes()
                    while full:
                        record = _close(*full[0], source, settings, state_dir)
                        full.pop(0)
                        _add_record(result, record, split_dir, out, written=True)
            pool.wait_writes()
        if shard is not None:
            record = _close(shard, number, start, len(source), True, pending, source, settings, state_dir)
            shard = None
            _add_record(result, record, split_dir, out, written=True)
        else:  # trailing skipped files after the last shard: nothing to write, but they are reported
            result.skipped.extend(pending.skipped)
    finally:
        for unfinished in [entry[0] for entry in full] + ([shard] if shard is not None else []):
            unfinished.abort()
    return result


def _close(
    shard: TarShardWriter,
    number: int,
    start: int,
    end: int,
    final: bool,
    pending: SplitResult,
    source: SplitSource,
    settings: dict,
    state_dir: Path,
) -> dict[str, Any]:
    tar_record, idx_record = shard.close()
    record = {
        "settings": settings,
        "shard": _shard_name(number),
        "start": start,
        "end": end,
        "final": final,
        "fingerprint": source.fingerprint(start, end),
        "tar": tar_record,
        "idx": idx_record,
        "count": pending.count,
        "per_class": {str(k): v for k, v in sorted(pending.per_class.items())},
        "skipped": pending.skipped,
        "reencoded": pending.reencoded,
        "max_pixels": pending.max_pixels,
    }
    files.write_json_atomic(state_dir / f"{_shard_name(number)}.json", record)
    return record


def _add_record(result: SplitResult, record: dict, split_dir: Path, out: Path, written: bool = False) -> None:
    tar = split_dir / f"{record['shard']}.tar"
    for path, checksum in ((tar, record["tar"]), (tar.with_suffix(".idx"), record["idx"])):
        result.files.append({"path": path.relative_to(out).as_posix(), **checksum})
        if written:
            result.written_bytes += checksum["bytes"]
    result.count += record["count"]
    result.per_class.update({int(k): v for k, v in record["per_class"].items()})
    result.skipped.extend(record["skipped"])
    result.reencoded += record["reencoded"]
    result.max_pixels = max(result.max_pixels, record["max_pixels"])


def write_array_split(source: SplitSource, out: Path, settings: dict) -> SplitResult:
    """Write (or keep) ``out/<split>/images.npy`` and ``labels.npy`` of an in-memory data set."""
    split_dir = out / source.split
    split_dir.mkdir(parents=True, exist_ok=True)
    state = out / STATE_DIR / f"{source.split}.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    record = files.read_json(state)
    fingerprint = source.fingerprint()
    arrays = {"images.npy": source.images, "labels.npy": np.asarray(source.labels, np.int64)}
    result = SplitResult(count=len(source), per_class=Counter(source.labels))
    result.max_pixels = 32 * 32
    valid = bool(record) and record.get("settings") == settings and record.get("fingerprint") == fingerprint
    valid = valid and all(files.matches_record(split_dir / name, record["files"].get(name)) for name in arrays)
    if not valid:
        files.remove_quietly(state)
        checksums = {}
        for name, array in arrays.items():
            path = split_dir / name
            with open(files.tmp_path(path), "wb") as f:
                np.save(f, array, allow_pickle=False)
            files.finish(files.tmp_path(path), path)
            checksums[name] = {"bytes": path.stat().st_size, "sha256": files.sha256_file(path)}
            result.written_bytes += checksums[name]["bytes"]
        record = {"settings": settings, "fingerprint": fingerprint, "files": checksums}
        files.write_json_atomic(state, record)
    for name in arrays:
        result.files.append({"path": f"{source.split}/{name}", **record["files"][name]})
    return result
