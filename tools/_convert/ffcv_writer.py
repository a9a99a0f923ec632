"""FFCV outputs: one ``<split>.beton`` per split, filled in order by this process, its images prepared in parallel.

The worker pool (:mod:`tools._convert.pool`, payload ``"ffcv"``) decodes each source file once, validates it,
shrinks it to the max resolution and encodes it as FFCV's ``RGBImageField`` stores it (raw pixels or an OpenCV
JPEG, raw-or-JPEG chosen per sample in proportion mode). This process copies those bytes, in source order, into
the file through FFCV's ``DatasetWriter`` machinery (:class:`loaders.ffcv_writer.OrderedBetonWriter`: FFCV's
header, field descriptors, page allocator and metadata / allocation table). So every file is decoded once (the
previous design validated in one pass and let FFCV's writer decode again), no FFCV writer process exists that
could die and leave the writer waiting forever (a dead or failing pool worker is a clear error at once), and the
bytes of a ``.beton`` are the same whatever the number of workers.

FFCV is imported before any conversion starts (:func:`import_writer`: fail fast; about 2 s, most of it torch).
The file is written under a temporary name and renamed when complete. Resume works per split: a state record
(``.convert-state/<split>.json``) with the file's checksum, the settings and the source fingerprint lets a rerun
keep a finished ``.beton``. ``--verify`` reads every sample back with FFCV's real ``Loader`` in a watched child
process (:mod:`tools._convert.ffcv_child`).
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

import numpy as np

from tools._convert import files
from tools._convert.dali_writer import STATE_DIR, SplitResult
from tools._convert.images import stored_pixels
from tools._convert.pool import DecodePool, Payload
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
    max_pixels: int,
    workers: int,
    strict: bool,
    progress: Callable[[int], None],
) -> SplitResult:
    """Write ``out/<split>.beton`` from every usable sample of ``source``.

    ``max_pixels``: the largest stored picture, in pixels, when no max resolution bounds it (it sizes FFCV's
    pages); ignored otherwise.
    """
    ffcv_writer = import_writer()
    beton = out / f"{source.split}.beton"
    state = out / STATE_DIR / f"{source.split}.json"
    tmp = files.tmp_path(beton)
    files.remove_quietly(state)
    files.remove_quietly(tmp)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    result, skipped = SplitResult(), []
    with contextlib.ExitStack() as stack:
        stack.callback(files.remove_quietly, tmp)
        if source.images is None:
            max_res = settings["max_res"]
            # pages fit the largest possible sample: the same page size (and bytes) whatever else was converted
            page_size = page_size_for(stored_pixels(max_res, max_res) if max_res else max_pixels)
            payload = Payload("ffcv", max_res, settings["jpeg_quality"], settings["write_mode"],
                              settings["compress_prob"])  # fmt: skip
            pool = stack.enter_context(DecodePool(source.paths, source.labels, 0, workers, payload))
            chunks = pool.chunks()
        else:
            page_size, pool, chunks = MIN_PAGE, None, None
        modes = {"jpg": ffcv_writer.JPG, "raw": ffcv_writer.RAW}
        with ffcv_writer.OrderedBetonWriter(str(tmp), _fields(ffcv_writer, settings), capacity=len(source),
                                            page_size=page_size) as writer:  # fmt: skip
            if pool is None:
                for image, label in zip(source.images, source.labels):
                    pixels = np.ascontiguousarray(image, dtype=np.uint8)
                    height, width = pixels.shape[:2]
                    writer.add((ffcv_writer.EncodedImage(modes["raw"], height, width, pixels.nbytes, pixels), label))
                    result.per_class[int(label)] += 1
                    progress(1)
            else:
                for chunk, scratch in chunks:
                    moves = []
                    for item in chunk:
                        if item.reason is not None:
                            skipped.append(source.skip(item.index, item.reason, strict))
                            continue
                        label = int(source.labels[item.index])
                        image = ffcv_writer.EncodedImage(
                            modes[item.mode], item.stored_height, item.stored_width, item.nbytes
                        )
                        moves += [(item.offset, size, ptr) for ptr, size in writer.add((image, label))]
                        result.per_class[label] += 1
                    pool.write_out(scratch, [(str(tmp), moves)])  # a worker copies the chunk into place
                    progress(len(chunk))
                pool.wait_writes()
            if not writer.count:
                raise ConvertError(f"{source.split}: every source file was skipped; nothing to write")
        checksum = files.finish_hashed(tmp, beton)
    record = {
        "settings": settings,
        "fingerprint": source.fingerprint(),
        "file": checksum,
        "count": sum(result.per_class.values()),
        "per_class": {str(k): v for k, v in sorted(result.per_class.items())},
        "skipped": skipped,
    }
    files.write_json_atomic(state, record)
    result = result_from_record(record, source.split)
    result.written_bytes = record["file"]["bytes"]
    return result


def _install_hint(error) -> str:
    from loaders.ffcv_import import INSTALL_HINT

    return INSTALL_HINT.format(error=error).replace("Every other --loader", "--format dali")


def import_writer():
    """:mod:`loaders.ffcv_writer` (imports FFCV the fast way), or a ConvertError saying how to install FFCV.

    ``tools/convert.py`` calls it before converting anything when FFCV output is asked for: a missing or broken
    FFCV (its system libraries) then stops the run at once, not after hours of a DALI pass; and FFCV's import
    (~2 s, most of it torch; nothing else in the tool needs torch) is not paid in the middle of the work."""
    try:
        from loaders.ffcv_import import import_ffcv

        import_ffcv()
        from loaders import ffcv_writer
    except ImportError as error:
        raise ConvertError(_install_hint(error)) from error
    return ffcv_writer


def _fields(ffcv_writer, settings: dict) -> dict:
    """The .beton's fields, as FFCV's RGBImageField / IntField describe them in the file."""
    image = ffcv_writer.RGBImageField(
        write_mode=settings["write_mode"],
        max_resolution=settings["max_res"],
        jpeg_quality=settings["jpeg_quality"],
        compress_probability=settings["compress_prob"],
    )
    return {"image": image, "label": ffcv_writer.IntField()}


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
