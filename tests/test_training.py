"""Tests for rotvq.lab.training: config validation, determinism, learning, history, evaluation."""
from __future__ import annotations

import csv
import math

import pytest
import torch

import dataclasses
import json

from rotvq.lab.datasets import load_digits
from rotvq.lab.training import (METRICS, GlobalBatchSampler, History, TrainConfig, build_model,
                                check_field, evaluate, train)
from rotvq.quantizer import METRIC_NAMES

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
    dict(seed=-1), dict(hidden=8.0), dict(ema=1), dict(distance="manhattan"), dict(lr="0.1"),
    dict(downsamples=-1), dict(steps=None),
])
def test_config_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_every_field_carries_its_schema():
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata["help"] and field.metadata["group"] in ("training", "quantizer", "model")
    config = TrainConfig(lr=1, grad_clip=None, dead_code_threshold=None)
    assert isinstance(config.lr, float) and config.lr == 1.0  # ints accepted, stored as floats
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown TrainConfig fields: colour"):
        TrainConfig.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="no field"):
        check_field("colour", 1)
    assert config.vq_kwargs()["distance"] == "euclidean"


def test_metric_names_are_the_layers():
    # the history's columns: the model's loss terms, then the layer's own metrics() names
    assert METRICS == ("loss", "recon_loss", "vq_loss", *METRIC_NAMES[1:])
    assert METRIC_NAMES[0] == "loss"  # the layer's weighted loss, renamed vq_loss here


def test_global_batches_are_the_union_of_the_rank_shards():
    def take(sampler, k):
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    single = take(GlobalBatchSampler(50, 12, seed=3), 10)  # 10 steps: more than 4 epochs
    shards = [take(GlobalBatchSampler(50, 12, seed=3, rank=r, world_size=3), 10) for r in range(3)]
    for step in range(10):
        assert torch.equal(torch.cat([s[step] for s in shards]), single[step])
    epoch = torch.cat(single[:4])  # 4 batches per epoch, the last 2 examples dropped
    assert len(set(epoch.tolist())) == 48
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(50, 12, seed=0, rank=0, world_size=5)
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchSampler(50, 12, seed=0, rank=3, world_size=3)


def test_same_seed_gives_identical_history_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    _, first = _run(steps=25, seed=7)
    _, second = _run(steps=25, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.to_dict() == second.to_dict()  # bit-identical floats
    assert len(first) == 25 and first.step == list(range(25))
    _, other = _run(steps=25, seed=8)
    assert other["recon_loss"] != first["recon_loss"]


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
    assert history.final(window=10)["recon_loss"] < 0.3 * history["recon_loss"][0]
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
    assert history.final(3)["loss"] == pytest.approx(sum(history["loss"][-3:]) / 3)
    path = tmp_path / "h.csv"
    history.to_csv(path, extra={"estimator": "rotation"})
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and rows[0]["estimator"] == "rotation"
    assert float(rows[5]["perplexity"]) == history["perplexity"][5]  # repr round-trips exactly
    assert list(rows[0]) == ["estimator", "step", *METRICS]
    with pytest.raises(ValueError, match="empty"):
        History().final()
    with pytest.raises(KeyError, match="no column 'mean_z_norm'"):
        history["mean_z_norm"]
    with pytest.raises(ValueError, match="metrics"):
        history.append(6, {"loss": 1.0})  # every step has the same names


def test_history_records_batch_statistics():
    _, history = _run(steps=4)
    h = history.to_dict()
    for i in range(4):
        assert 0 < h["usage"][i] <= 1 and 1 <= h["perplexity"][i] <= 16
        assert h["vq_loss"][i] == pytest.approx(1.0 * h["codebook_loss"][i] + 0.25 * h["commitment_loss"][i],
                                                rel=1e-5)
        assert h["loss"][i] == pytest.approx(h["recon_loss"][i] + h["vq_loss"][i], rel=1e-5)


def test_progress_bar(capsys):
    _run(steps=4, log_every=2)  # default: stderr is not a terminal under pytest -> quiet
    assert capsys.readouterr().err == ""
    config = TrainConfig(steps=4, log_every=2, **SMALL)
    train(build_model(config, TRAIN), TRAIN, config, progress=True)  # tqdm, on stderr
    err = capsys.readouterr().err
    assert "rotation seed 0:" in err and "/4 " in err  # the bar's description and total
    train(build_model(config, TRAIN), TRAIN, config, progress=False)
    assert capsys.readouterr().err == ""


def test_non_finite_loss_raises_and_names_the_step():
    config = TrainConfig(steps=3, **SMALL)
    model = build_model(config, TRAIN)
    with torch.no_grad():
        model.decoder[-1].bias.fill_(float("inf"))  # finite z, infinite reconstruction
    with pytest.raises(FloatingPointError, match="at step 0"):
        train(model, TRAIN, config)
    x = TRAIN.x.clone()
    x[:] = float("nan")
    with pytest.raises(ValueError, match="NaN"):  # NaN latents: the layer refuses the batch
        train(build_model(config, TRAIN), x, config)


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
                         steps=3, encoder_norm=20.0, init="normal", init_scale=0.01)  # small codes
    model = build_model(config, images)
    with torch.no_grad():
        start = model.encode(images.x[:32]).norm(dim=-1).mean()
    assert float(start) == pytest.approx(20.0, rel=1e-4)
    history = train(model, images, config)
    assert history["q_norm"][0] < 0.01 * history["z_norm"][0]  # |q| << |z| regime


def test_evaluate_over_full_split():
    model, _ = _run(steps=5)
    model.train()
    result = evaluate(model, TEST)
    assert model.training  # mode restored
    assert list(result) == list(METRICS)
    assert 0 < result["usage"] <= 1 and 1 <= result["perplexity"] <= result["usage"] * 16 + 1e-9
    # no hand patching: the layer's codebook_loss (mean over entries) is the squared error per entry
    d = model.latent_dim
    assert result["codebook_loss"] == pytest.approx(result["quantization_error"] / d, rel=1e-5)
    assert result["loss"] == pytest.approx(result["recon_loss"] + result["vq_loss"], rel=1e-12)
    small_batches = evaluate(model, TEST, batch_size=50)
    for key, value in result.items():
        assert small_batches[key] == pytest.approx(value, rel=1e-5)
    with torch.no_grad():
        model.eval()
        out = model(TEST.x)
    assert result["recon_loss"] == pytest.approx(float(out.recon_loss), rel=1e-5)
    # one perplexity formula: the layer's own statistics over the whole split
    assert {k: result[k] for k in METRIC_NAMES[1:]} == pytest.approx(
        {k: v for k, v in out.vq.metrics().items() if k != "loss"}, rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, TEST, batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run():
    model, history = _run(steps=20, device="cuda")
    assert next(model.parameters()).is_cuda and len(history) == 20
    result = evaluate(model, TEST)
    assert math.isfinite(result["recon_loss"])
