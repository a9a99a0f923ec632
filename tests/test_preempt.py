"""Preemption-safe runs (train/preempt.py, docs/preemption.md), for every installed loader.

One uninterrupted 2-epoch run per backend (synthetic subset of 32, ResNet-18 at 16 px, batch 8: 4 steps per
epoch, pad-crop + flip augmentation) is the reference. Against it, in subprocesses (real signals, real exits):

* SIGTERM / SIGUSR1 at a random (seeded) step, sent by the trainer to itself through the test hook
  ``DIVNORM_SIGNAL_AT_STEP``, plus a second SIGTERM while that checkpoint is written (``DIVNORM_SIGNAL_IN_SAVE``):
  exit code 3, a loadable ``last.pt`` holding the position, then ``--resume`` ends with weights identical to the
  reference bit for bit, and the same per-epoch training metrics;
* ``checkpoint.every_steps=3`` and a SIGKILL (kill -9) at step 7: ``--resume`` continues from step 6 and ends
  identical to the reference.

The reference runs alone (it writes the data set the others read); the two interrupted runs then run at once, and
so do their two resumes: one thread each, they share a 2-core machine at little cost, and the backend's five runs
take three runs' time.

The loader-level checks (a resumed epoch yields the very batches of an uninterrupted one) are cheaper and cover
the ImageNet graphs too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from loaders import build_loader
from loaders.base import LoaderSpec
from train.checkpoint import load
from train.preempt import EXIT_PREEMPTED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "data.subset=32",
    "data.batch_size=8",  # 4 steps per epoch
    "data.eval_batch_size=32",
    "data.image_size=16",
    "data.workers=0",  # torch: batches made in the main process (no worker start-up); DALI / FFCV: one thread
    "lr_scheduler.name=none",
    "optimizer.lr=0.02",
    "training.test_at_end=false",
    "checkpoint.save_best=false",  # a checkpoint write costs seconds on a 2-core machine
    "checkpoint.save_conv1=false",
    "logging.refresh_steps=2",
]
MODEL = "resnet18"  # BatchNorm running statistics and momentum buffers must survive the stop
STEPS = 8  # 2 epochs x 4 steps
BACKENDS = {"torch": None, "gpu": None, "dali": "nvidia.dali", "ffcv": "ffcv"}
IDS = ["torch", "tensor", "dali", "ffcv"]  # "gpu" as a test id would make conftest treat these as CUDA tests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _installed(loader: str) -> bool:
    module = BACKENDS[loader]
    return module is None or importlib.util.find_spec(module) is not None


def _command(root, exp: str, loader: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", "synthetic", MODEL, exp, *SMALL, f"logging.runs_dir={root}",
            f"data.path={root.parent / 'data'}", "--epochs", "2", "--loader", loader, "--device", "cpu",
            *extra]  # fmt: skip


def _env(env: dict | None) -> dict:
    # one thread: on a busy 2-core machine this is ~5x faster than two, and as deterministic
    return {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}


def _train(root, exp: str, loader: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_command(root, exp, loader, *extra), cwd=REPO, env=_env(env), capture_output=True,
                          text=True, timeout=240)  # fmt: skip


def _train_together(runs: dict[str, tuple]) -> dict[str, subprocess.CompletedProcess]:
    """Several ``_train`` runs at once (one thread each, so two share a 2-core machine without slowing each
    other much): {name: (root, exp, loader, extra, env)} -> {name: completed process}."""
    started = {}
    for name, (root, exp, loader, extra, env) in runs.items():
        cmd = _command(root, exp, loader, *extra)
        started[name] = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    done = {}
    try:
        for name, process in started.items():
            stdout, stderr = process.communicate(timeout=240)
            done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return done


def _ok(done: subprocess.CompletedProcess, code: int = 0) -> None:
    assert done.returncode == code, f"exit {done.returncode}\n" + done.stdout[-2000:] + done.stderr[-3000:]


@pytest.fixture(scope="module", params=list(BACKENDS), ids=IDS)
def reference(request, tmp_path_factory):
    """(loader, runs_dir, last.pt of the uninterrupted run, its metrics lines)."""
    loader = request.param
    if not _installed(loader):
        pytest.skip(f"{loader} backend not installed")
    root = tmp_path_factory.mktemp(f"preempt-{loader}") / "runs"
    _ok(_train(root, "straight", loader))
    lines = [json.loads(line) for line in (root / "straight" / "metrics.jsonl").read_text().splitlines()]
    yield loader, root, load(root / "straight" / "last.pt"), lines
    shutil.rmtree(root.parent, ignore_errors=True)


def _assert_same_run(reference, folder) -> None:
    loader, _, expected, expected_lines = reference
    got = load(folder / "last.pt")
    assert got["global_step"] == STEPS and got["book"]["epoch"] == 2 and got["position"] is None
    assert expected["model"].keys() == got["model"].keys()
    for key in expected["model"]:
        assert torch.equal(expected["model"][key], got["model"][key]), f"{loader}: {key} differs from the reference"
    for group_a, group_b in zip(expected["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    for want, have in zip(expected_lines, lines):  # the interrupted epoch's line counts every batch once
        for key in ("loss", "top1", "top5", "samples", "steps"):
            assert want["train"][key] == have["train"][key], (loader, key)
        for key in ("loss", "top1", "top5", "samples"):
            assert want["val"][key] == have["val"][key], (loader, key)


def _signal_at(loader: str) -> tuple[int, str]:
    step = random.Random(f"preempt-{loader}").randint(1, STEPS - 1)  # seeded: a known step per loader
    return step, "SIGUSR1" if loader in ("torch", "ffcv") else "SIGTERM"


@pytest.fixture(scope="module")
def interrupted(reference):
    """A backend's two interrupted runs (a signal at a seeded step; SIGKILL at step 7 after checkpoints every 3
    steps) at once, what each left in its folder, then their two ``--resume`` runs at once:
    {exp: (interrupted run, names in its folder, its last.pt or None, resumed run)}."""
    loader, root, _, _ = reference
    step, name = _signal_at(loader)
    hooks = {"DIVNORM_SIGNAL_AT_STEP": f"{step}:{name}", "DIVNORM_SIGNAL_IN_SAVE": "1"}
    first = _train_together({
        "signal": (root, "signal", loader, (), hooks),
        "killed": (root, "killed", loader, ("checkpoint.every_steps=3",), {"DIVNORM_SIGNAL_AT_STEP": "7:SIGKILL"}),
    })  # fmt: skip
    left = {}
    for exp in first:
        folder = root / exp
        names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        left[exp] = names, load(folder / "last.pt") if "last.pt" in names else None
    resumed = _train_together({exp: (root, exp, loader, ("--resume",), None) for exp in first})
    return {exp: (first[exp], *left[exp], resumed[exp]) for exp in first}


def test_signal_saves_the_position_and_resume_is_exact(reference, interrupted):
    loader, root, _, _ = reference
    step, name = _signal_at(loader)
    done, names, saved, resumed = interrupted["signal"]
    _ok(done, EXIT_PREEMPTED)
    assert EXIT_PREEMPTED == 3 and "--resume" in done.stderr
    assert f"preempted ({name}) at step {step}" in done.stdout
    assert not [n for n in names if n.startswith(".")], "temp files left behind"
    assert saved is not None, names  # loadable although a second SIGTERM arrived while it was written
    assert saved["global_step"] == step
    assert saved["position"]["epoch"] == (step // 4) and saved["position"]["batch"] == step % 4
    assert saved["position"]["ranks"][0]["sums"][3] == 8 * (step % 4)  # samples of the partial epoch so far
    assert len(saved["loaders"]) == 1 and ("dali_checkpoint" in saved["loaders"][0]) == (loader == "dali")
    _ok(resumed)
    assert f"batch {step % 4}/4 (step {step})" in resumed.stdout
    _assert_same_run(reference, root / "signal")


def test_kill_after_every_steps_checkpoint_resumes_exactly(reference, interrupted):
    _, root, _, _ = reference
    done, names, saved, resumed = interrupted["killed"]
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert saved is not None, names
    # saved at steps 3, 4 (the epoch's end) and 6: killed at 7, the folder holds step 6 = epoch 2, batch 2
    assert saved["global_step"] == 6 and (saved["position"]["epoch"], saved["position"]["batch"]) == (1, 2)
    _ok(resumed)
    assert "batch 2/4 (step 6)" in resumed.stdout
    _assert_same_run(reference, root / "killed")


# -- loader level: a resumed epoch is the tail of an uninterrupted one -----------------------------------------


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.parametrize("name", list(BACKENDS), ids=IDS)
def test_start_batch_yields_the_tail_of_the_epoch(name, tmp_path):
    if not _installed(name):
        pytest.skip(f"{name} backend not installed")
    spec = LoaderSpec("synthetic", "train", 16, True, data_dir=str(tmp_path), workers=1, seed=3,
                      options={"subset": 64})  # fmt: skip
    straight = build_loader(name, spec)
    straight.set_epoch(0)
    rng = torch.get_rng_state()
    _batches(straight)
    # the global RNG (dropout's) is not touched by reading batches, so when an epoch starts does not matter
    assert torch.equal(rng, torch.get_rng_state()), f"{name} drew from the global torch RNG"
    straight.set_epoch(1)
    whole = _batches(straight)  # epoch 1 after epoch 0: what an uninterrupted run reads
    first = build_loader(name, spec)
    first.set_epoch(0)
    _batches(first)
    first.set_epoch(1)
    batches = iter(first)
    head = [next(batches) for _ in range(2)]
    head = [(images.clone(), labels.clone()) for images, labels in head]
    state = first.state_dict()  # what a mid-epoch checkpoint keeps after batch 2
    resumed = build_loader(name, spec)
    resumed.load_state_dict(state)
    resumed.set_epoch(1, start_batch=2)
    tail = _batches(resumed)
    assert len(whole) == 4 and len(tail) == 2
    for (images, labels), (want_images, want_labels) in zip(head + tail, whole):
        assert torch.equal(labels, want_labels) and torch.equal(images, want_images), name
    resumed.set_epoch(2)  # the epoch after a resumed one: identical too (DALI's streams continue)
    straight.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_batches(resumed), _batches(straight))), name
    for loader in (straight, first, resumed):
        loader.close()


def test_a_signal_during_the_first_compile_stops_the_run_at_once(tmp_path):
    """A SIGTERM as the run's first compile starts (the trainer's test hook sends it there): nothing is trained
    yet, so the run stops at once, exit 3, naming what to run next, instead of waiting for a step boundary that a
    compile whose workers died with the same signal would never reach. No checkpoint is written."""
    root = tmp_path / "runs"
    done = _train(root, "c", "gpu", "training.compile=true", env={"DIVNORM_SIGNAL_IN_COMPILE": "SIGTERM"})
    _ok(done, 3)
    err = done.stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM during the first compile" in err and "start it again (--overwrite)" in err, err
    assert not (root / "c" / "last.pt").exists() and "epoch 1/" not in done.stdout
