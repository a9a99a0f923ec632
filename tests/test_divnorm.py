"""divnorm/: every variant against slow loop implementations, gradients, layouts, autocast, freezing, factory."""

from __future__ import annotations

import ast
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import divnorm
from divnorm import (
    DIVNORM_TYPES,
    DivisiveNorm2d,
    GDN2d,
    LineDivisiveNorm2d,
    LocalResponseNorm2d,
    build_divnorm,
    check_finite,
    pool_size,
)
from divnorm.grouped import grouped_divnorm_autograd

REPO = Path(__file__).resolve().parents[1]
CHANNELS = [3, 64, 96, 128, 192, 256, 384, 512, 2048]
# REFERENCE.md's table for p = 0.5 (C=3: 2 ** int(0.79) = 1, one channel per pool)
POOL_SIZES = {3: 1, 64: 8, 96: 8, 128: 8, 192: 8, 256: 16, 384: 16, 512: 16, 1024: 32, 2048: 32}

# The config's full divnorm_specs dict with the shipped defaults (REFERENCE.md, "Config sections").
CONFIG_SPECS = {
    "type": "nonorm",
    "sigma": 1.0,
    "gamma": 1.0,
    "eps": 0,
    "p": 0.5,
    "power": 2,
    "lamb": 10.0,
    "alpha": 0.1,
    "beta": 1.0,
    "k": 10.0,
    "asact": False,
    "fix_gamma": False,
    "fix_sigma": False,
    "fix_all": False,
    "single_gamma": False,
    "single_sigma": False,
}


