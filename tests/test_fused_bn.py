"""ReLU -> ``ours`` -> BatchNorm as one function (divnorm.fused_bn) and as Triton kernels (divnorm.triton_fused_bn).

Both are checked against the three layers run one after another: the output, every gradient (x, gamma, sigma,
BatchNorm's weight and bias) and BatchNorm's running statistics. The torch function runs in this process in
float64 (exact to rounding); the kernels run on the CPU under Triton's interpreter in a child pytest, as in
tests/test_divnorm_kernel.py (the interpreter is a property of the process), and on CUDA in the GPU tests.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from divnorm import build_divnorm
from divnorm.fused_bn import fusion_applies, relu_divnorm_batchnorm
from models import create_model
from models.layers import ConvUnit
from tests.kernel_helpers import run_interpreted_tests, sgd_losses

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED or importlib.util.find_spec("triton") is None,
    reason="runs in the TRITON_INTERPRET=1 child of test_fused_kernel_under_triton_interpreter",
)
REPO = Path(__file__).resolve().parents[1]


def _layers(
    channels: int,
    dtype: torch.dtype = torch.float64,
    momentum: float | None = 0.1,
    affine=True,
    bn_eps: float = 1e-5,
    **specs,
):
    """An ``ours`` layer and a BatchNorm2d with non-trivial parameters (seeded by the channel count).

    ``bn_eps``: BatchNorm's eps. BatchNorm undoes DN's per-pool gain exp(gamma) but for its eps, so with the usual
    1e-5 gamma's true gradient is ~1e-3 of sigma's; an eps of the variance's order makes it large enough to check
    against its own scale."""
    generator = torch.Generator().manual_seed(channels)
    dn = build_divnorm({"type": "ours", "kernel": "torch", **specs}, channels).to(dtype)
    norm = nn.BatchNorm2d(channels, eps=bn_eps, momentum=momentum, affine=affine).to(dtype)
    with torch.no_grad():
        dn.gamma.copy_(torch.randn(dn.gamma.shape, generator=generator) * 0.3)
        dn.sigma.copy_(torch.rand(dn.sigma.shape, generator=generator) + 0.5)
        if affine:
            norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(channels, generator=generator) * 0.3)
        norm.running_mean.uniform_(-0.1, 0.1, generator=generator)
    return dn, norm


def _close(actual, expected, tolerance, what):
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6)
    assert error <= tolerance, f"{what}: max error {error:.3g} of the largest value (tolerance {tolerance:g})"


def _compare(
    channels: int,
    *,
    relu: bool = True,
    channels_last: bool = True,
    size=(3, 5, 6),
    kernel: str = "torch",
    dtype: torch.dtype = torch.float64,
    tolerance: float = 1e-10,
    steps: int = 2,
    **options,
) -> None:
    """``relu_divnorm_batchnorm`` against relu -> dn -> norm in float64: output, gradients, running statistics.

    Two steps, so the running statistics' update is checked on top of a first one (and the cumulative average
    when momentum is None counts batches).
    """
    dn, norm = _layers(channels, **options)
    fused_dn, fused_norm = copy.deepcopy(dn).to(dtype), copy.deepcopy(norm)
    fused_dn.kernel = kernel
    fused_dn.gamma.data = fused_dn.gamma.data.float() if dtype != torch.float64 else fused_dn.gamma.data
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(size[0], channels, *size[1:], dtype=torch.float64, generator=generator)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        grad = torch.randn(x.shape, dtype=torch.float64, generator=generator)
        x_ref, x_fused = x.clone().requires_grad_(), x.to(dtype).requires_grad_()
        expected = norm(dn(torch.relu(x_ref) if relu else x_ref))
        actual = relu_divnorm_batchnorm(x_fused, fused_dn, fused_norm, relu=relu)
        assert actual.dtype == dtype and actual.shape == x.shape
        assert actual.is_contiguous(memory_format=torch.channels_last) == channels_last
        _close(actual, expected, tolerance, "output")
        (expected * grad).sum().backward()
        (actual.double() * grad).sum().backward()
        _close(x_fused.grad, x_ref.grad, tolerance, "dx")
    for mine, theirs, name in ((fused_dn, dn, "dn"), (fused_norm, norm, "norm")):
        for (param_name, param), reference in zip(mine.named_parameters(), theirs.parameters()):
            if not reference.requires_grad:
                assert param.grad is None, f"{name}.{param_name} is frozen but got a gradient"
                continue
            # gamma's true gradient is ~0 (BatchNorm undoes a per-pool gain but for its eps), a sum of M * pool
            # terms that cancel: measured against sigma's scale, and with fp32 sums 1e-3 of it; with a large
            # BatchNorm eps (the bn_eps cases) it is not small, and is measured against its own scale
            scale, limit = reference.grad, tolerance
            if param_name == "gamma" and norm.eps < 1:
                scale, limit = theirs.sigma.grad, tolerance if dtype == torch.float64 else max(tolerance, 1e-3)
            error = (param.grad.double() - reference.grad).abs().max() / scale.abs().max().clamp_min(1e-6)
            assert error <= limit, f"d{name}.{param_name}: max error {error:.3g} (tolerance {limit:g})"
    if norm.track_running_stats:
        _close(fused_norm.running_mean, norm.running_mean, tolerance, "running_mean")
        _close(fused_norm.running_var, norm.running_var, tolerance, "running_var")
        assert int(fused_norm.num_batches_tracked) == int(norm.num_batches_tracked) == steps


# (channels, options): every pool exponent, power, layout, parameter option and BatchNorm setting at least once.
TORCH_CASES = [
    (64, {}),
    (64, {"channels_last": False}),
    (64, {"relu": False}),
    (96, {"power": 3, "p": 0.5}),
    (96, {"power": 1, "channels_last": False, "single_gamma": True}),
    (3, {"p": 1.0}),  # one global pool of 3 channels
    (256, {"p": 0.25, "single_sigma": True, "momentum": None}),
    (64, {"fix_gamma": True, "affine": False}),
    (64, {"fix_all": True, "size": (1, 2, 2)}),  # batch 1
    (96, {"power": 3, "bn_eps": 10.0}),  # gamma's gradient checked against its own scale
]


@pytest.mark.parametrize(("channels", "options"), TORCH_CASES)
def test_torch_function_matches_the_three_layers(channels, options):
    _compare(channels, **options)


def test_fused_function_keeps_only_the_input_and_small_statistics():
    """What the backward keeps: x and per-pixel / per-channel statistics, not the DN or the BatchNorm output."""
    dn, norm = _layers(64, torch.float32)
    x = torch.randn(2, 64, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        relu_divnorm_batchnorm(x, dn, norm, relu=True)
    full_size = [t for t in saved if t.numel() == x.numel()]
    assert len(full_size) == 1 and full_size[0].data_ptr() == x.data_ptr()
    # x, the pool denominators (1/pool of x), mean and rstd and BatchNorm's weight (C each), gamma and sigma
    assert sum(t.numel() for t in saved) == x.numel() * (1 + 1 / dn.pool) + 3 * 64 + 2 * dn.num_pools


def test_batch_of_one_value_per_channel_is_refused_like_batchnorm():
    dn, norm = _layers(64, torch.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        relu_divnorm_batchnorm(torch.randn(1, 64, 1, 1), dn, norm, relu=True)


def _unit_model(fuse_bn, kernel="torch"):
    torch.manual_seed(0)
    config = {"divnorm_specs": {"type": "ours", "kernel": kernel, "fuse_bn": fuse_bn}}
    return create_model("resnet18", num_classes=10, model_config=config, image_size=32)


def test_model_with_fuse_bn_trains_like_the_unfused_model():
    """A CIFAR ResNet-18 (DN after every conv, ReLU -> DN -> BN units and the BN-only last conv of each block)
    gives the same loss, gradients and running statistics with fuse_bn=true as with false; eval mode is unfused."""
    fused, plain = _unit_model(True).double(), _unit_model(False).double()
    plain.load_state_dict(fused.state_dict())
    units = [m for m in fused.modules() if isinstance(m, ConvUnit) and "dn" in m._modules]
    assert units and all(unit.fuse_bn is True for unit in units)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (4,))
    for model in (fused, plain):
        model.to(memory_format=torch.channels_last)
        nn.functional.cross_entropy(model(x), target).backward()
    for (name, mine), theirs in zip(fused.named_parameters(), plain.parameters()):
        _close(mine.grad, theirs.grad, 1e-9, name)
    for (name, mine), theirs in zip(fused.named_buffers(), plain.buffers()):
        _close(mine, theirs, 1e-9, name)
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(x), plain(x))


def test_fusion_applies_only_where_it_is_exact():
    dn, norm = _layers(64, torch.float32)
    x = torch.randn(2, 64, 3, 3).to(memory_format=torch.channels_last)
    relu = nn.ReLU()
    assert fusion_applies(True, relu, dn, norm, x) and fusion_applies(True, None, dn, norm, x)
    assert not fusion_applies(False, relu, dn, norm, x)
    assert not fusion_applies("auto", relu, dn, norm, x)  # auto: CUDA tensors only
    assert not fusion_applies(True, nn.GELU(), dn, norm, x)
    assert not fusion_applies(True, relu, dn, nn.SyncBatchNorm(64), x)
    assert not fusion_applies(True, relu, build_divnorm({"type": "ken"}, 64), norm, x)
    norm.eval()
    assert not fusion_applies(True, relu, dn, norm, x)  # running statistics: the plain layers
    norm.train()
    handle = dn.register_forward_hook(lambda *args: None)  # someone watches DN's output (the sparsity report)
    assert not fusion_applies(True, relu, dn, norm, x)
    handle.remove()


def test_fuse_bn_config_key():
    from models.config import ModelConfigError, resolve_model_config
    from train.config import ConfigError, load_config

    assert load_config("cifar100", "resnet18", [])["model"]["divnorm_specs"]["fuse_bn"] is False
    config = load_config("cifar100", "resnet18", ["model-divnorm_specs-fuse_bn=auto"])
    assert config["model"]["divnorm_specs"]["fuse_bn"] == "auto"
    with pytest.raises(ConfigError, match="fuse_bn"):
        load_config("cifar100", "resnet18", ["model.divnorm_specs.fuse_bn=yes"])
    with pytest.raises(ModelConfigError, match='fuse_bn must be "auto", true or false'):
        resolve_model_config({"divnorm_specs": {"fuse_bn": "on"}})


def test_compiled_fused_unit_has_no_graph_break_and_matches_eager():
    """torch.compile traces the fused function (and the running-statistics update) in one graph on the CPU."""
    torch.manual_seed(0)
    parts = {"divnorm_specs": {"type": "ours", "kernel": "torch", "fuse_bn": True}}
    model = create_model("alexnet", num_classes=10, model_config=parts, image_size=32)
    unit = (
        model.features.conv3
        if hasattr(model.features, "conv3")
        else next(m for m in model.modules() if isinstance(m, ConvUnit))
    )
    x = torch.randn(2, unit.conv.in_channels, 6, 6).to(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(copy.deepcopy(unit))(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager_unit, compiled_unit = copy.deepcopy(unit), copy.deepcopy(unit)
    expected = eager_unit(x)
    actual = torch.compile(compiled_unit, backend="aot_eager")(x)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(compiled_unit.norm.running_var, eager_unit.norm.running_var)


# ---- the Triton kernels under the interpreter (child process) ----

KERNEL_CASES = [
    (64, {}),
    (64, {"relu": False, "power": 3}),
    (96, {"power": 1, "single_gamma": True, "single_sigma": True}),
    (3, {"p": 1.0, "momentum": None}),
    (256, {"size": (2, 9, 9)}),  # more row tiles than programs: each program combines several tiles
    (2048, {"p": 1.0, "size": (2, 1, 3)}),
    (2048, {"p": 0.5, "fix_gamma": True, "affine": False, "size": (1, 2, 3)}),
    (64, {"bn_eps": 10.0}),  # gamma's gradient against its own scale (see _layers)
    (256, {"size": (2, 9, 9), "bn_eps": 10.0, "single_gamma": True}),  # several tiles a program, one gamma
]


@interpreted
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy log2(0) on masked lanes
@pytest.mark.parametrize(("channels", "options"), KERNEL_CASES)
def test_interpreted_fused_kernel_matches_the_three_layers(channels, options):
    _compare(channels, kernel="triton", dtype=torch.float32, tolerance=2e-5, **options)


@interpreted
@pytest.mark.parametrize("bn_eps", [1e-5, 10.0])
def test_interpreted_fused_kernel_in_bfloat16(bn_eps):
    _compare(64, kernel="triton", dtype=torch.bfloat16, tolerance=2e-2, steps=1, bn_eps=bn_eps)


@interpreted
def test_interpreted_fused_kernel_takes_the_kernel_and_nchw_the_function():
    dn, norm = _layers(64, torch.float32)
    dn.kernel = "triton"
    x = torch.randn(2, 64, 3, 3, requires_grad=True)
    nchw = relu_divnorm_batchnorm(x, dn, norm, relu=True)
    assert type(nchw.grad_fn).__name__ == "ReluDivNormBatchNormFunctionBackward"
    channels_last = relu_divnorm_batchnorm(x.to(memory_format=torch.channels_last), dn, norm, relu=True)
    assert type(channels_last.grad_fn).__name__ == "_ReluDnBnEagerBackward"  # eager: the custom op's twin


@interpreted
def test_interpreted_fused_eager_twin_equals_the_custom_op():
    """The eager twin and the custom op (what a compiled model runs) agree bit for bit, output and gradients."""
    from divnorm.ops import relu_dn_bn, relu_dn_bn_fwd

    torch.manual_seed(0)
    x = torch.randn(2, 64, 3, 3).to(memory_format=torch.channels_last)
    params = [torch.randn(8) * 0.1, torch.rand(8) + 0.5, torch.rand(64) + 0.5, torch.randn(64)]
    dout = torch.randn(2, 64, 3, 3).to(memory_format=torch.channels_last)
    for needs in ((True,) * 5, (True, False, False, False, False), (False, True, True, True, True)):
        results = []
        for call in (relu_dn_bn_fwd, relu_dn_bn):
            inputs = [t.clone().requires_grad_(need) for t, need in zip((x, *params), needs)]
            out, mean, var, rstd = call(*inputs, 8, 2.0, 1e-8, 1e-5, True)
            out.backward(dout)
            results.append([out.detach(), mean, var, rstd, *(t.grad for t in inputs)])
        for op_value, twin_value in zip(*results):
            assert (op_value is None) == (twin_value is None)
            if op_value is not None:
                assert torch.equal(op_value, twin_value)


@interpreted
def test_interpreted_fused_custom_op_registration():
    """torch.library's own check of the schema, fake implementation, autograd and AOT dispatch."""
    from divnorm.ops import relu_dn_bn_fwd

    x = torch.randn(2, 64, 2, 3).to(memory_format=torch.channels_last).requires_grad_()
    params = [torch.zeros(8), torch.ones(8), torch.rand(64) + 0.5, torch.zeros(64)]
    args = (x, *(p.requires_grad_() for p in params), 8, 2.0, 1e-8, 1e-5, True)
    torch.library.opcheck(relu_dn_bn_fwd, args)


