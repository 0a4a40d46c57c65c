"""The stochastic estimators (rotvq.stochastic): forward law, gradients, seeds, eval mode.

NSVQ and DiVeQ do not return ``q`` in training, so they are held to their own contract:
the law of the forward value, the gradient formulas of the module docstring (against
autograd through an independent plain-torch transcription of the papers' formulas and
against the explicit ``d x d`` Jacobian), seeded determinism, the exact-``q`` eval mode,
shapes and dtypes, and bad input.
"""
from __future__ import annotations

import math

import pytest
import torch

import rotvq
from rotvq.stochastic import STOCHASTIC_NAMES, ResidualProjection

FUNCS = {"nsvq": rotvq.noise_substitution, "diveq": rotvq.diveq}


def pair(n=64, d=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen, dtype=dtype)
    q = z + 0.3 * torch.randn(n, d, generator=gen, dtype=dtype)
    return z, q


def test_names_and_exports():
    assert STOCHASTIC_NAMES == ("nsvq", "diveq")
    assert rotvq.noise_substitution is rotvq.stochastic.noise_substitution
    assert "diveq" in rotvq.__all__ and "noise_substitution" in rotvq.__all__


# ---------------------------------------------------------------------------------
# Forward law


def test_nsvq_forward_keeps_the_error_length_in_a_uniform_direction():
    z, q = pair(n=20000, d=8)
    out = rotvq.noise_substitution(z, q, generator=torch.Generator().manual_seed(3))
    step = out - z
    torch.testing.assert_close(step.norm(dim=-1), (q - z).norm(dim=-1), rtol=1e-12, atol=0)
    u = step / step.norm(dim=-1, keepdim=True)
    # uniform on the sphere: mean 0, second moment I/d, independent of the error direction
    assert u.mean(0).abs().max() < 4 / math.sqrt(20000)
    torch.testing.assert_close(u.T @ u / 20000, torch.eye(8, dtype=z.dtype) / 8, atol=0.01, rtol=0)
    e = (q - z) / (q - z).norm(dim=-1, keepdim=True)
    assert (u * e).sum(-1).mean().abs() < 4 / math.sqrt(20000 * 8)
    assert not torch.equal(out, q)


def test_nsvq_forward_matches_the_formula_with_the_same_noise():
    z, q = pair()
    out = rotvq.noise_substitution(z, q, generator=torch.Generator().manual_seed(5))
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=z.dtype)
    expected = z + (z - q).norm(dim=-1, keepdim=True) * v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)


def test_diveq_forward_matches_the_formula_with_the_same_noise():
    z, q = pair()
    out = rotvq.diveq(z, q, sigma=0.05, generator=torch.Generator().manual_seed(5))
    n = 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=z.dtype)
    w = (q - z + n) / (q - z + n).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, z + (q - z).norm(dim=-1, keepdim=True) * w, rtol=0, atol=1e-14)
    torch.testing.assert_close((out - z).norm(dim=-1), (q - z).norm(dim=-1), rtol=1e-12, atol=0)


