"""Independent reference formulas for the estimator tests.

Everything here is written from the textbook formulas with explicit d×d matrices, in
float64 or in mpmath at 50 digits, and shares no code with :mod:`rotvq.operators`.
"""
from __future__ import annotations

import mpmath
import torch

mpmath.mp.dps = 50

#: Every named estimator with the options the tests use (rotvq.get_surrogate(name, **options)).
OPERATORS = {
    "ste": {},
    "rotation": {},
    "rotation_unscaled": {},
    "rotation_clipped": {"lo": 0.5, "hi": 1.5},
    "rotation_interp": {"t": 0.3},
    "rotation_tangent": {},
    "householder": {},
}


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def textbook_rotation(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """R = I + 2 q̂ ẑᵀ − (q̂ + ẑ)(q̂ + ẑ)ᵀ / (1 + cos θ), batched, float64."""
    z, q = z.double(), q.double()
    zh, qh = unit(z), unit(q)
    c = (zh * qh).sum(-1)[..., None, None]
    d = z.shape[-1]
    s = zh + qh
    eye = torch.eye(d, dtype=torch.float64)
    return eye + 2 * qh[..., :, None] * zh[..., None, :] - s[..., :, None] * s[..., None, :] / (1 + c)


def textbook_householder(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    z, q = z.double(), q.double()
    v = unit(unit(z) - unit(q))
    d = z.shape[-1]
    return torch.eye(d, dtype=torch.float64) - 2 * v[..., :, None] * v[..., None, :]


def scale(z, q):
    return (torch.linalg.vector_norm(q.double(), dim=-1) / torch.linalg.vector_norm(z.double(), dim=-1))[..., None, None]


def dense_G(name: str, z: torch.Tensor, q: torch.Tensor, **opt) -> torch.Tensor:
    """The dense G of each named operator from explicit matrices (float64)."""
    d = z.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    lam = scale(z, q)
    R = textbook_rotation(z, q)
    if name == "ste":
        return eye.expand(*z.shape[:-1], d, d)
    if name == "rotation":
        return lam * R
    if name == "rotation_unscaled":
        return R
    if name == "rotation_clipped":
        return lam.clamp(opt.get("lo", 0.5), opt.get("hi", 1.5)) * R
    if name == "rotation_interp":
        t = opt.get("t", 0.5)
        return t * lam * R + (1 - t) * eye
    if name == "rotation_tangent":
        zh = unit(z.double())
        P = eye - zh[..., :, None] * zh[..., None, :]
        # G^T = λ P R^T  =>  G = λ R P
        return lam * R @ P
    if name == "householder":
        return lam * textbook_householder(z, q)
    raise KeyError(name)


def mp_rotation_vjp(z, q, g, scaled=True):
    """λ Rᵀ g for one vector pair in 50-digit arithmetic (the inputs' exact values)."""
    Z = [mpmath.mpf(float(x)) for x in z.double()]
    Q = [mpmath.mpf(float(x)) for x in q.double()]
    G = [mpmath.mpf(float(x)) for x in g.double()]
    nz = mpmath.sqrt(sum(x * x for x in Z))
    nq = mpmath.sqrt(sum(x * x for x in Q))
    zh = [x / nz for x in Z]
    qh = [x / nq for x in Q]
    c = sum(a * b for a, b in zip(zh, qh))
    a = sum(x * y for x, y in zip(qh, G))
    b = sum(x * y for x, y in zip(zh, G))
    k = (a + b) / (1 + c)
    lam = nq / nz if scaled else 1
    return torch.tensor([float(lam * (G[i] + zh[i] * (2 * a - k) - qh[i] * k)) for i in range(len(Z))], dtype=torch.float64)


def clustered(k=5, per=40, d=3, sep=100.0, noise=0.1, seed=0):
    """k well-separated Gaussian clusters: (x (k*per, d), centers (k, d), labels (k*per,))."""
    g = torch.Generator().manual_seed(seed)
    centers = sep * torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(per)
    return centers[labels] + noise * torch.randn(k * per, d, generator=g), centers, labels
