"""Resource sampling around one measurement: process CPU utilisation and peak RSS including every child process
(DataLoader workers, FFCV/DALI threads live in the process itself), and on a GPU its utilisation and memory.

A background thread samples every ``interval`` seconds. CPU time is summed over the process tree, remembering the
last value of each child, so workers that exit between samples still count. Peak RSS is the largest sum of the
resident sets of the tree; forked workers share pages with their parent, so this sum is an upper bound of the
real footprint (it is what an out-of-memory killer would also see per process).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from typing import Any

import psutil


def process_tree_cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (DataLoader workers) right now."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:  # the worker exited between listing and reading
            continue
        total += times.user + times.system
    return total


def _gpu_utilisation_reader():
    """A function returning the GPU's utilisation in percent, or None where nothing can read it."""
    try:
        import pynvml  # nvidia-ml-py, optional

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # noqa: BLE001 - any failure means: fall back to nvidia-smi
        pass
    if shutil.which("nvidia-smi"):

        def read_smi() -> float | None:
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                return float(out.stdout.strip().splitlines()[0])
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return None

        return read_smi
    return None


class ResourceMonitor:
    """Samples the process tree (and the GPU) while a measurement runs.

    ``start()`` begins peak-RSS tracking; ``begin_timed()`` / ``end_timed()`` bracket the timed windows, over
    which CPU and GPU utilisation are averaged; ``stop()`` returns the summary dict.
    """

    def __init__(self, interval: float = 0.25, gpu: bool = False) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self._cpu_by_pid: dict[int, float] = {}
        self._peak_rss = 0
        self._gpu_reader = _gpu_utilisation_reader() if gpu else None
        self._gpu_samples: list[float] = []
        self._timed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._timed_start: tuple[float, float] | None = None
        self._timed_end: tuple[float, float] | None = None
        self._system_cpu: float | None = None
        self._gpu_interval = 1.0  # nvidia-smi costs tens of ms: sample it less often
        self._last_gpu = 0.0

    # sampling --------------------------------------------------------------------------------------------
    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.process, *self.process.children(recursive=True)]
        except psutil.Error:
            return [self.process]

    def _sample(self) -> None:
        rss = 0
        for proc in self._tree():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss += proc.memory_info().rss
                self._cpu_by_pid[proc.pid] = times.user + times.system
            except psutil.Error:  # the worker exited between listing and reading
                continue
        self._peak_rss = max(self._peak_rss, rss)
        now = time.perf_counter()
        if self._timed and self._gpu_reader is not None and now - self._last_gpu >= self._gpu_interval:
            self._last_gpu = now
            value = self._gpu_reader()
            if value is not None:
                self._gpu_samples.append(value)

    def _cpu_total(self) -> float:
        return sum(self._cpu_by_pid.values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    # phases ----------------------------------------------------------------------------------------------
    def start(self) -> ResourceMonitor:
        self._sample()
        self._thread.start()
        return self

    def begin_timed(self) -> None:
        self._sample()
        psutil.cpu_percent(interval=None)  # resets the system-wide counter
        self._timed_start = (time.perf_counter(), self._cpu_total())
        self._timed = True

    def end_timed(self) -> None:
        self._sample()
        self._timed = False
        self._timed_end = (time.perf_counter(), self._cpu_total())
        self._system_cpu = psutil.cpu_percent(interval=None)

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the summary: CPU utilisation (percent of one core, so 200 = two busy cores), the
        machine-wide CPU load in the same window (other programs included), peak RSS in MiB, GPU utilisation."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sample()
        summary: dict[str, Any] = {"peak_rss_mib": round(self._peak_rss / 2**20, 1)}
        if self._timed_start and self._timed_end:
            wall = self._timed_end[0] - self._timed_start[0]
            busy = self._timed_end[1] - self._timed_start[1]
            summary["cpu_percent"] = round(100.0 * busy / wall, 1) if wall > 0 else None
            cores = psutil.cpu_count() or 1
            summary["system_cpu_percent"] = round(self._system_cpu * cores, 1) if self._system_cpu is not None else None
        if self._gpu_reader is not None:
            samples = self._gpu_samples
            summary["gpu_utilization_percent"] = round(sum(samples) / len(samples), 1) if samples else None
        return summary