def test_diveq_forward_approaches_q_as_sigma_shrinks():
    z, q = pair()
    gaps = [(rotvq.diveq(z, q, sigma=s, generator=torch.Generator().manual_seed(0)) - q)
            .norm(dim=-1).max().item() for s in (1e-1, 1e-3, 1e-5)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4
    assert gaps[2] > 0  # not exactly q in training


# ---------------------------------------------------------------------------------
# Gradients


def manual(name, z, q, generator_seed, sigma=0.05):
    """The papers' formulas in plain torch (autograd through them), same noise."""
    gen = torch.Generator().manual_seed(generator_seed)
    v = torch.randn(z.shape, generator=gen, dtype=z.dtype)
    r = torch.sqrt(((z - q) ** 2).sum(-1, keepdim=True))
    if name == "nsvq":
        return z + r * v / torch.sqrt((v * v).sum(-1, keepdim=True))
    direction = (q - z + sigma * v).detach()
    return z + r * direction / torch.sqrt((direction * direction).sum(-1, keepdim=True))


@pytest.mark.parametrize("name", list(FUNCS))
def test_gradients_match_autograd_through_the_formula(name):
    z0, q0 = pair(n=32, d=6, seed=1)
    g = torch.randn(32, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = []
    for fn in (lambda z, q: FUNCS[name](z, q, generator=torch.Generator().manual_seed(4),
                                        **({"sigma": 0.05} if name == "diveq" else {})),
               lambda z, q: manual(name, z, q, 4)):
        z = z0.clone().requires_grad_(True)
        q = q0.clone().requires_grad_(True)
        fn(z, q).backward(g)
        grads.append((z.grad, q.grad))
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(FUNCS))
def test_gradient_formula_of_the_module_docstring(name):
    """dL/dz = g + (w.g) ê and dL/dq = -(w.g) ê, with w the unit step taken."""
    z0, q0 = pair(n=16, d=5, seed=2)
    g = torch.randn(16, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    z = z0.clone().requires_grad_(True)
    q = q0.clone().requires_grad_(True)
    out = FUNCS[name](z, q, generator=torch.Generator().manual_seed(6))
    out.backward(g)
    step = (out - z).detach()
    w = step / step.norm(dim=-1, keepdim=True)
    e = (z0 - q0) / (z0 - q0).norm(dim=-1, keepdim=True)
    wg = (w * g).sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, g + wg * e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.grad, -wg * e, rtol=1e-12, atol=1e-12)
    # the explicit Jacobian I + w ê^T, column by column from torch.autograd.functional
    for i in range(3):
        def one(zi, i=i):
            return FUNCS[name](zi[None], q0[i:i + 1],
                               generator=torch.Generator().manual_seed(6))[0]
        # the same noise only for row 0 of a fresh draw: compare with that row's step
        J = torch.autograd.functional.jacobian(one, z0[i])
        out_i = one(z0[i])
        w_i = (out_i - z0[i]) / (out_i - z0[i]).norm()
        torch.testing.assert_close(J, torch.eye(5, dtype=z0.dtype) + torch.outer(w_i, e[i]),
                                   rtol=1e-12, atol=1e-12)


def test_diveq_small_noise_gradient_removes_the_error_direction():
    z0, q0 = pair(n=16, d=5, seed=3)
    g = torch.randn(16, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    z = z0.clone().requires_grad_(True)
    rotvq.diveq(z, q0, sigma=1e-9, generator=torch.Generator().manual_seed(0)).backward(g)
    e = (z0 - q0) / (z0 - q0).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(z.grad, g - (e * g).sum(-1, keepdim=True) * e, rtol=0, atol=1e-7)


def test_nsvq_gradient_is_the_ste_on_average_over_the_noise():
    z0, q0 = pair(n=1, d=4, seed=4)
    z = z0.expand(40000, 4).clone().requires_grad_(True)
    g = torch.tensor([[0.3, -1.0, 0.5, 2.0]], dtype=torch.float64).expand(40000, 4)
    # a gradient that does not depend on where the forward value lands: the mean is g
    rotvq.noise_substitution(z, q0.expand(40000, 4), generator=torch.Generator().manual_seed(1)).backward(g)
    err = (z.grad.mean(0) - g[0]).abs().max().item()
    assert err < 4 * g[0].norm().item() / math.sqrt(40000)


@pytest.mark.parametrize("name", list(FUNCS))
def test_rows_with_z_equal_q_pass_the_gradient_and_stay_finite(name):
    z0, q0 = pair(n=4, d=3)
    q0[1] = z0[1]
    z = z0.clone().requires_grad_(True)
    out = FUNCS[name](z, q0, generator=torch.Generator().manual_seed(0))
    g = torch.ones_like(out)
    out.backward(g)
    assert torch.equal(out[1], q0[1])
    assert torch.isfinite(z.grad).all() and torch.equal(z.grad[1], g[1])


# ---------------------------------------------------------------------------------
# Seeds, shapes, dtypes


@pytest.mark.parametrize("name", list(FUNCS))
def test_seeded_determinism_and_global_generator(name):
    z, q = pair()
    a = FUNCS[name](z, q, generator=torch.Generator().manual_seed(11))
    b = FUNCS[name](z, q, generator=torch.Generator().manual_seed(11))
    c = FUNCS[name](z, q, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        d = FUNCS[name](z, q)
    assert torch.equal(a, d)  # generator=None draws the same numbers from the global one


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 3, 4, 7)])
def test_shapes_and_dtypes(name, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=gen).to(dtype).requires_grad_(True)
    q = torch.randn(shape, generator=gen).to(dtype)
    out = FUNCS[name](z, q, generator=torch.Generator().manual_seed(1))
    assert out.shape == z.shape and out.dtype == dtype
    out.sum().backward()
    assert z.grad.shape == z.shape and z.grad.dtype == dtype and torch.isfinite(z.grad).all()


