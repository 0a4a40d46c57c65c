"""Grouped (multi-head) vector quantisation: ``G`` groups of channels, each quantised on its own.

:class:`GroupedVQ` splits every vector ``z`` of ``D`` channels into ``G`` consecutive groups of
``D / G`` channels (product quantisation, Jégou et al. 2011; the "heads" of
vector-quantize-pytorch) and quantises group ``g`` with a quantizer of its own (separate
codebooks, the default) or with one quantizer shared by all groups. Each group's quantizer
is a :class:`rotvq.VectorQuantizer`, or a :class:`rotvq.ResidualVQ` when ``num_quantizers > 1``
(grouped residual VQ, as in HiFi-Codec). The estimator acts per group, so ``G`` is
block-diagonal, one block ``G_g`` per group: the encoder receives ``(G_1^T g_1, ..., G_G^T g_G)``.

With ``K`` codes per group the output can take ``K^G`` values while the codebooks hold
``G K`` codes of ``D / G`` channels.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._base import QuantizerBase, Rows, _check_bool, metrics
from ._checks import at_least_float32, check_positive_int
from ._layout import from_rows
from ._steps import row_means
from .quantizer import VectorQuantizer
from .residual import ResidualVQ

__all__ = ["GroupedVQ", "GroupedOutput"]


class GroupedOutput(NamedTuple):
    """Result of :meth:`GroupedVQ.forward`; the first ten fields are those of :class:`rotvq.VQOutput`.

    The loss terms, ``usage`` and ``perplexity`` are means over the groups (a loss is then a mean
    over all ``D`` channels, as for one quantizer); ``z_norm``, ``q_norm`` and
    ``quantization_error`` are those of the whole vectors.
    """

    quantized: torch.Tensor  # input layout and dtype; the groups' codes side by side
    indices: torch.Tensor  # (*leading shape, G) or (*leading shape, G, Q) int64
    loss: torch.Tensor  # () mean over groups
    codebook_loss: torch.Tensor  # () mean over groups
    commitment_loss: torch.Tensor  # () mean over groups
    usage: torch.Tensor  # () mean over groups (the shared quantizer's with a shared codebook)
    perplexity: torch.Tensor  # () mean over groups (the shared quantizer's with a shared codebook)
    z_norm: torch.Tensor  # () mean |z| over the vectors
    q_norm: torch.Tensor  # () mean |q| over the vectors
    quantization_error: torch.Tensor  # () mean |z - q|^2 over the vectors (summed over all D channels)
    parts: tuple  # one output per group (VQOutput or RVQOutput; codes without gradient), or with a
    # shared codebook one for all groups: quantized (*leading shape, G, D / G) channel-last

    def metrics(self) -> dict[str, float]:
        """The scalar fields as python floats, keys :data:`rotvq.METRIC_NAMES`."""
        return metrics(self)


class GroupedVQ(QuantizerBase):
    """``groups`` quantizers side by side on consecutive groups of ``dim // groups`` channels.

    Args:
        dim: D, the channels of a vector (a multiple of ``groups``).
        codebook_size: K, codes per group's codebook (per stage with ``num_quantizers > 1``).
        groups: G, the number of groups (>= 1).
        separate_codebooks: one quantizer per group (default) or one for all groups (its
            statistics and updates then pool every group's rows).
        num_quantizers: Q; 1: each group is a :class:`rotvq.VectorQuantizer`; more: a
            :class:`rotvq.ResidualVQ` of Q stages.
        channel_first: the input layout, as for :class:`rotvq.VectorQuantizer`.
        zero_masked: masked positions get ``quantized = 0`` and ``indices = -1`` (default: their code).
        **kwargs: passed to every group's quantizer (``estimator``, ``ema``, ``init``, ...;
            with ``num_quantizers > 1`` also :class:`rotvq.ResidualVQ`'s own options).

    Shapes: ``z`` and ``quantized`` are ``(..., D)`` or ``(B, D, *spatial)``; ``indices``
    ``(..., G)``, or ``(..., G, Q)`` with residual groups.
    """

    def __init__(self, dim: int, codebook_size: int, groups: int, *, separate_codebooks: bool = True,
                 num_quantizers: int = 1, channel_first: bool | None = None, zero_masked: bool = False,
                 **kwargs) -> None:
        QuantizerBase.__init__(self)
        check_positive_int("dim", dim)
        check_positive_int("groups", groups)
        check_positive_int("num_quantizers", num_quantizers)
        if dim % groups:
            raise ValueError(f"dim={dim} is not a multiple of groups={groups}")
        if not isinstance(separate_codebooks, bool):
            raise TypeError(f"separate_codebooks must be a bool, got {separate_codebooks!r}")
        if channel_first not in (None, True, False):
            raise TypeError(f"channel_first must be True, False or None, got {channel_first!r}")
        self.dim, self.codebook_size, self.groups, self.num_quantizers = dim, codebook_size, groups, num_quantizers
        self.separate_codebooks, self.channel_first = separate_codebooks, channel_first
        self.group_dim = dim // groups
        self.zero_masked = _check_bool("zero_masked", zero_masked)

        def make():
            if num_quantizers == 1:
                return VectorQuantizer(self.group_dim, codebook_size, channel_first=False, **kwargs)
            return ResidualVQ(self.group_dim, codebook_size, num_quantizers, channel_first=False, **kwargs)

        self.quantizers = torch.nn.ModuleList(make() for _ in range(groups if separate_codebooks else 1))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, groups={self.groups}, "
                f"separate_codebooks={self.separate_codebooks}, num_quantizers={self.num_quantizers}")

    def _group(self):
        return self.quantizers[0]._group()

    def quantize_rows(self, flat: torch.Tensor, real: torch.Tensor | None, lead: torch.Size) -> Rows:
        """:meth:`forward` on rows ``(N, D)``: each group's quantizer on its channels.

        Returns:
            :class:`rotvq._base.Rows` with ``indices`` ``(N, G)`` or ``(N, G, Q)``; ``extra``: the
            groups' :class:`rotvq._base.Rows`.
        """
        n, g, d = flat.shape[0], self.groups, self.group_dim
        if self.separate_codebooks:
            parts = [qz.quantize_rows(flat[:, i * d:(i + 1) * d], real, lead) for i, qz in enumerate(self.quantizers)]
            z_q = torch.cat([p.z_q for p in parts], 1)  # (N, D): block-diagonal G
            q = torch.cat([p.q for p in parts], 1)
            indices = torch.stack([p.indices for p in parts], 1)  # (N, G, ...)
            scalars = [torch.stack([getattr(p, name) for p in parts]).mean()
                       for name in ("loss", "codebook_loss", "commitment_loss", "usage", "perplexity")]
        else:  # one quantizer on the N G rows of D / G channels (row i, group j -> row i G + j)
            real_g = None if real is None else real.repeat_interleave(g)
            part = self.quantizers[0].quantize_rows(flat.reshape(n * g, d), real_g, torch.Size((*lead, g)))
            parts = [part]
            z_q, q = part.z_q.reshape(n, self.dim), part.q.reshape(n, self.dim)
            indices = part.indices.reshape(n, g, *part.indices.shape[1:])
            scalars = [part.loss, part.codebook_loss, part.commitment_loss, part.usage, part.perplexity]
        acc = at_least_float32(flat.dtype)
        with torch.no_grad():
            zd, qd = flat.detach().to(acc), q.to(acc)
            columns = torch.stack([torch.linalg.vector_norm(zd, dim=1), torch.linalg.vector_norm(qd, dim=1),
                                   (zd - qd).pow(2).sum(1)], 1)  # (N, 3)
            z_norm, q_norm, quantization_error = row_means(columns, real, self._group())
        return Rows(z_q, q, indices, *scalars, z_norm, q_norm, quantization_error, extra=parts)

    def _make_output(self, quantized, indices, rows: Rows, cf: bool, lead: torch.Size) -> GroupedOutput:
        if self.separate_codebooks:
            parts = tuple(_part_output(qz, part, cf, lead) for qz, part in zip(self.quantizers, rows.extra))
        else:  # the shared quantizer's own output: (*lead, G, D / G) channel-last, indices (*lead, G, ...)
            parts = (_part_output(self.quantizers[0], rows.extra[0], False, torch.Size((*lead, self.groups))),)
        return GroupedOutput(quantized, indices, *rows.scalars(), parts)

    def _check_device(self, z: torch.Tensor) -> None:
        self.quantizers[0]._check_device(z)

    def _index_sizes(self) -> tuple[int, ...]:
        inner = self.quantizers[0]._index_sizes()
        return (inner[0], self.groups, *inner[1:])

    def _allows_missing(self) -> bool:
        return self.zero_masked or self.quantizers[0]._allows_missing()

    def _codes_rows(self, indices: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        group_axis = indices.dim() - (len(self._index_sizes()) - 1)  # after the positions' axes
        if self.separate_codebooks:
            return torch.cat([qz._codes_rows(indices.select(group_axis, i), dtype)
                              for i, qz in enumerate(self.quantizers)], -1)
        codes = self.quantizers[0]._codes_rows(indices, dtype)  # (..., G, D / G)
        return codes.reshape(*codes.shape[:-2], self.dim)

    def get_codes_from_indices(self, indices: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The groups' codes of ``indices`` ``(..., G)`` (or ``(..., G, Q)``) side by side, in the layer's
        layout; in eval mode ``get_codes_from_indices(out.indices, z.dtype)`` equals ``out.quantized``."""
        return super().get_codes_from_indices(indices, dtype)


def _part_output(quantizer, part: Rows, cf: bool, lead: torch.Size):
    """A group's quantizer's own output type (VQOutput, RVQOutput) from its rows."""
    indices = part.indices.reshape(tuple(lead) + tuple(part.indices.shape[1:]))
    return quantizer._make_output(from_rows(part.q, cf, lead), indices, part, cf, lead)
