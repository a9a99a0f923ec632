"""FFCV outputs: one ``<split>.beton`` per split, written by FFCV's ``DatasetWriter`` in a watched child process.

The child (:mod:`tools._convert.ffcv_child`) runs in its own session. This side reads its progress lines, drives
the progress bar, and fails with a clear message instead of hanging when the child exits with an error, when
one of FFCV's workers dies (the child reports that within a fraction of a second), or when no progress arrives
for ``stall_timeout`` seconds; the whole process group is killed on the way out, and the half-written
``.beton.tmp`` is deleted. Resume works per split: a state record (``.convert-state/<split>.json``) with the
file's checksum, the settings and the source fingerprint lets a rerun keep a finished ``.beton``.

FFCV's writer lays out pages in the order its workers finish them, so with more than one worker the bytes of a
``.beton`` differ between runs (same samples, order, labels and pixels); with ``--workers 1`` they are identical.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tools._convert import files
from tools._convert.dali_writer import STATE_DIR, SplitResult
from tools._convert.sources import ConvertError, SplitSource

REPO = Path(__file__).resolve().parents[2]
MIN_PAGE = 8 << 20  # FFCV's default page size


def page_size_for(max_pixels: int) -> int:
    """A power-of-two page that fits the largest sample (raw RGB, or a JPEG of it: < 2x raw) with room to spare."""
    need = 2 * 3 * max_pixels + (64 << 10)
    size = MIN_PAGE
    while size < need:
        size *= 2
    return size


def run_child(spec: dict, workdir: Path, total: int, progress: Callable[[int], None], stall_timeout: float) -> dict:
    """Run :mod:`tools._convert.ffcv_child` on ``spec`` under the watchdog; its result dict, or ConvertError."""
    spec_path = workdir / f"{spec['mode']}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "tools._convert.ffcv_child", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: one killpg removes FFCV's workers too
        env=env,
    )
    state = {"done": 0, "changed": time.monotonic(), "result": None}
    errors: collections.deque[str] = collections.deque(maxlen=20)

    def read_stdout() -> None:
        for line in process.stdout:
            if line.startswith("progress "):
                state["done"], state["changed"] = int(line.split()[1]), time.monotonic()
            elif line.startswith("result "):
                state["result"] = json.loads(line[len("result ") :])

    def read_stderr() -> None:
        for line in process.stderr:
            if line.strip():
                errors.append(line.rstrip())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    reported = 0
    try:
        while process.poll() is None:
            time.sleep(0.1)
            if state["done"] > reported:
                progress(state["done"] - reported)
                reported = state["done"]
            if time.monotonic() - state["changed"] > stall_timeout:
                raise ConvertError(
                    f"FFCV {spec['mode']} made no progress for {stall_timeout:.0f} s ({reported}/{total} samples); "
                    "stopped it. Rerun to resume; raise --stall-timeout if the machine is just very busy"
                )
    finally:
        _kill_group(process)
    for reader in readers:
        reader.join(timeout=5)
    if state["done"] > reported:
        progress(state["done"] - reported)
    if process.returncode != 0 or state["result"] is None:
        tail = " | ".join(list(errors)[-6:]) or "no message"
        raise ConvertError(f"FFCV {spec['mode']} failed (exit status {process.returncode}): {tail}")
    return state["result"]


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def current_record(source: SplitSource, out: Path, settings: dict) -> dict | None:
    """The state record of a finished ``.beton`` for this input and these settings, or None."""
    record = files.read_json(out / STATE_DIR / f"{source.split}.json")
    beton = out / f"{source.split}.beton"
    if not record or record.get("settings") != settings or record.get("fingerprint") != source.fingerprint():
        return None
    return record if files.matches_record(beton, record.get("file")) else None


def result_from_record(record: dict, split: str) -> SplitResult:
    result = SplitResult(count=record["count"], per_class=Counter({int(k): v for k, v in record["per_class"].items()}))
    result.files.append({"path": f"{split}.beton", **record["file"]})
    result.skipped = list(record["skipped"])
    return result


def write_ffcv_split(
    source: SplitSource,
    out: Path,
    settings: dict,
    *,
    skipped: list[dict[str, Any]],
    max_pixels: int,
    workers: int,
    stall_timeout: float,
    progress: Callable[[int], None],
) -> SplitResult:
    """Write ``out/<split>.beton`` from the samples of ``source`` that the decode pass did not skip."""
    beton = out / f"{source.split}.beton"
    state = out / STATE_DIR / f"{source.split}.json"
    workdir = out / STATE_DIR / f"work-{source.split}"
    files.remove_quietly(state)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    bad = {item["index"] for item in skipped}
    keep = [i for i in range(len(source)) if i not in bad]
    if not keep:
        raise ConvertError(f"{source.split}: every source file was skipped; nothing to write")
    labels = np.asarray(source.labels, np.int64)[keep]
    np.save(workdir / "labels.npy", labels)
    spec: dict[str, Any] = {"mode": "write", "labels": str(workdir / "labels.npy")}
    spec["output"] = str(files.tmp_path(beton))
    if source.images is not None:
        np.save(workdir / "images.npy", source.images[keep])
        spec.update(images=str(workdir / "images.npy"), max_res=None, write_mode="raw", page_size=MIN_PAGE)
    else:
        with open(workdir / "paths.txt", "w") as f:
            f.writelines(source.paths[i] + "\n" for i in keep)
        max_res = settings["max_res"]
        pixels = min(max_pixels, max_res * max_res) if max_res else max_pixels  # largest sample after the resize
        spec.update(paths=str(workdir / "paths.txt"), max_res=max_res, write_mode=settings["write_mode"])
        spec["page_size"] = page_size_for(pixels)
    spec.update(
        jpeg_quality=settings["jpeg_quality"], compress_prob=settings["compress_prob"], workers=workers, seed=42
    )
    files.remove_quietly(spec["output"])
    try:
        child = run_child(spec, workdir, len(keep), progress, stall_timeout)
        files.finish(spec["output"], beton)
    finally:
        files.remove_quietly(spec["output"])
        shutil.rmtree(workdir, ignore_errors=True)
    per_class = Counter(labels.tolist())
    record = {
        "settings": settings,
        "fingerprint": source.fingerprint(),
        "file": {"bytes": beton.stat().st_size, "sha256": files.sha256_file(beton)},
        "count": len(keep),
        "per_class": {str(k): v for k, v in sorted(per_class.items())},
        "skipped": skipped,
    }
    files.write_json_atomic(state, record)
    result = result_from_record(record, source.split)
    result.written_bytes = record["file"]["bytes"]
    result.startup_seconds = child["import_seconds"]
    return result


def verify_beton(beton: Path, workers: int, stall_timeout: float, progress: Callable[[int], None]) -> dict:
    """Read every sample of ``beton`` with the real FFCV Loader (in the watched child): count and label histogram."""
    workdir = beton.parent / STATE_DIR / f"verify-{beton.stem}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        spec = {"mode": "verify", "beton": str(beton), "batch_size": 64, "workers": workers}
        return run_child(spec, workdir, 0, progress, stall_timeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
