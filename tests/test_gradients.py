"""The reference gradients of rotvq.lab.gradients, each against an independent computation."""
from __future__ import annotations

import math

import pytest
import torch

import rotvq
from rotvq.lab import gradients as G
from rotvq.lab.models import MLPVQVAE, ConvVQVAE


@pytest.fixture(autouse=True, scope="module")
def float64_default():
    """Every tensor of this module in float64: the references are compared to 1e-8 and below."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def smooth_objective(d=3, seed=0):
    """A smooth, non-quadratic f(rows, u) with a different target per row."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(5, d, generator=gen)
    t = torch.randn(16, 5, generator=gen)

    def f(rows, u):
        return (torch.tanh(u @ A.T) - t[rows]).pow(2).sum(-1) + 0.1 * u.pow(4).sum(-1)
    return f


def test_value_and_grad_and_unquantized_row_by_row():
    f = smooth_objective()
    u = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    values, grad = G.value_and_grad(f, u)
    for i in range(3):
        ui = u[i].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(f(torch.tensor([i]), ui[None]).sum(), ui)
        torch.testing.assert_close(grad[i], gi)
    torch.testing.assert_close(G.unquantized(f, u), grad)


def test_taylor_is_gradient_plus_hessian_vector_product_by_finite_differences():
    f = smooth_objective()
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(16, 3, generator=gen)
    z = q + 0.3 * torch.randn(16, 3, generator=gen)
    v, h = z - q, 1e-5
    hv = (G.unquantized(f, q + h * v) - G.unquantized(f, q - h * v)) / (2 * h)
    torch.testing.assert_close(G.taylor(f, z, q), G.unquantized(f, q) + hv, rtol=1e-7, atol=1e-8)
    # exact for a quadratic: the Taylor transport is the gradient at z
    A = torch.randn(4, 3, generator=gen)
    quad = lambda rows, u: (u @ A.T - 1.0).pow(2).sum(-1)  # noqa: E731
    torch.testing.assert_close(G.taylor(quad, z, q), G.unquantized(quad, z))


def test_softmax_smoothed_against_an_explicit_soft_code_and_the_covariance_form():
    f = smooth_objective()
    gen = torch.Generator().manual_seed(3)
    codebook = torch.randn(7, 3, generator=gen)
    z = torch.randn(16, 3, generator=gen)
    for tau in (0.05, 0.5, 3.0):
        expected = []
        for i in range(16):
            zi = z[i].clone().requires_grad_(True)
            logits = torch.stack([-((zi - e) ** 2).sum() / tau for e in codebook])
            w = torch.exp(logits - logits.max())
            soft = (w / w.sum()) @ codebook
            (gi,) = torch.autograd.grad(f(torch.tensor([i]), soft[None]).sum(), zi)
            expected.append(gi)
        got = G.softmax_smoothed(f, z, codebook, tau)
        torch.testing.assert_close(got, torch.stack(expected))
        # (2/tau) Cov_p(e) grad f(q_tau): the Jacobian of the soft code is symmetric
        p = G.soft_assignment(z, codebook, tau)
        qt = p @ codebook
        centred = codebook[None] - qt[:, None]  # (n, K, d)
        cov = torch.einsum("nk,nki,nkj->nij", p, centred, centred)
        form = 2 / tau * (cov @ G.unquantized(f, qt)[..., None])[..., 0]
        torch.testing.assert_close(got, form)
    with pytest.raises(ValueError):
        G.soft_assignment(z, codebook, 0.0)


def two_codes(d=3):
    codebook = torch.tensor([[0.0] * d, [1.0] + [0.0] * (d - 1)]) + 0.2
    target = torch.tensor([0.3, -0.7, 1.1, 0.4, 0.0][:d])

    def f(rows, u):  # a quadratic decoder's loss |2u - t|^2, the same for every row
        return (2 * u - target).pow(2).sum(-1)
    return codebook, f


