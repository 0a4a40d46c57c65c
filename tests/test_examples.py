"""examples/train_ddp.py, the README's multi-process example, run as the README says: torchrun, 2 gloo ranks.

The ranks must hold identical model, quantizer and optimizer tensors at the end; a run resumed from a
checkpoint loaded on every rank must end where an uninterrupted run ends (bitwise); a checkpoint loaded on
rank 0 alone, after wrapping in DDP, must be caught by the script's --check.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

TIMEOUT_S = 240


def _torchrun(repo_root, *args, expect_ok=True):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(repo_root / "examples" / "train_ddp.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU
    done = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if expect_ok:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def runs(repo_root, tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    tmp = tmp_path_factory.mktemp("ddp")
    out = {"whole": _torchrun(repo_root, "--steps", "6", "--save", str(tmp / "whole.pt"), "--check"),
           "first": _torchrun(repo_root, "--steps", "3", "--save", str(tmp / "first.pt"), "--check")}
    out["resumed"] = _torchrun(repo_root, "--steps", "3", "--resume", str(tmp / "first.pt"), "--save",
                               str(tmp / "resumed.pt"), "--check")
    out["rank0_only"] = _torchrun(repo_root, "--steps", "2", "--resume", str(tmp / "first.pt"),
                                  "--resume-on-rank0-only", "--check", expect_ok=False)
    out["files"] = {name: torch.load(tmp / f"{name}.pt") for name in ("whole", "first", "resumed")}
    return out


def test_ranks_stay_identical(runs):
    for name in ("whole", "first", "resumed"):
        assert "ranks identical: model, quantizer and optimizer state" in runs[name].stdout, name


def test_resuming_on_every_rank_continues_the_run_exactly(runs):
    whole, resumed = runs["files"]["whole"], runs["files"]["resumed"]
    assert whole["step"] == resumed["step"] == 6
    for k, v in whole["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert bool(whole["model"]["vq.initialized"])
    for i, state in whole["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, resumed["optimizer"]["state"][i][k]), (i, k)


def test_loading_on_rank_zero_only_is_caught(runs):
    done = runs["rank0_only"]
    assert done.returncode != 0
    assert "ranks differ in" in done.stdout and "encoder.0.weight" in done.stdout
