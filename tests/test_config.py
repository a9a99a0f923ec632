"""Config files, overrides (original ``-`` and dotted syntax), validation messages and the command line."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from train.__main__ import build_parser, main
from train.config import (
    CONFIG_DIR,
    DATASETS,
    MODELS,
    ConfigError,
    apply_overrides,
    defaults,
    flatten,
    load_config,
    parse_value,
)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_dataset_model_file_loads(dataset, model):
    config = load_config(dataset, model)
    assert set(flatten(config)) == set(flatten(defaults())), "a config file adds or drops keys"
    assert config["seed"] == 42 and config["runs"] == 1
    assert config["optimizer"]["momentum"] == 0.9 and config["optimizer"]["nesterov"] is True
    assert config["training"]["patience"] == 5 and config["training"]["criterion"] == "cross_entropy"


def test_original_per_model_defaults():
    """REFERENCE.md's per-model values."""
    expect = {
        ("cifar100", "alexnet"): (128, 90, 0.05, 1e-4, "steplr", 30),
        ("imagenet", "alexnet"): (128, 90, 0.05, 1e-4, "plateau", None),
        ("imagenet", "resnet18"): (128, 60, 0.01, 1e-4, "steplr", 20),
        ("imagenet", "resnet50"): (64, 60, 0.01, 1e-4, "steplr", 20),
        ("imagenet", "vgg16"): (64, 60, 0.01, 5e-4, "steplr", 20),
    }
    for (dataset, model), (batch, epochs, lr, wd, sched, step) in expect.items():
        c = load_config(dataset, model)
        assert c["data"]["batch_size"] == batch and c["training"]["epochs"] == epochs
        assert c["optimizer"]["lr"] == lr and c["optimizer"]["weight_decay"] == wd
        assert c["lr_scheduler"]["name"] == sched
        if step is not None:
            assert c["lr_scheduler"]["step_size"] == step and c["lr_scheduler"]["gamma"] == 0.1
        assert c["model"]["divnorm_specs"]["type"] == "nonorm"  # the original's files default to no DN


def test_model_section_matches_the_models_defaults():
    import models

    assert defaults()["model"] == models.DEFAULT_MODEL_CONFIG


def test_every_divnorm_key_the_factory_reads_is_a_config_key():
    """Each key a DN type reads (divnorm.factory's defaults) is settable from the command line and reaches the
    layer: the baselines' lrn_* / gdn_* keys included."""
    from divnorm.baselines import GDN2d, LocalResponseNorm2d
    from divnorm.factory import TYPE_DEFAULTS
    from train.build import build_network

    read = {key for keys in TYPE_DEFAULTS.values() for key in keys}
    assert sorted(read - set(defaults()["model"]["divnorm_specs"])) == []
    config = load_config("synthetic", "alexnet", ["model.divnorm_specs.type=lrn", "model.divnorm_specs.lrn_size=3",
                                                  "model.divnorm_specs.lrn_k=1.5"])  # fmt: skip
    lrn = [m for m in build_network("synthetic", "alexnet", config).modules() if isinstance(m, LocalResponseNorm2d)]
    assert lrn and {(m.size, m.k, m.alpha) for m in lrn} == {(3, 1.5, 1e-4)}
    config = load_config(
        "synthetic", "alexnet", ["model.divnorm_specs.type=gdn", "model.divnorm_specs.gdn_gamma_init=0.5"]
    )
    gdn = [m for m in build_network("synthetic", "alexnet", config).modules() if isinstance(m, GDN2d)]
    assert gdn and all(torch.allclose(m.gamma_param(m.gamma).diagonal(), torch.tensor(0.5)) for m in gdn)


@pytest.mark.parametrize("value", ["[1,0.5]", "[0,0]", "[0.5,2]"])
def test_crop_scale_must_be_an_ordered_fraction(value):
    """Every loader samples crops in [low, high]: the torch loader used to take a reversed or zero range silently."""
    with pytest.raises(ConfigError, match="0 < low <= high"):
        load_config("imagenet", "alexnet", [f"data.crop_scale={value}"])
    load_config("imagenet", "alexnet", ["data.crop_scale=[0.35,1]", "data.crop_ratio=[0.75,1.5]"])


