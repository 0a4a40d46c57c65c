"""The estimator contract: exact forward, G^T g backward, degenerate inputs, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotvq
from rotvq.backend import get_backend, set_backend
from reference import OPERATORS, dense_G, mp_rotation_vjp, textbook_householder, textbook_rotation, unit

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 2e-5, torch.float64: 1e-10}


@pytest.fixture(autouse=True, scope="module", params=["eager", "compiled"])
def backend(request):
    """Every test of this module runs under both backends (module scope: the compiled
    kernels are built once per dtype, not once per test)."""
    before = get_backend()
    set_backend(request.param)
    yield request.param
    assert get_backend() == request.param, "the compiled backend fell back to eager"
    set_backend(before)


def backward(fn, z, q, g):
    z = z.detach().clone().requires_grad_(True)
    out = fn(z, q)
    out.backward(g)
    return out, z.grad


def rel_err(a, b):
    a, b = a.double(), b.double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------
# Forward value


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_forward_is_exactly_q(name, dtype):
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(64, 33, generator=gen, dtype=torch.float64) * 100).to(dtype)
    q = (torch.randn(64, 33, generator=gen, dtype=torch.float64) * 0.37).to(dtype)
    assert not torch.equal(z + (q - z), q), "the test data must show the naive STE's rounding"
    out = rotvq.apply_estimator(z.requires_grad_(), q, rotvq.get_surrogate(name, **OPERATORS[name]))
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out, q)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_functions_forward_exact(dtype):
    z = (torch.randn(10, 5) * 3).to(dtype).requires_grad_()
    q = torch.randn(10, 5).to(dtype)
    G = torch.randn(5, 5).to(dtype)
    for out in (rotvq.ste(z, q), rotvq.rotation_trick(z, q), rotvq.rotation_trick(z, q, scale=False),
                rotvq.generalized_ste(z, q, G), rotvq.generalized_ste(z, q, rotvq.Householder())):
        assert torch.equal(out, q)
        assert out.requires_grad


def test_q_gets_no_gradient_and_z_does():
    z = torch.randn(4, 6, requires_grad=True)
    q = torch.randn(4, 6, requires_grad=True)
    out = rotvq.rotation_trick(z, q)
    out.pow(2).sum().backward()
    assert q.grad is None
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_without_grad_returns_q():
    z, q = torch.randn(3, 4), torch.randn(3, 4)
    assert rotvq.rotation_trick(z, q) is q
    with torch.no_grad():
        zz = z.clone().requires_grad_()
        assert rotvq.ste(zz, q) is q


# ---------------------------------------------------------------------------------
# Backward against the explicit-matrix route


@pytest.mark.parametrize("name", list(OPERATORS))
def test_backward_matches_dense_route_float64(name):
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64) * 2
    q = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64) * 0.5
    g = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    op = rotvq.get_surrogate(name, **OPERATORS[name])
    _, grad = backward(lambda a, b: rotvq.apply_estimator(a, b, op), z, q, g)
    G = dense_G(name, z, q, **OPERATORS[name])
    expected = (G.transpose(-1, -2) @ g[..., None])[..., 0]
    assert rel_err(grad, expected) < 1e-12
    # the same operator's dense matrix, and generalized_ste with that matrix
    assert torch.allclose(op.matrix(z, q), G, atol=1e-12)
    _, grad_dense = backward(lambda a, b: rotvq.generalized_ste(a, b, G), z, q, g)
    assert rel_err(grad_dense, expected) < 1e-12


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    d=st.integers(1, 40),
    zscale=st.floats(1e-3, 1e3),
    qscale=st.floats(1e-3, 1e3),
    dtype=st.sampled_from(DTYPES),
    name=st.sampled_from(list(OPERATORS)),
    seed=st.integers(0, 2**31 - 1),
)
def test_backward_random_shapes_scales_dtypes(lead, d, zscale, qscale, dtype, name, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, d)
    z = (torch.randn(shape, generator=gen, dtype=torch.float64) * zscale).to(dtype)
    q = (torch.randn(shape, generator=gen, dtype=torch.float64) * qscale).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    op = rotvq.get_surrogate(name, **OPERATORS[name])
    out, grad = backward(lambda a, b: rotvq.apply_estimator(a, b, op), z, q, g)
    assert torch.equal(out, q)
    assert grad.dtype == dtype and grad.shape == shape
    assert torch.isfinite(grad).all()
    zd, qd, gd = z.double(), q.double(), g.double()
    # reference from the exact (rounded) inputs, in float64, with the explicit matrices;
    # skip rows where the textbook formulas themselves are ill-conditioned
    c = (unit(zd) * unit(qd)).sum(-1)
    # rows where |z| is below the resolution of q use the documented fallback G = I
    ratio = torch.linalg.vector_norm(zd, dim=-1) / (torch.finfo(dtype).eps * torch.linalg.vector_norm(qd, dim=-1))
    if name != "ste":
        assert torch.equal(grad[ratio < 0.5], g[ratio < 0.5])
    ok = (c > -0.9) if name != "householder" else (c < 0.9)
    ok = ok & (ratio > 2)
    if d == 1:
        ok = ok & (c > 0) if name != "householder" else ok & False
    if not ok.any():
        return
    G = dense_G(name, zd[ok], qd[ok], **OPERATORS[name])
    expected = (G.transpose(-1, -2) @ gd[ok][..., None])[..., 0]
    # the result is rounded to the input dtype once
    tol = TOL[dtype] * (1 + expected.abs().max().item())
    assert (grad.double()[ok] - expected).abs().max().item() <= tol * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computed_in_float32(dtype):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(256, 64, generator=gen).to(dtype)
    q = torch.randn(256, 64, generator=gen).to(dtype)
    g = torch.randn(256, 64, generator=gen).to(dtype)
    _, grad = backward(rotvq.rotation_trick, z, q, g)
    # reference from the same rounded inputs in float64, then rounded once to dtype
    G = dense_G("rotation", z.double(), q.double())
    expected = (G.transpose(-1, -2) @ g.double()[..., None])[..., 0]
    assert torch.equal(grad, expected.to(torch.float32).to(dtype)) or rel_err(grad, expected) < torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------
# rotation_matrix


def test_rotation_matrix_properties_and_textbook_formula():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    q = torch.randn(20, 6, generator=gen, dtype=torch.float64) * 3
    R = rotvq.rotation_matrix(z, q)
    assert R.shape == (20, 6, 6)
    ref = textbook_rotation(z, q)
    ok = (unit(z) * unit(q)).sum(-1) > -0.9
    assert torch.allclose(R[ok], ref[ok], atol=1e-12)
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(20, dtype=torch.float64), atol=1e-12)
    assert torch.allclose((R @ unit(z)[..., None])[..., 0], unit(q), atol=1e-12)
    # fixes the orthogonal complement of span{z, q}
    v = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    basis = torch.linalg.qr(torch.stack([z, q], -1))[0]
    v = v - (basis @ (basis.transpose(-1, -2) @ v[..., None]))[..., 0]
    assert torch.allclose((R @ v[..., None])[..., 0], v, atol=1e-12)


# ---------------------------------------------------------------------------------
# Degenerate inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1.0, 2.0, 3.0, 0.1])
def test_antiparallel_is_documented_rotation_by_pi(dtype, c):
    gen = torch.Generator().manual_seed(5)
    d = 7
    z = torch.randn(8, d, generator=gen).to(dtype)
    q = (-c * z.double()).to(dtype)
    R = rotvq.rotation_matrix(z, q).double()
    zh = unit(z.double())
    k = zh.abs().argmin(-1)
    p = torch.nn.functional.one_hot(k, d).double() - zh.gather(-1, k[:, None]) * zh
    p = unit(p)
    eye = torch.eye(d, dtype=torch.float64)
    expected = eye - 2 * zh[..., :, None] * zh[..., None, :] - 2 * p[..., :, None] * p[..., None, :]
    tol = 10 * torch.finfo(dtype).eps
    assert (R - expected).abs().max().item() < tol
    for name in OPERATORS:
        g = torch.randn(8, d, generator=gen).to(dtype)
        out, grad = backward(lambda a, b: rotvq.apply_estimator(a, b, name), z, q, g)
        assert torch.equal(out, q)
        assert torch.isfinite(grad).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [1e-2, 1e-4, 1e-5, 1e-6])
def test_nearly_antiparallel_is_accurate(dtype, gap):
    """Within `gap` radians of antiparallel the gradient matches 50-digit arithmetic."""
    gen = torch.Generator().manual_seed(6)
    d = 32
    Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    worst = 0.0
    for _ in range(5):
        Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
        ang = math.pi - gap
        z = (2.5 * Q[:, 0]).to(dtype)
        q = (0.3 * (math.cos(ang) * Q[:, 0] + math.sin(ang) * Q[:, 1])).to(dtype)
        g = torch.randn(d, generator=gen, dtype=torch.float64).to(dtype)
        _, grad = backward(rotvq.rotation_trick, z, q, g)
        worst = max(worst, rel_err(grad, mp_rotation_vjp(z, q, g)))
    # the result is rounded to `dtype` once; the float64 inner computation loses ~1e-16/gap
    assert worst < 4 * torch.finfo(dtype).eps + 1e-15 / gap


def test_naive_formula_fails_where_rotvq_does_not():
    """The textbook formula in float32 is wrong near θ = π; rotvq is not."""
    d = 16
    gen = torch.Generator().manual_seed(7)
    Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    ang = math.pi - 1e-5
    z = Q[:, 0].float()
    q = (math.cos(ang) * Q[:, 0] + math.sin(ang) * Q[:, 1]).float()
    g = torch.randn(d, generator=gen)
    zh, qh = z / z.norm(), q / q.norm()
    naive = g + 2 * zh * (qh @ g) - (qh + zh) * ((qh + zh) @ g) / (1 + zh @ qh)
    ref = mp_rotation_vjp(z, q, g)
    _, grad = backward(rotvq.rotation_trick, z, q, g)
    assert not torch.isfinite(naive).all() or rel_err(naive, ref) > 0.1
    assert rel_err(grad, ref) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPERATORS))
def test_zero_and_tiny_z_fall_back_to_identity(dtype, name):
    d = 5
    q = torch.randn(4, d).to(dtype)
    g = torch.randn(4, d).to(dtype)
    tiny = torch.finfo(dtype).tiny
    z = torch.stack([torch.zeros(d), torch.full((d,), tiny), torch.full((d,), 1e-30), -torch.zeros(d)]).to(dtype)
    out, grad = backward(lambda a, b: rotvq.apply_estimator(a, b, name), z, q, g)
    assert torch.equal(out, q)
    assert torch.equal(grad, g), "a degenerate z uses G = I"


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_but_resolvable_z_keeps_the_scale(dtype):
    """|z| above the resolution of q is not degenerate: G = (|q|/|z|) R, finite."""
    eps = torch.finfo(dtype).eps
    z = torch.tensor([[4 * eps, 0.0, 0.0]], dtype=torch.float64).to(dtype)
    q = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64).to(dtype)
    g = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64).to(dtype)
    _, grad = backward(rotvq.rotation_trick, z, q, g)
    expected = dense_G("rotation", z.double(), q.double()).transpose(-1, -2) @ g.double()[..., None]
    assert torch.isfinite(grad).all()
    assert rel_err(grad, expected[..., 0]) < 4 * eps


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_q(dtype):
    z = torch.randn(3, 4).to(dtype)
    q = torch.zeros(3, 4, dtype=dtype)
    g = torch.randn(3, 4).to(dtype)
    for name, expected in [("rotation", torch.zeros_like(g)), ("rotation_unscaled", g),
                           ("rotation_interp", (0.5 * g.float()).to(dtype)), ("rotation_tangent", torch.zeros_like(g)),
                           ("rotation_clipped", (0.5 * g.float()).to(dtype))]:
        out, grad = backward(lambda a, b: rotvq.apply_estimator(a, b, name), z, q, g)
        assert torch.equal(out, q)
        assert torch.isfinite(grad).all()
        assert torch.allclose(grad.double(), expected.double(), atol=2 * torch.finfo(dtype).eps), name


def test_parallel_rotation_is_identity_and_householder_is_a_reflection():
    z = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    q = 2 * z
    R = rotvq.rotation_matrix(z, q)
    assert torch.allclose(R, torch.eye(3, dtype=torch.float64), atol=1e-15)
    H = rotvq.Householder(scale=False).matrix(z, q)
    assert torch.allclose(H @ H, torch.eye(3, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(torch.linalg.det(H), torch.tensor(-1.0, dtype=torch.float64))
    assert torch.allclose((H @ unit(z)[..., None])[..., 0], unit(q), atol=1e-14)


def test_householder_matches_textbook_and_maps_z_to_q():
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    q = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    H = rotvq.Householder(scale=False).matrix(z, q)
    assert torch.allclose(H, textbook_householder(z, q), atol=1e-12)
    assert torch.allclose((H @ unit(z)[..., None])[..., 0], unit(q), atol=1e-12)


def test_dimension_one():
    z = torch.tensor([[2.0], [3.0], [-1.0]], dtype=torch.float64)
    q = torch.tensor([[0.5], [-1.5], [-4.0]], dtype=torch.float64)
    R = rotvq.rotation_matrix(z, q)
    assert torch.equal(R[:, 0, 0], torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    g = torch.ones(3, 1, dtype=torch.float64)
    _, grad = backward(rotvq.rotation_trick, z, q, g)
    # G z = q in 1-D means G = q / z
    assert torch.allclose(grad, (q / z), atol=1e-15)


def test_empty_batch():
    z = torch.randn(0, 5, requires_grad=True)
    q = torch.randn(0, 5)
    out = rotvq.rotation_trick(z, q)
    out.sum().backward()
    assert out.shape == (0, 5) and z.grad.shape == (0, 5)


# ---------------------------------------------------------------------------------
# Bad input


def test_bad_inputs():
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        rotvq.rotation_trick(z, torch.randn(3, 5))
    with pytest.raises(ValueError, match="same shape"):
        rotvq.ste(z, torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        rotvq.ste(torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating"):
        rotvq.rotation_trick(z, torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        rotvq.ste(z, z.double())
    with pytest.raises(TypeError, match="Tensor"):
        rotvq.ste(z, [1.0, 2.0])
    with pytest.raises(ValueError, match="d = 4"):
        rotvq.generalized_ste(z, z, torch.eye(3))
    with pytest.raises(ValueError, match="shape"):
        rotvq.generalized_ste(z, z, torch.randn(4, 3))
    with pytest.raises(ValueError, match="broadcast"):
        rotvq.generalized_ste(z, z, torch.randn(5, 4, 4))
    with pytest.raises(TypeError, match="JacobianSurrogate"):
        rotvq.generalized_ste(z, z, "rotation")
    with pytest.raises(ValueError, match="unknown estimator"):
        rotvq.get_surrogate("rotate")
    with pytest.raises(ValueError):
        rotvq.ClippedRotation(lo=2.0, hi=1.0)
    with pytest.raises(ValueError):
        rotvq.InterpolatedRotation(t=1.5)
    with pytest.raises(TypeError):
        rotvq.Rotation(scale="yes")
    with pytest.raises(ValueError, match="at least 1"):
        rotvq.ste(torch.randn(3, 0), torch.randn(3, 0))


def test_dense_G_broadcasts_over_leading_dims():
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    q = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    G = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    _, grad = backward(lambda a, b: rotvq.generalized_ste(a, b, G), z, q, g)
    expected = torch.einsum("bnji,bnj->bni", G.detach().expand(2, 3, 4, 4), g)
    assert torch.allclose(grad, expected)
    assert G.grad is None


def test_custom_operator_subclass():
    class Halve(rotvq.JacobianSurrogate):
        needs_inputs = False

        def apply_transpose(self, g, z, q):
            return 0.5 * g

    z = torch.randn(3, 4, requires_grad=True)
    q = torch.randn(3, 4)
    out = rotvq.generalized_ste(z, q, Halve())
    out.sum().backward()
    assert torch.equal(out, q) and torch.allclose(z.grad, torch.full((3, 4), 0.5))
    assert torch.allclose(Halve().matrix(z.detach(), q), 0.5 * torch.eye(4).expand(3, 4, 4))


def test_gradcheck_of_the_backward_as_a_linear_map():
    """The backward is linear in g: check with autograd's gradcheck on a loss of z_q."""
    gen = torch.Generator().manual_seed(10)
    z = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    W = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    out = rotvq.rotation_trick(z, q)
    loss = ((out @ W) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, z)
    g = 2 * (q @ W) @ W.T
    G = dense_G("rotation", z.detach(), q)
    assert torch.allclose(grad, (G.transpose(-1, -2) @ g[..., None])[..., 0], atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_every_device(device):
    z = torch.randn(16, 8, device=device, requires_grad=True)
    q = torch.randn(16, 8, device=device)
    for name in OPERATORS:
        z.grad = None
        out = rotvq.apply_estimator(z, q, name)
        out.sum().backward()
        assert torch.equal(out, q) and z.grad.device == q.device and torch.isfinite(z.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    q = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    q[0] = -2 * z[0]
    g = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    for name in OPERATORS:
        _, a = backward(lambda x, y: rotvq.apply_estimator(x, y, name), z, q, g)
        _, b = backward(lambda x, y: rotvq.apply_estimator(x, y, name), z.cuda(), q.cuda(), g.cuda())
        assert torch.allclose(a, b.cpu(), atol=1e-12), name


@pytest.mark.parametrize("name", ["ste", "rotation", "rotation_tangent", "householder"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("which", ["both", "estimator", "error"])
def test_estimator_with_error_matches_unfused(name, dtype, which):
    """The VQ layer's fused node (estimator + per-row |z - t|^2) gives the values and the
    gradient of the two separate expressions, over several cache blocks of rows."""
    from rotvq.estimators import _apply_with_error

    gen = torch.Generator().manual_seed(3)
    n, d = 5000, 128  # 640k entries: more than one row block on CPU
    z0 = torch.randn(n, d, generator=gen).to(dtype)
    t = torch.randn(n, d, generator=gen)  # the codes, float32 (the layer's table dtype)
    q = t.to(dtype)
    g = torch.randn(n, d, generator=gen).to(dtype)
    w = torch.rand(n, generator=gen)
    acc = torch.promote_types(dtype, torch.float32)
    op = rotvq.get_surrogate(name)

    z = z0.clone().requires_grad_(True)
    zq, err = _apply_with_error(z, q, t, op, acc)
    assert torch.equal(zq, q) and err.dtype == acc
    outs, grads = {"both": ([zq, err], [g, w]), "estimator": ([zq], [g]), "error": ([err], [w])}[which]
    (fused,) = torch.autograd.grad(outs, z, grads)

    zr = z0.clone().requires_grad_(True)
    ref_err = (zr.to(acc) - t.to(acc)).pow(2).sum(1)
    torch.testing.assert_close(err, ref_err.detach(), rtol=1e-5, atol=1e-4)
    ref_outs = {"both": [rotvq.apply_estimator(zr, q, op), ref_err], "estimator": [rotvq.apply_estimator(zr, q, op)],
                "error": [ref_err]}[which]
    (ref,) = torch.autograd.grad(ref_outs, zr, grads)
    assert fused.dtype == dtype
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(fused, ref, **tol)
    if name == "ste" and which == "estimator":
        assert torch.equal(fused, g)  # straight-through: the gradient itself


def test_estimator_with_error_does_not_write_into_upstream_gradient():
    from rotvq.estimators import _apply_with_error

    z = torch.randn(64, 8, requires_grad=True)
    t = torch.randn(64, 8)
    g = torch.randn(64, 8)
    keep = g.clone()
    zq, err = _apply_with_error(z, t, t, rotvq.get_surrogate("ste"), torch.float32)
    torch.autograd.grad([zq, err.sum()], z, [g, None])
    assert torch.equal(g, keep)
