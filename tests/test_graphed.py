"""``training.cuda_graphs``: the whole-step graph of the tensor-resident path.

On the CPU the captured step's code runs without capture (:class:`train.graphed.GraphedSteps` with
``capture=False``): it must train exactly like the ordinary loop (same batches from the epoch plan, the learning
rate read from a device tensor, the same metric sums). The capture itself and its speed are GPU matters (marked).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from loaders import build_loader
from loaders.base import LoaderSpec
from train.__main__ import main
from train.config import load_config
from train.distributed import DistributedEnv
from train.graphed import GraphedSteps, graphs_blocker, train_one_epoch_graphed
from train.loop import TrainState, train_one_epoch
from train.schedule import LrSchedule, build_optimizer

from .test_train_parts import small_net
from .test_train_run import SMALL


def resident_loader(device: torch.device, batch: int = 32, subset: int = 160) -> object:
    spec = LoaderSpec("synthetic", "train", batch, True, device=device, seed=3, options={"subset": subset})
    return build_loader("gpu", spec)


def make_state(
    net: nn.Module, device: torch.device, *, lr_on_device: bool, fused: bool = False, amp=None, optimizer: str = "sgd"
):
    cfg = load_config("synthetic", "alexnet")
    options = {**cfg["optimizer"], "name": optimizer}
    optimizer = build_optimizer(net, options, 0.05, fused=fused, lr_on_device=lr_on_device)
    # cosine: the learning rate changes every step, so a stale (captured) value would show
    schedule = LrSchedule(optimizer, {**cfg["lr_scheduler"], "name": "cosine", "t_max": 3}, 0.05, 3, 5)
    return TrainState(net, optimizer, schedule, nn.CrossEntropyLoss(), device, DistributedEnv(), amp,
                      refresh_steps=2)  # fmt: skip


def test_the_step_code_trains_exactly_like_the_loop_on_cpu():
    device = torch.device("cpu")
    torch.manual_seed(0)
    reference = small_net().to(memory_format=torch.channels_last)
    graphed_net = small_net().to(memory_format=torch.channels_last)
    graphed_net.load_state_dict(reference.state_dict())
    loop_state = make_state(reference, device, lr_on_device=True)  # the same float32 learning rate in both
    graph_state = make_state(graphed_net, device, lr_on_device=True)
    assert isinstance(graph_state.optimizer.param_groups[0]["lr"], torch.Tensor)
    loader = resident_loader(device)
    steps = GraphedSteps(graph_state, resident_loader(device), capture=False)
    for epoch in range(2):
        want = train_one_epoch(loop_state, loader, epoch)
        got = train_one_epoch_graphed(graph_state, steps, epoch)
        for key in ("loss", "top1", "top5", "samples", "steps", "lr"):
            assert got[key] == want[key], key
        assert got["lr"] != 0.05  # the schedule moved the device learning rate
    assert loop_state.global_step == graph_state.global_step == 10 and int(steps.global_step) == 10
    for (name, a), b in zip(reference.state_dict().items(), graphed_net.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_failed_capture_goes_on_uncaptured_or_raises_when_strict():
    """The capture itself fails (on the CPU: no CUDA graph can be made; on a GPU e.g. an op that syncs): under
    ``auto`` the step runs uncaptured, the same as the ordinary step, with one line naming the error; under
    ``training.cuda_graphs=true`` the error is raised with its cause."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    reference, net = small_net(), small_net()
    net.load_state_dict(reference.state_dict())
    lines: list[str] = []
    steps = GraphedSteps(make_state(net, device, lr_on_device=True), resident_loader(device), capture=False,
                         say=lines.append)  # fmt: skip
    steps.start_epoch(0)
    assert steps._capture_and_replay() >= 0.0
    assert steps.graph is None and not steps.capture and steps.fallback_error
    assert len(lines) == 1 and "capturing the training step failed" in lines[0] and steps.fallback_error in lines[0]
    assert steps.describe() == {"captured": False, "capture_seconds": 0.0, "fallback_error": steps.fallback_error}
    assert int(steps.step_index) == 1 and int(steps.global_step) == 1  # the step ran once, uncaptured
    loop = make_state(reference, device, lr_on_device=True)
    loader = resident_loader(device)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    loop.optimizer.zero_grad(set_to_none=True)
    loop.criterion(reference(images), labels).backward()
    loop.optimizer.step()
    for (name, a), b in zip(reference.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), name

    strict = GraphedSteps(make_state(small_net(), device, lr_on_device=True), resident_loader(device),
                          capture=False, strict=True)  # fmt: skip
    strict.start_epoch(0)
    with pytest.raises(RuntimeError, match="cuda_graphs=true: capturing the training step failed") as raised:
        strict._capture_and_replay()
    assert raised.value.__cause__ is not None and int(strict.step_index) == 0