def randomize(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Give per-pool parameters distinct values so a wrong pool index shows up in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if isinstance(layer, DivisiveNorm2d):
            layer.gamma.copy_(torch.rand(layer.gamma.shape, generator=gen) - 0.5)
            layer.sigma.copy_(torch.rand(layer.sigma.shape, generator=gen) + 0.5)
    return layer


# ---------------------------------------------------------------------------------------------------------
# Slow, obviously-correct references: python loops over channels, vectorized only over (N, H, W).


def loop_ours(x, gamma, sigma, pool, power, eps):
    y = torch.empty_like(x)
    for g in range(x.shape[1] // pool):
        members = range(g * pool, (g + 1) * pool)
        energy = sum(x[:, m].abs() ** power for m in members)
        gain = math.exp(gamma[g if len(gamma) > 1 else 0])
        offset = abs(sigma[g if len(sigma) > 1 else 0]) ** power + eps
        for c in members:
            y[:, c] = gain * x[:, c].abs() ** power / (energy + offset)
    return y


def loop_ken(x, lamb, alpha, beta, k):
    """Shift-and-add over the window offsets j (each a plain slice), zero padding at the channel ends."""
    channels = x.shape[1]
    window = math.ceil(8 * lamb)
    window += 1 - window % 2
    half = window // 2
    energy = x**2
    total = torch.zeros_like(x)
    for j in range(-half, half + 1):
        # total[c] += energy[c + j] * exp(-|j| / lambda) for every c with 0 <= c + j < C
        lo, hi = max(0, -j), min(channels, channels - j)
        if lo < hi:
            total[:, lo:hi] += energy[:, lo + j : hi + j] * math.exp(-abs(j) / lamb)
    return energy / (k * (1 + alpha / lamb * total)) ** beta


def loop_gdn(x, beta, gamma):
    y = torch.empty_like(x)
    for i in range(x.shape[1]):
        total = beta[i] + sum(gamma[i, j] * x[:, j] ** 2 for j in range(x.shape[1]))
        y[:, i] = x[:, i] / total.sqrt()
    return y


def loop_lrn(x, size, alpha, beta, k):
    y = torch.empty_like(x)
    channels = x.shape[1]
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels - 1, c + (size - 1) // 2)
        total = sum(x[:, j] ** 2 for j in range(lo, hi + 1))
        y[:, c] = x[:, c] / (k + alpha / size * total) ** beta
    return y


# ---------------------------------------------------------------------------------------------------------
# Values against the loops


@pytest.mark.parametrize("channels", sorted(POOL_SIZES))
def test_pool_size_matches_reference_table(channels):
    assert pool_size(channels, 0.5) == POOL_SIZES[channels]
    assert pool_size(channels, 1.0) == channels  # p = 1: one global pool


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("power", [2, 3])  # even and odd; P = 1 in the gradient tests
@pytest.mark.parametrize("channels", CHANNELS)
def test_ours_matches_loop(channels, power, batch):
    layer = randomize(DivisiveNorm2d(channels, p=0.5, power=power, eps=1e-3)).double()
    x = torch.randn(batch, channels, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(channels))
    expected = loop_ours(x, layer.gamma.tolist(), layer.sigma.tolist(), POOL_SIZES[channels], power, 1e-3)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    if power % 2:  # odd P: |x|^P keeps the output non-negative (the original crashed here)
        assert (y >= 0).all()


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("channels", [3, 96, 256])
def test_ours_global_pool_and_single_parameters(channels, single):
    layer = DivisiveNorm2d(channels, p=1.0, single_gamma=single, single_sigma=single, gamma=0.3, sigma=0.7)
    assert layer.num_pools == 1 and layer.gamma.numel() == 1
    x = torch.randn(2, channels, 3, 2, dtype=torch.float64)
    expected = loop_ours(x, [0.3], [0.7], channels, 2, 1e-8)
    torch.testing.assert_close(layer.double()(x), expected)
    grouped = DivisiveNorm2d(channels, single_gamma=single, single_sigma=single)
    assert grouped.gamma.numel() == (1 if single else channels // POOL_SIZES[channels])


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("lamb", [0.7, 10.0])  # windows 7 (ceil 5.6 = 6, bumped) and 81
@pytest.mark.parametrize("channels", CHANNELS)
def test_ken_matches_loop(channels, lamb, batch):
    layer = LineDivisiveNorm2d(channels, lamb=lamb, alpha=0.3, beta=0.75, k=1.5).double()
    x = torch.randn(batch, channels, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(channels))
    # the float32-rounded initial values, as the layer holds them
    values = [p.item() for p in (layer.lamb, layer.alpha, layer.beta, layer.k)]
    torch.testing.assert_close(layer(x), loop_ken(x, *values), rtol=1e-10, atol=1e-12)


def test_ken_window_follows_learned_lambda():
    layer = LineDivisiveNorm2d(32, lamb=1.0).double()
    assert divnorm.ken_window(1.0) == 9 and divnorm.ken_window(1.25) == 11 and divnorm.ken_window(0.5) == 5
    with torch.no_grad():
        layer.lamb.fill_(1.25)  # the window grows from 9 to 11 channels with no rebuild
    x = torch.randn(2, 32, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(layer(x), loop_ken(x, 1.25, 0.1, 1.0, 10.0))
    weights = layer.channel_weights(torch.float64)
    assert weights[0, 5] > 0 and weights[0, 6] == 0


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("channels", [3, 64, 96])
def test_gdn_matches_loop(channels, batch):
    layer = dense_gdn(channels, seed=channels).double()  # dense gamma: every cross term counts
    gen = torch.Generator().manual_seed(channels)
    beta, gamma = layer.beta_param(layer.beta), layer.gamma_param(layer.gamma)
    assert (gamma >= 0).all() and (beta >= 1e-6).all()
    x = torch.randn(batch, channels, 2, 2, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(layer(x), loop_gdn(x, beta.detach(), gamma.detach()))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("channels", [3, 64, 96])
def test_lrn_matches_loop(channels, batch):
    layer = build_divnorm({"type": "lrn"}, channels)
    assert isinstance(layer, LocalResponseNorm2d)
    x = torch.randn(batch, channels, 2, 2, dtype=torch.float64) * 30
    torch.testing.assert_close(layer(x), loop_lrn(x, 5, 1e-4, 0.75, 2.0))


def test_ours_output_bounded_by_gain():
    layer = DivisiveNorm2d(64, gamma=0.5)
    y = layer(torch.randn(4, 64, 5, 5) * 100)
    assert (y >= 0).all() and (y <= math.exp(0.5) * (1 + 1e-6)).all()


# ---------------------------------------------------------------------------------------------------------
# Gradients


def dense_gdn(channels: int, seed: int = 0) -> GDN2d:
    """A GDN whose gamma entries all sit above the reparameterization's bound (at the bound, the lower-bound
    trick's gradient is deliberately one-sided, which finite differences cannot match)."""
    layer = GDN2d(channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.gamma.copy_(layer.gamma_param.init(torch.rand(channels, channels, generator=gen) * 0.2 + 0.01))
        layer.beta.copy_(layer.beta_param.init(torch.rand(channels, generator=gen) + 0.1))
    return layer


def tiny_layers():
    """One small float64 instance of every variant (and the ``ours`` options with their own code paths)."""
    return {
        "ours_p2": randomize(DivisiveNorm2d(16, eps=1e-3)),
        "ours_p3": randomize(DivisiveNorm2d(16, power=3, eps=1e-3)),
        "ours_p1": randomize(DivisiveNorm2d(16, power=1, eps=1e-3)),
        "ours_global_single": DivisiveNorm2d(16, p=1.0, single_gamma=True, single_sigma=True, gamma=0.2),
        "ken": LineDivisiveNorm2d(16, lamb=0.55, alpha=0.4, beta=0.8, k=1.3),
        "gdn": dense_gdn(16),
        "lrn": LocalResponseNorm2d(16),
    }


@pytest.mark.parametrize("name", list(tiny_layers()))
def test_gradcheck_float64(name):
    layer = tiny_layers()[name].double()
    x = torch.randn(2, 16, 2, 2, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(inp, *values):
        state = {name: v for (name, _), v in zip(named, values)}
        return torch.func.functional_call(layer, state, (inp,))

    named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    # fast_mode checks random projections of the Jacobian: the same test at a fraction of the cost
    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_hand_written_backward_matches_autograd_composition():
    layer = randomize(DivisiveNorm2d(64, eps=0.0))
    x = torch.randn(3, 64, 4, 5, requires_grad=True)
    grad = torch.randn(3, 64, 4, 5)
    layer(x).backward(grad)
    fast = (x.grad.clone(), layer.gamma.grad.clone(), layer.sigma.grad.clone())
    x.grad = None
    layer.zero_grad()
    grouped_divnorm_autograd(x, layer.gamma, layer.sigma, layer.pool, layer.power, layer.eps).backward(grad)
    for got, want in zip(fast, (x.grad, layer.gamma.grad, layer.sigma.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_zero_input_with_zero_eps_and_sigma_stays_finite():
    # config eps = 0 and a sigma learned down to 0: the denominator floor keeps 0 / 0 out
    layer = DivisiveNorm2d(64, eps=0.0, sigma=0.0)
    x = torch.zeros(2, 64, 3, 3)
    x[0, :8, 0, 0] = 1e-12
    x.requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.sigma.grad).all()


# ---------------------------------------------------------------------------------------------------------
# Layout, batch size, autocast


@pytest.mark.parametrize("name", list(tiny_layers()))
def test_channels_last_same_values_and_gradients(name):
    layer = tiny_layers()[name]
    x = torch.randn(2, 16, 5, 4)
    grad = torch.randn(2, 16, 5, 4)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer.zero_grad()
        xi = x.clone(memory_format=fmt).requires_grad_(True)
        y = layer(xi)
        y.backward(grad.contiguous(memory_format=fmt))
        results.append((y, xi.grad, [p.grad for p in layer.parameters()]))
    (y0, g0, p0), (y1, g1, p1) = results
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(g1, g0)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if isinstance(layer, DivisiveNorm2d):
        assert y1.is_contiguous(memory_format=torch.channels_last)  # no layout change on the hot path


def test_gradient_in_other_layout_than_input():
    layer = randomize(DivisiveNorm2d(64))
    x = torch.randn(2, 64, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(2, 64, 3, 3)  # NCHW gradient for a channels-last input
    layer(x).backward(grad)
    reference = x.detach().clone().requires_grad_(True)
    grouped_divnorm_autograd(reference, layer.gamma, layer.sigma, layer.pool, 2.0, layer.eps).backward(grad)
    torch.testing.assert_close(x.grad, reference.grad)


@pytest.mark.parametrize("name", list(tiny_layers()))
def test_autocast_bf16_close_to_fp32(name):
    layer = tiny_layers()[name]
    conv = nn.Conv2d(3, 16, 3, padding=1)
    images = torch.randn(2, 3, 6, 6)
    expected = layer(conv(images))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(images)
        assert features.dtype == torch.bfloat16
        y = layer(features)
    assert y.dtype == torch.bfloat16  # cast back to the input's dtype
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("type_", [t for t in DIVNORM_TYPES if t != "nonorm"])
@pytest.mark.parametrize("value", [0.0, 1e-6, 1e4])
def test_fp16_extremes_stay_finite(type_, value):
    layer = build_divnorm({**CONFIG_SPECS, "type": type_}, 64)
    x = torch.full((1, 64, 2, 2), value, dtype=torch.float16)
    x[0, ::3] = -value
    y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------------------
# Freezing and divergence


@pytest.mark.parametrize(
    ("options", "frozen"),
    [
        ({"fix_gamma": True}, {"gamma"}),
        ({"fix_sigma": True}, {"sigma"}),
        ({"fix_all": True}, {"gamma", "sigma"}),  # per pool: the original's fix_all did nothing here
        ({"fix_gamma": True, "single_gamma": True}, {"gamma"}),
        ({"type": "ken", "fix_all": True}, {"lamb", "alpha", "beta", "k"}),
        ({"type": "gdn", "fix_all": True}, {"beta", "gamma"}),
        ({"type": "ken"}, set()),
    ],
)
def test_fixed_parameters_do_not_move_after_a_step(options, frozen):
    layer = build_divnorm({**CONFIG_SPECS, "type": "ours", **options}, 64)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    # weight decay and momentum would move a parameter even with a zero gradient
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        loss = layer(torch.randn(4, 64, 3, 3)).square().mean()
        if loss.requires_grad:  # with everything frozen there is nothing to differentiate
            loss.backward()
        optimizer.step()
    for name, param in layer.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == (name not in frozen), name


def test_divergence_is_reported_not_reset():
    model = nn.Sequential(nn.Conv2d(3, 64, 1), DivisiveNorm2d(64), nn.Conv2d(64, 64, 1), LineDivisiveNorm2d(64))
    check_finite(model)  # healthy: no error
    with torch.no_grad():
        model[1].sigma[3] = float("nan")
        model[3].lamb.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"1\.sigma.*3\.lamb"):
        check_finite(model)
    with pytest.raises(FloatingPointError, match="sigma"):
        model[1].check_finite()
    model(torch.randn(1, 3, 2, 2))
    assert math.isnan(model[1].sigma[3].item()) and math.isinf(model[3].lamb.item())  # nothing was silently reset


# ---------------------------------------------------------------------------------------------------------
# Factory


def test_factory_builds_every_type_from_the_full_config_dict():
    expected = {
        "nonorm": nn.Identity,
        "ours": DivisiveNorm2d,
        "ken": LineDivisiveNorm2d,
        "lrn": LocalResponseNorm2d,
        "gdn": GDN2d,
    }
    assert set(DIVNORM_TYPES) == set(expected)
    for type_, cls in expected.items():
        layer = build_divnorm({**CONFIG_SPECS, "type": type_, "asact": True}, 128)
        assert type(layer) is cls
        assert layer(torch.randn(1, 128, 2, 2)).shape == (1, 128, 2, 2)


def test_factory_reads_the_type_keys_and_defaults():
    layer = build_divnorm({**CONFIG_SPECS, "type": "ours", "p": 1.0, "power": 3, "gamma": 0.25, "sigma": 2.0}, 96)
    assert (layer.pool, layer.power, layer.eps) == (96, 3.0, 0.0)
    assert layer.gamma.item() == 0.25 and layer.sigma.item() == 2.0
    assert build_divnorm({"type": "ours"}, 64).eps == 1e-8  # REFERENCE: 1e-8 when the key is absent
    ken = build_divnorm({**CONFIG_SPECS, "type": "ken", "lamb": 2.0, "k": 1.0}, 64)
    assert ken.lamb.item() == 2.0 and ken.k.item() == 1.0 and ken.alpha.item() == pytest.approx(0.1)
    lrn = build_divnorm({"type": "lrn", "lrn_size": 3, "lrn_k": 1.0}, 8)
    assert (lrn.size, lrn.k, lrn.alpha) == (3, 1.0, 1e-4)


@pytest.mark.parametrize(
    ("specs", "channels", "message"),
    [
        ({"type": "heeger"}, 64, "choose one of: nonorm, ours, ken, lrn, gdn"),
        ({"type": "ours", "sigmaa": 1.0}, 64, "unknown divnorm_specs key.*'sigmaa'.*known keys: alpha"),
        ({"type": "ours"}, 100, "100 channels do not split into pools of 8"),
        ({"type": "ours", "p": 1.5}, 64, r"p must lie in \[0, 1\]"),
        ({"type": "ours", "power": 0}, 64, "power must be > 0"),
        ({"type": "ken", "lamb": -1.0}, 64, "lamb must be > 0"),
        ({"type": "ours", "power": "2"}, 64, "power must be a number, got '2'"),
        ({"type": "ours", "fix_all": 1}, 64, "fix_all must be true or false"),
    ],
)
def test_factory_errors_name_the_fix(specs, channels, message):
    with pytest.raises(ValueError, match=message):
        build_divnorm(specs, channels)


def test_compiles_as_one_graph():
    # the trainer may torch.compile the model: the hand-written autograd.Function must not break the graph
    torch._dynamo.reset()
    layer = randomize(DivisiveNorm2d(64))
    x = torch.randn(2, 64, 3, 3, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer(x))
    assert torch.isfinite(x.grad).all() and layer.gamma.grad is not None


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects \(N, 64, H, W\) input, got \(2, 32, 3, 3\)"):
        DivisiveNorm2d(64)(torch.randn(2, 32, 3, 3))


def test_divnorm_imports_only_torch():
    allowed = {"torch", "divnorm", "__future__", "math", "collections", "typing"}
    # the fused kernel's modules, loaded only when a kernel runs: triton ships with torch
    lazy = {
        "ops.py": {"triton"},
        "triton_ours.py": {"triton", "dataclasses", "functools"},
        "triton_fused_bn.py": {"triton"},
    }
    for path in (REPO / "divnorm").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            extra = roots - allowed - lazy.get(path.name, set())
            assert not extra, f"{path.name} imports {extra}"
    # and importing divnorm (building a torch-path layer included) leaves triton unimported
    code = "import sys, divnorm; divnorm.build_divnorm({'type': 'ours', 'kernel': 'torch'}, 8); "
    code += "print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_speed_benchmark_script_writes_its_report(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("divnorm_speed", REPO / "benchmarks/divnorm_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.md"
    assert bench.main(["--shape", "2", "64", "4", "4", "--rounds", "2", "--warmup", "1", "--out", str(out)]) == 0
    text = out.read_text()
    for needle in ("BatchNorm2d+ReLU", "original conv3d", "DN time / BN+ReLU time", "conv3d time / DN time"):
        assert needle in text
    assert "(2, 64, 4, 4)" in text and text == capsys.readouterr().out.rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): same values as the CPU, and fp16/bf16 autocast stays finite and close


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(tiny_layers()))
def test_cuda_matches_cpu_channels_last(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # ken / gdn convolve: TF32 would differ by ~1e-3
    layer = tiny_layers()[name]
    x = torch.randn(2, 16, 5, 4)
    grad = torch.randn(2, 16, 5, 4)
    outputs = []
    for device, fmt in (("cpu", torch.contiguous_format), ("cuda", torch.channels_last)):
        layer.to(device).zero_grad()
        xi = x.detach().to(device).contiguous(memory_format=fmt).requires_grad_(True)  # never x itself
        y = layer(xi)
        y.backward(grad.to(device).contiguous(memory_format=fmt))
        outputs.append([t.detach().cpu() for t in (y, xi.grad, *[p.grad for p in layer.parameters()])])
    for cpu_value, cuda_value in zip(*outputs):
        torch.testing.assert_close(cuda_value, cpu_value, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("type_", [t for t in DIVNORM_TYPES if t != "nonorm"])
def test_cuda_autocast_low_precision(type_, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 3, padding=1).cuda()
    layer = build_divnorm({**CONFIG_SPECS, "type": type_}, 64).cuda()
    images = torch.randn(4, 3, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    expected = layer(conv(images))
    with torch.autocast("cuda", dtype=dtype):
        y = layer(conv(images))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in [*conv.parameters(), *layer.parameters()])
    for value in (0.0, 1e-6, 1e4):
        x = torch.full((2, 64, 3, 3), value, device="cuda", dtype=dtype)
        with torch.autocast("cuda", dtype=dtype):
            assert torch.isfinite(layer(x)).all()
