"""The README's "Coming from vector-quantize-pytorch" mapping, checked against vector-quantize-pytorch itself.

Each test builds a vector-quantize-pytorch (vqp) module with the arguments the README names, the rotvq
module the README maps them to, gives the rotvq module vqp's initial codebook (and projection weights),
trains both side by side on the same batches and compares what they return and the state they reach.
"""
from __future__ import annotations

import math

import pytest
import torch

import rotvq

vqp = pytest.importorskip("vector_quantize_pytorch")

D, K = 8, 16

#: The rotvq arguments that reproduce vqp's VectorQuantize defaults (the README's table says why each differs).
VQP_DEFAULTS = dict(ema=True, decay=0.8, commitment_weight=1.0, init="uniform", init_scale=math.sqrt(6 / (K * D)),
                    dead_code_threshold=0.0, estimator="rotation", channel_first=False)


def _load_codebook(layer: rotvq.VectorQuantizer, codebook) -> None:
    with torch.no_grad():
        layer.embedding.copy_(codebook._codebook.embed[0])
        layer.embed_sum.copy_(codebook._codebook.embed_avg[0])
        layer.cluster_size.copy_(codebook._codebook.cluster_size[0])


def _batches(steps=5, seed=0, shape=(4, 12, D)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(steps)]


def _grad(out, x, g):
    return torch.autograd.grad((out * g).sum(), x, retain_graph=True)[0]


