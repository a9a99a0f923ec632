"""The four backbones: registry and config errors, torchvision parameter parity, unit order and DN placement,
the registry x size x DN x relu x batchnorm grid, weight inits, channels-last, and overfitting one batch."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import models
from divnorm import DivisiveNorm2d, LineDivisiveNorm2d
from models import ModelConfigError, count_parameters, create_model, first_conv, layer_counts, list_models

MODEL_NAMES = ["alexnet", "resnet18", "resnet50", "vgg16"]
DN_SETTINGS = {
    "nonorm": {"type": "nonorm"},
    "ours": {"type": "ours"},
    "ours+asact": {"type": "ours", "asact": True},
    # the 2022 paper's CIFAR values keep the window (ceil(8 * lamb), odd) small
    "ken": {"type": "ken", "lamb": 2.0, "k": 1.0},
}
DN_CLASSES = {"nonorm": None, "ours": DivisiveNorm2d, "ours+asact": DivisiveNorm2d, "ken": LineDivisiveNorm2d}

# Structure tests push small inputs through the 224 px layouts (adaptive pooling allows it); one test per model
# runs a real 224 px image.
# vgg16's five max-pools need 32 px even in the 32 px layout; the other 32 px layouts take 16 px (4x cheaper).
STRUCTURE_INPUT = {32: 16, 224: 64}


def structure_side(name: str, image_size: int) -> int:
    return 32 if name == "vgg16" and image_size == 32 else STRUCTURE_INPUT[image_size]


def model_config(dn: str = "nonorm", relu: bool = True, batchnorm: bool = True, **extra) -> dict:
    return {"relu": relu, "batchnorm": batchnorm, "divnorm_specs": dict(DN_SETTINGS[dn]), **extra}


def units(model: nn.Module) -> list[nn.Sequential]:
    """Every conv unit (a Sequential whose first child is named ``conv``), in module order, shortcuts excluded."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and "conv" in module._modules and not name.endswith("downsample"):
            found.append(module)
    return found


# ---------------------------------------------------------------- registry and config errors


def test_registry_lists_the_four_backbones():
    assert list_models() == MODEL_NAMES


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ModelConfigError, match="unknown model 'resnet34'; choose one of: alexnet, resnet18"):
        create_model("resnet34", num_classes=10)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"batch_norm": True}, r"unknown model config key\(s\) batch_norm; valid keys: batchnorm, relu"),
        ({"relu": "no"}, "model.relu must be true or false"),
        ({"weight_init": "xavier"}, "unknown model.weight_init 'xavier'; choose one of: kaiming, normal"),
        ({"std": "wide"}, 'model.std must be a positive number or "input_size"'),
        ({"std_ratio": -1}, "model.std_ratio must be a positive number"),
        ({"divnorm_specs": {"type": "ourz"}}, "unknown divnorm_specs.type 'ourz'; choose one of"),
        ({"divnorm_specs": {"type": "ours", "gama": 1.0}}, r"unknown divnorm_specs key\(s\) 'gama'"),
        ({"divnorm_specs": {"asact": 1}}, "model.divnorm_specs.asact must be true or false"),
        ({"divnorm_specs": "ours"}, "model.divnorm_specs must be a dict"),
    ],
)
def test_bad_model_config_is_one_clear_error(config, message):
    with pytest.raises(ModelConfigError, match=message):
        create_model("resnet18", num_classes=10, model_config=config, image_size=32)


def test_missing_keys_take_the_defaults_and_defaults_are_not_mutated():
    before = repr(models.DEFAULT_MODEL_CONFIG)
    resolved = models.resolve_model_config({"relu": False, "divnorm_specs": {"type": "ours"}})
    assert resolved["relu"] is False and resolved["batchnorm"] is True and resolved["weight_init"] == "kaiming"
    assert resolved["divnorm_specs"]["type"] == "ours" and resolved["divnorm_specs"]["p"] == 0.5
    assert resolved["divnorm_specs"]["asact"] is False
    resolved["divnorm_specs"]["p"] = 1.0
    assert repr(models.DEFAULT_MODEL_CONFIG) == before


# ---------------------------------------------------------------- parameter parity with torchvision


