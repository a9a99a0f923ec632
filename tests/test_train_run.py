"""Whole runs of ``python -m train`` on a small synthetic subset: run folder, resume, NaN stop, early stop, DDP.

The network is the real DN ResNet-18 at 16 px (the lightest checkpoints of the four) on the tensor-resident
loader; each run reads 64 training samples (2 steps of 32) and evaluates on 64 validation and 64 test samples.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from train.__main__ import main
from train.checkpoint import load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "data.subset=64",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "data.image_size=16",
    "model.divnorm_specs.type=ours",
    "lr_scheduler.name=none",
    "optimizer.lr=0.02",
    "logging.refresh_steps=2",
]


# The run's mechanics do not depend on the network; ResNet-18 (11 M parameters, with BatchNorm) writes ~135 MB of
# checkpoints per epoch where AlexNet (57 M, the grid's model) writes ~690 MB, ~8 s of every run on the 2-core VM.
MODEL = "resnet18"


def train(tmp_path, exp: str, *extra: str, epochs: int = 2, loader: str = "gpu") -> int:
    argv = ["synthetic", MODEL, exp, *SMALL, f"logging.runs_dir={tmp_path}", "--epochs", str(epochs)]
    return main([*argv, "--loader", loader, "--device", "cpu", *extra])


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two epochs in one go (shared by the run-folder and resume tests)."""
    root = tmp_path_factory.mktemp("runs")
    assert train(root, "straight") == 0
    yield root / "straight"
    shutil.rmtree(root, ignore_errors=True)  # ~270 MB of checkpoints


def test_run_folder_contents(straight_run):
    folder = straight_run
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt", "conv1.pt", "summary.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temp files left behind"
    summary = json.loads((folder / "summary.json").read_text())
    for split in ("val", "test"):
        assert set(summary[split]) == {"top1", "top5", "loss"}
        assert 0 <= summary[split]["top1"] <= summary[split]["top5"] <= 100
    assert summary["images_per_second"] > 0 and summary["wall_seconds"] > 0
    assert summary["epochs"] == 2 and summary["dataset"] == "synthetic" and summary["loader"] == "gpu"
    assert summary["best_epoch"] in (1, 2) and summary["stopped"] == "completed"
    assert summary["compile"] == {"setting": "auto", "enabled": False, "mode": None, "seconds": 0.0,
                                  "fallback_error": None}  # fmt: skip
    assert summary["compile_seconds"] == 0
    epochs = (folder / "metrics.jsonl").read_text().splitlines()
    val_seconds = sum(json.loads(line)["val"]["seconds"] for line in epochs)
    assert summary["eval_seconds"] == pytest.approx(val_seconds, rel=1e-3)
    assert summary["eval_share"] == pytest.approx(val_seconds / (val_seconds + summary["train_seconds"]), rel=1e-3)
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    for line in lines:
        assert line["train"]["samples"] == 64 and line["val"]["samples"] == 64
        train = line["train"]
        assert train["data_seconds"] + train["compute_seconds"] + train["compile_seconds"] == pytest.approx(
            train["seconds"], rel=1e-4
        )
        assert train["compile_seconds"] == 0  # training.compile=auto is eager on the CPU
    config = json.loads((folder / "config.json").read_text())
    assert config["data"]["subset"] == 64 and config["run"]["model"] == MODEL
    conv1 = torch.load(folder / "conv1.pt")
    assert set(conv1) == {"initial", "best", "final"} and conv1["initial"].shape == (64, 3, 3, 3)
    assert not torch.equal(conv1["initial"], conv1["final"])
    last = load(folder / "last.pt")
    assert last["book"]["epoch"] == 2 and last["global_step"] == 4
    first = next(v for v in last["model"].values() if v.ndim == 4)  # conv1 comes first in module order
    assert torch.equal(first.float(), conv1["final"])


def test_every_checkpoint_loads_with_weights_only(straight_run):
    """last.pt, best.pt and conv1.pt hold only tensors and plain data: plain torch.load(weights_only=True) reads
    them, RNG states included (see docs/safety.md)."""
    for name in ("last.pt", "best.pt", "conv1.pt"):
        state = torch.load(straight_run / name, map_location="cpu", weights_only=True)
        assert isinstance(state, dict) and state, name
    rng = torch.load(straight_run / "last.pt", weights_only=True)["rng"][0]
    assert rng["python"]["state"].dtype == torch.int64 and rng["python"]["state"].shape == (625,)
    assert rng["numpy"]["keys"].shape == (624,) and rng["torch"].dtype == torch.uint8


def test_resume_gives_identical_weights(straight_run, tmp_path):
    # no best.pt where a test does not read it: CI machines have little disk
    assert train(tmp_path, "split", "checkpoint.save_best=false", epochs=1) == 0
    assert load(tmp_path / "split" / "last.pt")["book"]["epoch"] == 1
    assert train(tmp_path, "split", "checkpoint.save_best=false", "--resume", epochs=2) == 0
    a = load(straight_run / "last.pt")
    b = load(tmp_path / "split" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    lines = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]


