r"""Two stochastic estimators from the literature: NSVQ (2022) and DiVeQ (2025).

These two do **not** keep the promise of :mod:`rotvq.estimators`. In training their
forward value is ``q`` plus a random error of the size of ``|z - q|`` (NSVQ) or a
randomly perturbed copy of ``q`` (DiVeQ), not ``q`` itself: the decoder sees a point near
the code, and the gradient is the derivative of that random point. So they have their own
functions, with a ``training`` flag:

* :func:`noise_substitution` -- NSVQ, Vali and Bäckström, *NSVQ: Noise Substitution in
  Vector Quantization for Machine Learning*, IEEE Access 10 (2022), 13598--13610: the
  quantization error ``q - z`` is replaced by a vector of the same length in a random
  direction,

  .. math:: \tilde z = z + \|z - q\|\,\frac{v}{\|v\|}, \qquad v \sim \mathcal N(0, I_d).

* :func:`diveq` -- DiVeQ, Vali, Bäckström and Solin, *DiVeQ: Differentiable Vector
  Quantization Using the Reparameterization Trick* (arXiv 2509.26469): the error keeps
  its length, and its direction, the direction to the code perturbed by a small noise,
  sits inside a stop-gradient,

  .. math:: \tilde z = z + \|q - z\|\,\mathrm{sg}\Big[\frac{q - z + n}{\|q - z + n\|}\Big],
            \qquad n \sim \mathcal N(0, \sigma^2 I_d).

Both are written from the papers' formulas and checked against the authors' code
(``NSVQ.py`` in github.com/MHVali/Noise-Substitution-in-Vector-Quantization; 
``vqvae_compression/diveq.py`` and ``diveq_detach.py`` in github.com/AaltoML/DiVeQ, commit
``9b288d0``); none of that code is copied here. Two facts of the authors' code matter:
in both, the length ``|z - q|`` is differentiated with respect to ``z`` *and* to the code
(the codebook learns through it, without a codebook loss), and DiVeQ's default noise is
``torch.distributions.Normal(0, noise_var)`` with ``noise_var = 1e-3``, so ``1e-3`` is the
noise's *standard deviation* (the parameter is called a variance there). ``sigma``
here is that standard deviation, default ``1e-3``.

**Backward** (derived in :ref:`ch-estimates`, :eq:`est-nsvq` and :eq:`est-expect`). With
``ê = (z - q)/|z - q|`` and ``ĝ`` the gradient at the forward value:

* NSVQ: ``dL/dz = ĝ + (u·ĝ) ê`` with ``u = v/|v|``; ``dL/dq = -(u·ĝ) ê``;
* DiVeQ: ``dL/dz = ĝ + (w·ĝ) ê`` with ``w`` the unit direction in the stop-gradient;
  ``dL/dq = -(w·ĝ) ê``. For ``σ -> 0``, ``w -> -ê`` and ``dL/dz -> ĝ - (ê·ĝ) ê``: the
  part of the gradient along ``z - q`` is removed.

On a row with ``z = q`` the length is 0, its derivative is taken as 0 (as torch's norm
does), and both return ``z`` (which is ``q``) with the gradient ``ĝ``.

**Eval mode** (``training=False``) is deterministic and keeps the exact-forward promise:
both return ``q`` itself (bitwise, through :func:`rotvq.generalized_ste`) and no
gradient reaches ``q``. The backward is the training Jacobian's noise-free counterpart:

* NSVQ: the straight-through ``dL/dz = g``, which is the mean of its training Jacobian
  ``I + u ê^T`` over the random direction (``E[u] = 0``);
* DiVeQ: ``dL/dz = g - (ê·g) ê`` (the limit ``σ -> 0``, and the authors'
  "detach" variant), :class:`ResidualProjection`; ``g`` on rows with ``z = q``.

Randomness: the noise is drawn from ``generator`` (a :class:`torch.Generator` on the
device of ``z``) or, with ``generator=None``, from torch's global generator; one draw per
vector. The same seed gives the same result, bitwise, on the same machine.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_vector_pair, compute_dtype
from .estimators import generalized_ste, ste
from .operators import JacobianSurrogate

__all__ = ["noise_substitution", "diveq", "ResidualProjection", "STOCHASTIC_NAMES"]

#: The stochastic estimators, by the names the book uses.
STOCHASTIC_NAMES: tuple[str, ...] = ("nsvq", "diveq")


class ResidualProjection(JacobianSurrogate):
    r"""``G = I - ê ê^T`` with ``ê = (z - q)/|z - q|`` (``G = I`` where ``z = q``).

    The backward of :func:`diveq` in eval mode: the noise-free limit of its training
    Jacobian (the component of the gradient along the quantization error is removed).
    ``G`` is symmetric, so ``G^T g = g - (ê·g) ê``.
    """

    def apply_transpose(self, g, z, q):
        e = z - q
        ee = (e * e).sum(-1, keepdim=True)
        eg = (e * g).sum(-1, keepdim=True)
        coef = torch.where(ee > 0, eg / torch.where(ee > 0, ee, torch.ones_like(ee)),
                           torch.zeros_like(ee))
        return g - coef * e


_RESIDUAL_PROJECTION = ResidualProjection()


def _check_flags(training: object, generator: object, z: torch.Tensor) -> None:
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if generator.device.type != z.device.type:
            raise ValueError(f"the generator is on {generator.device}, z on {z.device}")


def _normal(shape, z: torch.Tensor, dtype: torch.dtype,
            generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of ``shape`` in ``dtype`` on the device of ``z``."""
    return torch.randn(shape, generator=generator, dtype=dtype, device=z.device)


