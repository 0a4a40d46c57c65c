r"""The steps every rotvq quantizer runs on rows ``(N, D)``: check, estimate, losses, statistics.

A quantizer's ``quantize_rows`` reads as its algorithm because the steps that are the same
for all of them live here:

* :func:`check_rows` -- the rows' norms (reused by the statistics) and which rows hold NaN/inf;
* :func:`estimate` -- the gradient estimator ``z_q = sg[G] z + sg[q - G z]`` (forward exactly
  ``q``, backward ``G^T g``; the book's eq. ``gen-def``) fused with the per-row error
  ``|z - q|^2`` of the commitment term; masked rows become their own code;
* :func:`vq_losses` -- the codebook term ``beta |q - sg[z]|^2`` and the commitment term
  ``gamma |z - sg[q]|^2`` (Su 2024; van den Oord et al. 2017, eq. 3, with the names swapped,
  see :mod:`rotvq.quantizer`), means over the ``N D`` entries of the real rows;
* :func:`code_usage` -- usage and perplexity of a histogram of codes;
* :func:`raise_if_bad` -- the ``ValueError`` for non-finite rows, after the counts were summed
  over ranks so that every rank raises together;
* :func:`row_means` -- means of per-row statistics over the real rows of every rank.
"""
from __future__ import annotations

import torch

from . import distributed as D_
from ._checks import compiling
from .estimators import _apply_with_error

__all__ = ["check_rows", "estimate", "vq_losses", "code_usage", "raise_if_bad", "row_means"]


def check_rows(flat: torch.Tensor, real: torch.Tensor | None, acc: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|z| per row (N,) in acc, non-finite real rows (N,) bool)``.

    The norms are computed once, without a graph, and reused by the statistics; a finite norm
    proves a finite row, so eagerly only rows with a non-finite norm are read again (compiled
    code checks every entry: no data-dependent shapes).
    """
    with torch.no_grad():
        z_norm_rows = torch.linalg.vector_norm(flat.detach().to(acc), dim=1)  # (N,)
    bad = _nonfinite_rows(flat.detach(), z_norm_rows)  # (N,)
    if real is not None:
        bad = bad & real
    return z_norm_rows, bad


def _nonfinite_rows(flat: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool, True on the rows of ``flat`` that hold a NaN or an inf."""
    if compiling():
        return ~torch.isfinite(flat).all(1)
    suspect = ~torch.isfinite(norms)
    if bool(suspect.any()):
        rows = suspect.nonzero().squeeze(1)
        suspect[rows] = ~torch.isfinite(flat[rows]).all(1)
    return suspect


