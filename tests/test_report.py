"""``python -m train.report``: two short synthetic runs (nonorm, ours) -> table equals summary.json, PNGs are
real images, HTML embeds them, Gini index against hand-computed values, running and foreign folders."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from train.__main__ import main as train_main
from train.report import main as report_main
from train.report_analysis import activation_sparsity, gini

TINY = [
    "data.subset=64",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "data.image_size=16",
    "training.epochs=2",
    "checkpoint.save_last=false",  # best.pt is all the report needs; saves writing ~460 MB per run
    "logging.refresh_steps=2",
]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A nonorm baseline and an ``ours`` DN AlexNet, 2 epochs on 64 synthetic 16-px images, plus their report."""
    root = tmp_path_factory.mktemp("report-runs")
    for dn in ("nonorm", "ours"):
        argv = ["synthetic", "alexnet", dn, f"model-divnorm_specs-type={dn}", *TINY, f"logging.runs_dir={root}"]
        assert train_main([*argv, "--loader", "gpu", "--device", "cpu"]) == 0
    out = root / "report"
    assert report_main([str(root / "nonorm"), str(root / "ours"), "--out", str(out), "--batch", "16"]) == 0
    yield root, out
    shutil.rmtree(root, ignore_errors=True)  # ~460 MB of checkpoints


# ---------------------------------------------------------------------------------------------- Gini index


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], 0.0),  # all equal
        ([0.0, 0.0, 0.0, 1.0], 0.75),  # (2*4-4-1)*1 / (4*1) = 3/4
        ([1.0, 2.0, 3.0, 4.0], 0.25),  # (-3*1 -1*2 +1*3 +3*4) / (4*10) = 10/40
        ([3.0, -1.0, 2.0], 2.0 / 9.0),  # |.| sorted 1,2,3: (-2*1 + 0*2 + 2*3) / (3*6) = 4/18
        ([0.0, 5.0], 0.5),  # (-1*0 + 1*5) / (2*5)
        ([0.0, 0.0], 0.0),  # no mass: defined as 0
    ],
)
def test_gini_hand_computed(values, expected):
    assert gini(torch.tensor(values)) == pytest.approx(expected, abs=1e-12)


def test_gini_shape_and_scale_invariant():
    x = torch.randn(2, 3, 4, 5)
    assert gini(x) == pytest.approx(gini(x.flatten() * 7.5), abs=1e-6)
    assert 0.0 < gini(x) < 1.0


def test_sparsity_hooks_before_after():
    """A ReLU at a position named ``dn``: before = raw input, after = rectified (half zeros)."""
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(1, 4, 1, bias=False))
    net.add_module("dn", torch.nn.ReLU())
    torch.nn.init.ones_(net.conv.weight)
    x = torch.tensor([-2.0, -1.0, 1.0, 2.0]).view(4, 1, 1, 1)
    (row,) = activation_sparsity(net, x)
    assert row.name == "dn" and row.zeros_before == 0.0 and row.zeros_after == 0.5
    # each value appears in 4 channels; the Gini index does not change under such replication
    assert row.gini_before == pytest.approx(1.0 / 6.0)  # |.| sorted 1,1,2,2: (-3 -1 +2 +6) / (4*6)
    assert row.gini_after == pytest.approx(7.0 / 12.0)  # 0,0,1,2: (1*1 + 3*2) / (4*3)


# ---------------------------------------------------------------------------------------------- full report


@pytest.mark.timeout(300)
def test_table_equals_summary(two_runs):
    root, out = two_runs
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    for row, name in zip(report["runs"], ("nonorm", "ours"), strict=True):
        summary = json.loads((root / name / "summary.json").read_text())
        assert row["run"] == name and row["dn"] == name and row["model"] == "alexnet" and row["loader"] == "gpu"
        assert row["status"] == summary["stopped"] == "completed"
        assert row["epochs"] == summary["epochs"] == 2
        assert row["val"] == summary["val"] and row["test"] == summary["test"]
        assert row["images_per_second"] == summary["images_per_second"]
        assert row["wall_seconds"] == summary["wall_seconds"]
        line = next(x for x in md.splitlines() if x.startswith(f"| {name} | alexnet"))
        for value in (summary["val"]["top1"], summary["test"]["top5"], summary["images_per_second"]):
            assert f"| {value:.2f} |" in line
    base, dn = (json.loads((root / n / "summary.json").read_text()) for n in ("nonorm", "ours"))
    delta = next(x for x in md.splitlines() if x.startswith("| ours | ") and "alexnet" not in x)
    assert f"{dn['test']['top1'] - base['test']['top1']:+.2f}" in delta