# ---------------------------------------------------------------------------------
# Eval mode: exactly q, deterministic backward


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_eval_mode_returns_q_exactly(name, dtype):
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(64, 33, generator=gen, dtype=torch.float64) * 100).to(dtype)
    q = (torch.randn(64, 33, generator=gen, dtype=torch.float64) * 0.37).to(dtype)
    assert not torch.equal(z + (q - z), q)
    z.requires_grad_(True)
    out = FUNCS[name](z, q, training=False)
    assert torch.equal(out, q) and out.dtype == dtype
    # and without a graph
    assert torch.equal(FUNCS[name](z.detach(), q, training=False), q)


def test_eval_mode_backward():
    z0, q0 = pair(n=16, d=5)
    q0[2] = z0[2]
    g = torch.randn(16, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = z0.clone().requires_grad_(True)
    q = q0.clone().requires_grad_(True)
    rotvq.noise_substitution(z, q, training=False).backward(g)
    assert torch.equal(z.grad, g) and (q.grad is None or not q.grad.any())
    z = z0.clone().requires_grad_(True)
    rotvq.diveq(z, q0, training=False).backward(g)
    e = z0 - q0
    coef = torch.where((e * e).sum(-1, keepdim=True) > 0,
                       (e * g).sum(-1, keepdim=True) / (e * e).sum(-1, keepdim=True).clamp_min(1e-300), 0.0)
    torch.testing.assert_close(z.grad, g - coef * e, rtol=1e-12, atol=1e-12)
    assert torch.equal(z.grad[2], g[2])
    # the operator's dense G is symmetric and idempotent, and kills z - q
    G = ResidualProjection().matrix(z0[:3], q0[:3])
    torch.testing.assert_close(G, G.transpose(-1, -2))
    torch.testing.assert_close(G @ G, G)
    torch.testing.assert_close((G @ e[:3, :, None])[[0, 1], ..., 0], torch.zeros(2, 5, dtype=G.dtype))


def test_eval_mode_is_deterministic_and_ignores_the_generator():
    z, q = pair()
    z.requires_grad_(True)
    a = rotvq.diveq(z, q, training=False, generator=torch.Generator().manual_seed(1))
    b = rotvq.diveq(z, q, training=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and torch.equal(a, q)


# ---------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("name", list(FUNCS))
def test_bad_input(name):
    fn = FUNCS[name]
    z, q = pair(n=4, d=3)
    with pytest.raises(ValueError):
        fn(z, q[:, :2])
    with pytest.raises(TypeError):
        fn(z, q.float())
    with pytest.raises(TypeError):
        fn(z.numpy(), q)
    with pytest.raises(TypeError):
        fn(z.long(), q.long())
    with pytest.raises(TypeError):
        fn(z, q, training=1)
    with pytest.raises(TypeError):
        fn(z, q, generator=0)


def test_bad_sigma():
    z, q = pair(n=4, d=3)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            rotvq.diveq(z, q, sigma=bad)
    for bad in ("0.1", None, True):
        with pytest.raises(TypeError):
            rotvq.diveq(z, q, sigma=bad)