def test_data_section_has_every_shared_key():
    keys = {
        "path", "gpu", "loader", "batch_size", "eval_batch_size", "workers", "subset", "augment", "crop_scale",
        "crop_ratio", "image_size", "val_resize", "prefetch", "pin_memory", "dali_device", "dali_threads",
        "hw_decoder_load", "dali_decode", "dali_train_antialias", "os_cache", "batches_ahead", "progressive_resolution",
        "progressive_start_res", "progressive_end_res", "progressive_start_epoch", "progressive_end_epoch",
    }  # fmt: skip
    data = defaults()["data"]
    assert keys <= set(data)
    assert data["val_resize"] == 256 and data["prefetch"] == 2 and data["hw_decoder_load"] == 0.65
    assert data["crop_scale"] == [0.08, 1.0] and data["subset"] is None and data["loader"] == "torch"


def test_dash_and_dot_overrides_are_the_same():
    a = load_config("imagenet", "alexnet", ["model-relu=false", "model-divnorm_specs-type=ours"])
    b = load_config("imagenet", "alexnet", ["model.relu=false", "model.divnorm_specs.type=ours"])
    assert a == b
    assert a["model"]["relu"] is False and a["model"]["divnorm_specs"]["type"] == "ours"


def test_override_values_parse_as_json():
    c = load_config(
        "cifar100",
        "resnet18",
        [
            "optimizer.lr=0.1",
            "training.epochs=7",
            "data.subset=null",
            "data.crop_scale=[0.25,1]",
            "data.path=/some/where",
            "training.grad_clip=1",
            "model-divnorm_specs-eps=1e-8",
            "model.std=input_size",
            "optimizer.nesterov=False",
            "data.bz=32",  # the original's key name
        ],
    )
    assert c["optimizer"]["lr"] == 0.1 and c["training"]["epochs"] == 7 and isinstance(c["training"]["epochs"], int)
    assert c["data"]["subset"] is None and c["data"]["crop_scale"] == [0.25, 1.0]
    assert c["data"]["path"] == "/some/where" and c["training"]["grad_clip"] == 1
    assert c["model"]["divnorm_specs"]["eps"] == 1e-8 and c["model"]["std"] == "input_size"
    assert c["optimizer"]["nesterov"] is False and c["data"]["batch_size"] == 32
    assert parse_value("3") == 3 and parse_value("2.5") == 2.5 and parse_value("true") is True
    assert parse_value("None") is None and parse_value("ours") == "ours" and parse_value('"7"') == "7"


def test_int_accepted_for_float_and_converted():
    c = load_config("synthetic", "alexnet", ["optimizer.lr=1"])
    assert c["optimizer"]["lr"] == 1.0 and isinstance(c["optimizer"]["lr"], float)


def test_unknown_key_names_nearest_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config("imagenet", "alexnet", ["model-divnorm_spec-type=ours"])
    assert "model.divnorm_specs.type" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config("imagenet", "alexnet", ["optimizer.learning_rate=0.1"])
    assert "unknown config key" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config("imagenet", "alexnet", ["training.epoch=3"])
    assert "training.epochs" in str(info.value)


def test_deep_unknown_key_is_an_error_at_any_depth():
    with pytest.raises(ConfigError, match="unknown config key 'model.divnorm_specs.type.extra'"):
        load_config("imagenet", "alexnet", ["model-divnorm_specs-type-extra=1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.epochs=ten", "an integer"),
        ("training.epochs=1.5", "an integer"),
        ("training.epochs=true", "an integer"),
        ("model.relu=1", "true/false"),
        ("optimizer.lr=fast", "a number"),
        ("data.crop_scale=0.5", "a list"),
        ("data.subset=many", "an integer"),
        ("model.batchnorm=null", "cannot be null"),
    ],
)
def test_wrong_type_names_the_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("cifar100", "alexnet", [override])


def test_choices_are_checked_and_old_names_accepted():
    with pytest.raises(ConfigError, match="choose one of: auto, bf16, fp16, off"):
        load_config("cifar100", "alexnet", ["training.amp=fp8"])
    assert load_config("cifar100", "alexnet", ["lr_scheduler-name=cosinelr"])["lr_scheduler"]["name"] == "cosine"


