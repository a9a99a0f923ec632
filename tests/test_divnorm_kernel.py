"""The fused Triton ``ours`` kernel against the torch path: on the CPU under Triton's interpreter, and on CUDA.

Triton decides whether kernels are interpreted when ``triton.language`` is first imported (its own ``tl.sum`` is
then interpreted or compiled for good), so ``TRITON_INTERPRET=1`` cannot be switched on inside a running test
session, and setting it for the whole session (conftest) would make the GPU tests interpreted too. The
``test_interpreted_*`` tests therefore run in a child pytest started with the variable set
(:func:`test_kernel_under_triton_interpreter`); in this process they are skipped. The grid of cases is sparse but
covers each channel count, pool exponent, power, layout, dtype, batch size and parameter option at least once
(the interpreter is slow; each case is a 2x3 image).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from divnorm import build_divnorm, pool_size
from tests.kernel_helpers import run_interpreted_tests, sgd_losses

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child of test_kernel_under_triton_interpreter"
)
REPO = Path(__file__).resolve().parents[1]


def _pair(channels: int, **specs) -> tuple[nn.Module, nn.Module]:
    """The same ``ours`` layer twice (kernel=triton, kernel=torch) with equal, non-trivial parameters."""
    fused = build_divnorm({"type": "ours", "kernel": "triton", **specs}, channels)
    reference = build_divnorm({"type": "ours", "kernel": "torch", **specs}, channels)
    generator = torch.Generator().manual_seed(channels)
    with torch.no_grad():
        fused.gamma.copy_(torch.randn(fused.gamma.shape, generator=generator) * 0.3)
        fused.sigma.copy_(torch.rand(fused.sigma.shape, generator=generator) + 0.5)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def _input(batch: int, channels: int, dtype: torch.dtype, channels_last: bool, size=(2, 3)) -> torch.Tensor:
    x = torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(batch * 1000 + channels))
    x = x.to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Within a tolerance scaled to the tensor's largest value (bf16/fp16: about one rounding of the output)."""
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().clamp_min(1e-6)
    tolerance = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    error = (actual - expected).abs().max() / scale
    assert error <= tolerance, f"{what}: max error {error:.3g} of the largest value (tolerance {tolerance:g})"


