"""The researcher's tools around a finished run: TensorBoard events, train.evaluate, train.export,
models.load_pretrained and the torch.hub entries.

One short real run (DN ResNet-18 at 16 px, 64 synthetic samples, 2 epochs on the tensor-resident loader; ~45 MB
of checkpoints, a sixth of AlexNet's) is shared by the tests of this module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from divnorm.common import divnorm_layers
from train.__main__ import main as train_main
from train.checkpoint import load
from train.evaluate import main as evaluate_main
from train.export import main as export_main
from train.tensorboard import EVENT_FILE_GLOB, TensorBoardLog

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "data.subset=64",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "data.image_size=16",
    "model.divnorm_specs.type=ours",
    "lr_scheduler.name=none",
    "optimizer.lr=0.02",
    "checkpoint.save_last=false",  # ~90 MB we do not read
]

pytestmark = pytest.mark.slow


def train(root: Path, exp: str, *extra: str, epochs: int = 2) -> int:
    argv = ["synthetic", "resnet18", exp, *SMALL, f"logging.runs_dir={root}", "--epochs", str(epochs)]
    return train_main([*argv, "--loader", "gpu", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert train(root, "r18") == 0
    yield root / "r18"
    shutil.rmtree(root, ignore_errors=True)


def _flat(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        elif key != "epoch":
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------------------------------ TensorBoard


def test_tensorboard_events_match_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    assert len(list(run.glob(EVENT_FILE_GLOB))) == 1  # in the run folder itself: one run per folder in TensorBoard
    board = EventAccumulator(str(run), size_guidance={"tensors": 0, "histograms": 0, "images": 0})
    board.Reload()
    tags = board.Tags()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())

    def values(tag: str) -> dict[int, float]:
        assert board.SummaryMetadata(tag).plugin_data.plugin_name == "scalars", tag
        return {e.step: tensor_util.make_ndarray(e.tensor_proto).item() for e in board.Tensors(tag)}

    expected: dict[str, dict[int, float]] = {}
    for line in lines:
        for tag, value in _flat(line).items():
            expected.setdefault(tag, {})[line["epoch"]] = value
        train_part = line["train"]
        expected.setdefault("train/data_wait_fraction", {})[line["epoch"]] = (
            train_part["data_seconds"] / train_part["seconds"]
        )
    for key in ("loss", "top1", "top5"):
        expected[f"test/{key}"] = {2: summary["test"][key]}
    assert {"train/loss", "train/top1", "train/top5", "val/loss", "val/top1", "val/top5", "lr"} <= set(expected)
    assert {"train/images_per_second", "test/top1"} <= set(expected)
    scalar_tags = {tag for tag in tags["tensors"] if tag != "config/text_summary"}
    assert scalar_tags == set(expected)
    for tag, by_epoch in expected.items():
        assert values(tag) == by_epoch, tag  # exactly: float64 in the event file

    net = models.create_model("resnet18", num_classes=100, model_config={"divnorm_specs": {"type": "ours"}},
                              image_size=32)  # fmt: skip
    dn_tags = {f"divnorm/{name}/{p}" for name, layer in divnorm_layers(net) for p, _ in layer.named_parameters()}
    assert dn_tags and set(tags["histograms"]) == dn_tags
    gammas = board.Histograms("divnorm/stem.conv1.dn/gamma")
    size = dict(net.named_parameters())["stem.conv1.dn.gamma"].numel()
    assert [h.step for h in gammas] == [1, 2] and gammas[0].histogram_value.num == size
    assert tags["images"] == ["conv1/filters"]
    image = board.Images("conv1/filters")
    assert [i.step for i in image] == [1, 2] and image[0].width > 8 * 3 * 8  # 8 upscaled 3x3 filters a row
    text = board.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"runs_dir"' in text and '"tensorboard": true' in text


def test_overwrite_removes_old_events_and_switch_off(tmp_path):
    folder = tmp_path / "again"
    folder.mkdir()
    stale = [folder / "events.out.tfevents.1.old.0", folder / "eval-test.json"]
    for path in stale:
        path.write_text("old")
    assert train(tmp_path, "again", "logging.tensorboard=false", "--overwrite", epochs=1) == 0
    assert not any(path.exists() for path in stale)
    assert not list(folder.glob(EVENT_FILE_GLOB))  # switched off: no new event file either
    assert (folder / "summary.json").is_file()


def test_tensorboard_resume_hides_events_past_the_checkpoint(tmp_path):
    """An interrupted run logged epochs 1-2 but checkpointed after 1: the resumed writer's epoch 2 replaces the old
    one in what TensorBoard shows (its own reader, the one the server uses)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    config = {"logging": {"tensorboard": True}}
    first = TensorBoardLog(tmp_path, config)
    first.log_epoch({"epoch": 1, "train": {"loss": 3.0}})
    first.log_epoch({"epoch": 2, "train": {"loss": 2.0}})
    first.close()
    resumed = TensorBoardLog(tmp_path, config, start_epoch=1)
    resumed.log_epoch({"epoch": 2, "train": {"loss": 1.5}})
    resumed.close()
    board = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    board.Reload()
    loss = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in board.Tensors("train/loss")]
    assert loss == [(1, 3.0), (2, 1.5)]


