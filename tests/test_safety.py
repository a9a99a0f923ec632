"""Nothing run, nothing clobbered: planted malicious checkpoints are refused, outputs have one writer at a time.

Malicious checkpoints are real pickles whose loading would create a marker file (``open(path, "w")`` or
``os.system("touch ...")``); ``--resume`` and ``python -m train.report`` must refuse them with one line and exit
non-zero, and the marker must not exist afterwards. Locks are real ``flock`` locks taken by real processes: a
second conversion into the same ``--out`` stops at once naming the first one's pid (the first is paused with
SIGSTOP while the second tries, so the overlap is certain), and a lock whose holder was killed does not block.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from train import checkpoint as ckpt
from train.files import OutputLockedError, exclusive_lock

SMALL = ["data.subset=64", "data.batch_size=32", "data.image_size=16", "model.divnorm_specs.type=ours"]


class OpensAFile:
    """Unpickling this calls ``open(path, "w")``: the file appears only if the pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsAShellCommand:
    """Unpickling this runs ``touch path`` through ``os.system``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def plant_run_folder(folder: Path, marker: Path) -> None:
    """A run folder as ``python -m train`` leaves it (config.json, metrics.jsonl) with planted checkpoints."""
    from train.config import load_config

    folder.mkdir(parents=True)
    config = load_config("synthetic", "alexnet", [*SMALL, f"logging.runs_dir={folder.parent}"])
    config["run"] = {"dataset": "synthetic", "model": "alexnet", "exp": folder.name, "loader": "gpu"}
    (folder / "config.json").write_text(json.dumps(config))
    split = {"loss": 4.6, "top1": 1.5, "top5": 6.0, "samples": 64, "seconds": 1.0}
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "lr": 0.05, "train": split, "val": split}) + "\n")
    torch.save({"model": OpensAFile(marker), "book": {"epoch": 1}}, folder / "last.pt")
    torch.save({"model": RunsAShellCommand(marker)}, folder / "best.pt")
    torch.save({"initial": OpensAFile(marker)}, folder / "conv1.pt")


# ------------------------------------------------------------------------------------------------ checkpoints


def test_reader_refuses_code_and_names_the_file(tmp_path):
    marker = tmp_path / "pwned"
    for name, payload in (("a.pt", OpensAFile(marker)), ("b.pt", RunsAShellCommand(marker))):
        torch.save({"model": payload}, tmp_path / name)
        with pytest.raises(ckpt.CheckpointError) as caught:
            ckpt.load(tmp_path / name)
        message = str(caught.value)
        assert str(tmp_path / name) in message and "\n" not in message and "nothing in this file was run" in message
        assert ("io.open" in message) if name == "a.pt" else ("posix.system" in message or "os.system" in message)
    # a plain pickle (not a torch zip), a truncated file, a directory: one line each, no code run
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"model": OpensAFile(marker)}))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:64])
    for path in (tmp_path / "plain.pkl", tmp_path / "cut.pt", tmp_path):
        with pytest.raises(ckpt.CheckpointError, match="^.*" + str(path).replace(".", r"\.")):
            ckpt.load(path)
    assert not marker.exists()


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    ckpt.atomic_save({"rng": [ckpt.rng_state()], "book": {"best": -float("inf"), "epoch": None}}, tmp_path / "r.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3).tolist())
    state = torch.load(tmp_path / "r.pt", weights_only=True)  # plain torch, no allowlist
    ckpt.set_rng_state(state["rng"][0])
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3).tolist())
    assert got == expected and state["book"]["best"] == -float("inf")


def test_first_format_checkpoint_loads_and_upgrades(tmp_path, capsys):
    """A checkpoint of the first format (NumPy / tuple RNG states) still resumes exactly, and ``upgrade`` makes it
    loadable by plain ``torch.load(weights_only=True)``."""
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.ones(2)}, "rng": [old], "book": {"epoch": 3}}, path)
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)
    expected = (random.random(), np.random.rand(), torch.rand(2).tolist())
    ckpt.set_rng_state(ckpt.load(path)["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == expected
    assert ckpt.main(["upgrade", str(path)]) == 0 and "upgraded" in capsys.readouterr().out
    state = torch.load(path, weights_only=True)
    assert state["book"] == {"epoch": 3} and torch.equal(state["model"]["w"], torch.ones(2))
    assert ckpt.main(["upgrade", str(path)]) == 0 and "already current" in capsys.readouterr().out
    torch.save({"model": OpensAFile(tmp_path / "pwned")}, tmp_path / "evil.pt")
    assert ckpt.main(["upgrade", str(tmp_path / "evil.pt")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "pwned").exists()


def test_resume_refuses_a_planted_last_pt(tmp_path, capsys):
    from train.__main__ import main

    marker = tmp_path / "pwned"
    plant_run_folder(tmp_path / "runs" / "evil", marker)
    argv = ["synthetic", "alexnet", "evil", *SMALL, f"logging.runs_dir={tmp_path / 'runs'}", "--resume"]
    assert main([*argv, "--loader", "gpu", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "last.pt" in err[0], err
    assert not marker.exists()


@pytest.mark.timeout(180)
def test_report_refuses_planted_checkpoints(tmp_path):
    """``python -m train.report`` (a real process) on a folder with planted conv1.pt, best.pt and last.pt: each is
    refused in turn (one line naming it), none runs."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "runs" / "evil"
    plant_run_folder(folder, marker)
    planted = {"conv1.pt", "best.pt", "last.pt"}
    while planted:  # each round refuses the first planted file the report reads; then that file goes
        command = [sys.executable, "-m", "train.report", str(folder), "--out", str(tmp_path / "report")]
        run = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=REPO, check=False)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and "refused" in lines[0], run.stderr
        refused = [name for name in planted if f"/{name}:" in lines[0]]
        assert len(refused) == 1, lines[0]
        assert not marker.exists()
        planted.discard(refused[0])
        (folder / refused[0]).unlink()