def test_existing_folder_needs_resume_or_overwrite(straight_run, capsys):
    assert train(straight_run.parent, "straight") == 2
    assert "--resume" in capsys.readouterr().err
    assert train(straight_run.parent, "nothing-here", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    # epoch 1 trains normally; steplr multiplies the lr by 1e20 from epoch 2 on, which blows the loss up
    code = train(tmp_path, "nan", "lr_scheduler.name=steplr", "lr_scheduler.step_size=1", "lr_scheduler.gamma=1e20",
                 "optimizer.lr=0.01", "model.batchnorm=false", "model.divnorm_specs.type=nonorm",
                 "checkpoint.save_best=false", epochs=3)  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "stopped: training loss became NaN/inf at step" in out and "(epoch 2)" in out
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["stopped"] == "nonfinite" and summary["epochs"] == 1
    last = load(tmp_path / "nan" / "last.pt")
    assert last["book"]["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in last["model"].values())


def test_early_stop_with_patience(tmp_path):
    # lr 0 and no BatchNorm (whose running statistics move even at lr 0): the validation loss stays the same, so
    # patience 1 stops after epoch 2
    assert train(tmp_path, "early", "optimizer.lr=0", "model.batchnorm=false", "training.early_stop=true",
                 "training.patience=1",
                 "checkpoint.save_best=false", epochs=5) == 0  # fmt: skip
    summary = json.loads((tmp_path / "early" / "summary.json").read_text())
    assert summary["stopped"] == "early_stop" and summary["epochs"] == 2


# The 2-process torchrun run (identical weights, disjoint samples in shard order) is tests/test_distributed.py,
# for every installed loader.


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_run_with_amp_and_compile(tmp_path, amp):
    """On a GPU: autocast (GradScaler for fp16), channels-last, torch.compile; the run folder as on the CPU."""
    argv = ["synthetic", "alexnet", f"gpu-{amp}", *SMALL, f"logging.runs_dir={tmp_path}", "--epochs", "1",
            "--loader", "gpu", "--device", "cuda", f"training.amp={amp}", "training.compile=true"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / f"gpu-{amp}" / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["amp"] == amp
    assert math.isfinite(summary["test"]["loss"])
    last = load(tmp_path / f"gpu-{amp}" / "last.pt")
    assert (last["scaler"] is not None) == (amp == "fp16")


@pytest.mark.gpu
def test_cuda_run_with_the_loader_below_training(tmp_path, capsys):
    """``data.loader_priority=low`` on a GPU: the run trains, validates and tests on the high-priority stream (CUDA
    graphs and compile as by default) and says so; the same seed on the default stream gives the same test loss."""
    losses = {}
    for priority in ("same", "low"):
        argv = ["synthetic", MODEL, f"prio-{priority}", *SMALL, f"logging.runs_dir={tmp_path}", "--epochs", "1",
                "--loader", "gpu", "--device", "cuda", f"data.loader_priority={priority}"]  # fmt: skip
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert ("data.loader_priority=low: training on a CUDA stream of priority -" in out) == (priority == "low")
        losses[priority] = json.loads((tmp_path / f"prio-{priority}" / "summary.json").read_text())["test"]["loss"]
    assert losses["low"] == pytest.approx(losses["same"], rel=2e-2)  # bf16 and atomics: close, not bit-equal


@pytest.mark.parametrize("interval", [3600, 0])
def test_checkpoint_interval_defers_epoch_checkpoints(tmp_path, monkeypatch, interval):
    """``checkpoint.interval_seconds``: with an hour, of three epochs' checkpoints only the first (which shows at
    once that the disk takes them) and the last are written; best.pt carries the best epoch the run reports (kept
    in memory until the last write); with 0, after every epoch. The writes are the real ones, counted on their
    way to disk."""
    from train import checkpoint as ckpt

    written: list[str] = []
    real_save = ckpt.atomic_save

    def counted(obj, path):
        written.append(os.path.basename(path))
        return real_save(obj, path)

    monkeypatch.setattr(ckpt, "atomic_save", counted)
    assert train(tmp_path, "iv", f"checkpoint.interval_seconds={interval}", "optimizer.lr=0.005", epochs=3) == 0
    folder = tmp_path / "iv"
    summary = json.loads((folder / "summary.json").read_text())
    assert written.count("last.pt") == (2 if interval else 3)
    improving = _improving_epochs(folder)
    assert written.count("best.pt") == (1 + any(e > 1 for e in improving) if interval else len(improving))
    assert load(folder / "last.pt")["book"]["epoch"] == 3
    assert load(folder / "best.pt")["epoch"] == summary["best_epoch"]


def _improving_epochs(folder) -> list[int]:
    """The epochs whose validation top-1 beat every earlier one (the best.pt writes of an every-epoch run)."""
    best, epochs = -1.0, []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["val"]["top1"] > best:
            best = row["val"]["top1"]
            epochs.append(row["epoch"])
    return epochs


def test_checkpoint_interval_must_be_a_number_of_seconds(tmp_path, capsys):
    assert train(tmp_path, "bad", "checkpoint.interval_seconds=-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.interval_seconds must be 0" in err[0]
