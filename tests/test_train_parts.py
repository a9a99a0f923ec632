"""Trainer parts on small real modules: schedules, weight-decay groups, metrics, checkpoints, the epoch loop."""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from divnorm import DivisiveNorm2d
from loaders import build_loader
from loaders.base import LoaderSpec
from train.checkpoint import CheckpointWriteError, atomic_save, conv1_weight, load, rng_state, set_rng_state
from train.config import ConfigError, load_config
from train.distributed import DistributedEnv, detect_env
from train.loop import NonFiniteLossError, TrainState, evaluate, train_one_epoch
from train.metrics import MetricSums, correct_topk
from train.schedule import LrSchedule, build_optimizer, parameter_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_net(num_classes: int = 100) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        DivisiveNorm2d(16),
        nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.LayerNorm(256),
        nn.Linear(256, num_classes),
    )


def schedule_for(name: str, **overrides) -> LrSchedule:
    cfg = load_config("synthetic", "alexnet")["lr_scheduler"]
    cfg.update(name=name, **overrides)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    return LrSchedule(optimizer, cfg, base_lr=1.0, epochs=10, steps=10)


def test_steplr_is_epochwise():
    s = schedule_for("steplr", step_size=3, gamma=0.1, warmup_epochs=0)
    assert [round(s.multiplier(e * 10), 6) for e in range(7)] == [1, 1, 1, 0.1, 0.1, 0.1, 0.01]
    assert s.multiplier(29) == 1.0  # last step of epoch 2


def test_cosine_warmup_and_onecycle_values():
    s = schedule_for("cosine", t_max=10, min_lr=0.0, warmup_epochs=0)
    assert s.multiplier(0) == 1.0 and math.isclose(s.multiplier(50), 0.5) and s.multiplier(100) < 1e-12
    w = schedule_for("none", warmup_epochs=1, warmup_start_factor=0.1)
    assert math.isclose(w.multiplier(0), 0.1) and math.isclose(w.multiplier(5), 0.55) and w.multiplier(10) == 1.0
    o = schedule_for("onecycle", pct_start=0.25, warmup_epochs=0)
    assert o.multiplier(0) == 0 and math.isclose(o.multiplier(25), 1.0) and math.isclose(o.multiplier(100), 0.0)
    assert o.multiplier(12) < o.multiplier(25) > o.multiplier(60)


def test_plateau_reduces_after_patience_and_round_trips():
    s = schedule_for("plateau", patience=2, factor=0.1, warmup_epochs=0)
    for loss in [1.0, 1.0, 1.0]:
        s.end_epoch(loss)
    assert s.multiplier(0) == 1.0  # two bad epochs: not yet more than patience
    s.end_epoch(1.0)
    assert math.isclose(s.multiplier(0), 0.1)
    t = schedule_for("plateau", patience=2, factor=0.1)
    t.load_state_dict(s.state_dict())
    assert t.multiplier(0) == s.multiplier(0) and t.state_dict() == s.state_dict()
    assert s.step(3) == pytest.approx(0.1) and s.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_no_weight_decay_selects_norm_and_divnorm_by_type():
    net = small_net()
    groups = parameter_groups(net, 5e-4, no_decay_on_norm=True)
    no_decay = {id(p) for p in groups[1]["params"]}
    expected = {id(p) for m in (net[2], net[3], net[6]) for p in m.parameters()}
    assert no_decay == expected and groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 5e-4
    assert {id(p) for p in groups[0]["params"]} == {id(p) for m in (net[0], net[7]) for p in m.parameters()}
    assert len(parameter_groups(net, 5e-4, no_decay_on_norm=False)) == 1


def test_optimizers_from_config():
    cfg = load_config("imagenet", "resnet18")["optimizer"]
    sgd = build_optimizer(small_net(), cfg, 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    adamw = build_optimizer(small_net(), {**cfg, "name": "adamw"}, 0.1)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["eps"] == 1e-7


def test_correct_topk_and_metric_sums():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0], [0.0, 0, 9, 0, 0, 0]])
    labels = torch.tensor([5, 5, 0])
    top1, top5 = correct_topk(logits, labels)
    assert int(top1) == 1 and int(top5) == 2
    sums = MetricSums(torch.device("cpu"))
    sums.update(torch.tensor(2.0), logits, labels)
    sums.update(torch.tensor(1.0), logits[:1], labels[:1])
    result = sums.result(DistributedEnv())
    assert result["samples"] == 4 and math.isclose(result["loss"], (2 * 3 + 1) / 4)
    assert math.isclose(result["top1"], 50.0) and math.isclose(result["top5"], 75.0)


