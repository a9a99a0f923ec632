"""Reading a .beton back with FFCV's real ``Loader``, in a child process: ``python -m tools._convert.ffcv_child SPEC``.

FFCV's ``Loader`` waits forever when one of its threads or processes dies, so ``--verify`` runs it here, in a
process of its own session that :mod:`tools._convert.ffcv_writer` watches, and this process watches its own
children: a watchdog thread reports progress on stdout (``progress <n>``) every 0.2 s and, the moment a child
exits with an error or a signal, kills the rest and exits with status 3. The last stdout line of a successful run
is ``result <json>``: the real FFCV ``Loader`` decodes every sample in order (decode + ToTensor on the CPU) and
the result holds the count, the label histogram, whether labels came in order and how many images were blank.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter

from loaders.ffcv_import import import_ffcv


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


def verify(spec: dict) -> dict:
    import_ffcv()  # keeps torch's thread count
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
    result = verify(spec)
    result["seconds"] = time.monotonic() - started
    print(f"result {json.dumps(result)}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: FFCV's loader threads can block a normal exit


if __name__ == "__main__":
    main()
