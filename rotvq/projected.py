"""A learned projection around any quantizer: quantise in a smaller (or larger) code space.

:class:`Projected` wraps a quantizer of dimension ``c`` (``codebook_dim`` in
vector-quantize-pytorch) for inputs of dimension ``D``::

    u = W_in z + b_in        (N, c)   project in
    u_q = quantizer(u)       (N, c)   any rotvq quantizer, its estimator acting in the code space
    z_q = W_out u_q + b_out  (N, D)   project out

Low-dimensional codes with a projection (Yu et al. 2022, "Vector-quantized Image Modeling
with Improved VQGAN", arXiv 2110.04627, section 3.2: "factorized codes", there with
l2-normalised codes) keep a large codebook in use. The projections are ordinary
``nn.Linear`` layers trained with the model; the gradient reaching ``z`` is
``W_in^T G^T W_out^T g``, ``G`` the inner quantizer's estimator.
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import QuantizerBase, Rows, _check_bool
from ._checks import check_positive_int

__all__ = ["Projected"]


class Projected(QuantizerBase):
    """``quantizer`` between a projection in (``dim -> quantizer.dim``) and out (back to ``dim``).

    Args:
        quantizer: any rotvq quantizer (:class:`rotvq.VectorQuantizer`, :class:`rotvq.ResidualVQ`,
            :class:`rotvq.GroupedVQ`, :class:`rotvq.FSQ`) constructed with ``channel_first=None``:
            the layout is the wrapper's.
        dim: D, the channels of the input and of ``quantized``.
        channel_first: the input layout, as for :class:`rotvq.VectorQuantizer`.
        bias: whether the projections have a bias.
        zero_masked: masked positions get ``quantized = 0`` and ``indices = -1`` (default: their code).

    The output is the inner quantizer's output type with ``quantized`` projected out (input
    layout, ``(..., D)``); ``indices``, losses and statistics are the inner quantizer's, in the
    code space. :meth:`get_codes_from_indices` projects the codes out too.
    """

    def __init__(self, quantizer: QuantizerBase, dim: int, *, channel_first: bool | None = None,
                 bias: bool = True, zero_masked: bool = False) -> None:
        QuantizerBase.__init__(self)
        if not isinstance(quantizer, QuantizerBase):
            raise TypeError(f"quantizer must be a rotvq quantizer, got {type(quantizer).__name__}")
        check_positive_int("dim", dim)
        if quantizer.channel_first is not None:
            raise ValueError(f"the inner quantizer has channel_first={quantizer.channel_first}: the layout is "
                             "the Projected wrapper's; construct the inner quantizer with channel_first=None "
                             "and pass channel_first to Projected")
        if channel_first not in (None, True, False):
            raise TypeError(f"channel_first must be True, False or None, got {channel_first!r}")
        self.quantizer, self.dim, self.channel_first = quantizer, dim, channel_first
        self.zero_masked = _check_bool("zero_masked", zero_masked)
        self.project_in = nn.Linear(dim, quantizer.dim, bias=bias)
        self.project_out = nn.Linear(quantizer.dim, dim, bias=bias)

    @property
    def codebook_size(self) -> int:
        """The inner quantizer's ``codebook_size``."""
        return self.quantizer.codebook_size

    def _group(self):
        return self.quantizer._group()

    def quantize_rows(self, flat: torch.Tensor, real: torch.Tensor | None, lead: torch.Size) -> Rows:
        """:meth:`forward` on rows ``(N, D)``: project in, quantise, project out."""
        u = self.project_in(flat)  # (N, c)
        rows = self.quantizer.quantize_rows(u, real, lead)
        with torch.no_grad():
            q = self.project_out(rows.q)  # (N, D) the codes in the input space, no graph
        return rows._replace(z_q=self.project_out(rows.z_q), q=q, extra=rows)

    def _make_output(self, quantized, indices, rows: Rows, cf: bool, lead: torch.Size):
        return self.quantizer._make_output(quantized, indices, rows.extra, cf, lead)

    def _check_device(self, z: torch.Tensor) -> None:
        if z.device != self.project_in.weight.device:
            raise ValueError(f"input is on {z.device}, the projection on {self.project_in.weight.device}")

    def _index_sizes(self) -> tuple[int, ...]:
        return self.quantizer._index_sizes()

    def _allows_missing(self) -> bool:
        return self.zero_masked or self.quantizer._allows_missing()

    @torch.no_grad()
    def _codes_rows(self, indices: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        codes = self.quantizer._codes_rows(indices, dtype)  # (..., c)
        out = self.project_out(codes.reshape(-1, codes.shape[-1]).to(self.project_out.weight.dtype))
        out = out.reshape(*codes.shape[:-1], self.dim)
        trailing = len(self._index_sizes()) - 1  # a position whose every index is -1 has no code: zeros
        missing = (indices < 0).reshape(*indices.shape[:indices.dim() - trailing], -1).all(-1)
        out = torch.where(missing[..., None], torch.zeros_like(out), out)
        return out if dtype is None else out.to(dtype)
