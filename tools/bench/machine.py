"""The machine description stored with every benchmark: CPU, cores, RAM, GPU, driver, library versions, commit.

Nothing here imports DALI or FFCV (their versions come from package metadata), so describing the machine is
cheap and works where a backend is missing.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LIBRARIES = ("torch", "torchvision", "numpy", "nvidia-dali-cuda130", "ffcv", "numba", "cupy-cuda13x", "psutil")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide throughput (None where not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> dict[str, Any]:
    """HEAD of the repository and whether the working tree had changes (results belong to exact code)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def gpu_description() -> list[dict[str, Any]]:
    """Name, memory and driver of each CUDA GPU (empty without one)."""
    import torch

    if not torch.cuda.is_available():
        return []
    driver = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            driver = None
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "driver": driver,
                "cuda_runtime": torch.version.cuda,
            }
        )
    return gpus


def describe_machine() -> dict[str, Any]:
    """Everything a reader needs to compare two results files."""
    import psutil

    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_model": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpu_description(),
        "libraries": library_versions(),
        "git": git_commit(),
    }


def machine_slug() -> str:
    """The folder name of this machine under ``benchmarks/``: the trainer's own name for it, so that
    ``python -m train ... --loader auto`` finds ``benchmarks/<machine>/tuned.json`` (e.g. ``cpu-2cpu``,
    ``nvidia-h100-80gb-hbm3-x1-16cpu``)."""
    try:
        from train.data import machine_name
    except ImportError:  # the trainer is not in this checkout: the same rule, written out
        import torch

        cores = os.cpu_count() or 1
        gpu = f"{torch.cuda.get_device_name(0)}-x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
        return re.sub(r"[^a-z0-9]+", "-", f"{gpu}-{cores}cpu".lower()).strip("-")
    return machine_name()