def test_detect_env(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = detect_env()
    assert (env.rank, env.world_size, env.local_rank, env.enabled, env.is_main) == (1, 4, 1, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="torchrun"):
        detect_env()


def test_atomic_save_and_rng_round_trip(tmp_path):
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    atomic_save({"x": a}, tmp_path / "c.pt")
    assert torch.equal(load(tmp_path / "c.pt")["x"], a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temp file left behind
    assert conv1_weight(small_net()).shape == (16, 3, 3, 3)


def _file_size_limit(limit: int):
    """preexec_fn: a disk that is full after ``limit`` bytes per file (writes past it fail with EFBIG)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write() instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


FULL_DISK_SAVE = """
import sys, torch
from train.checkpoint import CheckpointWriteError, atomic_save
try:
    atomic_save({"w": torch.zeros(1 << 20)}, sys.argv[1])  # 4 MiB, past the 1 MiB limit
except CheckpointWriteError as error:
    print(error)
    sys.exit(3)
"""


def test_failed_checkpoint_write_keeps_the_old_file(tmp_path):
    """A real short write (RLIMIT_FSIZE, which torch reports as a full disk does): a clear error naming the file,
    the old checkpoint byte for byte, no temp file; from the CLI, exit 1 and one line, no traceback."""
    target = tmp_path / "last.pt"
    atomic_save({"w": torch.ones(4)}, target)
    before = target.read_bytes()
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", FULL_DISK_SAVE, str(target)], env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=_file_size_limit(1 << 20))  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"could not write {target}" in done.stdout and "the write stopped short" in done.stdout
    assert "MiB free" in done.stdout and "--resume" in done.stdout
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert issubclass(CheckpointWriteError, OSError)

    runs = tmp_path / "runs"
    argv = ["synthetic", "alexnet", "full", "data.subset=32", "data.batch_size=32", "data.image_size=16",
            f"logging.runs_dir={runs}", "--epochs", "1", "--loader", "gpu", "--device", "cpu"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "train", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=240, preexec_fn=_file_size_limit(16 << 20))  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "error: could not write" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not [p for p in (runs / "full").iterdir() if p.name.startswith(".")], "temp file left behind"


# ----------------------------------------------------------------------------------- the epoch loop itself


def tensor_loader(split: str, train: bool, subset: int, dtype=torch.float32, batch: int = 32):
    spec = LoaderSpec("synthetic", split, batch, train, dtype=dtype, seed=1, options={"subset": subset})
    return build_loader("gpu", spec)


def make_state(net: nn.Module, lr: float = 0.05, amp: torch.dtype | None = None) -> TrainState:
    cfg = load_config("synthetic", "alexnet")
    optimizer = build_optimizer(net, cfg["optimizer"], lr)
    schedule = LrSchedule(optimizer, {**cfg["lr_scheduler"], "name": "none"}, lr, 1, 10)
    return TrainState(net, optimizer, schedule, nn.CrossEntropyLoss(), torch.device("cpu"), DistributedEnv(), amp,
                      refresh_steps=2)  # fmt: skip


def test_train_epoch_learns_and_reports_timing():
    torch.manual_seed(0)
    net = small_net().to(memory_format=torch.channels_last)
    state = make_state(net)
    loader = tensor_loader("train", True, 256)
    first = train_one_epoch(state, loader, 0)
    for epoch in range(1, 3):
        last = train_one_epoch(state, loader, epoch)
    assert first["samples"] == 256 and first["steps"] == 8 and state.global_step == 24
    assert last["loss"] < first["loss"]
    assert first["seconds"] > 0 and 0 <= first["data_seconds"] <= first["seconds"]
    assert math.isclose(first["data_seconds"] + first["compute_seconds"], first["seconds"], rel_tol=1e-6)
    assert first["images_per_second"] == pytest.approx(256 / first["seconds"])
    val = evaluate(state, tensor_loader("val", False, 200, batch=64))
    assert val["samples"] == 200 and 0 <= val["top1"] <= val["top5"] <= 100


def test_bf16_autocast_on_cpu_and_progress_and_record():
    torch.manual_seed(0)
    net = small_net()
    state = make_state(net, amp=torch.bfloat16)
    calls, record = [], []
    result = train_one_epoch(state, tensor_loader("train", True, 128, dtype=torch.bfloat16), 0,
                             progress=lambda s, t, ips: calls.append((s, t)), record=record)  # fmt: skip
    assert math.isfinite(result["loss"]) and result["samples"] == 128
    assert calls[0] == (2, 4) and calls[-1] == (4, 4)
    trace = torch.cat(record)
    assert trace.shape == (128, 2) and trace[:, 0].min() >= 0 and trace[:, 0].max() < 100


def test_nan_loss_stops_naming_the_step():
    net = small_net()
    state = make_state(net, lr=0.05)
    with torch.no_grad():
        net[7].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 0 \(epoch 4\)"):
        train_one_epoch(state, tensor_loader("train", True, 128), 3)


def test_epoch_through_the_torch_loader():
    """The same loop on the torchvision DataLoader backend (no workers: in-process)."""
    torch.manual_seed(0)
    spec = LoaderSpec("synthetic", "train", 32, True, workers=0, seed=1, options={"subset": 64, "pin_memory": False})
    result = train_one_epoch(make_state(small_net()), build_loader("torch", spec), 0)
    assert result["samples"] == 64 and result["steps"] == 2 and math.isfinite(result["loss"])


def test_progress_bar_on_off():
    from train.metrics import progress_bar_factory

    assert progress_bar_factory("off", True)(0, 1) is None
    assert progress_bar_factory("on", False)(0, 1) is None  # only rank 0 draws
    update = progress_bar_factory("on", True)(0, 1)
    update(1, 2, 100.0)
    update(2, 2, 100.0)


def test_metrics_log_truncates_to_the_checkpoint(tmp_path):
    from train.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch})
    with open(log.path, "a") as f:
        f.write('{"epoch": 4, "tr')  # torn line of an interrupted write
    log.truncate_after(2)
    assert [r["epoch"] for r in log.read()] == [1, 2]


# ------------------------------------------------------------------------------------- data.loader_priority


def test_loader_priority_is_a_no_op_on_the_cpu_and_checks_its_value():
    from train.streams import describe, running_on, training_stream

    cpu = torch.device("cpu")
    assert training_stream(cpu, "same") is None and training_stream(cpu, "low") is None
    assert describe(None, "same") is None
    assert "no effect without a CUDA device" in describe(None, "low")
    with running_on(None):
        assert torch.ones(2).sum() == 2
    with pytest.raises(ValueError, match="same, low"):
        training_stream(cpu, "high")
    with pytest.raises(ConfigError, match="data.loader_priority"):
        load_config("synthetic", "alexnet", ["data.loader_priority=high"])


@pytest.mark.gpu
def test_loader_priority_low_runs_the_block_on_the_highest_priority_stream():
    from train.streams import running_on, training_stream

    device = torch.device("cuda")
    caller = torch.cuda.current_stream(device)
    stream = training_stream(device, "low")
    assert stream is not None and stream.priority == torch.cuda.Stream.priority_range()[1] < 0
    # Each stream is held back by a GPU sleep (~tens of ms) before it writes, so a missing wait reads stale data:
    # the block must see x written by the caller's stream, and the caller must see y written by the block.
    x = torch.zeros(1024, 1024, device=device)
    torch.cuda._sleep(50_000_000)
    x.fill_(2.0)
    with running_on(stream):
        assert torch.cuda.current_stream(device) == stream
        torch.cuda._sleep(50_000_000)
        y = (x @ x).sum()
    assert torch.cuda.current_stream(device) == caller
    assert y.item() == 4.0 * 1024**3  # every entry of x @ x is 4 * 1024: exact in fp32 (and tf32) sums
    assert training_stream(device, "same") is None