@pytest.mark.timeout(300)
def test_pngs_are_real_images(two_runs):
    _root, out = two_runs
    names = {"curves.png", "sparsity.png", "conv1_nonorm.png", "conv1_ours.png", "dn_params_ours.png"}
    assert names <= {p.name for p in out.glob("*.png")}
    assert not (out / "dn_params_nonorm.png").exists()  # nonorm has no learned DN parameters
    for name in names:
        with Image.open(out / name) as image:
            assert image.width > 200 and image.height > 150
            pixels = np.asarray(image.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, name


@pytest.mark.timeout(300)
def test_html_is_self_contained(two_runs):
    _root, out = two_runs
    page = (out / "report.html").read_text()
    assert "<table>" in page and 'src="curves.png"' not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(list(out.glob("*.png")))
    assert base64.b64decode(images[0]).startswith(b"\x89PNG")


@pytest.mark.timeout(300)
def test_sparsity_and_parameters(two_runs):
    _root, out = two_runs
    analysis = json.loads((out / "report.json").read_text())["analysis"]
    nonorm, ours = analysis["nonorm"]["layers"], analysis["ours"]["layers"]
    assert [r["name"] for r in ours] == [f"features.conv{i}.dn" for i in range(1, 6)]
    # nonorm has no DN slot: measured where DN would sit, after each unit's activation
    assert [r["name"] for r in nonorm] == [f"features.conv{i}.act" for i in range(1, 6)]
    assert {r["kind"] for r in ours} == {"DivisiveNorm2d"}
    for row in nonorm:  # no layer: nothing changes across the position
        assert row["gini_before"] == row["gini_after"] and row["zeros_before"] == row["zeros_after"]
    for row in ours:  # DN with power 2 keeps ReLU's zeros zero and re-weights the rest
        assert row["zeros_after"] >= row["zeros_before"] and row["gini_after"] != row["gini_before"]
    for row in nonorm + ours:
        assert 0.0 < row["gini_before"] < 1.0 and 0.0 <= row["zeros_after"] <= 1.0
        assert row["zeros_before"] > 0.2  # post-ReLU input
    params = analysis["ours"]["dn_parameters"]
    assert set(params["features.conv1.dn"]) == {"gamma", "sigma"} and len(params["features.conv1.dn"]["gamma"]) == 8
    assert analysis["nonorm"]["dn_parameters"] == {}


# ---------------------------------------------------------------------------------------------- running / bad input


@pytest.mark.timeout(300)
def test_running_run_uses_metrics(two_runs, tmp_path):
    root, _out = two_runs
    running = tmp_path / "running"
    running.mkdir()
    for name in ("config.json", "metrics.jsonl", "best.pt"):
        shutil.copy(root / "ours" / name, running / name)
    first = (root / "ours" / "metrics.jsonl").read_text().splitlines()[0]
    (running / "metrics.jsonl").write_text(first + "\n" + '{"epoch": 2, "tra')  # torn last line while writing
    out = tmp_path / "rep"
    assert report_main([str(running), "--out", str(out), "--batch", "4"]) == 0
    (row,) = json.loads((out / "report.json").read_text())["runs"]
    epoch = json.loads(first)
    assert row["status"] == "running" and row["epochs"] == 1 and row["test"] is None
    assert row["val"] == {k: epoch["val"][k] for k in ("top1", "top5", "loss")}
    assert math.isclose(row["images_per_second"], epoch["train"]["samples"] / epoch["train"]["seconds"])
    md = (out / "report.md").read_text()
    assert "| running |" in md and "no conv1.pt" in md


@pytest.mark.parametrize("kind", ["missing", "foreign", "bad-json"])
def test_bad_folder_is_clear_error(tmp_path, capsys, kind):
    folder = tmp_path / "somewhere"
    if kind != "missing":
        folder.mkdir()
        (folder / "notes.txt").write_text("x")
    if kind == "bad-json":
        (folder / "config.json").write_text("{not json")
        (folder / "metrics.jsonl").write_text("")
    assert report_main([str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- seed groups


def _config(dn: str = "ours", seed: int = 42, exp: str = "a", runs_dir: str = "runs") -> dict:
    return {
        "seed": seed,
        "model": {"batchnorm": True, "divnorm_specs": {"type": dn, "p": 0.5}},
        "data": {"loader": "gpu"},
        "logging": {"runs_dir": runs_dir},
        "run": {"exp": exp, "dataset": "synthetic", "model": "alexnet"},
    }


def test_groups_differ_only_in_seed():
    from train.report_groups import group_indices

    configs = [
        _config("nonorm", 42, "s/nonorm/seed42"),
        _config("ours", 42, "s/ours/seed42"),
        _config("nonorm", 43, "s/nonorm/seed43", runs_dir="elsewhere"),  # where the files go changes no number
        _config("ours", 43, "s/ours/seed43"),
        _config("ken", 42, "s/ken/seed42"),
    ]
    assert group_indices(configs) == [[0, 2], [1, 3], [4]]
    lr = _config("ours", 44, "s/ours/seed44")
    lr["model"]["divnorm_specs"]["p"] = 1.0  # any other key: another group
    assert group_indices([configs[1], lr]) == [[0], [1]]


def test_group_name_and_stats():
    from train.report_groups import format_stat, group_name, mean_std

    assert group_name(["s/ours-bn/seed42", "s/ours-bn/seed43"]) == "s/ours-bn"
    assert group_name(["ours/run0", "ours/run1"]) == "ours"
    assert group_name(["a", "b", "c"]) == "a (+2)"
    stat = mean_std([10.0, 12.0, 17.0, None, float("nan")])  # missing values are left out of n
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(13.0)
    assert stat["std"] == pytest.approx(math.sqrt(((10 - 13) ** 2 + (12 - 13) ** 2 + (17 - 13) ** 2) / 2))
    assert mean_std([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert format_stat(stat) == "13.00 ± 3.61 (3)" and format_stat(mean_std([5.0])) == "5.00 (1)"
    assert format_stat(mean_std([])) == "-"


@pytest.mark.timeout(300)
def test_no_groups_when_no_seed_repeats(two_runs):
    _root, out = two_runs
    assert "groups" not in json.loads((out / "report.json").read_text())
    assert "Results by group" not in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------- what is compared


def _copy_run(source, folder, files=("config.json", "metrics.jsonl")):
    folder.mkdir()
    for name in files:
        shutil.copy(source / name, folder / name)
    return folder


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("content", "why"), [("[]", "a JSON list, not an object"), ('{"stopped": "compl', "not valid JSON")]
)
def test_damaged_summary_is_a_note(two_runs, tmp_path, content, why):
    """A finished run whose summary.json is there but unreadable: a note naming the file, not a crash (``[]`` was an
    AttributeError) and not "running" (a truncated file read as no file)."""
    root, _out = two_runs
    run = _copy_run(root / "ours", tmp_path / "damaged")
    (run / "summary.json").write_text(content)
    out = tmp_path / "rep"
    assert report_main([str(run), "--out", str(out), "--batch", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    (row,) = report["runs"]
    assert row["status"] == "summary damaged" and row["val"] is not None  # the best epoch of metrics.jsonl
    (note,) = [n for n in report["notes"]["ours"] if "damaged" in n]
    assert str(run / "summary.json") in note and why in note
    md = (out / "report.md").read_text()
    assert "| summary damaged |" in md and "| running |" not in md and "no summary.json yet" not in md


@pytest.mark.timeout(300)
def test_same_folder_twice_is_one_run(two_runs, tmp_path, capsys):
    root, _out = two_runs
    out = tmp_path / "rep"
    again = str(root / "ours") + "/"  # the same folder spelled another way
    assert report_main([str(root / "ours"), again, "--out", str(out), "--batch", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in report["runs"]] == ["ours"] and "groups" not in report  # not a 2-seed group
    assert any("given 2 times" in n and "counted once" in n for n in report["notes"]["ours"])
    assert "given 2 times" in capsys.readouterr().out
    assert "Difference from the baseline" not in (out / "report.md").read_text()


@pytest.mark.timeout(300)
def test_runs_of_two_data_sets_get_a_table_each(two_runs, tmp_path):
    """No difference across data sets: each data set's runs have their own table and baseline (its first run)."""
    root, _out = two_runs
    other = _copy_run(root / "ours", tmp_path / "cifar", ("config.json", "metrics.jsonl", "summary.json"))
    config = json.loads((other / "config.json").read_text())
    config["run"].update(dataset="cifar100", exp="cifar")
    config["data"]["path"] = str(tmp_path / "no-cifar")  # its analysis fails (a note); the table does not need it
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "rep"
    argv = [str(other), str(root / "nonorm"), str(root / "ours"), "--out", str(out), "--batch", "4"]
    assert report_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["baselines"] == {"cifar100": "cifar", "synthetic": "nonorm"}
    md = (out / "report.md").read_text()
    assert "on 2 data sets (cifar100, synthetic)" in md
    assert "Baselines: **cifar** (cifar100), **nonorm** (synthetic) (the first run of each data set)." in md
    cifar_part, synthetic_part = md.split("### Data set: cifar100")[1].split("### Data set: synthetic")
    assert "| cifar | alexnet" in cifar_part and "Difference from the baseline" not in cifar_part  # alone: no Δ
    assert "Difference from the baseline (nonorm):" in synthetic_part
    delta = synthetic_part.split("Difference from the baseline (nonorm):")[1].strip().split("\n\n")[0].splitlines()
    assert [x.split(" | ")[0] for x in delta[2:]] == ["| ours"]  # Δ of ours against nonorm only, not of cifar
