"""Tests of rotvq.FSQ against hand-computed examples (Mentzer et al. 2023, arXiv 2309.15505)."""
from __future__ import annotations

import math

import pytest
import torch

import rotvq
from rotvq import FSQ, Projected

LEVELS = (8, 5, 5, 5)


def _preimage(fsq, level_values):
    """z with bound(z) = the given integer levels (channel by channel); +-10 where the level is the
    extreme one of an odd L (beyond the bound's open range, reached by rounding only)."""
    levels = torch.tensor(fsq.levels, dtype=torch.float64)
    half_l = (levels - 1) * (1 - fsq.eps) / 2
    offset = (torch.tensor(fsq.levels) % 2 == 0).double() * 0.5
    shift = torch.atanh(offset / half_l)
    ratio = (level_values.double() + offset) / half_l
    inside = ratio.abs() < 1
    z = torch.atanh(ratio.clamp(-0.999999, 0.999999)) - shift
    return torch.where(inside, z, 10 * torch.sign(level_values.double())), inside


def test_codebook_size_basis_and_hand_computed_indices():
    fsq = FSQ(LEVELS)
    assert fsq.codebook_size == 1000 and fsq.dim == 4
    assert fsq._basis.tolist() == [1, 8, 40, 200]
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [20.0, 20.0, 20.0, 20.0], [-20.0, -20.0, -20.0, -20.0],
                      [20.0, -20.0, 0.0, 0.0]])
    out = fsq.eval()(z)
    # digits (level + L // 2): (4, 2, 2, 2) -> 4 + 2*8 + 2*40 + 2*200 = 500; (7, 4, 4, 4) -> 999; 0; (7, 0, 2, 2) -> 487
    assert out.indices.tolist() == [500, 999, 0, 7 + 0 + 80 + 400]
    assert out.quantized.tolist() == [[0, 0, 0, 0], [0.75, 1, 1, 1], [-1, -1, -1, -1], [0.75, -1, 0, 0]]
    codes = fsq.get_codes_from_indices(torch.tensor([500, 999, 0, 487]))
    assert torch.equal(codes, out.quantized)


def test_bound_at_the_level_centres_and_its_range():
    fsq = FSQ(LEVELS)
    # L = 8: l = 3.5 (1 - 1e-3) = 3.4965, o = 0.5: bound in (-3.9965, 2.9965) -> levels -4..3
    # L = 5: l = 2 (1 - 1e-3) = 1.998, o = 0: bound in (-1.998, 1.998) -> levels -2..2
    far = fsq.bound(torch.tensor([[30.0] * 4, [-30.0] * 4], dtype=torch.float64))
    torch.testing.assert_close(far, torch.tensor([[2.9965, 1.998, 1.998, 1.998], [-3.9965, -1.998, -1.998, -1.998]],
                                                 dtype=torch.float64))
    assert torch.equal(fsq.bound(torch.zeros(1, 4, dtype=torch.float64)).abs() < 1e-15, torch.ones(1, 4, dtype=torch.bool))
    for k in range(-4, 4):  # every level reachable inside the bound: bound(preimage) = k
        values = torch.tensor([k, max(-2, min(2, k)), 1, -1])
        z, inside = _preimage(fsq, values)
        b = fsq.bound(z[None])[0]
        torch.testing.assert_close(b[inside], values.double()[inside], atol=1e-9, rtol=0)
        assert torch.equal(torch.round(b), values.double())