def test_the_step_code_stops_at_a_signal_and_resumes_exactly(monkeypatch):
    """A SIGTERM (the trainer's test hook: a real signal through the real handler) inside epoch 2 of the captured
    step's code: the boundary saves the position, and a fresh model + optimizer + GraphedSteps resumed from it end
    with the weights and the epoch's metrics of the uninterrupted run, bit for bit on the CPU."""
    import copy

    from train.preempt import SIGNAL_AT_STEP_ENV, StepBoundary, StopSignals

    device = torch.device("cpu")
    torch.manual_seed(0)
    init = small_net().to(memory_format=torch.channels_last).state_dict()

    def fresh():
        net = small_net().to(memory_format=torch.channels_last)
        net.load_state_dict(init)
        state = make_state(net, device, lr_on_device=True)
        return net, state, GraphedSteps(state, resident_loader(device), capture=False)

    net, state, steps = fresh()
    reference = [train_one_epoch_graphed(state, steps, epoch) for epoch in range(2)]

    saved = {}

    def save(position):
        saved.update(position=position, net=copy.deepcopy(net2.state_dict()), step=state2.global_step,
                     optimizer=copy.deepcopy(state2.optimizer.state_dict()))  # fmt: skip

    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "7")  # epoch 2 (5 steps an epoch), after its 2nd batch
    net2, state2, steps2 = fresh()
    signals = StopSignals()
    boundary = StepBoundary(DistributedEnv(), signals, 0, save)
    signals.install()
    try:
        assert not train_one_epoch_graphed(state2, steps2, 0, boundary=boundary)["preempted"]
        stopped = train_one_epoch_graphed(state2, steps2, 1, boundary=boundary)
    finally:
        signals.close()
    assert stopped["preempted"] and saved["position"].epoch == 1 and saved["position"].batch == 2
    assert saved["step"] == 7

    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    net3, state3, steps3 = fresh()
    net3.load_state_dict(saved["net"])
    state3.optimizer.load_state_dict(saved["optimizer"])
    for group in state3.optimizer.param_groups:  # as Run.restore: the learning rate stays a tensor
        group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32).clone()
    state3.global_step = saved["step"]
    resumed = StepBoundary(DistributedEnv(), StopSignals(), 0, save)
    resumed.resume = saved["position"]
    got = train_one_epoch_graphed(state3, steps3, 1, boundary=resumed)
    for key in ("loss", "top1", "top5", "samples", "steps", "lr"):
        assert got[key] == reference[1][key], key
    for (name, a), b in zip(net.state_dict().items(), net3.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_nan_inside_the_step_is_reported_with_its_step():
    device = torch.device("cpu")
    torch.manual_seed(0)
    state = make_state(small_net(), device, lr_on_device=True)
    state.schedule.base_lr = 1e30  # the first update blows the weights up; the loss goes non-finite after it
    steps = GraphedSteps(state, resident_loader(device), capture=False)
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step [1-4] \(epoch 1\)"):
        train_one_epoch_graphed(state, steps, 0)


def test_blocker_names_the_reason():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    loader = resident_loader(cpu, subset=64)
    ok = {"device": cuda, "loader": loader, "world_size": 1, "amp": "bf16", "compile_mode": "default",
          "record_samples": False}  # fmt: skip
    assert graphs_blocker(**ok) is None
    for change, words in (({"device": cpu}, "CUDA device"), ({"loader": object()}, "--loader gpu"),
                          ({"world_size": 2}, "one process"), ({"amp": "fp16"}, "GradScaler"),
                          ({"compile_mode": "reduce-overhead"}, "reduce-overhead"),
                          ({"compile_mode": "max-autotune"}, "max-autotune captures CUDA graphs of its own"),
                          ({"record_samples": True}, "record_samples")):  # fmt: skip
        assert words in graphs_blocker(**{**ok, **change})
    assert graphs_blocker(**{**ok, "compile_mode": "max-autotune-no-cudagraphs"}) is None


def test_compile_modes_that_capture_graphs_of_their_own_are_the_blocked_ones():
    """Which modes bring inductor's own CUDA graphs is torch's (``triton.cudagraphs`` in its mode options), read
    here from the installed torch, so a torch that changes them fails this test; every mode is a config choice."""
    import torch._inductor

    from tools.bench.settings import COMPILE_MODES as BENCH_MODES
    from train.compiled import COMPILE_MODES, CUDAGRAPH_MODES
    from train.config import CHOICES

    own = tuple(m for m in COMPILE_MODES if torch._inductor.list_mode_options(m).get("triton.cudagraphs"))
    assert own == CUDAGRAPH_MODES
    assert COMPILE_MODES == BENCH_MODES == CHOICES["training.compile_mode"]


@pytest.mark.slow
def test_cuda_graphs_true_without_a_gpu_is_one_line_and_auto_says_why(tmp_path, capsys):
    argv = ["synthetic", "alexnet", "g", *SMALL, f"logging.runs_dir={tmp_path}", "--epochs", "1", "--loader", "gpu",
            "--device", "cpu"]  # fmt: skip
    assert main([*argv, "training.cuda_graphs=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.cuda_graphs=true is not possible here: CUDA graphs need a CUDA device" in err[0]
    assert main([*argv, "--overwrite", "data.loader_priority=low"]) == 0
    out = capsys.readouterr().out
    assert out.count("cuda graphs off: CUDA graphs need a CUDA device") == 1
    assert out.count("data.loader_priority=low: no effect without a CUDA device") == 1
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["training"]["cuda_graphs"] == "auto"
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["cuda_graphs"] == {"setting": "auto", "enabled": False}


@pytest.mark.gpu
@pytest.mark.parametrize(("compiled", "optimizer"), [(False, "sgd"), (True, "sgd"), (False, "adamw")])
def test_captured_steps_match_eager_steps_on_cuda(compiled, optimizer):
    """Same seed, same batches: N steps replayed from the graph vs the same steps eagerly (bf16 tolerance); fused
    AdamW is captured too (its step counter on the device: capturable)."""
    from train.compiled import CompileGuard

    device = torch.device("cuda")
    torch.manual_seed(0)
    nets = [small_net().to(device, memory_format=torch.channels_last) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    results = []
    for net, capture in zip(nets, (False, True)):
        state = make_state(net, device, lr_on_device=True, fused=True, amp=torch.bfloat16, optimizer=optimizer)
        state.compiler = CompileGuard(net, enabled=compiled, device=device, say=print)
        steps = GraphedSteps(state, resident_loader(device), capture=capture, strict=True)
        results.append([train_one_epoch_graphed(state, steps, epoch) for epoch in range(3)])
        assert (steps.graph is not None) == capture
    for want, got in zip(*results):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.mark.gpu
def test_trainer_uses_cuda_graphs_on_the_resident_loader(tmp_path):
    """The trainer's default CUDA path (compiled model inside the captured step): 2 steps an epoch, 3 warm-up steps,
    the capture at step 4, so epoch 3 is replays only, from buffers refilled for the epoch."""
    argv = ["synthetic", "alexnet", "cg", *SMALL, f"logging.runs_dir={tmp_path}", "--epochs", "3", "--loader", "gpu",
            "--device", "cuda", "training.cuda_graphs=true"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "cg" / "summary.json").read_text())
    assert summary["test"] is not None and summary["epochs"] == 3
    assert summary["cuda_graphs"]["captured"] and summary["cuda_graphs"]["fallback_error"] is None
    epochs = [json.loads(line)["train"] for line in (tmp_path / "cg" / "metrics.jsonl").read_text().splitlines()]
    assert [e["samples"] for e in epochs] == [64, 64, 64]  # every replayed step counted
    assert all(math.isfinite(e["loss"]) for e in epochs) and epochs[2]["loss"] != epochs[1]["loss"]