# ------------------------------------------------------------------------------------------------------ locks

HOLD = "import sys, time; from train.files import exclusive_lock\nwith exclusive_lock(sys.argv[1], 'test'):\n"


def _holder(folder: Path) -> subprocess.Popen:
    """A real process that takes the lock on ``folder`` and sleeps; returns once it holds it."""
    code = HOLD + "    print('locked', flush=True); time.sleep(600)\n"
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_second_locker_is_refused_naming_the_pid_and_a_killed_holder_does_not_block(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(OutputLockedError) as caught, exclusive_lock(tmp_path, "conversion"):
            pass
        message = str(caught.value)
        assert f"pid {holder.pid}" in message and str(tmp_path) in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing anything: the kernel dropped its lock, the file stays
    with exclusive_lock(tmp_path, "conversion") as path:
        assert path.read_text().startswith(f"pid {os.getpid()} on ")
    with exclusive_lock(tmp_path, "conversion"):  # released on exit: the same process takes it again
        pass


@pytest.mark.timeout(300)
def test_concurrent_conversions_into_one_folder(tmp_path):
    """The second conversion into an --out that a running one holds stops at once naming its pid; the first
    completes and verifies. The first is paused (SIGSTOP) while the second tries, so the two surely overlap."""
    out = tmp_path / "out"
    args = [sys.executable, str(REPO / "tools/convert.py"), "synthetic", "--out", str(out), "--split", "val",
            "--subset", "256", "--format", "dali", "--workers", "1"]  # fmt: skip
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        lock = out / ".lock"
        while not (lock.is_file() and lock.read_text().startswith(f"pid {first.pid} ")):
            assert first.poll() is None and time.monotonic() < deadline, "the first conversion never took the lock"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1 and f"pid {first.pid}" in lines[0], second.stderr
        assert time.monotonic() - started < 60  # refused at start-up, not after waiting
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=200)
    assert first.returncode == 0, stderr[-2000:]
    verify = subprocess.run([*args[:2], "synthetic", "--out", str(out), "--verify-only"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert verify.returncode == 0 and "verify: PASS" in verify.stdout, verify.stdout + verify.stderr


def test_training_refuses_a_locked_run_folder(tmp_path, capsys, monkeypatch):
    """``python -m train`` into a run folder another training holds: exit 2 naming that pid, nothing written.

    The holder here is this test process through the trainer's own helper (flock locks belong to an open file,
    so ``main``'s second open of the lock file conflicts with it exactly as another process's would)."""
    from train.__main__ import main, run_folder_lock

    runs = tmp_path / "runs"
    with run_folder_lock(runs / "busy") as lock_path:
        assert lock_path == runs / ".busy.lock" and lock_path.read_text().startswith(f"pid {os.getpid()} ")
        argv = ["synthetic", "alexnet", "busy", *SMALL, f"logging.runs_dir={runs}", "--loader", "gpu"]
        assert main([*argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and "busy" in err[0], err
        assert not (runs / "busy").exists()
    monkeypatch.setenv("RANK", "1")  # torchrun's other ranks do not lock: rank 0 is the one writer
    with run_folder_lock(runs / "busy"), run_folder_lock(runs / "busy"):
        pass


# ------------------------------------------------------------------------------------------- CIFAR-100 files


def test_cifar_files_are_read_as_data_only(tmp_path):
    """CIFAR-100's python files are pickles: they load with only NumPy's array rebuild allowed (both NumPy
    spellings, protocols 2 and 4), and a planted one is refused naming the file, its code never run."""
    from loaders import LoaderError
    from loaders.datasets import CIFAR_FOLDER, cifar100_arrays, cifar100_class_names, read_cifar_pickle

    folder = tmp_path / CIFAR_FOLDER
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (5, 3072), dtype=np.uint8)
    test = {"data": images, "fine_labels": [3, 1, 4, 1, 5], "filenames": ["a.png"] * 5, "batch_label": "testing"}
    numpy1 = pickle.dumps(test, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in numpy1  # as the official files (written with NumPy 1) name it
    (folder / "test").write_bytes(numpy1)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}, protocol=4))
    got, labels = cifar100_arrays("test", tmp_path)
    assert np.array_equal(got, images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)) and labels.tolist() == [
        3,
        1,
        4,
        1,
        5,
    ]
    assert cifar100_class_names(tmp_path)[:2] == ["c0", "c1"]
    (folder / "test").write_bytes(pickle.dumps({"data": OpensAFile(tmp_path / "pwned"), "fine_labels": []}))
    with pytest.raises(LoaderError, match=r"refused .*test: loading it would call io\.open"):
        cifar100_arrays("test", tmp_path)
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": RunsAShellCommand(tmp_path / "pwned")}))
    with pytest.raises(LoaderError, match="refused"):
        read_cifar_pickle(folder / "meta")
    assert not (tmp_path / "pwned").exists()
