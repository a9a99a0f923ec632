"""Two CPU processes under torchrun (gloo) for every installed loader: shards, weights, reduced metrics, resume.

One 2-rank run of one epoch per backend (synthetic subset of 32, ResNet-18 at 16 px, no augmentation so a
sample is recognisable by its pixel sum) is shared by four checks:

* the ranks read disjoint shards that together cover the 32 samples once, in the contract's order;
* both ranks end with identical parameters (DDP) and the checkpoint holds them;
* the validation top-1 that the 2-rank run reduced over both ranks equals a 1-process evaluation of the saved
  weights with the same backend (so accuracy is over the whole split, not rank 0's half);
* a 1-process ``--resume`` continues the 2-process checkpoint for a second epoch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from loaders.base import LoaderSpec, shard_indices
from loaders.datasets import synthetic_arrays
from train.__main__ import main
from train.checkpoint import load
from train.data import build_split_loader, loader_spec
from train.run import build_network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "data.subset=32",
    "data.batch_size=8",
    "data.eval_batch_size=12",  # 16 validation samples per rank: one full and one partial batch
    "data.image_size=16",
    "data.augment=none",
    "data.workers=1",
    "lr_scheduler.name=none",
    "optimizer.lr=0.02",
    "training.test_at_end=false",
    "checkpoint.save_best=false",  # a checkpoint write costs seconds on a 2-core machine
    "checkpoint.save_conv1=false",
    "logging.refresh_steps=2",
]
MODEL = "resnet18"  # with BatchNorm (rank 0's running statistics must reach every rank); 5x fewer weights than AlexNet
N = 32  # samples per split: 2 training steps of 8 per rank
BACKENDS = {"torch": None, "gpu": None, "dali": "nvidia.dali", "ffcv": "ffcv"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _installed(loader: str) -> bool:
    module = BACKENDS[loader]
    return module is None or importlib.util.find_spec(module) is not None


# ids: "gpu" as a test id would make conftest treat the CPU test as a CUDA test
@pytest.fixture(scope="module", params=list(BACKENDS), ids=["torch", "tensor", "dali", "ffcv"])
def two_rank_run(request, tmp_path_factory):
    """(loader, run folder) of one 2-process epoch; the folder's runs_dir is its parent."""
    loader = request.param
    if not _installed(loader):
        pytest.skip(f"{loader} backend not installed")
    root = tmp_path_factory.mktemp(f"ddp-{loader}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           "synthetic", MODEL, "ddp", *SMALL, "training.record_samples=true", f"logging.runs_dir={root}",
           f"data.path={root / 'data'}", "--epochs", "1", "--loader", loader, "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=220)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    yield loader, root / "ddp"
    shutil.rmtree(root, ignore_errors=True)  # ~260 MB per backend (checkpoint, float64 trace)


def test_shards_disjoint_and_cover_the_epoch(two_rank_run):
    loader, folder = two_rank_run
    record = load(folder / "samples.pt")["ranks"]
    assert len(record) == 2
    _, labels = synthetic_arrays("train")
    labels = torch.from_numpy(labels[:N])
    sums = []
    for rank, entry in enumerate(record):
        assert entry["samples"].shape == (N // 2, 2), f"{loader}: rank {rank} read {entry['samples'].shape[0]} samples"
        spec = LoaderSpec("synthetic", "train", 8, True, seed=42, rank=rank, world_size=2)
        expected = shard_indices(N, spec, 0)
        assert torch.equal(entry["samples"][:, 0].long(), labels[expected]), f"{loader}: rank {rank} order"
        sums.append({round(v, 2) for v in entry["samples"][:, 1].tolist()})
    assert len(sums[0]) == N // 2 and len(sums[1]) == N // 2 and not sums[0] & sums[1], f"{loader}: ranks overlap"
    # the two shards together are the whole subset: every label count of the N samples is matched
    seen = torch.cat([entry["samples"][:, 0].long() for entry in record])
    assert torch.equal(torch.bincount(seen, minlength=10), torch.bincount(labels, minlength=10))


def test_identical_weights_on_both_ranks(two_rank_run):
    loader, folder = two_rank_run
    record = load(folder / "samples.pt")["ranks"]
    assert torch.equal(record[0]["params"], record[1]["params"]), f"{loader}: ranks ended with different weights"
    last = load(folder / "last.pt")
    saved = torch.cat([v.double().flatten() for k, v in last["model"].items() if "running" not in k and
                       "num_batches" not in k])  # fmt: skip
    assert torch.equal(saved, record[0]["params"]), f"{loader}: last.pt does not hold the trained weights"
    assert last["global_step"] == 2 and len(last["rng"]) == 2


def test_validation_accuracy_equals_single_process(two_rank_run):
    loader, folder = two_rank_run
    config = json.loads((folder / "config.json").read_text())
    config.pop("run")
    reduced = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])["val"]
    assert reduced["samples"] == N
    net = build_network("synthetic", MODEL, config)
    net.load_state_dict(load(folder / "last.pt")["model"])
    net.eval()
    spec = loader_spec(config, "synthetic", "val", False, torch.device("cpu"), torch.float32)
    val = build_split_loader(loader, spec)
    correct = total = 0
    with torch.no_grad():
        for images, labels in val:
            correct += int((net(images).argmax(1) == labels).sum())
            total += labels.numel()
    val.close()
    assert total == N
    assert reduced["top1"] == pytest.approx(100.0 * correct / total, abs=1e-6), f"{loader}: reduced top-1 differs"


def test_resume_on_one_process(two_rank_run, tmp_path, capsys):
    loader, folder = two_rank_run
    runs = tmp_path / "runs"
    (runs / "ddp").mkdir(parents=True)
    for name in ("last.pt", "metrics.jsonl", "config.json"):
        (runs / "ddp" / name).write_bytes((folder / name).read_bytes())
    argv = ["synthetic", MODEL, "ddp", *SMALL, f"logging.runs_dir={runs}", f"data.path={folder.parent / 'data'}",
            "--epochs", "2", "--loader", loader, "--device", "cpu", "--resume"]  # fmt: skip
    assert main(argv) == 0
    assert "RNG reseeded per rank" in capsys.readouterr().out
    last = load(runs / "ddp" / "last.pt")
    assert last["book"]["epoch"] == 2 and len(last["rng"]) == 1
    assert last["global_step"] == 2 + 4  # epoch 2 on one rank: 32 samples / batch 8
    lines = [json.loads(line) for line in (runs / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[1]["train"]["samples"] == N and lines[1]["val"]["samples"] == N
    start = load(folder / "last.pt")["model"]
    assert any(not torch.equal(start[k], last["model"][k]) for k in start), "the resumed epoch did not train"