def _length(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``|z - q|`` per row, ``(..., 1)``, differentiable in both (derivative 0 at z = q)."""
    return torch.linalg.vector_norm(z - q, dim=-1, keepdim=True)


def noise_substitution(z: torch.Tensor, q: torch.Tensor, *,
                       generator: torch.Generator | None = None,
                       training: bool = True) -> torch.Tensor:
    r"""NSVQ (Vali and Bäckström 2022): ``z + |z - q| v/|v|``, ``v ~ N(0, I)``, in training.

    Args:
        z: ``(..., d)`` encoder outputs, floating point.
        q: ``(..., d)`` their codes, same shape, dtype and device. In training, ``q``
            receives the gradient ``-(u·ĝ) ê`` if it requires one.
        generator: where the random directions come from (``None``: torch's global
            generator); one direction per vector.
        training: ``False`` returns ``q`` exactly with the straight-through backward.

    Returns:
        ``(..., d)``: in training, a point at distance ``|z - q|`` from ``z`` in a
        uniformly random direction, differentiable as in the module docstring; in eval
        mode, ``q`` (bitwise).

    Raises:
        TypeError: non-tensor or non-floating inputs, different dtypes, a non-bool
            ``training`` or a ``generator`` that is not a :class:`torch.Generator`.
        ValueError: shapes or devices of ``z`` and ``q`` differ; a generator on another
            device.
    """
    check_vector_pair(z, q)
    _check_flags(training, generator, z)
    if not training:
        return ste(z, q)  # the mean of the training Jacobian I + u ê^T over u is I
    cd = compute_dtype(z.dtype)
    v = _normal(z.shape, z, cd, generator)
    u = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(cd).tiny)
    zc, qc = z.to(cd), q.to(cd)
    return (zc + _length(zc, qc) * u).to(z.dtype)  # noise substitution


def diveq(z: torch.Tensor, q: torch.Tensor, *, sigma: float = 1e-3,
          generator: torch.Generator | None = None, training: bool = True) -> torch.Tensor:
    r"""DiVeQ (Vali, Bäckström and Solin 2025): ``z + |q - z| sg[(q - z + n)/|q - z + n|]``.

    Args:
        z: ``(..., d)`` encoder outputs, floating point.
        q: ``(..., d)`` their codes, same shape, dtype and device. In training, ``q``
            receives the gradient ``-(w·ĝ) ê`` if it requires one.
        sigma: standard deviation of the noise ``n`` added to the direction (the
            authors' default ``1e-3``); positive and finite.
        generator: where the noise comes from (``None``: torch's global generator).
        training: ``False`` returns ``q`` exactly with the backward ``g - (ê·g) ê``
            (:class:`ResidualProjection`).

    Returns:
        ``(..., d)``: in training, the point at distance ``|q - z|`` from ``z`` in the
        perturbed direction of ``q`` (close to ``q`` for small ``sigma``); in eval mode
        ``q`` (bitwise).

    Raises:
        TypeError: as :func:`noise_substitution`, or a ``sigma`` that is not a number.
        ValueError: as :func:`noise_substitution`, or ``sigma`` not positive and finite.
    """
    check_vector_pair(z, q)
    _check_flags(training, generator, z)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a number, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be positive and finite, got {sigma!r}")
    if not training:
        return generalized_ste(z, q, _RESIDUAL_PROJECTION)
    cd = compute_dtype(z.dtype)
    zc, qc = z.to(cd), q.to(cd)
    with torch.no_grad():
        direction = qc - zc + sigma * _normal(z.shape, z, cd, generator)
        w = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp_min(
            torch.finfo(cd).tiny)
    return (zc + _length(zc, qc) * w).to(z.dtype)  # the direction sits inside sg[.]
