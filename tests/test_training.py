"""Tests for rotvq.lab.training: config validation, determinism, learning, history, evaluation."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from rotvq.lab.datasets import load_digits
from rotvq.lab.training import METRICS, History, TrainConfig, build_model, evaluate, train

TRAIN, TEST = load_digits("train"), load_digits("test")
SMALL = dict(hidden=32, batch_size=32, codebook_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(**overrides):
    config = TrainConfig(**(SMALL | overrides))
    model = build_model(config, TRAIN)
    return model, train(model, TRAIN, config)


@pytest.mark.parametrize("bad", [
    dict(steps=0), dict(batch_size=2.5), dict(lr=0.0), dict(lr=float("inf")), dict(optimizer="rmsprop"),
    dict(estimator="nope"), dict(init="zeros"), dict(model="rnn"), dict(beta=-1.0), dict(decay=1.0),
    dict(grad_clip=0.0), dict(encoder_norm=-1.0), dict(init_scale=0.0), dict(steps=True),
])
def test_config_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_same_seed_gives_identical_history_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    _, first = _run(steps=25, seed=7)
    _, second = _run(steps=25, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.to_dict() == second.to_dict()  # bit-identical floats
    assert len(first) == 25 and first.step == list(range(25))
    _, other = _run(steps=25, seed=8)
    assert other.to_dict()["recon_loss"] != first.to_dict()["recon_loss"]


def test_kmeans_init_is_deterministic_too():
    _, first = _run(steps=5, init="kmeans", seed=1)
    _, second = _run(steps=5, init="kmeans", seed=1)
    assert first.to_dict() == second.to_dict()


def test_loss_falls_on_digits():
    # Mean predictor on the test split: the loss of a model that ignores its input.
    baseline = float(((TEST.x - TRAIN.x.mean(0)) ** 2).mean())
    config = TrainConfig(steps=150, hidden=64, batch_size=64, lr=3e-3, init="kmeans", estimator="rotation")
    model = build_model(config, TRAIN)
    history = train(model, TRAIN, config)
    assert history.final(window=10)["recon_loss"] < 0.3 * history.recon_loss[0]
    result = evaluate(model, TEST)
    assert result["recon_loss"] < 0.8 * baseline  # it learned something about the digits
    assert result["usage"] > 0.25 and result["perplexity"] > 8


def test_history_dict_csv_and_final(tmp_path):
    _, history = _run(steps=6)
    as_dict = history.to_dict()
    assert list(as_dict) == ["step", *METRICS]
    assert all(len(v) == 6 for v in as_dict.values())
    assert all(math.isfinite(v) for values in as_dict.values() for v in values)
    assert history.config["steps"] == 6 and history.wall_time > 0
    arrays = history.to_numpy()
    assert arrays["loss"].shape == (6,)
    assert history.final(3)["loss"] == pytest.approx(sum(history.loss[-3:]) / 3)
    path = tmp_path / "h.csv"
    history.to_csv(path, extra={"estimator": "rotation"})
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and rows[0]["estimator"] == "rotation"
    assert float(rows[5]["perplexity"]) == history.perplexity[5]  # repr round-trips exactly
    with pytest.raises(ValueError, match="empty"):
        History().final()


def test_history_records_batch_statistics():
    _, history = _run(steps=4)
    for i in range(4):
        assert 0 < history.usage[i] <= 1 and 1 <= history.perplexity[i] <= 16
        assert history.loss[i] == pytest.approx(
            history.recon_loss[i] + 1.0 * history.codebook_loss[i] + 0.25 * history.commitment_loss[i],
            rel=1e-5)


def test_progress_lines(capsys):
    _run(steps=4, log_every=2)  # default: stderr is not a terminal under pytest -> quiet
    assert capsys.readouterr().err == ""
    config = TrainConfig(steps=4, log_every=2, **SMALL)
    train(build_model(config, TRAIN), TRAIN, config, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("step      4/4")


def test_nan_loss_raises():
    x = TRAIN.x.clone()
    x[:] = float("nan")
    config = TrainConfig(steps=3, **SMALL)
    model = build_model(config, TRAIN)
    with pytest.raises(FloatingPointError, match="step 0"):
        train(model, x, config)


def test_input_checks():
    config = TrainConfig(steps=1, **(SMALL | dict(batch_size=2000)))
    with pytest.raises(ValueError, match="batch_size"):
        train(build_model(config, TRAIN), TRAIN, config)
    with pytest.raises(ValueError, match="flatten=True"):
        build_model(TrainConfig(model="mlp"), load_digits("test", flatten=False))
    with pytest.raises(ValueError, match="flatten=False"):
        build_model(TrainConfig(model="conv"), TEST)
    with pytest.raises(TypeError, match="tensor"):
        train(build_model(config, TRAIN), [[0.0]], config)


def test_conv_model_and_encoder_norm():
    images = load_digits("train", flatten=False)
    config = TrainConfig(model="conv", hidden=8, latent_dim=4, codebook_size=16, batch_size=32,
                         steps=3, encoder_norm=20.0, init_scale=0.01)
    model = build_model(config, images)
    with torch.no_grad():
        start = model.encode(images.x[:32]).norm(dim=-1).mean()
    assert float(start) == pytest.approx(20.0, rel=1e-4)
    history = train(model, images, config)
    assert history.mean_q_norm[0] < 0.01 * history.mean_z_norm[0]  # |q| << |z| regime


def test_evaluate_over_full_split():
    model, _ = _run(steps=5)
    model.train()
    result = evaluate(model, TEST)
    assert model.training  # mode restored
    assert set(result) == {"recon_loss", "usage", "perplexity", "mean_z_norm", "mean_q_norm",
                           "quantization_error"}
    assert 0 < result["usage"] <= 1 and 1 <= result["perplexity"] <= result["usage"] * 16 + 1e-9
    small_batches = evaluate(model, TEST, batch_size=50)
    for key, value in result.items():
        assert small_batches[key] == pytest.approx(value, rel=1e-5)
    with torch.no_grad():
        model.eval()
        out = model(TEST.x)
    assert result["recon_loss"] == pytest.approx(float(out.recon_loss), rel=1e-5)
    assert result["mean_z_norm"] == pytest.approx(float(out.vq.z_norm), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run():
    model, history = _run(steps=20, device="cuda")
    assert next(model.parameters()).is_cuda and len(history) == 20
    result = evaluate(model, TEST)
    assert math.isfinite(result["recon_loss"])
