"""The FFCV side of a conversion, run as a child process: ``python -m tools._convert.ffcv_child SPEC.json``.

FFCV's ``DatasetWriter`` forks worker processes and, when one of them dies, waits for it forever; its
``Loader`` does the same with its threads. So both run here, in a process of their own session that
:mod:`tools._convert.ffcv_writer` watches, and this process watches its own workers: a watchdog thread reports
progress on stdout (``progress <n>``) every 0.2 s and, the moment a worker exits with an error or a signal, kills
the remaining workers and exits with status 3 (``os._exit`` lets multiprocessing's resource tracker free the
writer's shared memory). The last stdout line of a successful run is ``result <json>``.

Writing (``"mode": "write"``): samples were validated beforehand by the parent's decode pass, so this reads them
again with the same decoder, hands uint8 RGB arrays to ``RGBImageField`` and labels to ``IntField``.
``write_mode="proportion"`` draws the JPEG-or-raw choice from a generator seeded by the sample's index, so it
does not depend on which worker takes the sample. Verifying (``"mode": "verify"``): the real FFCV ``Loader``
decodes every sample in order (decode + ToTensor on the CPU) and reports the label histogram.

A planted fault for the tests: ``DIVNORM_CONVERT_FAULT=raise:<i>`` or ``kill:<i>`` makes the worker that
writes sample ``i`` raise or SIGKILL itself.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter

import numpy as np

from tools._convert.images import decode, rgb_array

FAULT_ENV = "DIVNORM_CONVERT_FAULT"


class FileSamples:
    """Indexable (image, label) pairs read from validated image files."""

    def __init__(self, paths: list[str], labels: np.ndarray, max_res: int | None, counter) -> None:
        self.paths, self.labels, self.max_res, self.counter = paths, labels, max_res, counter
        fault = os.environ.get(FAULT_ENV, "")
        self.fault = (fault.split(":")[0], int(fault.split(":")[1])) if ":" in fault else None

    def __len__(self) -> int:
        return len(self.paths)

    def _count(self) -> None:
        with self.counter.get_lock():
            self.counter.value += 1

    def __getitem__(self, index: int):
        if self.fault and self.fault[1] == index:
            if self.fault[0] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"planted fault at sample {index} ({FAULT_ENV})")
        with open(self.paths[index], "rb") as f:
            image = rgb_array(decode(f.read(), self.max_res))
        self._count()
        return image, int(self.labels[index])


class ArraySamples(FileSamples):
    """Indexable (image, label) pairs of a uint8 (N, H, W, 3) array (stored raw, no resize)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, counter) -> None:
        super().__init__([], labels, None, counter)
        self.images = images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        self._count()
        return np.ascontiguousarray(self.images[index]), int(self.labels[index])


def _watch(counter_value, stop: threading.Event) -> None:
    """Report progress; on a dead worker, kill the others and exit at once (FFCV would wait forever)."""
    import psutil

    me = psutil.Process()
    last = -1
    while not stop.wait(0.2):
        value = counter_value()
        if value != last:
            print(f"progress {value}", flush=True)
            last = value
        for child in me.children():
            try:
                status = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue
            if status is None or (status.si_code == os.CLD_EXITED and status.si_status == 0):
                continue
            how = f"exit status {status.si_status}" if status.si_code == os.CLD_EXITED else f"signal {status.si_status}"
            print(f"FFCV worker process {child.pid} died ({how}); stopping", file=sys.stderr, flush=True)
            for other in me.children():
                if "resource_tracker" not in " ".join(_cmdline(other)):
                    other.kill()
            os._exit(3)


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except Exception:
        return []


def _import_ffcv():
    from loaders.ffcv_import import import_ffcv

    return import_ffcv()


