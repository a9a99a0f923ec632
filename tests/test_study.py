"""``python -m train.study``: the grid's commands, a reduced study end to end (run folders, grouped report equal to
the summaries' mean / sample std by hand, a rerun that skips finished runs and resumes a stopped one), and the
``data.synthetic_size`` key the recipe check sizes the synthetic set with."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from loaders.arrays import load_split_arrays
from loaders.base import LoaderError, LoaderSpec
from tests.test_train_run import SMALL
from train.config import ConfigError, load_config
from train.study import main as study_main

# the training runs' shared settings without the DN type (the study sets it per variant)
TINY = [item for item in SMALL if not item.startswith("model.divnorm_specs.type")]


# ---------------------------------------------------------------------------------------------- plan / dry run


def test_dry_run_lists_the_grid(tmp_path, capsys):
    assert (
        study_main(["synthetic", "--dry-run", "--epochs", "2", f"logging.runs_dir={tmp_path}", "optimizer.lr=0.01"])
        == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if " -m train " in line]
    assert len(lines) == 18  # 3 DN types x BN on/off x 3 seeds
    exps = [line.split(" -m train ")[1].split()[2] for line in lines]
    expected = {f"dn-synthetic/{dn}-{bn}/seed{s}" for dn in ("nonorm", "ours", "ken") for bn in ("bn", "nobn")
                for s in (42, 43, 44)}  # fmt: skip
    assert set(exps) == expected
    first = lines[0]
    for item in ("model.divnorm_specs.type=nonorm", "model.batchnorm=true", "seed=42", "data.loader=gpu",
                 "training.epochs=2", "optimizer.lr=0.01", "runs=1"):  # fmt: skip
        assert item in first.split()
    assert "--resume" not in first and not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["seed=3"], "--first-seed"),
        (["model-batchnorm=false"], "--batchnorm"),
        (["model.divnorm_specs.type=ours"], "--dn"),
        (["--dn", "ours,lrn"], "choose from nonorm, ours, ken"),
        (["optimizer.lrr=0.1"], "unknown config key"),
        (["--seeds", "0"], ">= 1"),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path, capsys):
    assert study_main(["synthetic", *argv, f"logging.runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- synthetic_size


def test_synthetic_size_sets_the_splits():
    sizes = {
        split: len(load_split_arrays(LoaderSpec("synthetic", split, 32, False, options={"synthetic_size": 400}))[1])
        for split in ("train", "val", "test")
    }
    assert sizes == {"train": 400, "val": 100, "test": 100}  # CIFAR-100's 4:1:1
    default = load_split_arrays(LoaderSpec("synthetic", "val", 32, False, options={"synthetic_size": None}))
    assert len(default[1]) == 2000
    with pytest.raises(LoaderError, match="data.synthetic_size must be a positive integer"):
        load_split_arrays(LoaderSpec("synthetic", "val", 32, False, options={"synthetic_size": 0}))
    assert load_config("synthetic", "alexnet", ["data.synthetic_size=40000"])["data"]["synthetic_size"] == 40000
    with pytest.raises(ConfigError, match="data.synthetic_size"):
        load_config("synthetic", "alexnet", ["data.synthetic_size=many"])


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """nonorm and ours with BatchNorm x 2 seeds, one 2-step epoch each, two processes at a time (``--parallel 2``:
    one thread each, and the parallel path's logs and results are what the tests below read). ResNet-18, not the
    grid's AlexNet: the mechanics are the model's business only through --model, and AlexNet's 57 M parameters
    make each run write ~690 MB of checkpoints (14 s of a run on this VM against 6 s for ResNet-18)."""
    root = tmp_path_factory.mktemp("study")
    argv = ["synthetic", "--model", "resnet18", "--device", "cpu", "--epochs", "1", "--dn", "nonorm,ours",
            "--batchnorm", "on", "--seeds", "2", "--name", "s", "--report-batch", "8", "--keep-last",
            "--parallel", "2", *TINY,
            f"logging.runs_dir={root}", "checkpoint.save_conv1=false"]  # fmt: skip
    assert study_main(argv) == 0
    yield root / "s", argv
    shutil.rmtree(root, ignore_errors=True)  # checkpoints: ~135 MB per run


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_study_folders_and_grouped_report(small_study):
    study, _argv = small_study
    variants = ("nonorm-bn", "ours-bn")
    for variant in variants:
        for seed in (42, 43):
            folder = study / variant / f"seed{seed}"
            assert {"config.json", "metrics.jsonl", "summary.json", "best.pt", "last.pt"} <= {
                p.name for p in folder.iterdir()
            }
            config = json.loads((folder / "config.json").read_text())
            assert config["seed"] == seed and config["model"]["batchnorm"] is True
            assert config["model"]["divnorm_specs"]["type"] == variant.split("-")[0]
            assert config["run"]["exp"] == f"s/{variant}/seed{seed}"
            assert (study / "logs" / f"{variant}-seed{seed}.log").read_text().count("done: s/") == 1
    report = json.loads((study / "report" / "report.json").read_text())
    groups = report["groups"]
    assert [g["group"] for g in groups] == ["s/nonorm-bn", "s/ours-bn"]  # only the DN type differs: two groups
    md = (study / "report" / "report.md").read_text()
    for group, variant in zip(groups, variants, strict=True):
        assert group["members"] == [f"s/{variant}/seed42", f"s/{variant}/seed43"]  # only the seed differs: one group
        summaries = [json.loads((study / variant / f"seed{s}" / "summary.json").read_text()) for s in (42, 43)]
        for split in ("val", "test"):
            for metric in ("top1", "top5", "loss"):
                values = [s[split][metric] for s in summaries]
                stat = group[split][metric]
                assert stat["n"] == 2
                assert stat["mean"] == pytest.approx((values[0] + values[1]) / 2, abs=1e-9)
                # sample std of two values: |a - b| / sqrt(2)
                assert stat["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5, abs=1e-9)
        ginis = [
            statistics.fmean(layer["gini_after"] for layer in report["analysis"][name]["layers"])
            for name in group["members"]
        ]
        assert group["gini"]["mean"] == pytest.approx(sum(ginis) / 2) and 0 < group["gini"]["mean"] < 1
        line = next(x for x in md.splitlines() if x.startswith(f"| s/{variant} | resnet18"))
        top1 = group["test"]["top1"]
        assert f"| {top1['mean']:.2f} ± {top1['std']:.2f} (2) |" in line
    record = json.loads((study / "study.json").read_text())
    assert [r["result"] for r in record["runs"]] == ["finished"] * 4 and record["wall_seconds"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rerun_skips_finished_and_resumes(small_study):
    study, argv = small_study
    stopped = study / "ours-bn" / "seed43"
    (stopped / "summary.json").unlink()  # as if stopped after its last checkpoint, before the end
    kept = {p: p.stat().st_mtime_ns for p in study.glob("*/seed*/summary.json")}
    assert len(kept) == 3
    assert study_main(argv) == 0
    record = {r["exp"]: r for r in json.loads((study / "study.json").read_text())["runs"]}
    assert record["s/ours-bn/seed43"]["state"] == "resume" and record["s/ours-bn/seed43"]["result"] == "finished"
    assert record["s/ours-bn/seed43"]["command"].endswith("--resume")
    assert sorted(r["result"] for r in record.values()) == ["finished", "skipped", "skipped", "skipped"]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished runs were not touched
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["test"] is not None
    assert "resumed" in (study / "logs" / "ours-bn-seed43.log").read_text()


# ---------------------------------------------------------------------------------------------- a kept run's config


def test_config_differences_of_a_kept_run(tmp_path):
    """What makes a finished run not the one this command would train: keys that change results, with the run's value
    and the new one; where files go, progress output, checkpoint saving and the epochs do not count."""
    from train.study import config_differences

    config = load_config("synthetic", "alexnet", ["runs=1", "seed=42"])
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "run": {"exp": "s/ours-bn/seed42"}}))
    assert config_differences(folder, config) == []
    now = load_config("synthetic", "alexnet", ["runs=1", "seed=42", "logging.runs_dir=/elsewhere",
                                               "logging.progress_bar=off", "checkpoint.save_last=false",
                                               "training.epochs=7"])  # fmt: skip
    assert config_differences(folder, now) == []
    now = load_config("synthetic", "alexnet", ["runs=1", "seed=43", "optimizer.lr=0.001"])
    assert config_differences(folder, now) == [("seed", 42, 43), ("optimizer.lr", config["optimizer"]["lr"], 0.001)]
    older = json.loads((folder / "config.json").read_text())
    del older["data"]["synthetic_size"]  # a key added after the run: its default, as --resume reads it
    (folder / "config.json").write_text(json.dumps(older))
    assert config_differences(folder, config) == []
    assert config_differences(folder, load_config("synthetic", "alexnet", ["runs=1", "seed=42",
                                                                           "data.synthetic_size=512"])) == [
        ("data.synthetic_size", None, 512)
    ]  # fmt: skip
    (folder / "config.json").write_text('{"seed": 4')  # damaged: cannot tell
    assert config_differences(folder, config) is None


def test_a_kept_run_of_loader_auto_compares_with_the_resolved_loader(tmp_path):
    """--loader auto: the run's config.json records the loader (and its tuned settings) the trainer resolved, so the
    study compares with the same resolution, not with "auto" (a rerun of an unchanged study was refused)."""
    from train.data import resolve_loader_name
    from train.study import _resolved_loader, config_differences

    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"synthetic": {"loader": "torch", "data": {"loader": "torch", "workers": 1}}}))
    config = load_config("synthetic", "alexnet", ["runs=1", "data.loader=auto", f"data.tuned_path={tuned}"])
    recorded = json.loads(json.dumps(config))
    resolve_loader_name(recorded, "synthetic", lambda _message: None)  # what the trainer writes into config.json
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    assert recorded["data"]["loader"] == "torch" and config["data"]["loader"] == "auto"
    assert config_differences(tmp_path, config) != []  # the comparison the study made before
    assert config_differences(tmp_path, _resolved_loader("synthetic", config)) == []
    assert config["data"]["loader"] == "auto"  # the study's own config is left as given


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rerun_with_another_config_is_refused(small_study, capsys):
    """The same study with optimizer.lr changed: the finished runs were trained with another lr, so keeping them would
    report the old numbers under the new command. One line naming the run, the key and the way out; nothing written."""
    study, argv = small_study
    before = {p: p.stat().st_mtime_ns for p in [study / "study.json", *study.glob("logs/*.log")]}
    capsys.readouterr()
    assert study_main([*argv, "optimizer.lr=0.001"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: finished run s/nonorm-bn/seed42: config differs") and err.count("\n") == 1, err
    assert "optimizer.lr" in err and "-> 0.001" in err and "--name" in err
    assert f"delete {study / 'nonorm-bn' / 'seed42'} to train that run again" in err
    assert "more run(s) alike" in err
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # keys that change no result: the finished runs are still this study's (a dry run shows the plan)
    neutral = ["logging.progress_bar=off", "logging.refresh_steps=7", "checkpoint.save_conv1=true", "--epochs", "2"]
    assert study_main([*argv, *neutral, "--dry-run"]) == 0
    assert capsys.readouterr().out.count("# finished: skipped") >= 3