@interpreted
def test_interpreted_compiled_unit_with_the_kernel_has_no_graph_break():
    """Dynamo traces a conv unit whose tail is the fused custom op into one graph; the compiled step (aot_eager)
    gives the eager unit's output, conv gradient and running statistics."""
    torch.manual_seed(0)
    config = {"divnorm_specs": {"type": "ours", "kernel": "triton", "fuse_bn": True}}
    model = create_model("alexnet", num_classes=10, model_config=config, image_size=32)
    unit = next(m for m in model.modules() if isinstance(m, ConvUnit) and m.conv.in_channels > 3)
    x = torch.randn(2, unit.conv.in_channels, 4, 4).to(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(copy.deepcopy(unit))(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert "divnorm.relu_dn_bn_fwd" in explanation.graphs[0].code
    eager_unit, compiled_unit = copy.deepcopy(unit), copy.deepcopy(unit)
    expected = eager_unit(x)
    actual = torch.compile(compiled_unit, backend="aot_eager")(x)
    torch.testing.assert_close(actual, expected)
    expected.square().sum().backward()
    actual.square().sum().backward()
    torch.testing.assert_close(compiled_unit.conv.weight.grad, eager_unit.conv.weight.grad)
    torch.testing.assert_close(compiled_unit.norm.running_var, eager_unit.norm.running_var)


@pytest.mark.skipif(INTERPRETED or importlib.util.find_spec("triton") is None, reason="the child's parent")
def test_fused_kernel_under_triton_interpreter():
    """Runs every ``test_interpreted_*`` test here in a child pytest started with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__, len(KERNEL_CASES) + 6)


# ---- GPU (skipped without CUDA; see tests/conftest.py) ----


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("shape", "p", "power", "bn_eps"),
    [
        ((8, 256, 56, 56), 0.5, 2, 1e-5),
        ((8, 2048, 7, 7), 0.5, 2, 1e-5),
        ((16, 96, 15, 15), 1.0, 3, 1e-5),
        ((8, 256, 28, 28), 0.5, 2, 10.0),  # gamma's gradient large enough to check (see _layers)
    ],
)
def test_fused_kernel_matches_the_three_layers_on_cuda(shape, p, power, bn_eps):
    dn, norm = _layers(shape[1], torch.float32, bn_eps=bn_eps, p=p, power=power)
    dn, norm = dn.cuda(), norm.cuda()
    fused_dn, fused_norm = copy.deepcopy(dn), copy.deepcopy(norm)
    fused_dn.kernel = "triton"
    x = torch.randn(shape, device="cuda").to(torch.bfloat16).to(memory_format=torch.channels_last)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = norm(dn(torch.relu(x_ref)))
    actual = relu_divnorm_batchnorm(x_fused, fused_dn, fused_norm, relu=True)
    assert type(actual.grad_fn).__name__ == "_ReluDnBnEagerBackward"
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    _close(actual, expected, 2e-2, "output")
    _close(x_fused.grad, x_ref.grad, 3e-2, "dx")
    pairs = [(fused_norm.weight, norm.weight), (fused_norm.bias, norm.bias), (fused_dn.sigma, dn.sigma)]
    if bn_eps >= 1:
        pairs.append((fused_dn.gamma, dn.gamma))
    for mine, theirs in pairs:
        _close(mine.grad, theirs.grad, 3e-2 if theirs is dn.gamma else 2e-2, "parameter gradient")
    _close(fused_norm.running_var, norm.running_var, 1e-2, "running_var")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_compiled_fused_model_has_no_graph_break_and_trains_like_the_unfused_one_on_cuda(kernel):
    """fuse_bn=auto, compiled: kernel=auto traces the torch function (no custom op in the graph), kernel=triton the
    fused kernels' custom op; either way one graph, and five bf16 SGD steps follow the unfused eager model's."""
    x = torch.randn(16, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (16,), device="cuda")
    model = _unit_model("auto", kernel=kernel).cuda().to(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    assert ("divnorm.relu_dn_bn_fwd" in explanation.graphs[0].code) == (kernel == "triton")
    losses = {}
    for mode, fuse_bn in (("unfused", False), ("fused-compiled", "auto")):
        net = _unit_model(fuse_bn, kernel=kernel).cuda().to(memory_format=torch.channels_last)
        losses[mode] = sgd_losses(net, torch.compile(net) if mode == "fused-compiled" else net, x, target)
    assert min(losses["unfused"][1:]) < losses["unfused"][0], losses  # it trains
    # losses, not weight gradients: this DN ResNet-18 at its initialization is ill-conditioned (its conv weights'
    # gradients in fp32 differ from float64's by up to 35 % of their largest value, on the CPU, either path)
    torch.testing.assert_close(
        torch.tensor(losses["fused-compiled"]), torch.tensor(losses["unfused"]), rtol=3e-2, atol=3e-2
    )


@pytest.mark.gpu
def test_fuse_bn_auto_takes_the_kernels_eagerly_on_cuda():
    model = _unit_model("auto", kernel="auto").cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    with torch.profiler.profile() as prof:
        model(x).sum().backward()
        torch.cuda.synchronize()
    names = {event.name for event in prof.events()}
    assert {"_ReluDnBnEager", "_ReluDnBnEagerBackward"} <= names  # the kernels, through the custom op's eager twin


@pytest.mark.timeout(300)
def test_traffic_count_shows_the_fused_function_without_a_full_size_intermediate(tmp_path):
    """benchmarks/fused_bn_traffic.py: inductor's byte count of the compiled tails. ReLU -> BatchNorm is 3 passes
    forward and 5 backward; the fused function's backward stays within a pass of that (no full-size fp32
    intermediate: such a buffer alone is 4 bf16 passes, written and read) and below the three layers'."""
    out = tmp_path / "traffic"
    command = [sys.executable, str(REPO / "benchmarks" / "fused_bn_traffic.py"), "--out", str(out),
               "--shape", "4,64,16,16"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    variants = json.loads((out / "results.json").read_text())["variants"]
    plain, layers, fused = (variants[k] for k in ("relu_bn", "relu_ours_bn_layers", "relu_ours_bn_function"))
    assert plain["forward_passes"] == pytest.approx(3, abs=0.1) and plain["backward_passes"] == pytest.approx(
        5, abs=0.1
    )
    assert fused["backward_passes"] < plain["backward_passes"] + 1.5
    assert fused["passes"] < layers["passes"] - 4
    assert "| ReLU -> BatchNorm (no DN) | 3.0" in (out / "results.md").read_text()