def estimate(zs: torch.Tensor, q: torch.Tensor, target: torch.Tensor, op, real: torch.Tensor | None,
             acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The estimator and the commitment error in one autograd node.

    Args:
        zs: ``(N, D)`` what was quantised (the gradient flows to it).
        q: ``(N, D)`` the chosen codes in ``zs``'s dtype, no graph.
        target: ``(N, D)`` the codes before that cast (the commitment term compares with them).
        op: the :class:`~rotvq.operators.JacobianSurrogate` giving ``G``.
        real: ``(N,)`` bool or ``None``; a masked row is replaced by its own code (zero
            error, zero gradient, never NaN).
        acc: dtype of the error.

    Returns:
        ``(z_q (N, D), |z - q|^2 per row (N,), zs with masked rows replaced)``; ``z_q``
        equals ``q`` bitwise; its backward is ``G^T g`` (+ the commitment gradient).
    """
    if real is not None:  # masked rows become their own code: zero loss, zero gradient, never NaN
        zs = torch.where(real[:, None], zs, q.to(zs.dtype))
    # estimate: forward value exactly q; backward sends G^T g to z (STE, rotation trick, ...)
    # and |z - q|^2 per row (the commitment term), in one autograd node
    z_q, err_rows = _apply_with_error(zs, q, target, op, acc)
    if real is not None:  # exactly 0 on masked rows (z := q there, but q may be a rounded code)
        err_rows = torch.where(real, err_rows, torch.zeros_like(err_rows))
    return z_q, err_rows, zs


def vq_losses(err_rows: torch.Tensor, codes: torch.Tensor | None, zs: torch.Tensor,
              w: torch.Tensor | None, dim: int, commitment_weight: float, codebook_weight: float | None,
              acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, codebook_loss, commitment_loss)`` of this rank's real rows (DDP averages their gradients).

    ``commitment_loss = sum_i |z_i - sg[q_i]|^2 / (n D)`` (gradient to ``z`` through ``err_rows``);
    ``codebook_loss = sum_i |q_i - sg[z_i]|^2 / (n D)`` (gradient to the codes; ``codes=None``:
    no learned codebook, the value of the commitment term without a graph, since
    ``(q - z)^2 == (z - q)^2`` bitwise); ``loss = gamma commitment + beta codebook``, the codebook
    term left out when ``codebook_weight`` is ``None`` (an EMA codebook).
    """
    n_local = err_rows.new_tensor(err_rows.shape[0], dtype=acc) if w is None else w.sum()
    entries = (n_local * dim).clamp_min(1)
    commitment_loss = err_rows.sum() / entries
    loss = commitment_weight * commitment_loss
    if codes is None:  # the codebook term moves nothing (the EMA update replaces it): its value only
        codebook_loss = commitment_loss.detach()
    else:
        codebook_loss = (codes.to(acc) - zs.detach().to(acc)).pow(2).sum(1).sum() / entries
    if codebook_weight is not None:
        loss = loss + codebook_weight * codebook_loss
    return loss, codebook_loss, commitment_loss


def code_usage(counts: torch.Tensor, n: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(usage, perplexity)`` of a code histogram ``counts (K,)`` over ``n`` rows.

    usage: fraction of the ``K`` codes chosen at least once; perplexity: ``exp`` of the entropy
    of ``counts / n``, in ``[1, K]`` (1 for an empty batch).
    """
    p = counts / n.clamp_min(1)
    perplexity = torch.exp(-torch.special.xlogy(p, p).sum())
    usage = (counts > 0).to(acc).mean()
    return usage, perplexity


def raise_if_bad(bad_global: torch.Tensor, bad: torch.Tensor, lead: torch.Size | None) -> None:
    """ValueError for non-finite rows (eager only; compiled code gates the updates instead).

    Args:
        bad_global: ``()`` the number of non-finite rows summed over the ranks.
        bad: ``(N,)`` this rank's non-finite rows; the message gives the first one's
            position in the input's leading shape ``lead`` (its row when ``lead`` is ``None``).
    """
    if compiling():
        return
    total = int(bad_global.item())
    if total == 0:
        return
    local = int(bad.sum().item())
    if local:
        first = int(torch.nonzero(bad)[0].item())
        if lead is None:
            raise ValueError(f"input has {local} row(s) with NaN or inf (first at row {first}); nothing was updated")
        where = []
        for size in reversed(lead):  # the flat row index as an index into the leading shape
            first, rest = divmod(first, size)
            where.insert(0, rest)
        where = tuple(where)
        raise ValueError(f"input has {local} row(s) with NaN or inf (first at leading index {where}); "
                         "nothing was updated")
    raise ValueError(f"another rank's input has NaN or inf in {total} row(s); nothing was updated")


def row_means(columns: torch.Tensor, real: torch.Tensor | None, group) -> torch.Tensor:
    """Means over the real rows of every rank of per-row statistics ``columns (N, C)`` (one ``all_reduce``).

    Masked rows may hold anything (NaN too): they are selected out, never multiplied. Returns ``(C,)``;
    0 for a batch without real rows.
    """
    with torch.no_grad():
        ones = torch.ones(columns.shape[0], 1, dtype=columns.dtype, device=columns.device)
        if real is not None:
            columns = torch.where(real[:, None], columns, torch.zeros_like(columns))
            ones = real.to(columns.dtype)[:, None]
        sums = torch.cat([ones, columns], 1).sum(0)  # (1 + C,) n, then the sums
        D_.all_reduce_sum(sums, group)
        return sums[1:] / sums[0].clamp_min(1)