@pytest.mark.parametrize("levels", [LEVELS, (3, 4, 7), (6, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_index_round_trip_over_the_whole_codebook(levels, dtype):
    fsq = FSQ(levels).eval()
    k = math.prod(levels)
    every = torch.arange(k)
    digits = (every[:, None] // fsq._basis) % fsq._levels  # (K, d)
    z, _ = _preimage(fsq, digits - fsq._levels // 2)
    out = fsq(z.to(dtype))
    assert torch.equal(out.indices, every)
    assert torch.equal(fsq.get_codes_from_indices(every, dtype), out.quantized)  # bitwise
    assert out.usage.item() == 1.0 and out.perplexity.item() == pytest.approx(k, rel=1e-4)
    assert torch.unique(out.quantized.float(), dim=0).shape[0] == k
    assert out.quantized.abs().max() <= 1


def test_straight_through_gradient_is_the_bound_derivative():
    fsq = FSQ(LEVELS)
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    g = torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = fsq(z)
    (gz,) = torch.autograd.grad(out.quantized, z, g)
    levels = torch.tensor(LEVELS, dtype=torch.float64)
    half_l = (levels - 1) * (1 - 1e-3) / 2
    shift = torch.atanh((levels % 2 == 0).double() * 0.5 / half_l)
    expect = g * (1 - torch.tanh(z.detach() + shift) ** 2) * half_l / (levels // 2)
    torch.testing.assert_close(gz, expect)
    assert out.loss.item() == 0 and not out.loss.requires_grad


def test_rotation_estimator_rotates_u_onto_q():
    fsq = FSQ(LEVELS, estimator="rotation")
    z = torch.randn(30, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    g = torch.randn(30, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = fsq(z)
    assert torch.equal(out.quantized, FSQ(LEVELS)(z).quantized)  # the same forward
    (gz,) = torch.autograd.grad(out.quantized, z, g)
    hw = torch.tensor([4.0, 2, 2, 2], dtype=torch.float64)
    u = fsq.bound(z.detach()) / hw
    q = out.quantized.detach()
    R = rotvq.rotation_matrix(u, q)
    through = (q.norm(dim=1) / u.norm(dim=1))[:, None] * (R.transpose(1, 2) @ g[..., None])[..., 0]
    derivative = torch.autograd.functional.jacobian(lambda t: fsq.bound(t).sum(0), z.detach()).diagonal(dim1=0, dim2=2)
    torch.testing.assert_close(gz, through * derivative / hw)


def test_statistics_by_hand_and_masks():
    fsq = FSQ(LEVELS)
    z = torch.tensor([[0.0] * 4, [0.0] * 4, [20.0] * 4, [-20.0] * 4, [float("nan")] * 4])
    mask = torch.tensor([True, True, True, True, False])
    out = fsq(z, mask=mask)
    assert out.indices[:4].tolist() == [500, 500, 999, 0]
    assert out.usage.item() == pytest.approx(3 / 1000)
    assert out.perplexity.item() == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))))
    torch.testing.assert_close(out.z_norm, torch.tensor(20.0))  # (0 + 0 + 40 + 40) / 4
    assert torch.isfinite(out.quantized).all()
    leaf = z.clone().requires_grad_()
    o = fsq(leaf, mask=mask)
    (gz,) = torch.autograd.grad(o.quantized.sum(), leaf)
    assert not gz[4].any() and torch.isfinite(gz).all()
    with pytest.raises(ValueError, match=r"1 row\(s\) with NaN or inf"):
        fsq(z)


def test_layouts_and_projection():
    fsq = FSQ((5, 5, 5), channel_first=True)
    z = torch.randn(2, 3, 4, 5)
    out = fsq(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 4, 5)
    assert torch.equal(fsq.get_codes_from_indices(out.indices, z.dtype), out.quantized)
    model = Projected(FSQ((8, 5, 5, 5)), 32, channel_first=True)  # vector-quantize-pytorch's FSQ(levels, dim=32)
    x = torch.randn(2, 32, 6, requires_grad=True)
    o = model(x)
    assert o.quantized.shape == x.shape and o.indices.shape == (2, 6)
    o.quantized.sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("levels, kwargs, error", [
    ((8, 2, 5), {}, ValueError), ((), {}, TypeError), ("855", {}, TypeError), ((8, 5.0), {}, ValueError),
    ((8, True), {}, ValueError), ((8, 5), dict(eps=1.5), ValueError), ((8, 5), dict(estimator="nope"), ValueError),
    ((8, 5), dict(channel_first="yes"), TypeError),
])
def test_bad_arguments(levels, kwargs, error):
    with pytest.raises(error):
        FSQ(levels, **kwargs)
