"""Tests for the experiment command line (rotvq.lab.experiment)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import runpy
import socket
import subprocess
import sys

import pytest
import torch

from rotvq.lab.experiment import PRESETS, build_parser, expand_grid, main, smooth
from rotvq.lab.training import METRICS, TrainConfig

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
    assert "[2/2] estimator=rotation, init=normal, seed=3" in stdout and "runs.csv" in stdout


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
    ["--model", "mlp", "conv"],  # one input layout per command
    ["--hidden", "2.5"],
    ["--ema", "maybe"],
    ["--decay", "1"],
    ["--preset", "nope"],
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


def test_every_config_field_is_a_typed_flag():
    actions = {a.dest: a for a in build_parser()._actions}
    for field in dataclasses.fields(TrainConfig):
        action = actions[field.name]
        assert "--" + field.name.replace("_", "-") in action.option_strings
        assert field.metadata["help"] in action.help
        assert action.default is None  # unset flags leave TrainConfig's default in place
    args = build_parser().parse_args(["--hidden", "16", "--lr", "0.01", "--grad-clip", "none",
                                      "--estimator", "ste", "householder"])
    assert args.hidden == [16] and args.lr == [0.01] and args.grad_clip == [None]
    assert args.estimator == ["ste", "householder"]


def test_grid_expands_in_field_order_with_the_seed_innermost():
    configs = expand_grid({"seed": [0, 1], "gamma": [0.25, 1], "estimator": ["ste", "rotation"]},
                          base=TrainConfig(steps=7))
    assert [(c.estimator, c.gamma, c.seed) for c in configs] == [
        (e, g, s) for e in ("ste", "rotation") for g in (0.25, 1.0) for s in (0, 1)]
    assert all(c.steps == 7 for c in configs)
    assert expand_grid({}) == [TrainConfig()]
    with pytest.raises(ValueError, match="colour"):
        expand_grid({"colour": ["red"]})
    with pytest.raises(ValueError, match="non-empty"):
        expand_grid({"seed": []})
    with pytest.raises(ValueError, match="TrainConfig.gamma"):
        expand_grid({"gamma": [-1.0]})


def test_grid_runs_and_configuration_written_next_to_results(tmp_path):
    out = tmp_path / "grid"
    assert main(["--estimator", "ste", "--gamma", "0.25", "1", "--ema", "--grad-clip", "none", "5",
                 "--seed", "0", "--no-plots", "--out", str(out), *TINY]) == 0
    record = json.loads((out / "config.json").read_text())
    configs = [TrainConfig.from_dict(r["config"]) for r in record["runs"]]
    # nested loops in TrainConfig's field order: grad_clip (training) before gamma (quantizer)
    assert [(c.grad_clip, c.gamma) for c in configs] == [(None, 0.25), (None, 1.0), (5.0, 0.25), (5.0, 1.0)]
    assert all(c.ema and c.steps == 4 and c.estimator == "ste" for c in configs)
    assert record["world_size"] == 1 and record["dataset"] == "digits" and record["preset"] is None
    with open(out / "runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    for row, config in zip(runs, configs):  # every field is a column, with the run's value
        for key, value in config.to_dict().items():
            assert row[key] == ("" if value is None else str(value)), key
        assert row["world_size"] == "1"
        assert all(f"train_{m}" in row and f"test_{m}" in row for m in METRICS)
    with open(out / "history.csv") as handle:
        header = next(csv.reader(handle))
    assert header == ["run", "grad_clip", "gamma", "seed", "step", *METRICS]


def test_paper_preset_sets_the_protocol_and_flags_override_it(tmp_path):
    defaults = build_parser("paper").parse_args([])
    assert defaults.ema == [True] and defaults.decay == [0.8] and defaults.gamma == [1.0]
    assert defaults.optimizer == ["adamw"] and defaults.lr == [1e-4] and defaults.init == ["uniform"]
    assert defaults.distance == ["euclidean", "cosine"] and defaults.estimator == ["ste", "rotation"]
    out = tmp_path / "paper"
    assert main(["--preset", "paper", "--steps", "2", "--batch-size", "16", "--hidden", "8",
                 "--codebook-size", "16", "--latent-dim", "4", "--downsamples", "1", "--no-plots",
                 "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["preset"] == "paper"
    configs = [TrainConfig.from_dict(r["config"]) for r in record["runs"]]
    assert [(c.estimator, c.distance) for c in configs] == [
        ("ste", "euclidean"), ("ste", "cosine"), ("rotation", "euclidean"), ("rotation", "cosine")]
    for c in configs:
        assert (c.ema, c.decay, c.gamma, c.optimizer, c.lr, c.init, c.model) == (
            True, 0.8, 1.0, "adamw", 1e-4, "uniform", "conv")
        assert (c.steps, c.hidden, c.codebook_size) == (2, 8, 16)  # explicit flags win
    assert set(PRESETS["paper"]) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    """torchrun with 2 CPU ranks (gloo): outputs written once, world size recorded, and the
    histories equal a one-process run with the same global batch up to rounding, k-means
    initialisation and EMA codebook included (the layer synchronises them)."""
    args = ["--estimator", "rotation", "--init", "kmeans", "--ema", "--steps", "6",
            "--batch-size", "32", "--hidden", "16", "--codebook-size", "8", "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "rotvq.lab.experiment", *args, "--out", str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("[1/1]") == 1 and result.stdout.count("wrote ") == 1  # rank 0 only
    assert main([*args, "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    record = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert record["world_size"] == 2

    def read(name):
        with open(tmp_path / name / "history.csv") as handle:
            return list(csv.DictReader(handle))

    ddp, one = read("ddp"), read("one")
    assert len(ddp) == len(one) == 6
    for a, b in zip(ddp, one):
        for metric in METRICS:
            assert float(a[metric]) == pytest.approx(float(b[metric]), rel=1e-4, abs=1e-6), metric
    with open(tmp_path / "ddp" / "runs.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["world_size"] == "2"