def _compare(fused: nn.Module, reference: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward and backward through both layers; asserts y, dx, dgamma, dsigma agree; returns the fused output."""
    x_fused = x.clone().requires_grad_()
    x_reference = x.clone().requires_grad_()
    y_fused = fused(x_fused)
    y_reference = reference(x_reference)
    assert y_fused.dtype == x.dtype and y_fused.shape == x.shape
    assert y_fused.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(
        memory_format=torch.channels_last
    )
    _close(y_fused, y_reference, x.dtype, "y")
    grad = torch.randn(y_reference.shape, generator=torch.Generator().manual_seed(7)).to(x.device, x.dtype)
    y_fused.backward(grad)
    y_reference.backward(grad)
    _close(x_fused.grad, x_reference.grad, x.dtype, "dx")
    for name in ("gamma", "sigma"):
        mine, theirs = getattr(fused, name), getattr(reference, name)
        if not theirs.requires_grad:
            assert mine.grad is None, f"{name} is frozen but got a gradient"
            continue
        assert mine.grad.shape == mine.shape and mine.grad.dtype == mine.dtype
        _close(mine.grad, theirs.grad, torch.float32, f"d{name}")  # fp32 accumulation for every input dtype
    return y_fused


# (channels, p, power, channels_last, dtype, batch, extra specs): every value of each axis at least once.
CASES = [
    (3, 1.0, 2, True, torch.float32, 4, {}),  # one global pool of 3 (not a power of two)
    (3, 0.5, 1, False, torch.float32, 1, {}),  # pools of one channel
    (64, 0.5, 2, True, torch.float32, 4, {"single_gamma": True}),
    (64, 0.25, 3, False, torch.bfloat16, 4, {"fix_sigma": True}),
    (64, 0.5, 2, True, torch.float16, 1, {}),
    (96, 1.0, 1, False, torch.float32, 1, {"single_sigma": True}),
    (96, 0.5, 3, True, torch.bfloat16, 1, {}),
    (96, 0.5, 2, False, torch.float32, 4, {"fix_all": True}),
    (256, 0.5, 2, True, torch.bfloat16, 4, {}),  # a ResNet-50 stage's layer
    (256, 0.25, 1, False, torch.float32, 4, {"single_gamma": True, "single_sigma": True}),
    (256, 1.0, 2, False, torch.bfloat16, 1, {"fix_gamma": True}),
    (2048, 1.0, 2, True, torch.float32, 1, {}),  # the global p = 1 pool at its widest
    (2048, 0.5, 3, False, torch.float32, 1, {}),  # several pool blocks per pixel tile
    (2048, 0.25, 2, True, torch.bfloat16, 4, {"fix_gamma": True, "eps": 0.0}),
]


@interpreted
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy log2(0) on masked lanes
@pytest.mark.parametrize(("channels", "p", "power", "channels_last", "dtype", "batch", "specs"), CASES)
def test_interpreted_kernel_matches_torch_path(channels, p, power, channels_last, dtype, batch, specs):
    fused, reference = _pair(channels, p=p, power=power, **specs)
    assert fused.pool == pool_size(channels, p)
    _compare(fused, reference, _input(batch, channels, dtype, channels_last))


@interpreted
@pytest.mark.parametrize("channels_last", [True, False])
def test_interpreted_kernel_loops_over_more_tiles_than_programs(channels_last):
    """Enough pixels that each backward program sums several tiles into its partial dgamma / dsigma row."""
    fused, reference = _pair(256, p=0.5)
    _compare(fused, reference, _input(4, 256, torch.float32, channels_last, size=(9, 9)))


@interpreted
def test_interpreted_kernel_takes_odd_layouts_and_expanded_gradients():
    """A strided view is copied to NCHW once; the expanded gradient of ``.sum()`` is brought to x's layout."""
    fused, reference = _pair(64, p=0.5)
    x = _input(2, 64, torch.float32, False, size=(4, 6))[..., ::2]  # neither layout
    x_fused, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = fused(x_fused)
    assert y.is_contiguous()
    _close(y, reference(x_reference), torch.float32, "y")
    fused(x_fused).sum().backward()
    reference(x_reference).sum().backward()
    _close(x_fused.grad, x_reference.grad, torch.float32, "dx")
    _close(fused.gamma.grad, reference.gamma.grad, torch.float32, "dgamma")


@interpreted
def test_interpreted_custom_op_registration():
    """torch.library's own check of the schema, fake implementation, autograd and AOT dispatch."""
    from divnorm.ops import ours_fwd

    x = torch.randn(2, 64, 2, 3).to(memory_format=torch.channels_last).requires_grad_()
    args = (x, torch.zeros(8, requires_grad=True), torch.ones(8, requires_grad=True), 8, 2.0, 1e-8)
    torch.library.opcheck(ours_fwd, args)


@interpreted
def test_interpreted_compiled_model_has_no_graph_break():
    """Dynamo traces through the custom op in one graph; AOT autograd's compiled step equals the eager one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), build_divnorm({"type": "ours", "kernel": "triton"}, 16))
    x = torch.randn(2, 3, 4, 4)
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert "divnorm.ours_fwd" in explanation.graphs[0].code
    eager = net(x)
    eager.square().sum().backward()
    eager_grad = net[0].weight.grad.clone()
    net.zero_grad()
    compiled = torch.compile(net, backend="aot_eager")(x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(net[0].weight.grad, eager_grad)


def test_auto_on_cpu_takes_the_torch_path():
    """kernel=auto decides from the input's device: a CPU tensor never reaches the kernel, interpreter or not."""
    layer = build_divnorm({"type": "ours"}, 64)
    assert layer.kernel == "auto"
    y = layer(torch.randn(2, 64, 2, 3, requires_grad=True))
    assert type(y.grad_fn).__name__ == "GroupedDivNormFunctionBackward"


@interpreted
def test_interpreted_triton_on_cpu_takes_the_kernel():
    """Eager: the custom op's twin (a plain autograd.Function over the same kernels, less host time a call)."""
    layer = build_divnorm({"type": "ours", "kernel": "triton"}, 64)
    assert type(layer(torch.randn(2, 64, 2, 3, requires_grad=True)).grad_fn).__name__ == "_OursEagerBackward"


@interpreted
@pytest.mark.parametrize("single", [False, True])
def test_interpreted_eager_twin_equals_the_custom_op(single):
    """The eager twin and the custom op (what a compiled model runs) give the same output and gradients, bit for
    bit (the same kernels), for every combination of inputs that need a gradient."""
    from divnorm.ops import ours_fused, ours_fwd

    torch.manual_seed(0)
    params = 1 if single else 8
    x = torch.randn(2, 64, 3, 3).to(torch.bfloat16, memory_format=torch.channels_last)
    gamma, sigma, dy = torch.randn(params) * 0.1, torch.rand(params) + 0.5, torch.randn(2, 64, 3, 3)
    for needs in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        results = []
        for call in (ours_fwd, ours_fused):
            inputs = [t.clone().requires_grad_(need) for t, need in zip((x, gamma, sigma), needs)]
            y = call(*inputs, 8, 2.0, 1e-8)
            y.backward(dy.to(y.dtype))
            results.append([y.detach(), *(t.grad for t in inputs)])
        for op_value, twin_value in zip(*results):
            assert (op_value is None) == (twin_value is None)
            if op_value is not None:
                assert torch.equal(op_value, twin_value)


@pytest.mark.skipif(INTERPRETED, reason="this process runs the interpreter")
def test_triton_on_cpu_without_interpreter_says_what_to_do():
    layer = build_divnorm({"type": "ours", "kernel": "triton"}, 64)
    with pytest.raises(RuntimeError, match="needs CUDA tensors .*TRITON_INTERPRET=1") as info:
        layer(torch.randn(1, 64, 2, 3))
    assert "\n" not in str(info.value)


@pytest.mark.skipif(INTERPRETED, reason="this is the child's parent")
def test_kernel_under_triton_interpreter():
    """Runs every ``test_interpreted_*`` test in a child pytest whose process starts with TRITON_INTERPRET=1."""
    # the cases, 2 tile-loop tests, 2 of the eager twin against the op and 4 others (odd layouts, opcheck, no graph
    # break, kernel taken on CPU)
    run_interpreted_tests(__file__, len(CASES) + 8)


def test_bad_kernel_value_is_one_line():
    with pytest.raises(ValueError, match=r"^divnorm_specs.kernel must be one of auto, triton, torch, got 'cuda'$"):
        build_divnorm({"type": "ours", "kernel": "cuda"}, 64)
    with pytest.raises(ValueError, match="divnorm_specs.kernel must be one of"):
        build_divnorm({"type": "ours", "kernel": True}, 64)


def test_config_validates_kernel_key():
    from divnorm.ops import KERNEL_CHOICES
    from train.config import CHOICES, ConfigError, load_config

    assert CHOICES["model.divnorm_specs.kernel"] == KERNEL_CHOICES
    assert load_config("cifar100", "resnet18", [])["model"]["divnorm_specs"]["kernel"] == "auto"
    assert (
        load_config("cifar100", "resnet18", ["model.divnorm_specs.kernel=torch"])["model"]["divnorm_specs"]["kernel"]
        == "torch"
    )
    with pytest.raises(ConfigError, match="choose one of: auto, triton, torch"):
        load_config("cifar100", "resnet18", ["model.divnorm_specs.kernel=cuda"])


# ---- GPU: the compiled kernel (skipped without CUDA; see tests/conftest.py) ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(
    ("shape", "p", "power"),
    [((8, 256, 56, 56), 0.5, 2), ((4, 2048, 7, 7), 1.0, 2), ((4, 96, 15, 15), 0.5, 3), ((2, 64, 9, 9), 0.25, 1)],
)
def test_kernel_matches_torch_path_on_cuda(shape, p, power, channels_last, dtype):
    fused, reference = _pair(shape[1], p=p, power=power)
    fused, reference = fused.cuda(), reference.cuda()
    x = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(dtype)
    _compare(fused, reference, x.to(memory_format=torch.channels_last) if channels_last else x)