def closed_form(f, codebook, z, sigma):
    """grad E F(z + sigma eps) for two codes: (f1 - f0) phi(s/sigma)/sigma along the normal."""
    normal = (codebook[1] - codebook[0]) / (codebook[1] - codebook[0]).norm()
    mid = (codebook[0] + codebook[1]) / 2
    s = (z - mid) @ normal  # signed distance to the bisector, positive on code 1's side
    phi = torch.exp(-(s / sigma) ** 2 / 2) / math.sqrt(2 * math.pi)
    jump = f(torch.zeros(1, dtype=torch.long), codebook[1:]) - f(torch.zeros(1, dtype=torch.long), codebook[:1])
    return (jump * phi / sigma)[:, None] * normal


def test_gaussian_smoothed_against_the_closed_form_and_its_standard_error():
    codebook, f = two_codes()
    gen = torch.Generator().manual_seed(4)
    z = torch.tensor([[0.6, 0.1, -0.2], [0.9, 0.0, 0.3], [0.2, 0.5, 0.5], [0.75, -0.3, 0.0]]) + 0.2
    z = z.repeat(6, 1)  # 24 rows: 6 independent estimates of each of 4 points
    sigma = 0.3
    est = G.gaussian_smoothed(f, z, codebook, sigma, pairs=4000, generator=gen, chunk=5)
    exact = closed_form(f, codebook, z, sigma)
    zscore = (est.mean - exact).norm(dim=-1) / est.se
    assert zscore.max() < 4.5  # |error| within the reported standard error
    # the standard error is calibrated: E|error|^2 = se^2
    assert 0.5 < zscore.pow(2).mean() < 1.6
    assert est.evaluations <= 2 * len(z)  # two codes: f evaluated at most twice per row
    # shrinking sigma: the smoothed gradient vanishes off the boundary (the limit is 0)
    far = torch.tensor([[0.05, 0.0, 0.0]]) + 0.2
    tiny = G.gaussian_smoothed(f, far, codebook, 0.02, pairs=2000, generator=gen)
    assert torch.equal(tiny.mean, torch.zeros_like(tiny.mean)) and tiny.se.item() == 0
    with pytest.raises(ValueError):
        G.gaussian_smoothed(f, z, codebook, 0.0)


def test_gaussian_smoothed_is_seeded():
    codebook, f = two_codes()
    z = torch.tensor([[0.6, 0.1, -0.2]])
    a = G.gaussian_smoothed(f, z, codebook, 0.3, pairs=100, generator=torch.Generator().manual_seed(1))
    b = G.gaussian_smoothed(f, z, codebook, 0.3, pairs=100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.se, b.se)


