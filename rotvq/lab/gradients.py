r"""Reference gradients at the encoder output of a trained VQ-VAE, and the estimators' gradients.

The chapter "What do the estimators estimate?" (``book/estimates.ipynb``) asks how close each
estimator's gradient comes to a gradient that is actually defined. Its unit is *one encoder
output*: for a trained model, an input ``x`` and one of its latent positions, let

    f(u) = || dec(q_1, ..., u, ..., q_L) - x ||^2

be the reconstruction loss (summed over the pixels of ``x``) when the decoder gets ``u`` at that
position and the codes ``q_j`` at all the others. Training sees ``F(u) = f(VQ(u))``, which is
constant on every Voronoi cell: its derivative is zero almost everywhere (``book/ste.ipynb``).
The estimators all start from ``g = ∇f(q)``, the gradient at the code. The references, at the
encoder output ``z`` with code ``q``:

* :func:`unquantized` -- ``∇f(z)``, the decoder fed ``z`` itself (:eq:`est-unq`): what "copying
  the gradient" pretends to compute;
* :func:`taylor` -- ``∇f(q) + ∇²f(q)(z - q)``, the gradient at the code carried to ``z`` with one
  Taylor term, the Hessian-vector product by double backward (:eq:`est-unq`);
* :func:`softmax_smoothed` -- ``∇_z f(q_τ(z))`` with the soft code
  ``q_τ(z) = Σ_k p_k e_k``, ``p = softmax(-|z - e_k|² / τ)`` over all ``K`` codes, exact by
  enumeration (:eq:`est-soft`);
* :func:`gaussian_smoothed` -- ``∇_z E F(z + σε)``, ``ε ~ N(0, I)``, by antithetic Monte Carlo
  with the standard error of the estimate (:eq:`est-gauss`): ``E[(F(z+σε) - F(z-σε)) ε] / (2σ)``,
  where ``F`` takes only the values ``f(e_k)``, so ``f`` is evaluated once per distinct (encoder
  output, code) pair that the samples reach.

An objective is a callable ``f(rows, u) -> (m,)``: ``rows`` ``(m,)`` indexes the encoder outputs,
``u`` ``(m, d)`` the points; each value depends on its own row only, so one backward pass gives
every row's gradient. :class:`LatentObjective` builds one from a model of :mod:`rotvq.lab.models`.
:func:`estimator_gradients` gives the deterministic estimators' ``G^T g`` and
:func:`stochastic_gradients` draws NSVQ's and DiVeQ's (:mod:`rotvq.stochastic`) through autograd,
the decoder's gradient taken at their own forward value.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

from ..estimators import get_surrogate
from ..search import nearest_code
from ..stochastic import diveq, noise_substitution

__all__ = ["LatentObjective", "value_and_grad", "unquantized", "taylor", "soft_assignment",
           "softmax_smoothed", "gaussian_smoothed", "GaussianEstimate", "boundary_distance",
           "nearest_other_code", "estimator_gradients", "stochastic_gradients", "cosine",
           "relative_error"]

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LatentObjective:
    """``f(rows, u)``: the loss of a trained model when one latent vector is replaced by ``u``.

    Args:
        model: a :class:`~rotvq.lab.models.MLPVQVAE` or :class:`~rotvq.lab.models.ConvVQVAE`
            (a copy in ``dtype`` and eval mode is used; the model itself is not changed).
        x: inputs ``(B, ...)`` as the model takes them.
        positions: ``(n, 2)`` int64 pairs (input index, latent index in the flattened latent
            grid); default: every latent of every input.
        dtype: the dtype everything is computed in (float64 by default: the references are
            then far above rounding).
        batch: rows per decoder call when no gradient is needed.

    Attributes:
        z, q: ``(n, d)`` the selected encoder outputs and their codes.
        index: ``(n,)`` the codes' indices; codebook: ``(K, d)``.
        latents: ``(B, L, d)`` every input's codes (the decoder's other inputs).
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor,
                 positions: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float64,
                 batch: int = 2048) -> None:
        self.model = copy.deepcopy(model).to(dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.x = x.to(dtype)
        self.batch = batch
        with torch.no_grad():
            z_all = self.model.encode(self.x)  # (B, ..., d), channel-last
            self.latent_shape = tuple(z_all.shape[1:-1])
            d = z_all.shape[-1]
            z_all = z_all.reshape(z_all.shape[0], -1, d)  # (B, L, d)
            self.codebook = self.model.quantizer.embedding.detach().to(dtype)  # (K, d)
            index_all = nearest_code(z_all, self.codebook)  # (B, L)
        self.latents = self.codebook[index_all]  # (B, L, d)
        if positions is None:
            b, l = torch.meshgrid(torch.arange(z_all.shape[0]), torch.arange(z_all.shape[1]),
                                  indexing="ij")
            positions = torch.stack([b.flatten(), l.flatten()], 1)
        self.positions = positions.long()
        self.z = z_all[self.positions[:, 0], self.positions[:, 1]]  # (n, d)
        self.index = index_all[self.positions[:, 0], self.positions[:, 1]]  # (n,)
        self.q = self.codebook[self.index]

    def __len__(self) -> int:
        return len(self.z)

    def _loss(self, rows: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        b, l = self.positions[rows, 0], self.positions[rows, 1]
        inputs = self.latents[b].clone()  # (m, L, d)
        inputs[torch.arange(len(rows)), l] = u  # the one latent replaced, differentiably
        recon = self.model.decode(inputs.reshape(len(rows), *self.latent_shape, -1))
        return (recon - self.x[b]).pow(2).flatten(1).sum(1)  # (m,)

    def __call__(self, rows: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and u.requires_grad:
            return self._loss(rows, u)
        with torch.no_grad():
            return torch.cat([self._loss(rows[s:s + self.batch], u[s:s + self.batch])
                              for s in range(0, len(rows), self.batch)] or [u.new_zeros(0)])


def _rows(u: torch.Tensor) -> torch.Tensor:
    return torch.arange(len(u))


def value_and_grad(f: Objective, u: torch.Tensor,
                   rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(rows, u), ∇_u f(rows, u))`` row by row (one backward pass)."""
    rows = _rows(u) if rows is None else rows
    with torch.enable_grad():
        leaf = u.detach().clone().requires_grad_(True)
        values = f(rows, leaf)
        (grad,) = torch.autograd.grad(values.sum(), leaf)
    return values.detach(), grad


def unquantized(f: Objective, z: torch.Tensor) -> torch.Tensor:
    """``∇f(z)``: the gradient with the decoder fed the encoder output itself (eq. est-unq)."""
    return value_and_grad(f, z)[1]


def taylor(f: Objective, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``∇f(q) + ∇²f(q) (z - q)``: the gradient at the code transported to ``z`` with one
    Taylor term; the Hessian-vector product by double backward (eq. est-unq)."""
    rows = _rows(z)
    with torch.enable_grad():
        leaf = q.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(rows, leaf).sum(), leaf, create_graph=True)
        (hvp,) = torch.autograd.grad((grad * (z - q).detach()).sum(), leaf)
    return grad.detach() + hvp


def soft_assignment(z: torch.Tensor, codebook: torch.Tensor, tau: float) -> torch.Tensor:
    """``p_k(z) = softmax_k(-|z - e_k|² / τ)``, ``(n, K)``, differentiable in ``z``."""
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau!r}")
    sq = (z * z).sum(-1, keepdim=True) - 2 * z @ codebook.T + (codebook * codebook).sum(-1)
    return torch.softmax(-sq / tau, dim=-1)


def softmax_smoothed(f: Objective, z: torch.Tensor, codebook: torch.Tensor,
                     tau: float) -> torch.Tensor:
    """``∇_z f(q_τ(z))`` with the soft code ``q_τ(z) = p(z) @ codebook`` over all ``K`` codes
    (eq. est-soft); equal to ``(2/τ) Cov_p(e) ∇f(q_τ)``."""
    rows = _rows(z)
    with torch.enable_grad():
        leaf = z.detach().clone().requires_grad_(True)
        soft = soft_assignment(leaf, codebook, tau) @ codebook
        (grad,) = torch.autograd.grad(f(rows, soft).sum(), leaf)
    return grad


class GaussianEstimate(tuple):
    """``(mean, se, evaluations, halves)``: the Monte Carlo estimate ``(n, d)``, its standard
    error per row ``sqrt(tr Cov / pairs)`` ``(n,)``, how many values of ``f`` it took, and the
    estimates from the first and the second half of the pairs ``(2, n, d)`` (their cosine
    says how well the direction is resolved)."""

    __slots__ = ()

    def __new__(cls, mean, se, evaluations, halves):
        return super().__new__(cls, (mean, se, evaluations, halves))

    mean = property(lambda self: self[0])
    se = property(lambda self: self[1])
    evaluations = property(lambda self: self[2])
    halves = property(lambda self: self[3])


@torch.no_grad()
def gaussian_smoothed(f: Objective, z: torch.Tensor, codebook: torch.Tensor, sigma: float, *,
                      pairs: int = 1024, generator: torch.Generator | None = None,
                      chunk: int = 16, rows: torch.Tensor | None = None) -> GaussianEstimate:
    """``∇_z E F(z + σε)`` for ``F = f ∘ VQ`` and ``ε ~ N(0, I)``, by antithetic Monte Carlo.

    With ``pairs`` draws ``ε_s`` per row, the estimate is the mean of
    ``h_s = (F(z + σε_s) - F(z - σε_s)) ε_s / (2σ)`` (Stein's identity, each of the two halves
    unbiased; eq. est-gauss), and the standard error is ``sqrt(tr Cov(h) / pairs)``. ``F``
    takes only the values ``f(e_k)``: ``f`` is evaluated once per distinct (row, code) pair
    reached, not once per sample.

    Args:
        f: the objective; z: ``(n, d)``; codebook: ``(K, d)``; sigma: the scale, > 0.
        pairs: antithetic pairs per row. generator: the source of ``ε``.
        chunk: rows per batch of samples (memory: ``chunk * pairs * (d + K)`` numbers).
        rows: the objective's row of each ``z`` (default ``0..n-1``).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    n, d = z.shape
    k = len(codebook)
    rows = _rows(z) if rows is None else rows
    means, ses, halves, evaluations = [], [], [], 0
    for start in range(0, n, chunk):
        zc, rc = z[start:start + chunk], rows[start:start + chunk]
        c = len(zc)
        eps = torch.randn(c, pairs, d, generator=generator, dtype=z.dtype, device=z.device)
        plus = nearest_code(zc[:, None] + sigma * eps, codebook)  # (c, pairs)
        minus = nearest_code(zc[:, None] - sigma * eps, codebook)
        local = torch.arange(c, device=z.device)[:, None]
        keys = torch.cat([(local * k + plus).flatten(), (local * k + minus).flatten()])
        unique, inverse = torch.unique(keys, return_inverse=True)
        values = f(rc[unique // k], codebook[unique % k])  # one f per (row, code) reached
        evaluations += len(unique)
        f_plus = values[inverse[: c * pairs]].view(c, pairs)
        f_minus = values[inverse[c * pairs:]].view(c, pairs)
        h = ((f_plus - f_minus) / (2 * sigma))[..., None] * eps  # (c, pairs, d)
        means.append(h.mean(1))
        ses.append((h.var(1).sum(-1) / pairs).sqrt())
        halves.append(torch.stack([h[:, : pairs // 2].mean(1), h[:, pairs // 2:].mean(1)]))
    return GaussianEstimate(torch.cat(means), torch.cat(ses), evaluations, torch.cat(halves, 1))


def _code_distances(codebook: torch.Tensor) -> torch.Tensor:
    """``|e_j - e_k|`` for every pair of codes, ``(K, K)``, by direct differences (exact zeros
    on the diagonal and between duplicates)."""
    return torch.stack([(codebook - e).norm(dim=-1) for e in codebook])


@torch.no_grad()
def boundary_distance(z: torch.Tensor, codebook: torch.Tensor,
                      index: torch.Tensor | None = None, *, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance from each ``z`` to the boundary of its Voronoi cell, ``(n,)``:
    ``min_k (|z - e_k|² - |z - q|²) / (2|e_k - q|)`` over the codes ``e_k ≠ q`` (the
    distance to each bisector hyperplane; the nearest one bounds the cell). The numerator
    is computed as ``|e_k|² - |q|² - 2 z·(e_k - q)``."""
    index = nearest_code(z, codebook) if index is None else index
    width = 2 * _code_distances(codebook)  # (K, K)
    sq = (codebook * codebook).sum(-1)  # (K,)
    out = []
    for s in range(0, len(z), chunk):
        zc, ic = z[s:s + chunk], index[s:s + chunk]
        q = codebook[ic]
        gap = sq[None] - sq[ic][:, None] - 2 * (zc @ codebook.T - (zc * q).sum(-1, keepdim=True))
        w = width[ic]  # (c, K)
        dist = torch.where(w > 0, gap / w.clamp_min(torch.finfo(z.dtype).tiny),
                           torch.full_like(gap, float("inf")))
        out.append(dist.min(-1).values)
    return torch.cat(out)


@torch.no_grad()
def nearest_other_code(index: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The distance from each code ``codebook[index]`` to the nearest other (distinct) code."""
    dist = _code_distances(codebook)
    dist[dist == 0] = float("inf")  # the code itself and its exact duplicates
    return dist.min(-1).values[index]


def estimator_gradients(g: torch.Tensor, z: torch.Tensor, q: torch.Tensor,
                        names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``G^T g`` of each deterministic estimator named in :data:`rotvq.SURROGATE_NAMES`."""
    return {name: get_surrogate(name).vjp(g, z, q) for name in names}


def stochastic_gradients(f: Objective, z: torch.Tensor, q: torch.Tensor, name: str, *,
                         draws: int, generator: torch.Generator | None = None,
                         sigma: float = 1e-3) -> torch.Tensor:
    """``draws`` gradients ``(draws, n, d)`` of NSVQ (``"nsvq"``) or DiVeQ (``"diveq"``, noise
    ``sigma``) in training mode: autograd through ``f(rows, estimator(z, q))``, so the decoder's
    gradient is taken at the estimator's own (random) forward value."""
    if name not in ("nsvq", "diveq"):
        raise ValueError(f"name must be 'nsvq' or 'diveq', got {name!r}")
    rows = _rows(z)
    out = []
    for _ in range(draws):
        with torch.enable_grad():
            leaf = z.detach().clone().requires_grad_(True)
            point = (noise_substitution(leaf, q, generator=generator) if name == "nsvq"
                     else diveq(leaf, q, sigma=sigma, generator=generator))
            (grad,) = torch.autograd.grad(f(rows, point).sum(), leaf)
        out.append(grad)
    return torch.stack(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity (0 where either row is zero)."""
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    dot = (a * b).sum(-1)
    return torch.where((na > 0) & (nb > 0), dot / (na * nb).clamp_min(torch.finfo(a.dtype).tiny),
                       torch.zeros_like(dot))


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Row-wise ``|estimate - reference| / |reference|`` (inf where the reference is zero)."""
    nr = reference.norm(dim=-1)
    err = (estimate - reference).norm(dim=-1)
    return torch.where(nr > 0, err / nr.clamp_min(torch.finfo(nr.dtype).tiny),
                       torch.full_like(err, float("inf")))