def test_section_override_merges_keys():
    c = load_config("cifar100", "alexnet", ['model.divnorm_specs={"type": "ours", "p": 1}'])
    assert c["model"]["divnorm_specs"]["type"] == "ours" and c["model"]["divnorm_specs"]["p"] == 1.0
    assert c["model"]["divnorm_specs"]["sigma"] == 1.0  # untouched keys keep their values


def test_apply_overrides_without_equals_is_an_error():
    config = load_config("cifar100", "alexnet")
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(config, ["model-relu"])


def test_every_config_file_is_valid_json_with_known_keys():
    files = sorted(CONFIG_DIR.glob("*/*.json"))
    assert len(files) == len(DATASETS) * len(MODELS)
    for path in files:
        assert isinstance(json.loads(path.read_text()), dict)


# ------------------------------------------------------------------------------------------- command line


def test_help_lists_datasets_models_loaders_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in (*DATASETS, *MODELS, "torch", "dali", "ffcv", "gpu", "auto", "--loader", "--data-dir", "--device",
                 "--epochs", "--resume", "--download", "model-divnorm_specs-type=ours", "torchrun"):  # fmt: skip
        assert word in text, word


def test_cli_print_config_applies_flags(capsys):
    code = main(["imagenet", "alexnet", "exp1", "model-relu=false", "model-divnorm_specs-type=ours", "--epochs",
                 "3", "--loader", "dali", "--data-dir", "/data/in", "--device", "cpu", "--print-config"])  # fmt: skip
    assert code == 0
    config = json.loads(capsys.readouterr().out)
    assert config["training"]["epochs"] == 3 and config["data"]["loader"] == "dali"
    assert config["data"]["path"] == "/data/in" and config["device"] == "cpu"
    assert config["model"]["relu"] is False and config["model"]["divnorm_specs"]["type"] == "ours"