@pytest.mark.parametrize(
    ("name", "reference", "config"),
    [
        ("alexnet", torchvision.models.alexnet, {"batchnorm": False}),
        ("vgg16", torchvision.models.vgg16_bn, {}),
        ("resnet18", torchvision.models.resnet18, {}),
        ("resnet50", torchvision.models.resnet50, {}),
    ],
)
def test_parameter_count_equals_torchvision_at_224(name, reference, config):
    ours = create_model(name, num_classes=1000, model_config=config, image_size=224)
    theirs = reference(weights=None)
    assert count_parameters(ours) == count_parameters(theirs)
    # same shapes in the same order, not just the same total
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]


@pytest.mark.parametrize(("name", "shortcut_bn_params"), [("resnet18", 2 * (128 + 256 + 512)), ("resnet50", 2 * 3840)])
def test_original_bn_less_shortcut_drops_exactly_the_shortcut_batchnorms(name, shortcut_bn_params):
    standard = create_model(name, num_classes=10, image_size=32)
    original = create_model(name, num_classes=10, model_config={"shortcut_bn": False}, image_size=32)
    assert count_parameters(standard) - count_parameters(original) == shortcut_bn_params
    for module in original.modules():
        if getattr(module, "downsample", None) is not None:
            assert [type(m) for m in module.downsample] == [nn.Conv2d]


def test_layout_follows_image_size():
    small, large = create_model("resnet18", 10, image_size=32), create_model("resnet18", 10, image_size=224)
    assert (first_conv(small).kernel_size, first_conv(small).stride) == ((3, 3), (1, 1))
    assert (first_conv(large).kernel_size, first_conv(large).stride) == ((7, 7), (2, 2))
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.stem) and isinstance(large.stem.maxpool, nn.MaxPool2d)
    cifar_alexnet = create_model("alexnet", 100, image_size=32)
    assert cifar_alexnet.features.conv1.conv.kernel_size == (3, 3) and cifar_alexnet.features.conv1.conv.stride == (
        1,
        1,
    )
    assert cifar_alexnet.features.conv2.conv.kernel_size == (3, 3)
    vgg_small = create_model("vgg16", 100, image_size=32)
    assert [m.out_features for m in vgg_small.classifier if isinstance(m, nn.Linear)] == [512, 512, 100]


# ---------------------------------------------------------------- unit order and DN placement


@pytest.mark.parametrize(
    ("relu", "dn", "batchnorm"), list(itertools.product([True, False], ["nonorm", "ours"], [True, False]))
)
def test_every_feature_conv_is_conv_relu_dn_bn_in_that_order(relu, dn, batchnorm):
    expected = ["conv"] + ["act"] * relu + ["dn"] * (dn == "ours") + ["norm"] * batchnorm
    for name in ("alexnet", "vgg16"):
        model = create_model(name, 10, model_config(dn, relu, batchnorm), image_size=32)
        found = units(model)
        assert len(found) == {"alexnet": 5, "vgg16": 13}[name]
        for unit in found:
            assert list(unit._modules) == expected
            conv = unit.conv
            if dn == "ours":
                assert isinstance(unit.dn, DivisiveNorm2d) and unit.dn.num_channels == conv.out_channels
            if batchnorm:
                assert isinstance(unit.norm, nn.BatchNorm2d) and unit.norm.num_features == conv.out_channels
        # the classifier is never touched by the switches: its two ReLUs stay
        assert sum(isinstance(m, nn.ReLU) for m in model.classifier) == 2


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("asact", [False, True])
def test_resnet_dn_placement_follows_asact(name, relu, asact):
    specs = {"type": "ours", "asact": asact}
    model = create_model(name, 10, {"relu": relu, "divnorm_specs": specs}, image_size=32)
    last = "conv2" if name == "resnet18" else "conv3"
    assert list(model.stem.conv1._modules) == ["conv"] + ["act"] * relu + ["dn", "norm"]
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert len(blocks) == (8 if name == "resnet18" else 16)
    for block in blocks:
        for unit_name, unit in block.features.named_children():
            is_last = unit_name == last
            has_dn = not (is_last and asact)
            assert list(unit._modules) == ["conv"] + ["act"] * (relu and not is_last) + ["dn"] * has_dn + ["norm"]
        after_add = block.activation
        if asact:
            assert list(after_add._modules) == ["dn"] + ["act"] * relu
            assert after_add.dn.num_channels == getattr(block.features, last).conv.out_channels
        elif relu:
            assert list(after_add._modules) == ["act"]
        else:
            assert isinstance(after_add, nn.Identity)
    dn_count = sum(isinstance(m, DivisiveNorm2d) for m in model.modules())
    convs_in_blocks = sum(len(b.features) for b in blocks)
    assert dn_count == 1 + convs_in_blocks  # asact moves one DN per block from the last conv to after the add