def test_tensorboard_missing_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    said = []
    board = TensorBoardLog(tmp_path, {"logging": {"tensorboard": True}}, log=said.append)
    board.log_config({"a": 1})
    board.log_epoch({"epoch": 1, "train": {"loss": 1.0}})
    board.close()
    assert len(said) == 1 and "pip install tensorboard" in said[0]
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_reproduces_summary(run, capsys):
    summary = json.loads((run / "summary.json").read_text())
    assert evaluate_main([str(run), "--device", "cpu"]) == 0
    result = json.loads((run / "eval-test.json").read_text())
    for key in ("loss", "top1", "top5"):
        assert result[key] == summary["test"][key], key
    assert result["checkpoint"] == "best.pt" and result["epoch"] == summary["best_epoch"]
    assert result["samples"] == 64 and result["split"] == "test"
    out = capsys.readouterr().out
    assert "top-1" in out and "eval-test.json" in out
    # the best epoch's validation numbers come back too (same weights, same batches)
    assert evaluate_main([str(run), "--split", "val", "--device", "cpu"]) == 0
    val = json.loads((run / "eval-val.json").read_text())
    assert {key: val[key] for key in ("top1", "top5", "loss")} == summary["val"]
    # another backend reads the same images (its own decode and normalization: equal up to rounding)
    assert evaluate_main([str(run), "--split", "val", "--device", "cpu", "--loader", "torch"]) == 0
    other = json.loads((run / "eval-val.json").read_text())
    assert other["loader"] == "torch" and other["samples"] == 64
    assert other["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-3)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_evaluate_missing_run_or_checkpoint_is_one_line(run, tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no run folder") and "\n" not in err
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run / "config.json", partial / "config.json")
    assert evaluate_main([str(partial), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no checkpoint at" in err and "best.pt" in err and "\n" not in err
    assert evaluate_main([str(partial), "--checkpoint", "last", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "last.pt" in err and "\n" not in err


def test_last_checkpoint_with_numpy_state_is_one_line(run, tmp_path, capsys):
    import numpy as np

    folder = tmp_path / "withlast"
    folder.mkdir()
    shutil.copy(run / "config.json", folder / "config.json")
    torch.save({"model": {"w": torch.zeros(1)}, "rng": np.random.get_state()}, folder / "last.pt")
    assert evaluate_main([str(folder), "--checkpoint", "last", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights_only=True" in err and "numpy" in err and "\n" not in err
    (folder / "last.pt").write_bytes((run / "best.pt").read_bytes()[:4096])  # truncated: damaged, not refused
    assert evaluate_main([str(folder), "--checkpoint", "last", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a readable checkpoint" in err and "truncated" in err and "\n" not in err


# ------------------------------------------------------------------------------------------- export and hub


def _best_net(run: Path) -> torch.nn.Module:
    """The run's best model the trainer's way: its config, its checkpoint reader."""
    net = models.create_model("resnet18", num_classes=100, model_config=json.loads((run / "config.json").read_text())
                              ["model"], image_size=32)  # fmt: skip
    net.load_state_dict(load(run / "best.pt")["model"])
    return net.eval()


def test_export_then_load_pretrained_gives_identical_logits(run, tmp_path):
    out = tmp_path / "export"
    assert export_main([str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    card = json.loads((out / "config.json").read_text())
    assert (card["model"], card["num_classes"], card["layout"], card["input_size"]) == ("resnet18", 100, 32, 16)
    assert card["model_config"]["divnorm_specs"]["type"] == "ours" and len(card["mean"]) == 3
    batch = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 16, 16, generator=batch)
    with torch.no_grad():
        reference = _best_net(run)(images)
        exported = models.load_pretrained(out)
        from_run = models.load_pretrained(run)
        assert not exported.training and not from_run.training
        assert torch.equal(exported(images), reference)
        assert torch.equal(from_run(images), reference)
        hub = torch.hub.load(str(REPO), "resnet18", weights=str(out), source="local", trust_repo=True)
        assert torch.equal(hub(images), reference)
    with pytest.raises(ValueError, match="holds a resnet18, not a alexnet"):
        torch.hub.load(str(REPO), "alexnet", weights=str(out), source="local", trust_repo=True)
    with pytest.raises(ValueError, match="fixes the architecture"):
        torch.hub.load(str(REPO), "resnet18", weights=str(out), num_classes=10, source="local", trust_repo=True)
    with pytest.raises(FileNotFoundError, match="neither an exported model"):
        models.load_pretrained(tmp_path)


def test_load_pretrained_reads_no_pickle_and_no_trainer(run, tmp_path):
    """models stays below train: loading an exported folder or a run folder imports no train module, and the
    run folder's best.pt is read with weights_only=True (a pickled object in it is refused)."""
    code = (
        "import sys, models\n"
        f"models.load_pretrained({str(run)!r})\n"
        "bad = sorted(m for m in sys.modules if m == 'train' or m.startswith(('train.', 'loaders')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    shutil.copy(run / "config.json", hostile / "config.json")
    torch.save({"model": {}, "payload": Path("x")}, hostile / "best.pt")  # a pickled class, not a tensor
    with pytest.raises(ValueError, match="weights_only=True"):
        models.load_pretrained(hostile)


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet18", "resnet50"])
def test_hub_builds_every_registry_model(name):
    net = torch.hub.load(str(REPO), name, num_classes=10, image_size=32, divnorm="ours", source="local",
                         trust_repo=True)  # fmt: skip
    assert [type(layer).__name__ for _, layer in divnorm_layers(net)]  # DN layers inside
    with torch.no_grad():
        logits = net.eval()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    plain = torch.hub.load(str(REPO), name, num_classes=10, layout=32, batchnorm=False, source="local",
                           trust_repo=True)  # fmt: skip
    assert not list(divnorm_layers(plain))  # default: the registry's nonorm
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())


# ------------------------------------------------------------------------------------------------ bad input


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".lock"}


def test_bad_input_is_one_line_and_leaves_the_run_whole(tmp_path, capsys):
    """Found by a bad-input audit: each of these used to delete, overwrite or crash. Now each is one line, exit 2,
    before anything is written: --overwrite with a mistake (data set too small for a batch, a CPU run asking for
    the Triton kernel), an image size a model cannot take, --resume with other model options or a damaged
    config.json, an export into the run folder."""
    root = tmp_path / "runs"
    assert train(root, "r", "checkpoint.save_last=true", epochs=1) == 0
    folder = root / "r"
    before = _files(folder)
    capsys.readouterr()
    cases = [
        (("data.subset=16", "--overwrite"), "no training step"),
        (("model.divnorm_specs.kernel=triton", "--overwrite"), "kernel=triton needs a CUDA device"),
        (("model.batchnorm=false", "--resume", "--epochs", "2"), "do not fit this ResNet"),
    ]
    for extra, words in cases:
        assert train(root, "r", "checkpoint.save_last=true", *extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
        assert _files(folder) == before, extra
    argv = ["synthetic", "alexnet", "tiny", "data.image_size=7", f"logging.runs_dir={root}", "--device", "cpu"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "data.image_size=7 is too small for alexnet" in err and "\n" not in err
    assert not (root / "tiny").exists()
    assert export_main([str(folder), "--out", str(folder)]) == 2
    assert "holds a training run" in capsys.readouterr().err and _files(folder) == before
    damaged = root / "damaged"
    shutil.copytree(folder, damaged)
    for text in ("", "[1, 2]"):
        (damaged / "config.json").write_text(text)
        assert train(root, "damaged", "--resume") == 2
        err = capsys.readouterr().err.strip()
        assert "--resume" in err and "config.json" in err and "\n" not in err


def test_resume_inside_an_epoch_refuses_another_batch_layout(tmp_path):
    """A position inside an epoch is a batch index into that epoch: resuming it with another batch size or subset
    would skip or repeat samples, so it is refused; the same values resume."""
    from train.config import ConfigError, load_config
    from train.run_checkpoint import RunCheckpoints

    saved = load_config("synthetic", "resnet18", ["data.batch_size=32", "data.subset=1024"])
    position = {"epoch": 0, "batch": 15, "ranks": []}
    for overrides, refused in ((["data.batch_size=64"], "data.batch_size=32 -> 64"), (["data.subset=128"], "subset")):
        run = RunCheckpoints.__new__(RunCheckpoints)
        run.config, run.folder = load_config("synthetic", "resnet18", ["data.subset=1024", *overrides]), tmp_path
        if "data.batch_size" not in overrides[0]:
            run.config["data"]["batch_size"] = 32
        with pytest.raises(ConfigError, match=refused):
            run._check_epoch_layout({"config": saved}, position)
    run.config = saved
    run._check_epoch_layout({"config": saved}, position)