def test_boundary_distance():
    gen = torch.Generator().manual_seed(5)
    codebook = torch.randn(9, 4, generator=gen)
    codebook[8] = codebook[0]  # a duplicate code has no boundary with its twin
    z = 2 * torch.randn(200, 4, generator=gen)
    index = rotvq.nearest_code(z, codebook)
    b = G.boundary_distance(z, codebook, index, chunk=37)
    for i in range(0, 200, 23):
        q = codebook[index[i]]
        best = math.inf
        for e in codebook:
            if torch.equal(e, q):
                continue
            normal = (e - q) / (e - q).norm()
            best = min(best, float(((e + q) / 2 - z[i]) @ normal))
        assert b[i].item() == pytest.approx(best, rel=1e-12)
    # stepping just past the nearest bisector leaves the cell; stepping short of it does not
    i = 0
    q = codebook[index[i]]
    dists = [(float(((e + q) / 2 - z[i]) @ ((e - q) / (e - q).norm())), e) for e in codebook
             if not torch.equal(e, q)]
    dist, e = min(dists, key=lambda t: t[0])
    normal = (e - q) / (e - q).norm()
    assert rotvq.nearest_code((z[i] + 0.999 * dist * normal)[None], codebook).item() == index[i]
    assert rotvq.nearest_code((z[i] + 1.001 * dist * normal)[None], codebook).item() != index[i]
    assert (b > 0).all()
    other = G.nearest_other_code(index, codebook)
    assert (other > 0).all()
    assert other[index == 0].min() == pytest.approx(torch.cdist(codebook[:1], codebook[1:8]).min().item())


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_latent_objective_is_the_models_loss_with_one_latent_replaced(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = MLPVQVAE(12, 16, 3, 5, num_latents=2).float()
        x = torch.randn(6, 12, dtype=torch.float32)
    else:
        model = ConvVQVAE(2, 8, 3, 5).float()
        x = torch.randn(3, 2, 4, 4, dtype=torch.float32)
    obj = G.LatentObjective(model, x)
    m = obj.model  # the float64 copy
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched
    with torch.no_grad():
        z_all = m.encode(x.double())
    L = obj.latents.shape[1]
    assert len(obj) == x.shape[0] * L
    torch.testing.assert_close(obj.z, z_all.reshape(len(x), L, -1).reshape(-1, 3))
    torch.testing.assert_close(obj.q, obj.codebook[rotvq.nearest_code(obj.z, obj.codebook)])
    # f at the code is the loss of the fully quantized input, for every latent of it
    full = (m.decode(obj.latents.reshape(len(x), *z_all.shape[1:])) - x.double()).pow(2).flatten(1).sum(1)
    rows = torch.arange(len(obj))
    torch.testing.assert_close(obj(rows, obj.q), full[obj.positions[:, 0]])
    # its gradient is the full loss's gradient with respect to that latent
    latents = obj.latents.clone().requires_grad_(True)
    loss = (m.decode(latents.reshape(len(x), *z_all.shape[1:])) - x.double()).pow(2).sum()
    (grad_all,) = torch.autograd.grad(loss, latents)
    torch.testing.assert_close(G.unquantized(obj, obj.q), grad_all[obj.positions[:, 0], obj.positions[:, 1]])
    # chunked evaluation without a graph equals the differentiable one
    obj.batch = 4
    u = obj.z + 0.1
    with torch.no_grad():
        chunked = obj(rows, u)
    torch.testing.assert_close(chunked, obj._loss(rows, u))
    # a subset of positions
    sub = G.LatentObjective(model, x, obj.positions[[3, 1]])
    torch.testing.assert_close(sub.z, obj.z[[3, 1]])


def test_estimator_and_stochastic_gradients():
    f = smooth_objective()
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(16, 3, generator=gen)
    z = q + 0.3 * torch.randn(16, 3, generator=gen)
    g = G.unquantized(f, q)
    grads = G.estimator_gradients(g, z, q, ["ste", "rotation"])
    assert torch.equal(grads["ste"], g)
    torch.testing.assert_close(grads["rotation"], rotvq.Rotation().vjp(g, z, q))
    draws = G.stochastic_gradients(f, z, q, "nsvq", draws=2, generator=torch.Generator().manual_seed(7))
    leaf = z.clone().requires_grad_(True)
    point = rotvq.noise_substitution(leaf, q, generator=torch.Generator().manual_seed(7))
    (first,) = torch.autograd.grad(f(torch.arange(16), point).sum(), leaf)
    torch.testing.assert_close(draws[0], first)
    assert not torch.equal(draws[0], draws[1])
    dv = G.stochastic_gradients(f, z, q, "diveq", draws=1, sigma=1e-9, generator=torch.Generator().manual_seed(1))
    e = (z - q) / (z - q).norm(dim=-1, keepdim=True)
    gd = G.unquantized(f, q)  # DiVeQ's forward is (almost) q
    torch.testing.assert_close(dv[0], gd - (e * gd).sum(-1, keepdim=True) * e, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        G.stochastic_gradients(f, z, q, "ste", draws=1)


def test_cosine_and_relative_error():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert G.cosine(a, b).tolist() == [1.0, 0.0, 0.0]
    err = G.relative_error(a, b)
    assert err[0].item() == 0.5 and err[1].item() == 1.0 and math.isinf(err[2].item())