def test_cli_bad_key_is_one_line_and_exit_2(capsys):
    assert main(["cifar100", "alexnet", "x", "optimizer.lrr=0.1", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'optimizer.lrr'") and "optimizer.lr" in err
    assert "\n" not in err and "Traceback" not in err


def test_cli_unknown_dataset_and_missing_exp(capsys):
    assert main(["mnist", "alexnet", "x"]) == 2
    assert "choose one of: synthetic, cifar100, imagenet" in capsys.readouterr().err
    assert main(["cifar100", "alexnet", "optimizer.lr=0.1"]) == 2
    assert "<dataset> <model> <exp>" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_device_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    code = main(["synthetic", "alexnet", "x", "--device", "cuda", f"logging.runs_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA GPU" in err and "--device cpu" in err and "\n" not in err


def test_cli_missing_cifar_is_the_loader_message(tmp_path, capsys):
    code = main(["cifar100", "alexnet", "x", "--data-dir", str(tmp_path / "nothing"), "--loader", "gpu",
                 "--device", "cpu", f"logging.runs_dir={tmp_path / 'runs'}", "data.image_size=16"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "CIFAR-100 not found" in err and "--download" in err and "\n" not in err
    assert not (tmp_path / "runs" / "x" / "last.pt").exists()


def test_cli_missing_imagenet_names_the_layout(tmp_path, capsys):
    code = main(["imagenet", "alexnet", "x", "--data-dir", str(tmp_path), "--loader", "torch", "--device", "cpu",
                 f"logging.runs_dir={tmp_path / 'runs'}"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "ImageFolder" in err and str(tmp_path) in err and "\n" not in err


def test_loader_auto_reads_the_tuned_file_or_falls_back(tmp_path):
    from train.data import resolve_loader_name

    tuned = tmp_path / "tuned.json"
    data = {"loader": "dali", "workers": 6, "batch_size": 512, "dali_device": "cpu"}
    tuned.write_text(json.dumps({"cifar100": {"loader": "dali", "data": data, "benchmark": {"images_per_second": 1}}}))
    messages: list[str] = []
    config = load_config("cifar100", "alexnet", ["data.loader=auto", f"data.tuned_path={tuned}"])
    assert resolve_loader_name(config, "cifar100", messages.append) == "dali"
    assert config["data"]["workers"] == 6 and config["data"]["dali_device"] == "cpu"
    assert config["data"]["batch_size"] == 128, "the tuned batch size must not change the training config"
    config = load_config("imagenet", "alexnet", ["data.loader=auto", f"data.tuned_path={tmp_path / 'none.json'}"])
    assert resolve_loader_name(config, "imagenet", messages.append) == "torch"
    assert "no tuned settings" in messages[-1]
    config = load_config("synthetic", "alexnet", ["data.loader=auto", f"data.tuned_path={tuned}"])
    assert resolve_loader_name(config, "synthetic", messages.append) == "gpu"  # no synthetic entry: fallback
    config = load_config("imagenet", "alexnet", ["data.gpu=true"])
    assert resolve_loader_name(config, "imagenet", messages.append) == "dali"  # the original's GPU switch


def test_loader_auto_falls_back_when_the_tuned_loader_cannot_read_the_data(tmp_path):
    """A tuned file names the machine's fastest loader, not what the data was converted to: FFCV tuned for ImageNet
    with an ImageFolder tree as data.path falls back to torch and says why; with a .beton there it stays FFCV."""
    from train.data import resolve_loader_name

    tuned = tmp_path / "tuned.json"
    data = {"loader": "ffcv", "workers": 2, "batch_size": 64}
    tuned.write_text(json.dumps({"imagenet": {"loader": "ffcv", "data": data}}))
    tree = tmp_path / "tree"
    (tree / "train" / "n01440764").mkdir(parents=True)
    messages: list[str] = []
    overrides = ["data.loader=auto", f"data.tuned_path={tuned}", f"data.path={tree}"]
    config = load_config("imagenet", "alexnet", overrides)
    assert resolve_loader_name(config, "imagenet", messages.append) == "torch"
    assert messages[-1] == (f"loader auto: the tuned ffcv loader reads .beton files and {tree} holds none "
                            "(tools/convert.py --format ffcv); using torch instead")  # fmt: skip
    assert config["data"]["workers"] == 2  # the tuned keys stay: they are the torch loader's too
    (tree / "ffcv").mkdir()
    (tree / "ffcv" / "train.beton").write_bytes(b"")
    config = load_config("imagenet", "alexnet", overrides)
    assert resolve_loader_name(config, "imagenet", messages.append) == "ffcv"


def test_loader_auto_falls_back_to_the_format_a_folder_was_converted_to(tmp_path, monkeypatch):
    """Without a tuned file, ImageNet falls back to torch for an ImageFolder tree (or no path) and, for a
    tools/convert.py output (which torch cannot read), to the loader of the format found there: of both, DALI first
    where CUDA is, FFCV first on a CPU machine; a package missing sends it to the other."""
    from train.data import fallback_loader

    out = tmp_path / "converted"
    (out / "dali").mkdir(parents=True)
    (out / "dali" / "manifest.json").write_text(json.dumps({"format": "dali", "dataset": "imagenet"}))
    assert fallback_loader("imagenet", out) == fallback_loader("imagenet", out / "dali") == "dali"
    (out / "ffcv").mkdir()
    (out / "ffcv" / "train.beton").write_bytes(b"")
    assert fallback_loader("imagenet", out / "ffcv") == "ffcv"
    assert fallback_loader("imagenet", out / "ffcv" / "train.beton") == "ffcv"
    assert fallback_loader("imagenet", out) == ("dali" if torch.cuda.is_available() else "ffcv")
    assert fallback_loader("imagenet", None) == fallback_loader("imagenet", tmp_path / "tree") == "torch"
    assert fallback_loader("cifar100", out) == "gpu"
    monkeypatch.setitem(sys.modules, "ffcv" if not torch.cuda.is_available() else "nvidia.dali", None)  # not installed
    assert fallback_loader("imagenet", out) == ("ffcv" if torch.cuda.is_available() else "dali")


def test_every_loader_option_is_a_config_key():
    """Each ``spec.option("key")`` a loader reads must be settable: a key of configs/defaults.json's data section."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    data = json.loads((repo / "configs" / "defaults.json").read_text())["data"]
    read = {key for path in (repo / "loaders").glob("*.py") for key in re.findall(r'option\("(\w+)"', path.read_text())}
    assert read, "no loader options found: the pattern no longer matches the loaders' code"
    assert sorted(read - set(data)) == []
