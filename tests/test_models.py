"""Tests for rotvq.lab.models: shapes, losses, gradient flow, and control of the encoder-output norm."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from rotvq.lab.models import ConvVQVAE, MLPVQVAE, VQVAEOutput


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0, **kwargs):
    torch.manual_seed(seed)
    # random codes from construction on (the layer's default, k-means, waits for a training batch)
    return MLPVQVAE(64, [32, 16], 8, 32, **{"init": "normal", **kwargs})


def test_mlp_shapes_and_losses():
    model = _mlp()
    x = torch.rand(5, 64)
    out = model(x)
    assert isinstance(out, VQVAEOutput)
    assert out.reconstruction.shape == (5, 64)
    assert out.z.shape == (5, 4, 8)  # num_latents=4 latent vectors per input
    assert out.vq.quantized.shape == (5, 4, 8) and out.vq.indices.shape == (5, 4)
    assert torch.equal(out.vq.quantized, model.quantizer.codebook[out.vq.indices])
    assert out.recon_loss == F.mse_loss(out.reconstruction, x)
    assert out.loss == out.recon_loss + out.vq.loss
    assert out.codebook_loss is out.vq.codebook_loss and out.commitment_loss is out.vq.commitment_loss
    assert all(t.shape == () for t in (out.loss, out.recon_loss, out.codebook_loss, out.commitment_loss))


def test_metrics_are_named_in_the_labs_vocabulary():
    out = _mlp()(torch.rand(5, 64))
    metrics = out.metrics()
    vq = out.vq.metrics()
    assert list(metrics) == ["loss", "recon_loss", "vq_loss", *list(vq)[1:]]
    assert metrics["vq_loss"] == vq["loss"] and metrics["loss"] == float(out.loss.detach())
    assert metrics["recon_loss"] == float(out.recon_loss.detach())
    assert all(isinstance(v, float) for v in metrics.values())


def test_latents_are_channel_last_even_when_sizes_coincide():
    # (B, num_latents, D) with num_latents == D would be ambiguous to a layer guessing the layout
    model = MLPVQVAE(10, 7, 4, 5, num_latents=4)
    out = model(torch.rand(3, 10))
    assert out.z.shape == (3, 4, 4) and out.vq.indices.shape == (3, 4)


def test_mlp_hidden_variants():
    assert _mlp().encoder[0].out_features == 32
    single = MLPVQVAE(10, 7, 3, 5, num_latents=2)
    assert single(torch.rand(2, 10)).z.shape == (2, 2, 3)
    linear = MLPVQVAE(10, [], 3, 5, num_latents=1)  # no hidden layer
    assert linear(torch.rand(2, 10)).reconstruction.shape == (2, 10)


def test_conv_shapes_channel_last_latents():
    torch.manual_seed(0)
    model = ConvVQVAE(1, hidden=8, latent_dim=4, codebook_size=16)
    x = torch.rand(3, 1, 8, 8)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.z.shape == (3, 4, 4, 4)  # (B, H/2, W/2, latent_dim), channel-last
    assert out.vq.indices.shape == (3, 4, 4)
    # channel-last z is the encoder's channel-first output permuted, times encoder_scale
    assert torch.equal(out.z, model.encoder(x).permute(0, 2, 3, 1))
    rgb = ConvVQVAE(3, hidden=8, latent_dim=4, codebook_size=16, downsamples=2)
    assert rgb(torch.rand(2, 3, 8, 8)).z.shape == (2, 2, 2, 4)
    same = ConvVQVAE(3, hidden=8, latent_dim=4, codebook_size=16, downsamples=0)
    assert same(torch.rand(2, 3, 6, 6)).z.shape == (2, 6, 6, 4)


def test_bad_inputs_and_arguments():
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        _mlp()(torch.rand(5, 63))
    conv = ConvVQVAE(1, hidden=8, latent_dim=4, codebook_size=16, downsamples=2)
    with pytest.raises(ValueError, match="divisible"):
        conv(torch.rand(1, 1, 6, 8))
    with pytest.raises(ValueError, match="C, H, W|1, H, W"):
        conv(torch.rand(1, 3, 8, 8))
    for bad in (dict(latent_dim=0), dict(codebook_size=2.0), dict(encoder_scale=0.0),
                dict(encoder_scale=float("nan")), dict(downsamples=-1)):
        kwargs = dict(in_channels=1, hidden=8, latent_dim=4, codebook_size=16) | bad
        with pytest.raises(ValueError):
            ConvVQVAE(**kwargs)
    with pytest.raises(ValueError, match="num_latents"):
        MLPVQVAE(64, 16, 8, 32, num_latents=0)


def test_vq_kwargs_reach_the_quantizer():
    model = _mlp(estimator="ste", init="uniform", init_scale=0.01, ema=True)
    assert model.quantizer.estimator == "ste" and model.quantizer.ema
    assert model.quantizer.codebook.abs().max() <= 0.01
    with pytest.raises(TypeError):
        _mlp(no_such_option=1)
    with pytest.raises(ValueError, match="estimator"):
        _mlp(estimator="nope")


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
def test_gradients_reach_encoder_and_codebook(estimator):
    model = _mlp(estimator=estimator)
    model(torch.rand(8, 64)).loss.backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0  # through the estimator
    assert model.quantizer.codebook.grad.abs().sum() > 0  # through the codebook loss
    assert model.decoder[-1].weight.grad.abs().sum() > 0


def test_encoder_scale_multiplies_z():
    x = torch.rand(16, 64)
    base, scaled = _mlp(seed=3), _mlp(seed=3, encoder_scale=10.0)
    assert torch.equal(base.encoder[0].weight, scaled.encoder[0].weight)
    z1, z10 = base(x).z, scaled(x).z
    assert torch.allclose(z10, 10 * z1, rtol=1e-6, atol=0)
    out = scaled(x)
    # the quantizer's statistic is the mean Euclidean norm of the (scaled) latent vectors
    assert torch.isclose(out.vq.z_norm, out.z.norm(dim=-1).mean(), rtol=1e-6)
    assert torch.isclose(out.vq.z_norm / base(x).vq.z_norm, torch.tensor(10.0), rtol=1e-5)
    assert float(scaled.encoder_scale) == 10.0
    assert "encoder_scale" in scaled.state_dict()  # saved with the model, but not trained
    assert all(p is not scaled.encoder_scale for p in scaled.parameters())


def test_encoder_scale_produces_small_code_regime():
    # |q| << |z| on purpose: large encoder gain, small codebook init
    model = _mlp(encoder_scale=50.0, init_scale=0.01)
    out = model(torch.rand(32, 64))
    assert out.vq.q_norm < 0.05 * out.vq.z_norm


@pytest.mark.parametrize("target", [0.1, 25.0])
def test_calibrate_encoder_norm(target):
    torch.manual_seed(0)
    model = ConvVQVAE(1, hidden=8, latent_dim=4, codebook_size=16, encoder_scale=3.0)
    x = torch.rand(10, 1, 8, 8)
    with torch.no_grad():
        before = model.encode(x).norm(dim=-1).mean()
        factor = model.calibrate_encoder_norm(x, target)
        after = model.encode(x).norm(dim=-1).mean()
    assert abs(float(after) - target) < 1e-4 * target
    assert abs(factor - target / float(before)) < 1e-5 * factor
    with pytest.raises(ValueError, match="target"):
        model.calibrate_encoder_norm(x, 0.0)
