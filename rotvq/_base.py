"""What every rotvq quantizer shares around its algorithm: layout in, rows, layout out.

:class:`QuantizerBase` is the common ``forward``: validate the input and the mask and
flatten them to rows (:mod:`rotvq._layout`), run the quantizer's own
``quantize_rows(rows, real, lead) -> Rows``, and put the result back in the input's
layout. A quantizer (:class:`rotvq.VectorQuantizer`, :class:`rotvq.ResidualVQ`, ...)
implements only ``quantize_rows`` and ``_codes_rows`` (codes from indices), so each reads
as its algorithm, and a wrapper (residual stages, groups, a projection) calls
``quantize_rows`` of the quantizers it holds on rows, without a second layout pass.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._layout import check_indices, check_mask, from_rows, indices_layout, to_rows

__all__ = ["METRIC_NAMES", "Rows", "QuantizerBase", "metrics"]

#: Keys of :meth:`VQOutput.metrics`, in order.
METRIC_NAMES = ("loss", "codebook_loss", "commitment_loss", "usage", "perplexity", "z_norm", "q_norm",
                "quantization_error")


class Rows(NamedTuple):
    """What ``quantize_rows`` returns, on rows (N = rows of the call, C = the quantizer's dim)."""

    z_q: torch.Tensor  # (N, C) the estimator's output; forward value == q bitwise
    q: torch.Tensor  # (N, C) the codes, in the input dtype, without a graph
    indices: torch.Tensor  # (N, *index axes) int64
    loss: torch.Tensor  # () and the other scalars of VQOutput, in the order of METRIC_NAMES
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    usage: torch.Tensor
    perplexity: torch.Tensor
    z_norm: torch.Tensor
    q_norm: torch.Tensor
    quantization_error: torch.Tensor
    extra: object = None  # a quantizer's own per-call results (e.g. the residual stages)

    def scalars(self) -> tuple[torch.Tensor, ...]:
        """The eight scalars, in the order of :data:`METRIC_NAMES`."""
        return tuple(getattr(self, name) for name in METRIC_NAMES)


def _check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool, else ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def metrics(output) -> dict[str, float]:
    """An output's scalar fields :data:`METRIC_NAMES` as python floats, in one host transfer."""
    values = torch.stack([getattr(output, name).detach().double() for name in METRIC_NAMES]).tolist()
    return dict(zip(METRIC_NAMES, values))


class QuantizerBase(nn.Module):
    """Layout handling shared by the quantizers (abstract: subclasses set ``dim``, ``channel_first``
    and implement ``quantize_rows``, ``_codes_rows``, ``_make_output`` and ``_index_sizes``)."""

    dim: int
    channel_first: bool | None
    zero_masked: bool = False  # masked positions: quantized 0 and indices -1 (else their code)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None):
        """Quantise ``z``; in training mode also update the state (codebooks, counters).

        Args:
            z: ``(..., D)``, or ``(B, D, *spatial)`` with ``channel_first=True``; floating point.
            mask: optional bool tensor of the leading shape, True = real data; masked positions
                train nothing and count in no statistic (with ``zero_masked``: ``quantized`` 0 and
                ``indices`` -1 there).

        Returns:
            The quantizer's output (a named tuple whose first ten fields are those of
            :class:`rotvq.VQOutput`); ``quantized`` has the layout and dtype of ``z``.

        Raises:
            TypeError: non-floating input, non-bool mask.
            ValueError: wrong channel size, ambiguous layout, a mask of the wrong shape, NaN or inf
                in an unmasked row.
        """
        flat, cf, lead = to_rows(z, self.dim, self.channel_first, type(self).__name__)  # (N, D)
        self._check_device(z)
        real = check_mask(mask, lead, z)  # (N,) bool or None
        rows = self.quantize_rows(flat, real, lead)
        z_q, indices = rows.z_q, rows.indices
        if real is not None and self.zero_masked:  # masked positions: no code
            z_q = torch.where(real[:, None], z_q, torch.zeros_like(z_q))
            keep = real.reshape(-1, *([1] * (indices.dim() - 1)))
            indices = torch.where(keep, indices, torch.full_like(indices, -1))
        quantized = from_rows(z_q, cf, lead)
        indices = indices.reshape(tuple(lead) + tuple(indices.shape[1:]))
        return self._make_output(quantized, indices, rows, cf, lead)

    def _leaves(self) -> list:
        """The codebook quantizers this one holds (the modules with a ``frozen`` state of their own)."""
        return [m for m in self.modules() if m is not self and "_frozen" in m.__dict__]

    @property
    def frozen(self) -> bool:
        """Whether every codebook held is frozen (see :attr:`rotvq.VectorQuantizer.frozen`); setting it
        freezes or unfreezes them all (an FSQ has none: nothing to freeze)."""
        return all(m.frozen for m in self._leaves())

    @frozen.setter
    def frozen(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"frozen must be a bool, got {value!r}")
        for m in self._leaves():
            m.frozen = value

    def update(self) -> None:
        """Apply the updates accumulated by the codebooks held (constructed with ``manual_update=True``);
        see :meth:`rotvq.VectorQuantizer.update`. Call it on every rank.

        Raises:
            RuntimeError: no codebook held accumulates its updates.
        """
        pending = [m for m in self._leaves() if m.manual_update]
        if not pending:
            raise RuntimeError(f"{type(self).__name__}.update() applies the updates accumulated with "
                               "manual_update=True; no codebook here was constructed with it")
        for m in pending:
            m.update()

    def quantize_rows(self, flat: torch.Tensor, real: torch.Tensor | None, lead: torch.Size) -> Rows:
        """Quantise rows ``(N, D)`` (``real``: ``(N,)`` bool or ``None``; ``lead``: the input's leading
        shape, for error messages)."""
        raise NotImplementedError

    def _make_output(self, quantized, indices, rows: Rows, cf: bool, lead: torch.Size):
        raise NotImplementedError

    def _check_device(self, z: torch.Tensor) -> None:
        """Raise before anything else when ``z`` is on another device than the state (default: no state)."""

    def _index_sizes(self) -> tuple[int, ...]:
        """``(K, *trailing index axes)``: the range of an index and the axes an index tensor ends with."""
        raise NotImplementedError

    def _codes_rows(self, indices: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """Codes ``(..., C)`` of validated indices ``(..., *index axes)`` (``-1``: no code, zeros)."""
        raise NotImplementedError

    def _allows_missing(self) -> bool:
        """Whether ``-1`` ("no code") is a valid index (default: with ``zero_masked``)."""
        return self.zero_masked

    def get_codes_from_indices(self, indices: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The codes of ``indices`` in the quantizer's layout: the ``quantized`` of an eval-mode call.

        Args:
            indices: int64 or int32, the ``indices`` of an output.
            dtype: output dtype (default: the codebook's); pass the input's dtype to get, in eval
                mode, exactly the ``quantized`` of the call that produced ``indices`` (bitwise).

        Returns:
            ``(B, D, *spatial)`` with ``channel_first=True``, else ``(..., D)``.
        """
        sizes = self._index_sizes()
        indices = check_indices(indices, sizes, self._allows_missing())
        codes = self._codes_rows(indices, dtype)  # (..., D)
        return indices_layout(codes, self.channel_first, indices.dim() - (len(sizes) - 1))
