"""Tests for the experiment command line (rotvq.lab.experiment)."""
from __future__ import annotations

import csv
import runpy
import sys

import pytest
import torch

from rotvq.lab.experiment import main

TINY = ["--steps", "4", "--batch-size", "16", "--hidden", "8", "--codebook-size", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_explains_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("--estimators", "--inits", "--seeds", "--mnist", "--out", "examples:",
                     "runs.csv", "rotation_tangent"):
        assert expected in text


def test_module_entry_point(monkeypatch, capsys):
    # what `python -m rotvq.lab.experiment --help` runs, without starting a new interpreter
    monkeypatch.setattr(sys, "argv", ["rotvq.lab.experiment", "--help"])
    monkeypatch.delitem(sys.modules, "rotvq.lab.experiment")  # run a fresh copy as __main__
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("rotvq.lab.experiment", run_name="__main__", alter_sys=False)
    assert exit_info.value.code == 0
    assert "usage: rotvq-experiment" in capsys.readouterr().out


def test_tiny_comparison_writes_csv_and_png(tmp_path, capsys):
    out = tmp_path / "result"
    assert main(["--estimators", "ste", "rotation", "--inits", "normal", "--seeds", "3",
                 "--out", str(out), *TINY]) == 0
    with open(out / "runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    assert [(r["estimator"], r["init"], r["seed"]) for r in runs] == [("ste", "normal", "3"),
                                                                      ("rotation", "normal", "3")]
    for row in runs:
        assert row["dataset"] == "digits" and row["steps"] == "4"
        assert float(row["test_recon_loss"]) > 0 and 1 <= float(row["test_perplexity"]) <= 8
        assert float(row["train_recon_loss"]) > 0
    with open(out / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    assert len(history) == 2 * 4 and history[-1]["step"] == "3" and history[-1]["estimator"] == "rotation"
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    stdout = capsys.readouterr().out
    assert "[2/2] rotation" in stdout and "runs.csv" in stdout


def test_conv_on_patches_without_plots(tmp_path):
    out = tmp_path / "patches"
    assert main(["--dataset", "patches", "--model", "conv", "--estimators", "householder",
                 "--inits", "uniform", "kmeans", "--no-plots", "--out", str(out), *TINY]) == 0
    with open(out / "runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    assert [r["init"] for r in runs] == ["uniform", "kmeans"] and runs[0]["model"] == "conv"
    assert not (out / "curves.png").exists()


@pytest.mark.parametrize("argv", [
    ["--estimators", "nope"],
    ["--inits", "zeros"],
    ["--steps", "0"],
    ["--seeds", "-1"],
    ["--lr", "-1"],
    ["--dataset", "patches", "--mnist", "somewhere"],
    ["--model", "transformer"],
    ["--no-such-option"],
    ["--device", "not-a-device"],
    ["--batch-size", "5000"],  # more than the 1,438 training digits
    *([["--device", "cuda"]] if not torch.cuda.is_available() else []),
])
def test_bad_arguments_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_missing_local_dataset_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--mnist", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "does not download" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the data is found


def test_missing_matplotlib_is_reported_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "o"), *TINY])
    assert exit_info.value.code == 2
    assert "--no-plots" in capsys.readouterr().err
