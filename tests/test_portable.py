"""The chapters pass strict nbval on another CPU: emulated here by changing the code paths.

A fresh clone on a machine with another CPU must pass the README's test command without
re-executing the chapters.  This machine cannot become another CPU, but it can take other
code paths for the float32 work whose rounding differs between machines:

* ``ATEN_CPU_CAPABILITY=default`` -- ATen's kernels without vector instructions (AVX2 or
  AVX-512 elsewhere);
* ``MKL_CBWR=COMPATIBLE`` -- MKL's conditional numerical reproducibility mode: matrix
  products through its generic code path;
* ``ONEDNN_MAX_CPU_ISA=SSE41`` -- oneDNN's convolutions limited to SSE4.1.

Measured on the machine that made the chapters' records (torch 2.13.0+cpu, an Intel Xeon
with AVX-512): before the chapters read their training results from records, each of the
first two moved the scaling chapter's printed training numbers in the 3rd--4th digit (9 of
20 cells failed), and the third moved nothing there (the digits model has no convolution);
the convolutional runs of the scaling study go through oneDNN, so all three are set.  The
thread counts are changed too (the chapters pin their own).  The test first checks that
these settings change a float32 training computation bitwise on this machine: where they do
not, it would prove nothing, and it is skipped with that reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMULATED = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
            "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
TIMEOUT_S = 900

# A few steps of the lab's two models in float32, printed as the hex of the final weights' sum.
_DIGEST = r"""
import torch
from rotvq.lab.datasets import load_digits, load_patches
from rotvq.lab.training import TrainConfig, build_model, train
torch.set_num_threads(1)
out = []
for model, data in (("mlp", load_digits("train").x), ("conv", load_patches("train", flatten=False).x)):
    config = TrainConfig(model=model, steps=3, batch_size=32, hidden=16, codebook_size=16)
    net = build_model(config, data)
    train(net, data, config)
    out.append(float(sum(p.double().sum() for p in net.parameters())).hex())
print(" ".join(out))
"""


def _digest(env: dict[str, str]) -> list[str]:
    result = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True,
                            env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in EMULATED and not k.startswith("PYTEST")}
    return {**env, **extra}


@pytest.mark.slow
def test_chapters_pass_strict_nbval_on_an_emulated_other_cpu():
    native, emulated = _digest(_env({})), _digest(_env(EMULATED))
    if native == emulated:
        pytest.skip("ATEN_CPU_CAPABILITY/MKL_CBWR/ONEDNN_MAX_CPU_ISA change no float32 result "
                    "on this CPU: the emulation would prove nothing here")
    assert native[0] != emulated[0], "the emulation must move the MLP's float32 training (matmuls)"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0", "book/"],
        capture_output=True, text=True, env=_env(EMULATED), timeout=TIMEOUT_S, cwd=ROOT)
    assert result.returncode == 0, (
        "strict nbval failed under an emulated other CPU "
        f"({' '.join(f'{k}={v}' for k, v in EMULATED.items())}):\n{result.stdout[-6000:]}")