def _small_dn_net(kernel: str) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for c_in, c_out in ((3, 32), (32, 64)):
        dn = build_divnorm({"type": "ours", "kernel": kernel}, c_out)
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), dn, nn.ReLU(), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.gpu
def test_compiled_model_with_kernel_has_no_graph_break_on_cuda():
    net = _small_dn_net("triton").cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0
    assert "divnorm.ours_fwd" in explanation.graphs[0].code  # the custom op sits in the one graph


@pytest.mark.gpu
def test_auto_takes_the_kernel_eagerly_and_the_torch_path_when_compiled_on_cuda():
    """kernel=auto on CUDA: the Triton kernel in eager mode (8x the eager torch path), the torch path under
    torch.compile, which inductor fuses (as fast as the kernel or faster at every ResNet-50 stage shape on the
    H200, and inside whole models the opaque custom op cost more): no custom op in the compiled graph."""
    net = _small_dn_net("auto").cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0
    assert "divnorm.ours_fwd" not in explanation.graphs[0].code
    with torch.profiler.profile() as prof:
        net(x)
        torch.cuda.synchronize()
    assert any(event.name == "_OursEager" for event in prof.events())  # eager: the kernel ran (the op's twin)


@pytest.mark.gpu
def test_compiled_training_matches_eager_on_cuda():
    """Five SGD steps under bf16 autocast: the compiled model's losses follow the eager one's."""
    x = torch.randn(16, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (16,), device="cuda")
    losses = {}
    for mode in ("eager", "compiled"):
        net = _small_dn_net("triton").cuda().to(memory_format=torch.channels_last)
        losses[mode] = sgd_losses(net, torch.compile(net) if mode == "compiled" else net, x, target)
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=3e-2, atol=3e-2)
    assert losses["eager"][-1] < losses["eager"][0]  # it trained