def _seed_proportion(seed: int) -> None:
    """Make ``write_mode="proportion"`` choose per sample index, not per worker's random stream."""
    import ffcv.writer
    from ffcv.fields import RGBImageField

    handle_sample, encode = ffcv.writer.handle_sample, RGBImageField.encode
    current = {"index": 0}

    def seeded_handle(sample, dest_ix, *rest):
        current["index"] = int(dest_ix)
        return handle_sample(sample, dest_ix, *rest)

    def seeded_encode(self, destination, image, malloc):
        np.random.seed((seed * 1_000_003 + current["index"]) % 2**32)  # same choice on FFCV's page-retry too
        return encode(self, destination, image, malloc)

    ffcv.writer.handle_sample = seeded_handle
    RGBImageField.encode = seeded_encode


def write(spec: dict) -> dict:
    started = time.monotonic()
    _import_ffcv()
    imported = time.monotonic()
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from tqdm import tqdm

    ffcv.writer.tqdm = lambda *args, **kwargs: tqdm(*args, disable=True, **kwargs)  # we report progress
    counter = multiprocessing.Value("Q", 0)
    labels = np.load(spec["labels"])
    if spec.get("images"):
        samples = ArraySamples(np.load(spec["images"], mmap_mode="r"), labels, counter)
    else:
        with open(spec["paths"]) as f:
            paths = f.read().split("\n")[:-1]
        samples = FileSamples(paths, labels, spec["max_res"], counter)
    if spec["write_mode"] == "proportion":
        _seed_proportion(spec["seed"])
    fields = {
        "image": RGBImageField(
            write_mode=spec["write_mode"],
            max_resolution=spec["max_res"],
            jpeg_quality=spec["jpeg_quality"],
            compress_probability=spec["compress_prob"],
        ),
        "label": IntField(),
    }
    writer = ffcv.writer.DatasetWriter(spec["output"], fields, page_size=spec["page_size"], num_workers=spec["workers"])
    chunk = max(1, min(100, len(samples) // (4 * spec["workers"])))
    stop = threading.Event()
    threading.Thread(target=_watch, args=(lambda: counter.value, stop), daemon=True).start()
    writer.from_indexed_dataset(samples, chunksize=chunk)
    stop.set()
    multiprocessing.active_children()  # reap FFCV's finished workers: their CPU time then counts as ours
    return {"count": len(samples), "import_seconds": imported - started}


def verify(spec: dict) -> dict:
    _import_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import ToTensor

    reader = Reader(spec["beton"])
    metadata = reader.metadata[f"f{reader.field_names.index('image')}"]  # FFCV names metadata columns f0, f1, ...
    constant = len(metadata) > 0 and len(set(zip(metadata["width"], metadata["height"]))) == 1
    # CenterCrop decodes every image completely before cropping; variable sizes need it
    decoder = SimpleRGBImageDecoder() if constant else CenterCropRGBImageDecoder((64, 64), ratio=1.0)
    loader = Loader(
        spec["beton"],
        batch_size=spec["batch_size"],
        num_workers=spec["workers"],
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [decoder, ToTensor()], "label": [IntDecoder(), ToTensor()]},
    )
    seen, histogram, previous, ordered, blank = 0, Counter(), -1, True, 0
    counter = [0]
    stop = threading.Event()
    threading.Thread(target=_watch, args=(lambda: counter[0], stop), daemon=True).start()
    for images, labels in loader:
        values = labels.reshape(-1).tolist()
        histogram.update(values)
        ordered = ordered and all(b >= a for a, b in zip([previous, *values], values))
        previous = values[-1]
        blank += int((images.reshape(len(values), -1).amax(dim=1) == 0).sum())
        seen += len(values)
        counter[0] = seen
    stop.set()
    return {"count": seen, "per_class": {str(k): v for k, v in sorted(histogram.items())}, "ordered": ordered,
            "blank": blank}  # fmt: skip


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    started = time.monotonic()
    result = write(spec) if spec["mode"] == "write" else verify(spec)
    result["seconds"] = time.monotonic() - started
    print(f"result {json.dumps(result)}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: FFCV's loader threads can block a normal exit


if __name__ == "__main__":
    main()
