"""``training.compile``: auto resolves to eager on the CPU, a real compile is timed apart and cached on disk, and a
model that cannot compile falls back to eager with one warning line instead of crashing the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from divnorm import build_divnorm
from train.compiled import CompileGuard, cache_dir, resolve_compile
from train.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_setting_resolves_per_device_and_validates():
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile(True, torch.device("cpu")) is True and resolve_compile(False, torch.device("cuda")) is False
    config = load_config("synthetic", "alexnet")
    assert config["training"]["compile"] == "auto" and config["training"]["compile_mode"] == "default"
    assert load_config("synthetic", "alexnet", ["training.compile=false"])["training"]["compile"] is False
    for bad, words in (("training.compile=maybe", "choose one of: auto, true, false"),
                       ("training.compile=1", "expected a string or true/false"),
                       ("training.compile_mode=fast", "reduce-overhead")):  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            load_config("synthetic", "alexnet", [bad])


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "divnorm-trainer" / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


@pytest.mark.slow
def test_real_compile_is_timed_apart_cached_and_matches_eager(monkeypatch, tmp_path):
    """A small conv + DN net compiled by inductor on the CPU (g++): same outputs and gradients as eager, the first
    call of each (mode, shape) timed as compile, later calls not, and the FX graph cache written to the cache dir."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), build_divnorm({"type": "ours"}, 8), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 5)).to(memory_format=torch.channels_last)  # fmt: skip
    x = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
    guard = CompileGuard(net, enabled=True, device=torch.device("cpu"), say=print)

    def loss_and_grads(model):
        net.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    (loss, grads), first = guard.run(loss_and_grads, ("train", x.shape))
    (loss2, _), second = guard.run(loss_and_grads, ("train", x.shape))
    eager_loss, eager_grads = loss_and_grads(net)
    assert guard.compiled and guard.error is None
    assert first > 0 and second == 0 and guard.seconds == pytest.approx(first)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss2, eager_loss, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    assert any(p.is_file() for p in (tmp_path / "cache").rglob("*")), "inductor wrote nothing to the cache folder"
    assert guard.describe("auto") == {"setting": "auto", "enabled": True, "mode": "default",
                                      "seconds": round(first, 3), "fallback_error": None}  # fmt: skip


@pytest.mark.slow
def test_static_graphs_take_a_resolution_again(monkeypatch, tmp_path):
    """training.compile_dynamic=false (default): one static graph per input size, so training can go back to an
    earlier resolution (with torch 2.14.1's automatic dynamic shapes this very net, NCHW, fails on 8 -> 12 -> 16 ->
    8 px with an AssertionError on the saved input's strides; channels-last passes); each new size is compile time,
    a size seen before is not, and the gradients match eager at every size."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    assert load_config("synthetic", "alexnet")["training"]["compile_dynamic"] is False
    with pytest.raises(ConfigError, match="training.compile_dynamic"):
        load_config("synthetic", "alexnet", ["training.compile_dynamic=sometimes"])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5))  # fmt: skip
    guard = CompileGuard(net, enabled=True, device=torch.device("cpu"), say=print)
    counters.clear()  # dynamo's own count of the graphs it compiled: one per size, none again for a size seen
    for graphs, (size, new) in zip((1, 2, 3, 3, 3), ((8, True), (12, True), (16, True), (8, False), (12, False))):
        x = torch.randn(4, 3, size, size)

        def grads(model, x=x):
            net.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            return [p.grad.clone() for p in net.parameters()]

        got, seconds = guard.run(grads, ("train", x.shape))
        assert (seconds > 0) == new and guard.compiled, (size, seconds, guard.error)
        assert counters["stats"]["unique_graphs"] == graphs, (size, dict(counters["stats"]))
        for a, b in zip(got, grads(net), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_a_model_that_cannot_compile_trains_eagerly_with_one_warning(tmp_path):
    """Inductor without a working C++ compiler (a real failure: CXX points nowhere) -> warning, eager, exit 0."""
    env = {**os.environ, "CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    argv = ["synthetic", "alexnet", "fallback", "data.subset=64", "data.batch_size=32", "data.eval_batch_size=64",
            "data.image_size=16", "model.divnorm_specs.type=ours", f"logging.runs_dir={tmp_path}", "--epochs", "1",
            "--loader", "gpu", "--device", "cpu", "training.compile=true"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "train", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning: torch.compile failed")]
    assert len(warnings) == 1 and "C++ compiler" in warnings[0] and "continues eagerly" in warnings[0]
    assert "Traceback" not in done.stdout + done.stderr
    summary = json.loads((tmp_path / "fallback" / "summary.json").read_text())
    assert summary["compile"]["setting"] is True and summary["compile"]["enabled"] is False
    assert "InvalidCxxCompiler" in summary["compile"]["fallback_error"]
    assert summary["test"] is not None and summary["epochs"] == 1
    lines = [json.loads(line) for line in (tmp_path / "fallback" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train"]["compile_seconds"] > 0  # the failed attempt is compile time, kept out of images/s