@pytest.mark.skipif(INTERPRETED, reason="this is the child's parent")
@pytest.mark.parametrize("kernel", ["dn", "fused_bn"])
def test_tuning_sweep_dry_run(tmp_path, kernel):
    """benchmarks/tune_divnorm_kernel.py on the CPU (its own TRITON_INTERPRET=1 child): every swept launch shape
    computes what the torch path computes, and the kernel's TUNING is what the sweep returns to; for the DN kernel
    and for the fused ReLU -> DN -> BatchNorm kernels."""
    from divnorm import triton_ours

    out = tmp_path / "tune"
    command = [sys.executable, str(REPO / "benchmarks" / "tune_divnorm_kernel.py"), "--out", str(out), "--dry-run",
               "--kernel", kernel]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["kernel"] == kernel
    assert [entry["shape"] for entry in report["shapes"]] == [[2, 64, 4, 4], [2, 256, 2, 2]]
    rows = [row for entry in report["shapes"] for row in entry["settings"]]
    assert len(rows) == 6 and all(row["matches_torch_path"] for row in rows)
    assert {row["tile_elements"] for row in rows} == {1024, 4096, 8192}
    # a tile of 8192 is capped at these tensors' rows: the launch of 4096, not timed again
    copies = [row for row in rows if "same_launch_as" in row]
    assert [row["tile_elements"] for row in copies] == [8192, 8192]
    assert all(row["same_launch_as"] == [4096, 512] for row in copies)
    assert report["best_overall"] is not None and report["default_tuning"] == triton_ours.TUNING
    assert report["tuning_after"] == report["default_tuning"]  # the sweep put the default back
    assert "| (2, 64, 4, 4) | 8 |" in (out / "results.md").read_text()


def test_tile_shape_follows_tuning_at_every_call():
    """TUNING is read at each call (the sweep changes it between calls): the cached tile shape is keyed on it."""
    from divnorm import triton_ours

    x = torch.randn(4, 256, 8, 8).to(memory_format=torch.channels_last)
    layout, saved = triton_ours._layout(x), dict(triton_ours.TUNING)
    try:
        triton_ours.TUNING.update(tile_elements=4096, elements_per_warp=512)
        big = triton_ours._blocks(layout, 16, 16)
        triton_ours.TUNING.update(tile_elements=1024, elements_per_warp=256)
        small = triton_ours._blocks(layout, 16, 16)
    finally:
        triton_ours.TUNING.clear()
        triton_ours.TUNING.update(saved)
    assert (big.pix, big.pools, big.pool, big.num_warps) == (16, 16, 16, 8)
    assert (small.pix, small.pools, small.pool, small.num_warps) == (4, 16, 16, 4)