def test_vqp_defaults_are_the_readme_settings():
    torch.manual_seed(0)
    theirs = vqp.VectorQuantize(dim=D, codebook_size=K)
    ours = rotvq.VectorQuantizer(D, K, **VQP_DEFAULTS)
    bound = math.sqrt(6 / (K * D))  # kaiming_uniform_ of a (1, K, D) tensor: fan_in = K D, gain sqrt(2)
    assert 0.9 * bound < theirs._codebook.embed.abs().max() <= bound
    assert 0.9 * bound < ours.codebook.abs().max() <= bound
    _load_codebook(ours, theirs)
    for step, x in enumerate(_batches()):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_theirs, i_theirs, loss_theirs = theirs(xa)
        q, i, loss = ours(xb)[:3]  # the README's unpacking
        assert torch.equal(i, i_theirs), step
        torch.testing.assert_close(q, q_theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, loss_theirs)  # commitment weight 1, EMA: no codebook term
        g = torch.randn(x.shape)
        torch.testing.assert_close(_grad(q + loss, xb, g), _grad(q_theirs + loss_theirs, xa, g), rtol=1e-4,
                                   atol=1e-6)  # the rotation trick and the commitment gradient
        torch.testing.assert_close(ours.codebook, theirs._codebook.embed[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.cluster_size, theirs._codebook.cluster_size[0], rtol=1e-5, atol=1e-6)


def test_cosine_and_channel_first():
    torch.manual_seed(1)
    theirs = vqp.VectorQuantize(dim=D, codebook_size=K, use_cosine_sim=True, channel_last=False)
    ours = rotvq.VectorQuantizer(D, K, **{**VQP_DEFAULTS, "channel_first": True}, distance="cosine")
    _load_codebook(ours, theirs)
    for step, x in enumerate(_batches(seed=1, shape=(3, D, 10))):  # (B, D, N)
        q_theirs, i_theirs, _ = theirs(x)
        out = ours(x)
        assert torch.equal(out.indices, i_theirs), step
        torch.testing.assert_close(out.quantized, q_theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.codebook, theirs._codebook.embed[0], rtol=1e-5, atol=1e-6)


def test_dead_codes_same_rule_other_replacements():
    """threshold_ema_dead_code=t is dead_code_threshold=t: the same codes die; vqp replaces them by random
    batch rows, rotvq by the rows its codebook serves worst."""
    torch.manual_seed(2)
    theirs = vqp.VectorQuantize(dim=D, codebook_size=K, threshold_ema_dead_code=0.9)
    ours = rotvq.VectorQuantizer(D, K, **{**VQP_DEFAULTS, "dead_code_threshold": 0.9})
    _load_codebook(ours, theirs)
    x = _batches(1, seed=2)[0]
    expected_dead = (0.8 * ours.cluster_size + 0.2 * torch.bincount(
        torch.cdist(x.reshape(-1, D), ours.codebook).argmin(1), minlength=K)) < 0.9
    before = ours.codebook.clone()
    theirs(x)
    ours(x)
    moved_theirs = (theirs._codebook.embed[0] != before).any(1) & expected_dead
    moved_ours = (ours.codebook != before).any(1) & expected_dead
    assert expected_dead.any() and moved_theirs.equal(expected_dead) and moved_ours.equal(expected_dead)
    rows = x.reshape(-1, D)
    for k in expected_dead.nonzero()[:, 0]:
        assert (ours.codebook[k] == rows).all(1).any() and (theirs._codebook.embed[0, k] == rows).all(1).any()


def test_residual_vq_with_stage_scope_is_vqps():
    torch.manual_seed(3)
    theirs = vqp.ResidualVQ(dim=D, num_quantizers=3, codebook_size=K)
    ours = rotvq.ResidualVQ(D, K, 3, estimator_scope="stage", **VQP_DEFAULTS)
    for layer, their_layer in zip(ours.layers, theirs.layers):
        _load_codebook(layer, their_layer)
    for step, x in enumerate(_batches(seed=3)):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_theirs, i_theirs, losses_theirs = theirs(xa)
        out = ours(xb)
        assert torch.equal(out.indices, i_theirs), step  # (..., Q)
        torch.testing.assert_close(out.quantized, q_theirs, rtol=1e-5, atol=1e-5)
        losses = torch.stack([s.loss for s in out.stages])  # vqp returns the per-stage losses
        torch.testing.assert_close(losses, losses_theirs, rtol=1e-5, atol=1e-7)
        g = torch.randn(x.shape)
        torch.testing.assert_close(_grad(out.quantized + losses.sum(), xb, g),
                                   _grad(q_theirs + losses_theirs.sum(), xa, g), rtol=1e-4, atol=1e-5)
        for layer, their_layer in zip(ours.layers, theirs.layers):
            torch.testing.assert_close(layer.codebook, their_layer._codebook.embed[0], rtol=1e-5, atol=1e-6)


def test_heads_are_groups_and_codebook_dim_is_a_projection():
    torch.manual_seed(4)
    # heads whose codebook_dim * heads == dim: groups of channels, no projection
    theirs = vqp.VectorQuantize(dim=D, codebook_size=K, heads=2, codebook_dim=D // 2, separate_codebook_per_head=True)
    ours = rotvq.GroupedVQ(D, K, 2, **{**VQP_DEFAULTS, "init_scale": 1.0})
    for h, layer in enumerate(ours.quantizers):
        with torch.no_grad():
            layer.embedding.copy_(theirs._codebook.embed[h])
            layer.embed_sum.copy_(theirs._codebook.embed_avg[h])
    for step, x in enumerate(_batches(seed=4)):
        q_theirs, i_theirs, loss_theirs = theirs(x)
        out = ours(x)
        assert torch.equal(out.indices, i_theirs), step  # (..., heads)
        torch.testing.assert_close(out.quantized, q_theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.loss, loss_theirs)  # the mean over all channels
    # codebook_dim: a projection in and out (weights copied)
    theirs = vqp.VectorQuantize(dim=D, codebook_size=K, codebook_dim=3)
    ours = rotvq.Projected(rotvq.VectorQuantizer(3, K, **{**VQP_DEFAULTS, "channel_first": None}), D,
                           channel_first=False)
    _load_codebook(ours.quantizer, theirs)
    with torch.no_grad():
        for mine, their in ((ours.project_in, theirs.project_in[0] if isinstance(theirs.project_in, torch.nn.Sequential)
                             else theirs.project_in), (ours.project_out, theirs.project_out)):
            mine.weight.copy_(their.weight)
            mine.bias.copy_(their.bias)
    x = _batches(1, seed=5)[0]
    q_theirs, i_theirs, loss_theirs = theirs(x)
    out = ours(x)
    assert torch.equal(out.indices, i_theirs)
    torch.testing.assert_close(out.quantized, q_theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, loss_theirs)


def test_masks_with_zeros_for_padding():
    torch.manual_seed(6)
    theirs = vqp.VectorQuantize(dim=D, codebook_size=K)  # return_zeros_for_masked_padding=True by default
    ours = rotvq.VectorQuantizer(D, K, **VQP_DEFAULTS, zero_masked=True)
    _load_codebook(ours, theirs)
    x = _batches(1, seed=6)[0]
    mask = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(7)) > 0.3
    q_theirs, i_theirs, loss_theirs = theirs(x, mask=mask)
    out = ours(x, mask=mask)
    assert torch.equal(out.indices, i_theirs)  # -1 where masked
    torch.testing.assert_close(out.quantized, q_theirs, rtol=1e-5, atol=1e-6)  # zeros where masked
    torch.testing.assert_close(out.loss, loss_theirs)  # the mean over the real positions
    torch.testing.assert_close(ours.codebook, theirs._codebook.embed[0], rtol=1e-5, atol=1e-6)


def test_fsq_codes_and_indices():
    theirs = vqp.FSQ(levels=[8, 5, 5, 5])
    ours = rotvq.FSQ((8, 5, 5, 5), channel_first=False)
    every = torch.arange(1000)
    assert torch.equal(ours.get_codes_from_indices(every), theirs.indices_to_codes(every))  # the same numbering
    # inputs at the level centres (vqp bounds with 1 + eps, the paper and rotvq with 1 - eps: the same levels)
    codes = ours.get_codes_from_indices(every).double()
    half = torch.tensor([4.0, 2, 2, 2], dtype=torch.float64)
    level = codes * half
    half_l = (torch.tensor([8.0, 5, 5, 5], dtype=torch.float64) - 1) * (1 - 1e-3) / 2
    offset = torch.tensor([0.5, 0, 0, 0], dtype=torch.float64)
    ratio = ((level + offset) / half_l).clamp(-0.999, 0.999)
    z = (torch.atanh(ratio) - torch.atanh(offset / half_l)).float()[None]  # (1, 1000, 4)
    q_theirs, i_theirs = theirs(z)
    out = ours(z)
    assert torch.equal(out.indices, i_theirs.long()) and torch.equal(out.indices[0], every)
    assert torch.equal(out.quantized, q_theirs)