def test_resnet_block_computes_the_reference_order():
    """A hand-written forward of one basic block (with a downsample) equals the module's output."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, {"divnorm_specs": {"type": "ours", "asact": True}}, image_size=32).eval()
    block = model.layer2[0]
    x = torch.randn(2, 64, 8, 8)
    f = block.features

    def bn(module, t):
        return F.batch_norm(t, module.running_mean, module.running_var, module.weight, module.bias, False)

    out = bn(f.conv1.norm, f.conv1.dn(F.relu(F.conv2d(x, f.conv1.conv.weight, stride=2, padding=1))))
    out = bn(f.conv2.norm, F.conv2d(out, f.conv2.conv.weight, padding=1))  # last conv: no ReLU, no DN (asact)
    shortcut = bn(block.downsample.norm, F.conv2d(x, block.downsample.conv.weight, stride=2))
    expected = F.relu(block.activation.dn(out + shortcut))  # after the add: DN, then ReLU
    torch.testing.assert_close(block(x), expected)


# ---------------------------------------------------------------- the grid


# registry x {32, 224} px x DN x relu x batchnorm. asact only moves DN inside residual blocks, so for alexnet and
# vgg16 "ours+asact" would rebuild the "ours" network; test_asact_changes_nothing_outside_resnets checks that.
GRID = [
    pytest.param(
        name, size, dn, relu, bn, id=f"{name}-{size}px-{dn}-{'relu' if relu else 'norelu'}-{'bn' if bn else 'nobn'}"
    )
    for name in MODEL_NAMES
    for size in (32, 224)
    for dn in DN_SETTINGS
    if name.startswith("resnet") or dn != "ours+asact"
    for relu in (True, False)
    for bn in (True, False)
]


@pytest.mark.parametrize(("name", "image_size", "dn", "relu", "batchnorm"), GRID)
def test_grid_forward_shape_finite_and_every_parameter_gets_a_gradient(name, image_size, dn, relu, batchnorm):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, model_config=model_config(dn, relu, batchnorm), image_size=image_size)
    dn_class = DN_CLASSES[dn]
    dn_layers = [m for m in model.modules() if dn_class is not None and isinstance(m, dn_class)]
    assert len(dn_layers) == {"alexnet": 5, "vgg16": 13, "resnet18": 17, "resnet50": 49}[name] * (dn != "nonorm")
    side = structure_side(name, image_size)
    out = model(torch.randn(2, 3, side, side))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()] == []
    # A DN parameter that only scales a whole layer (ken's k) can get an exactly-zero gradient when BatchNorm
    # follows, since BN undoes any per-channel scale; every other parameter must get a non-zero one.
    dn_names = {f"{n}.{pn}" for n, m in model.named_modules() if m in dn_layers for pn, _ in m.named_parameters()}
    assert [n for n, p in trainable.items() if n not in dn_names and not p.grad.any()] == []


@pytest.mark.parametrize("name", ["alexnet", "vgg16"])
def test_asact_changes_nothing_outside_resnets(name):
    ours = create_model(name, 10, model_config("ours"), image_size=32)
    asact = create_model(name, 10, model_config("ours+asact"), image_size=32)
    assert repr(asact) == repr(ours)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_real_224_pixel_forward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000, model_config=model_config("ours"), image_size=224).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ---------------------------------------------------------------- weight init


def conv_weights(config: dict, name: str = "alexnet") -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [
        m.weight.detach() for m in create_model(name, 10, config, image_size=32).modules() if isinstance(m, nn.Conv2d)
    ]


def test_kaiming_init_is_fan_in_relu_with_zero_bias():
    torch.manual_seed(0)
    model = create_model("alexnet", 10, {}, image_size=32)
    for unit in units(model):
        conv = unit.conv
        expected = math.sqrt(2 / conv.weight[0].numel())
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
        assert torch.count_nonzero(conv.bias) == 0


def test_normal_init_uses_std_or_input_size():
    for weight in conv_weights({"weight_init": "normal", "std": 0.05}):
        assert weight.std().item() == pytest.approx(0.05, rel=0.1) and abs(weight.mean().item()) < 0.01
    for weight in conv_weights({"weight_init": "normal", "std": "input_size"}):
        assert weight.std().item() == pytest.approx(1 / math.sqrt(weight[0].numel()), rel=0.1)


def pools(weight: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    size = 2 ** int(p * math.log2(weight.shape[0]))
    return weight.reshape(weight.shape[0] // size, size, -1)  # (pools, filters per pool, fan_in)


def test_multivariate_gaussian_draws_each_pool_around_a_shared_mean():
    config = {"weight_init": "multivariate_gaussian", "std": 0.01, "mean_std": 0.2}
    for weight in conv_weights(config):
        grouped = pools(weight)
        within = (grouped - grouped.mean(dim=1, keepdim=True)).std().item()
        assert within == pytest.approx(0.01, rel=0.15)  # spread around the pool's mean is `std`
        assert grouped.mean(dim=1).std().item() == pytest.approx(0.2, rel=0.15)  # the means spread by `mean_std`


def test_kaiming_gaussian_draws_each_pool_around_a_kaiming_filter():
    for weight in conv_weights({"weight_init": "kaiming_gaussian", "std_ratio": 0.1}):
        grouped = pools(weight)
        centre = grouped.mean(dim=1, keepdim=True)
        kaiming_std = math.sqrt(2 / weight[0].numel())
        assert centre.std().item() == pytest.approx(kaiming_std, rel=0.15)
        assert (grouped - centre).std().item() == pytest.approx(0.1 * kaiming_std, rel=0.15)


def test_pooled_init_follows_divnorm_p():
    weight = conv_weights({"weight_init": "multivariate_gaussian", "divnorm_specs": {"p": 1.0}}, "resnet18")[0]
    # p = 1: one pool over all 64 filters, so every filter is close to the same mean
    assert (weight - weight.mean(dim=0)).std().item() == pytest.approx(0.01, rel=0.15)


# ---------------------------------------------------------------- channels-last and overfitting


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channels_last_gives_the_same_output_and_stays_channels_last(name):
    torch.manual_seed(0)
    model = create_model(name, 10, model_config("ours"), image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        formats = []

        def record(module, inputs, output):
            formats.append((type(module).__name__, output.is_contiguous(memory_format=torch.channels_last)))

        # every 4-D layer: the features of alexnet/vgg, everything before the fc of a resnet
        body = model.features if hasattr(model, "features") else model
        spatial = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, DivisiveNorm2d)
        hooks = [m.register_forward_hook(record) for m in body.modules() if isinstance(m, spatial)]
        out = model(x.to(memory_format=torch.channels_last))
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert formats and [f for f in formats if not f[1]] == []


# Overfitting settings per model: the 32 px layouts with the smallest input each takes (vgg16's five max-pools
# need 32 px), to keep the test within budget on two CPU cores. ResNet-50 with DN after all 49 convs has a backward
# gain that compounds to ~1e3x the no-DN gradient at the stem and does not fit at all from the default init
# (Adam 1e-4..3e-3, asact on or off); zero_init_residual fixes that.
OVERFIT = {
    "alexnet": (16, 1e-3, {}),
    "vgg16": (32, 1e-3, {}),
    "resnet18": (16, 3e-3, {}),
    "resnet50": (16, 1e-3, {"zero_init_residual": True}),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_with_ours_dn_overfits_one_batch(name):
    side, lr, extra = OVERFIT[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, model_config=model_config("ours", **extra), image_size=32)
    images, labels = torch.randn(16, 3, side, side), torch.arange(16) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_zeroes_the_last_norm_of_every_block(name):
    model = create_model(name, 10, {"zero_init_residual": True}, image_size=32)
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert all(torch.count_nonzero(b.features[-1].norm.weight) == 0 for b in blocks)
    default = create_model(name, 10, image_size=32)
    assert all(bool((b.features[-1].norm.weight == 1).all()) for stage in (default.layer1,) for b in stage)


def test_summary_helpers():
    model = create_model("resnet18", 10, model_config("ours"), image_size=32)
    assert first_conv(model) is model.stem.conv1.conv
    counts = layer_counts(model)
    assert counts["Conv2d"] == 1 + 16 + 3 and counts["DivisiveNorm2d"] == 17 and counts["BatchNorm2d"] == 20
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == 0
    frozen = create_model("resnet18", 10, {"divnorm_specs": {"type": "ours", "fix_all": True}}, image_size=32)
    dn_params = sum(p.numel() for m in frozen.modules() if isinstance(m, DivisiveNorm2d) for p in m.parameters())
    assert dn_params > 0 and count_parameters(frozen) - count_parameters(frozen, trainable_only=True) == dn_params
