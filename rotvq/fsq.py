r"""Finite scalar quantisation (FSQ): round each of ``d`` bounded channels to a few levels.

Mentzer, Minnen, Agustsson, Tschannen, "Finite Scalar Quantization: VQ-VAE Made Simple",
2023, arXiv 2309.15505. Channel ``i`` of ``z`` takes ``L_i`` values; the codebook is
implicit, the product grid of ``K = prod_i L_i`` codes, and has no state to learn, collapse
or synchronise. With ``l_i = (L_i - 1)(1 - eps) / 2``, ``o_i = 1/2`` for even ``L_i``
(else 0) and ``s_i = artanh(o_i / l_i)`` (section 3, Appendix A.1)::

    bound(z)_i = tanh(z_i + s_i) l_i - o_i             in (-L_i/2, L_i/2): rounds to L_i integers
    q_i        = round(bound(z)_i) / floor(L_i / 2)     codes in [-1, 1]
    index      = sum_i (round(bound(z)_i) + floor(L_i / 2)) prod_{j<i} L_j

The paper's code writes ``tan(o_i / l_i)`` for the shift; ``artanh`` is the shift for which
``bound(0) = 0`` (both round a neighbourhood of 0 to the same codes; vector-quantize-pytorch
uses ``artanh`` with ``1 + eps``). Gradients: the paper's straight-through estimator on the
rounding, ``z_q = u + sg[q - u]`` with ``u = bound(z) / floor(L / 2)``, is the book's
generalized estimator (eq. ``gen-def``) on the pair ``(u, q)`` with ``G = I``; ``estimator=``
takes any other :class:`rotvq.JacobianSurrogate` for that pair (``"rotation"`` rotates ``u``
onto ``q``). The encoder receives ``bound'(z) * G^T g / floor(L / 2)`` (elementwise
``bound'``). The paper's levels for ``K`` about ``2^8, 2^10, 2^12, 2^14, 2^16``: ``(8, 6, 5)``,
``(8, 5, 5, 5)``, ``(7, 5, 5, 5, 5)``, ``(8, 8, 8, 6, 5)``, ``(8, 8, 8, 5, 5, 5)``. A learned
projection to and from ``d = len(levels)`` channels is :class:`rotvq.Projected`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import distributed as D_
from ._base import QuantizerBase, Rows, _check_bool
from ._checks import at_least_float32
from ._steps import check_rows, code_usage, estimate, raise_if_bad
from .operators import JacobianSurrogate
from .quantizer import VectorQuantizer, VQOutput

__all__ = ["FSQ"]


class FSQ(QuantizerBase):
    """Finite scalar quantiser with ``levels[i]`` values on channel ``i`` (implicit codebook).

    Args:
        levels: the number of values of each channel, ints >= 3 (``d = len(levels)``,
            ``K = prod(levels)``). ``L = 2`` is refused: its shift ``artanh(1 / (1 - eps))``
            is undefined.
        estimator: the gradient estimator on ``(u, q)``: ``"ste"`` (the paper's, default), a name
            in :data:`rotvq.SURROGATE_NAMES` or a :class:`rotvq.JacobianSurrogate`.
        channel_first: the input layout, as for :class:`rotvq.VectorQuantizer`.
        eps: the margin of the bound, in (0, 1) (1e-3 in the paper).
        sync: in training mode, sum the code counts (usage, perplexity) over the ranks of
            ``process_group`` (there is no state to keep equal).
        process_group: the group to synchronise over (``None``: the default group).
        zero_masked: masked positions get ``quantized = 0`` and ``indices = -1`` (default: their code).

    The output is a :class:`rotvq.VQOutput`: ``quantized`` (input layout, exactly the codes),
    ``indices`` (the input's leading shape, in ``[0, K)``); FSQ has no loss (``loss`` and
    ``codebook_loss`` are 0; ``commitment_loss`` reports the mean of ``(u - q)^2`` over the
    ``N d`` entries, without a graph); ``quantization_error`` is the mean ``|u - q|^2``.
    """

    def __init__(self, levels: Sequence[int], *, estimator: str | JacobianSurrogate = "ste",
                 channel_first: bool | None = None, eps: float = 1e-3, sync: bool = True,
                 process_group=None, zero_masked: bool = False) -> None:
        QuantizerBase.__init__(self)
        if isinstance(levels, (str, bytes)) or not hasattr(levels, "__len__") or len(levels) == 0:
            raise TypeError(f"levels must be a non-empty sequence of ints, got {levels!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 3 for v in levels):
            raise ValueError(f"every level must be an int >= 3, got {tuple(levels)}")
        if not (isinstance(eps, (int, float)) and 0 < eps < 1):
            raise ValueError(f"eps must be in (0, 1), got {eps!r}")
        if channel_first not in (None, True, False):
            raise TypeError(f"channel_first must be True, False or None, got {channel_first!r}")
        self._op = VectorQuantizer._resolve_estimator(estimator)
        self.estimator, self.levels, self.eps = estimator, tuple(levels), float(eps)
        self.dim, self.codebook_size, self.channel_first = len(levels), math.prod(levels), channel_first
        self.sync, self.process_group = bool(sync), process_group
        self.zero_masked = _check_bool("zero_masked", zero_masked)
        basis = [1]
        for size in self.levels[:-1]:
            basis.append(basis[-1] * size)
        self.register_buffer("_levels", torch.tensor(self.levels, dtype=torch.int64), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        est = self.estimator if isinstance(self.estimator, str) else type(self.estimator).__name__
        return f"levels={self.levels}, codebook_size={self.codebook_size}, estimator={est!r}"

    def _group(self):
        return D_.resolve_group(self.sync, self.process_group) if self.training else None

    def _half_width(self, dtype: torch.dtype) -> torch.Tensor:
        return (self._levels // 2).to(dtype)  # (d,) floor(L / 2)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """``tanh(z + s) l - o`` per channel (module docstring), ``(..., d)`` in ``z``'s dtype."""
        levels = self._levels.to(z.dtype)
        half_l = (levels - 1) * (1 - self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize_rows(self, flat: torch.Tensor, real: torch.Tensor | None, lead: torch.Size) -> Rows:
        """:meth:`forward` on rows ``(N, d)``: bound, round, estimate, count."""
        group = self._group()
        acc = at_least_float32(flat.dtype)
        z_norm_rows, bad = check_rows(flat, real, acc)
        zg = flat if real is None else torch.where(real[:, None], flat, flat.detach())  # no gradient to padding
        b = self.bound(zg.to(acc))  # (N, d) bounded
        hw = self._half_width(acc)
        u = b / hw  # (N, d) the value rounding acts on, in the codes' scale
        with torch.no_grad():
            level = torch.round(b)
            level = torch.where(torch.isfinite(level), level, torch.zeros_like(level))  # NaN rows: code 0
            q = level / hw  # (N, d) the codes
            indices = ((level.long() + self._levels // 2) * self._basis).sum(1)  # (N,)
        # estimate: z_q = sg[G] u + sg[q - G u] (G = I: the paper's straight-through rounding)
        z_q, err_rows, _ = estimate(u, q, q.detach(), self._op, real, acc)  # two tensors: compiles
        with torch.no_grad():
            ones = torch.ones_like(err_rows) if real is None else real.to(acc)
            per_row = torch.stack([z_norm_rows, torch.linalg.vector_norm(q, dim=1), err_rows.detach()], 1)
            if real is not None:  # masked rows may hold anything (NaN too): select, never multiply
                per_row = torch.where(real[:, None], per_row, torch.zeros_like(per_row))
            counts = torch.zeros(self.codebook_size, dtype=acc, device=flat.device).index_add_(0, indices, ones)
            n_local = ones.sum()
            packed = torch.cat([counts, n_local[None], per_row.sum(0), bad.sum().to(acc)[None]])
            D_.all_reduce_sum(packed, group)
            k = self.codebook_size
            counts, n = packed[:k], packed[k]
            raise_if_bad(packed[k + 4], bad, lead)
            usage, perplexity = code_usage(counts, n, acc)
            z_norm, q_norm, quantization_error = (packed[k + 1 + i] / n.clamp_min(1) for i in range(3))
            rounding = err_rows.sum() / (n_local * self.dim).clamp_min(1)
            zero = torch.zeros((), dtype=acc, device=flat.device)
        return Rows(z_q.to(flat.dtype), q.to(flat.dtype), indices, zero, zero, rounding, usage, perplexity,
                    z_norm, q_norm, quantization_error)

    def _make_output(self, quantized, indices, rows: Rows, cf: bool, lead: torch.Size) -> VQOutput:
        return VQOutput(quantized, indices, *rows.scalars())

    def _index_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,)

    def _codes_rows(self, indices: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        acc = torch.float32 if dtype is None else at_least_float32(dtype)
        digits = (indices.long().clamp_min(0)[..., None] // self._basis) % self._levels  # (..., d) in [0, L)
        codes = (digits - self._levels // 2).to(acc) / self._half_width(acc)  # the same division as the forward
        codes = torch.where((indices >= 0)[..., None], codes, torch.zeros_like(codes))  # -1: no code
        return codes if dtype is None else codes.to(dtype)

    def get_codes_from_indices(self, indices: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The codes of ``indices`` (values in ``[0, K)``) in the layer's layout; in eval or training mode,
        ``get_codes_from_indices(out.indices, z.dtype)`` equals ``out.quantized`` bitwise."""
        return super().get_codes_from_indices(indices, dtype)
