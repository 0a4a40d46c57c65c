r"""Residual vector quantisation: ``Q`` codebooks, each quantising what the previous ones left.

:class:`ResidualVQ` (Zeghidour et al. 2021, SoundStream, arXiv 2107.03312, Algorithm 1;
the quantiser of most neural audio codecs) approximates ``z`` by a sum of codes::

    r_0 = z,   q_i = Q_i(r_{i-1}),   r_i = r_{i-1} - q_i,   q = q_1 + ... + q_Q

Each stage ``Q_i`` is a :class:`rotvq.VectorQuantizer` (nearest code, losses, EMA or
gradient codebook, k-means init, dead codes, synchronisation across ranks), called on
rows; the stages' residuals carry no gradient of the codes (``r_i = r_{i-1} - sg[q_i]``),
so every stage's commitment term reaches the encoder.

How the gradient estimator applies (``estimator_scope``). The forward value is ``q`` in
both cases, bitwise; the backward differs. In the book's notation (eq. ``gen-def``:
``z_q = sg[G] z + sg[q - G z]``, backward ``G^T g``):

* ``"sum"`` (default): one estimator on the pair ``(z, q)``, ``z_q = sg[G] z + sg[q - G z]``
  with ``G = G(z, q)``: the encoder receives ``G^T g``. With the STE that is ``g``, as
  for a single quantiser; with the rotation trick, ``(|q|/|z|) R^T g`` with ``R`` rotating
  ``z`` onto the final approximation ``q``.
* ``"stage"``: one estimator per stage on ``(r_{i-1}, q_i)``, summed: the encoder receives
  ``sum_i G_i^T g``. With the STE that is ``Q g`` (the gradient grows with the number of
  stages); with the rotation trick, a sum of ``Q`` rotations, the later ones between
  small residuals and their codes. This is vector-quantize-pytorch's ``ResidualVQ``.

``tests/test_residual.py`` checks both formulas with sympy (:mod:`rotvq.symbolic`).
Measured by ``python tools/residual_estimator.py`` (the lab's MLP VQ-VAE on the embedded
digits, ``Q = 4`` stages of ``K = 16`` codes, ``D = 8``, 400 steps of Adam at learning rate
``1e-3``, k-means init and the automatic dead-code rule, seeds 0-4, one thread; test-split
reconstruction MSE, mean over seeds, the range in brackets; about 5 minutes)::

    estimator  scope  gamma  test MSE, mean [range]
    STE        sum    1/16   0.01464 [0.01403, 0.01524]
    STE        sum    1/4    0.01709 [0.01634, 0.01756]
    STE        sum    1      0.02496 [0.02361, 0.02709]
    STE        stage  1/16   0.01412 [0.01381, 0.01447]
    STE        stage  1/4    0.01442 [0.01398, 0.01531]
    STE        stage  1      0.01720 [0.01666, 0.01806]
    rotation   sum    1/16   0.01429 [0.01404, 0.01452]
    rotation   sum    1/4    0.01727 [0.01676, 0.01781]
    rotation   sum    1      0.02478 [0.02334, 0.02698]
    rotation   stage  1/16   0.01356 [0.01314, 0.01393]
    rotation   stage  1/4    0.01484 [0.01459, 0.01524]
    rotation   stage  1      0.01819 [0.01776, 0.01847]

At the same commitment weight ``gamma`` (per stage), ``"stage"`` reconstructs better, in
5 of 5 paired seeds at every ``gamma`` for both estimators. The derivation says why: it
sends about ``Q`` times the encoder gradient of ``"sum"`` (exactly ``Q g`` for the STE),
and under Adam, which normalises the gradient's scale, that is the same as dividing the
commitment terms' weight by ``Q``. Compared at that matched weight (``gamma`` for
``"stage"``, ``gamma / 4`` for ``"sum"``), the STE gives the same reconstruction with either
scope (``"sum"`` better in 1 and in 2 of 5 seeds: 0.01464 against 0.01442, 0.01709 against
0.01720), and the rotation trick reconstructs better with ``"sum"`` (5 of 5 seeds at both
pairs: 0.01429 against 0.01484, 0.01727 against 0.01819). Hence the default ``"sum"``:
the encoder's gradient is that of one estimator for the map ``z -> q`` whatever ``Q`` is,
a commitment weight keeps its meaning per stage, and a ``Q``-stage quantizer is a
one-stage quantizer when ``Q = 1`` in either scope. To carry over a ``gamma`` tuned with
``"stage"`` (vector-quantize-pytorch's behaviour), divide it by ``Q``, or keep
``estimator_scope="stage"``.

Quantize dropout (SoundStream, section III-C). In training mode with
``quantize_dropout=True`` a call uses only the first ``n`` stages, ``n`` uniform in
``[min_quantizers, Q]``, the same ``n`` for the whole batch; the stages after it are masked
out (they see a fully masked batch: no loss, no statistic, no update), contribute no code,
and their indices are ``-1``. ``n`` is a hash of ``(seed, step)``, where ``step`` is a
buffer counting training calls: identical on every rank (the first training call
broadcasts rank 0's counter, like the stages' state), reproducible from a checkpoint,
and equal to what one process computes, so the stages' states stay identical on every
rank. A per-example ``n`` (as in the paper) would not keep that last guarantee for
ranks holding different examples.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._base import QuantizerBase, Rows, _check_bool, metrics
from ._checks import at_least_float32, check_nonnegative_int, check_positive_int
from ._layout import from_rows
from ._setup import SetupState
from ._steps import estimate, row_means
from .quantizer import VectorQuantizer, VQOutput

__all__ = ["ResidualVQ", "RVQOutput", "ESTIMATOR_SCOPES"]

ESTIMATOR_SCOPES = ("sum", "stage")


class RVQOutput(NamedTuple):
    """Result of :meth:`ResidualVQ.forward`; the first ten fields are those of :class:`rotvq.VQOutput`.

    ``loss``, ``codebook_loss`` and ``commitment_loss`` are sums over the stages; ``usage``
    and ``perplexity`` means over the stages used; ``z_norm``, ``q_norm`` and
    ``quantization_error`` are those of ``z`` and the sum ``q`` (global batch in training
    mode with synchronisation).
    """

    quantized: torch.Tensor  # input layout and dtype; forward value == sum of the stages' codes
    indices: torch.Tensor  # (*leading shape, Q) int64; -1 for stages dropped by quantize dropout
    loss: torch.Tensor  # () sum over stages of each stage's loss
    codebook_loss: torch.Tensor  # () sum over stages
    commitment_loss: torch.Tensor  # () sum over stages
    usage: torch.Tensor  # () mean over the stages used of their usage
    perplexity: torch.Tensor  # () mean over the stages used of their perplexity
    z_norm: torch.Tensor  # () mean |z|
    q_norm: torch.Tensor  # () mean |q| of the sum of the codes
    quantization_error: torch.Tensor  # () mean |z - q|^2 (summed over D)
    stages: tuple  # one VQOutput per stage: its codes (no gradient), indices and statistics

    def metrics(self) -> dict[str, float]:
        """The scalar fields as python floats, keys :data:`rotvq.METRIC_NAMES`."""
        return metrics(self)


class ResidualVQ(SetupState, QuantizerBase):
    """Residual vector quantiser: ``num_quantizers`` stages on successive residuals.

    Args:
        dim: D, the code dimension.
        codebook_size: K, codes per stage.
        num_quantizers: Q, the number of stages (>= 1).
        shared_codebook: one :class:`rotvq.VectorQuantizer` for every stage (its updates
            run after each stage, in order) instead of one per stage.
        estimator_scope: ``"sum"`` (one estimator on ``(z, q)``) or ``"stage"`` (one per
            stage, summed); see the module docstring for what each sends to the encoder.
        quantize_dropout: in training mode use only the first ``n`` stages, ``n`` uniform
            in ``[min_quantizers, Q]`` per call (see the module docstring).
        min_quantizers: the fewest stages quantize dropout keeps (1 <= it <= Q).
        seed: seeds quantize dropout's choices (an int >= 0).
        channel_first: the input layout, as for :class:`rotvq.VectorQuantizer`.
        zero_masked: masked positions get ``quantized = 0`` and ``indices = -1`` (default: their code).
        commitment_weight: gamma of every stage (default 0.25, not the 1.0 of
            :class:`rotvq.VectorQuantizer`: in the measurement above, gamma = 1/4
            reconstructs better than 1 with both scopes and both estimators, and 1/16
            better still, at the edge of that grid; a digits MLP at 400 steps, so a larger
            model may prefer another value).
        **vq_kwargs: passed to every stage's :class:`rotvq.VectorQuantizer` (``estimator``,
            ``ema``, ``decay``, ``init``, ``sync``, ...). Cosine
            distance is refused: each stage would normalise its residual, and the sum of
            unit codes would not approximate ``z``.

    Shapes: ``z`` is ``(..., D)`` or ``(B, D, *spatial)``; ``quantized`` the same;
    ``indices`` ``(..., Q)`` or ``(B, *spatial, Q)``.
    """

    def __init__(self, dim: int, codebook_size: int, num_quantizers: int, *, shared_codebook: bool = False,
                 estimator_scope: str = "sum", quantize_dropout: bool = False, min_quantizers: int = 1,
                 seed: int = 0, channel_first: bool | None = None, zero_masked: bool = False,
                 commitment_weight: float = 0.25, **vq_kwargs) -> None:
        QuantizerBase.__init__(self)
        check_positive_int("num_quantizers", num_quantizers)
        check_nonnegative_int("seed", seed)
        if estimator_scope not in ESTIMATOR_SCOPES:
            raise ValueError(f"unknown estimator_scope {estimator_scope!r}; valid: {', '.join(ESTIMATOR_SCOPES)}")
        for name, value in (("shared_codebook", shared_codebook), ("quantize_dropout", quantize_dropout)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if isinstance(min_quantizers, bool) or not isinstance(min_quantizers, int) \
                or not 1 <= min_quantizers <= num_quantizers:
            raise ValueError(f"min_quantizers must be an int in [1, num_quantizers={num_quantizers}], "
                             f"got {min_quantizers!r}")
        if channel_first not in (None, True, False):
            raise TypeError(f"channel_first must be True, False or None, got {channel_first!r}")
        if vq_kwargs.get("distance", "euclidean") == "cosine":
            raise ValueError("ResidualVQ does not take distance='cosine': each stage would normalise its "
                             "residual, and the sum of unit codes would not approximate z")
        self.dim, self.codebook_size, self.num_quantizers = dim, codebook_size, num_quantizers
        self.shared_codebook, self.estimator_scope, self.channel_first = shared_codebook, estimator_scope, channel_first
        self.quantize_dropout, self.min_quantizers, self.seed = quantize_dropout, min_quantizers, seed
        self.zero_masked = _check_bool("zero_masked", zero_masked)
        count = 1 if shared_codebook else num_quantizers
        self.layers = torch.nn.ModuleList(
            VectorQuantizer(dim, codebook_size, channel_first=False, commitment_weight=commitment_weight,
                            **vq_kwargs) for _ in range(count))
        self.register_buffer("dropout_step", torch.zeros((), dtype=torch.int64))  # training calls so far
        self._init_setup()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, num_quantizers={self.num_quantizers}, "
                f"shared_codebook={self.shared_codebook}, estimator_scope={self.estimator_scope!r}, "
                f"quantize_dropout={self.quantize_dropout}")

    @property
    def stages(self) -> list[VectorQuantizer]:
        """The quantiser of each stage, in order (the same object ``Q`` times with a shared codebook)."""
        return [self.layers[0 if self.shared_codebook else i] for i in range(self.num_quantizers)]

    @property
    def codebooks(self) -> torch.Tensor:
        """The stages' codes, ``(Q, K, D)`` (detached)."""
        return torch.stack([stage.codes().detach() for stage in self.stages])

    def _group(self):
        return self.layers[0]._group()

    def _synced_tensors(self) -> list[torch.Tensor]:
        return [self.dropout_step]

    def _active(self, device: torch.device) -> torch.Tensor | None:
        """``(Q,)`` bool, the stages this training call uses (quantize dropout), or ``None`` (all)."""
        if not (self.training and self.quantize_dropout):
            return None
        span = self.num_quantizers - self.min_quantizers + 1
        salt = (self.seed * 0x9E3779B9) & 0xFFFFFFFF
        n = self.min_quantizers + _hash32((self.dropout_step + salt) & 0xFFFFFFFF) % span  # () int64
        return torch.arange(self.num_quantizers, device=device) < n

    def quantize_rows(self, flat: torch.Tensor, real: torch.Tensor | None, lead: torch.Size) -> Rows:
        """:meth:`forward` on rows ``(N, D)``: the stages on successive residuals, then the estimator.

        Returns:
            :class:`rotvq._base.Rows` with ``indices`` ``(N, Q)`` and, as ``extra``, each stage's
            :class:`rotvq._base.Rows`.
        """
        group = self._group()
        if self.training:
            self._run_setup(flat, real, None, lead, group)  # pending: rank 0's dropout counter on every rank
        active = self._active(flat.device)  # (Q,) bool or None
        residual, q, stage_rows = flat, None, []  # r_0 = z
        for i, stage in enumerate(self.stages):
            keep = None if active is None else active[i]
            real_i = real if keep is None else (keep.expand(flat.shape[0]) if real is None else real & keep)
            rows = stage.quantize_rows(residual, real_i, lead)  # q_i = Q_i(r_{i-1}), with its losses and update
            if keep is not None:  # a dropped stage contributes no code
                rows = _drop(rows, keep)
            stage_rows.append(rows)
            q = rows.q if q is None else q + rows.q  # q = q_1 + ... + q_i
            residual = residual - rows.q  # r_i = r_{i-1} - sg[q_i]
        acc = at_least_float32(torch.promote_types(self.layers[0].embedding.dtype, flat.dtype))
        if self.estimator_scope == "sum":
            # one estimator on (z, q): z_q = sg[G] z + sg[q - G z], G = G(z, q); backward G^T g
            zg = flat if real is None else torch.where(real[:, None], flat, flat.detach())
            z_q, err_rows, _ = estimate(zg, q, q.detach(), self.layers[0]._op, real, acc)  # two tensors: compiles
            err_rows = err_rows.detach()
        else:
            # one estimator per stage: z_q = sum_i (sg[G_i] r_{i-1} + sg[q_i - G_i r_{i-1}]); backward sum_i G_i^T g
            z_q = stage_rows[0].z_q
            for rows in stage_rows[1:]:
                z_q = z_q + rows.z_q
            with torch.no_grad():
                err_rows = (flat.to(acc) - q.to(acc)).pow(2).sum(1)
                if real is not None:
                    err_rows = torch.where(real, err_rows, torch.zeros_like(err_rows))
        if self.training:  # after the stages: a batch that raised counts no call
            with torch.no_grad():
                self.dropout_step.add_(1)
        indices = torch.stack([rows.indices for rows in stage_rows], 1)  # (N, Q)
        loss, codebook_loss, commitment_loss = (sum(getattr(r, name) for r in stage_rows)
                                                for name in ("loss", "codebook_loss", "commitment_loss"))
        usage, perplexity = _mean_over_used([r.usage for r in stage_rows], [r.perplexity for r in stage_rows], active)
        q_norm, quantization_error = row_means(
            torch.stack([torch.linalg.vector_norm(q.detach().to(acc), dim=1), err_rows.to(acc)], 1), real, group)
        z_norm = stage_rows[0].z_norm  # stage 1 quantises z itself
        return Rows(z_q, q, indices, loss, codebook_loss, commitment_loss, usage, perplexity, z_norm, q_norm,
                    quantization_error, extra=stage_rows)

    def _make_output(self, quantized, indices, rows: Rows, cf: bool, lead: torch.Size) -> RVQOutput:
        stages = tuple(VQOutput(from_rows(r.q, cf, lead), r.indices.reshape(lead), *r.scalars()) for r in rows.extra)
        return RVQOutput(quantized, indices, *rows.scalars(), stages)

    def _check_device(self, z: torch.Tensor) -> None:
        self.layers[0]._check_device(z)

    def _index_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size, self.num_quantizers)

    def _allows_missing(self) -> bool:
        return True

    def _codes_rows(self, indices: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        out = None
        for i, stage in enumerate(self.stages):  # the same sum, in the same order and dtype, as the forward
            idx = indices[..., i]
            codes = stage._codes_rows(idx.clamp_min(0), dtype)
            codes = torch.where((idx >= 0)[..., None], codes, torch.zeros_like(codes))
            out = codes if out is None else out + codes
        return out

    def get_codes_from_indices(self, indices: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The sum of the stages' codes of ``indices`` ``(..., Q)``, in the layer's layout; ``-1`` adds nothing.

        In eval mode, ``get_codes_from_indices(out.indices, z.dtype)`` equals ``out.quantized`` bitwise.
        """
        return super().get_codes_from_indices(indices, dtype)


def _drop(rows: Rows, keep: torch.Tensor) -> Rows:
    """A stage's rows with its codes zeroed and its indices -1 when ``keep`` (a 0-d bool) is False."""
    zero = torch.zeros_like(rows.q)
    return rows._replace(z_q=torch.where(keep, rows.z_q, zero), q=torch.where(keep, rows.q, zero),
                         indices=torch.where(keep, rows.indices, torch.full_like(rows.indices, -1)))


def _mean_over_used(usage: list, perplexity: list, active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    u, p = torch.stack(usage), torch.stack(perplexity)  # (Q,)
    if active is None:
        return u.mean(), p.mean()
    w = active.to(u.dtype)
    return (u * w).sum() / w.sum(), (p * w).sum() / w.sum()


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """``(x * m) mod 2^32`` for int64 ``x`` in ``[0, 2^32)``, without int64 overflow."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32") in int64 tensor arithmetic: the same bits eager
    and compiled, on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)
