"""A vector-quantisation layer with a choice of gradient estimator, ready for real training.

:class:`VectorQuantizer` maps encoder outputs (channel-last ``(..., D)``, or
channel-first feature maps ``(B, D, *spatial)``) to their nearest codes ``q`` in a
learned codebook of ``K`` codes and returns ``z_q``, whose forward value is exactly
``q`` and whose backward pass is given by a gradient estimator: the
straight-through estimator (STE) or one of the Jacobian surrogates of
:mod:`rotvq.operators`, the rotation trick by default. It keeps its state
identical on every data-parallel rank (:mod:`rotvq.distributed`), accepts masks of
padded positions, refuses non-finite batches before they can touch the codebook,
and compiles with ``torch.compile(fullgraph=True)`` from the first training step, fresh or
after ``load_state_dict`` (the one-time k-means init runs as an opaque operator inside the
compiled call: ``rotvq._setup``).

Loss convention. The source text (Su Jianlin, "VQ的旋转技巧", 2024, eq. in
section 回顾) writes the VQ-VAE loss as::

    L = |x - decoder(z_q)|^2 + beta |q - sg[z]|^2 + gamma |z - sg[q]|^2

so **beta weighs the codebook term** ``|q - sg[z]|^2`` (it moves the codes) and
**gamma weighs the commitment term** ``|z - sg[q]|^2`` (it moves the encoder).
This module follows that convention: ``codebook_weight`` is beta (default 1.0)
and ``commitment_weight`` is gamma (default 1.0), as in :eq:`scale-loss` of
:ref:`ch-scaling`. Note that van den Oord et al. (2017, eq. 3) use the opposite
naming: their ``beta`` (0.25) weighs the commitment term and the codebook term has
weight 1. This layer's default commitment weight is 1, not their 0.25: the scaling
study's decision table chose it (:ref:`the defaults table <scale-defaults>`). Both terms are mean squared errors over all ``N * D`` entries of the
(unmasked) batch.

References:
    van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation
    Learning", NeurIPS 2017, arXiv 1711.00937 (VQ-VAE; the loss, eq. 3; the
    EMA codebook update, appendix A.1).
    Razavi, van den Oord, Vinyals, "Generating Diverse High-Fidelity Images with
    VQ-VAE-2", NeurIPS 2019, arXiv 1906.00446 (EMA codebook updates).
    Fifty et al., "Restructuring Vector Quantization with the Rotation Trick",
    2024, arXiv 2410.06424 (the rotation trick; l2-normalised cosine VQ).
    Su Jianlin, "VQ的旋转技巧：梯度直通估计的一般推广", Scientific Spaces, 2024
    (k-means initialisation as the remedy for ``|q| << |z|``).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import distributed as D_
from ._base import METRIC_NAMES, QuantizerBase, Rows, metrics
from ._checks import at_least_float32, check_nonnegative_int, check_positive_int
from ._codebook_state import DEAD_CODE_PATIENCE, CodebookState
from ._steps import check_rows, code_usage, estimate, raise_if_bad, vq_losses
from .estimators import SURROGATE_NAMES, get_surrogate
from .operators import JacobianSurrogate
from .search import DEFAULT_MEMORY_BUDGET, DISTANCES, nearest_code

__all__ = ["INITS", "METRIC_NAMES", "DEAD_CODE_PATIENCE", "VQOutput", "VectorQuantizer"]

INITS = ("normal", "uniform", "kmeans")


class VQOutput(NamedTuple):
    """Result of :meth:`VectorQuantizer.forward` (N = number of real, unmasked input vectors).

    ``loss`` and the two loss terms are this process's (they carry the gradients
    that DDP averages); ``usage``, ``perplexity``, ``z_norm``, ``q_norm`` and
    ``quantization_error`` are statistics of the global batch (all ranks) in
    training mode with synchronisation, of the local batch otherwise.
    """

    quantized: torch.Tensor  # input layout and dtype; forward value == codes[indices]
    indices: torch.Tensor  # (B, *spatial) or (...): int64, the input's leading shape
    loss: torch.Tensor  # () beta * codebook_loss + gamma * commitment_loss (no codebook term with EMA)
    codebook_loss: torch.Tensor  # () mean over N*D entries of (q - sg[z])^2; gradient to the codebook only
    commitment_loss: torch.Tensor  # () mean over N*D entries of (z - sg[q])^2; gradient to z only
    usage: torch.Tensor  # () fraction of the K codes chosen at least once in the batch
    perplexity: torch.Tensor  # () exp(entropy of the batch's code histogram), in [1, K]
    z_norm: torch.Tensor  # () mean |z| over the N vectors (before any normalisation)
    q_norm: torch.Tensor  # () mean |q| over the N vectors
    quantization_error: torch.Tensor  # () mean over N of |z - q|^2 (summed over D; normalised z for cosine)

    def metrics(self) -> dict[str, float]:
        """The scalar fields as python floats, keys :data:`METRIC_NAMES`, in one host transfer."""
        return metrics(self)


class VectorQuantizer(CodebookState, QuantizerBase):
    """Nearest-code vector quantiser with a pluggable gradient estimator.

    Args:
        dim: D, the code dimension (>= 1).
        codebook_size: K, the number of codes (>= 1).
        estimator: gradient estimator, ``"ste"``, ``"rotation"`` or any name in
            :data:`rotvq.SURROGATE_NAMES`, or a :class:`rotvq.JacobianSurrogate`;
            resolved to an operator once, here.
        distance: ``"euclidean"`` or ``"cosine"``. Cosine VQ is l2-normalised
            throughout: encoder outputs and codes are normalised before the search,
            the estimator sees the normalised pair (so the rotation trick's
            ``|q|/|z|`` is 1), ``quantized`` and ``get_codes_from_indices`` return
            unit codes, the losses compare unit vectors, the EMA update averages
            unit vectors and renormalises, dead codes are replaced by normalised
            encoder outputs, and the k-means init is spherical k-means.
        channel_first: layout of the input. ``False``: channel-last ``(..., D)``.
            ``True``: ``(B, D, *spatial)`` (conv feature maps, audio, video);
            ``quantized`` keeps that layout and ``indices`` is ``(B, *spatial)``.
            ``None`` (default): 1-D and 2-D inputs are ``(..., D)``; a 3-D input is
            ``(B, T, D)`` unless ``shape[1] == D`` too, which is ambiguous and raises;
            a 4-D or larger input raises. Why: a 4-D tensor in torch is almost always
            a channel-first feature map, and guessing the channel axis from sizes is
            exactly how ``VectorQuantizer(16, 64)(torch.randn(2, 16, 16, 16))`` used to
            quantise along the width without a word. Stating the layout once, at
            construction, makes that mistake impossible to make silently. A sequence
            model whose length can equal ``D`` passes ``channel_first=False``: with
            ``None`` such a batch raises, mid-training if it comes late.
        codebook_weight: beta, weight of the codebook term (>= 0; default ``None``: 1.0). With
            ``ema=True`` there is no codebook term (the EMA update moves the codes): a value
            other than 1.0 raises ``ValueError`` instead of being ignored.
        commitment_weight: gamma, weight of the commitment term (>= 0, default 1.0). The
            default follows the scaling study's decision rule (:ref:`the defaults table <scale-defaults>`): with
            this layer's other defaults, gamma = 1 reconstructs better than 1/4 on every
            seed in every configuration of the record at ``d >= 32`` (the table there,
            computed from ``book/records/``; one convolutional model, 3 seeds, 1,000 steps:
            a different model or training length can prefer another value).
        ema: learn the codebook by exponential moving averages of cluster sizes
            and sums (a buffer, updated in training mode only; the codebook term is
            left out of ``loss``) instead of by gradient (an ``nn.Parameter``).
        decay: EMA decay in (0, 1), for the EMA codebook and ``cluster_size``.
        eps: Laplace smoothing constant of the EMA cluster sizes (> 0).
        init: ``"kmeans"`` (default): k-means (k-means++ seeding; spherical for
            cosine) on the first training batch, at most ``kmeans_max_points``
            vectors of it, gathered from all ranks. It is the default because codes
            start where the data is, whatever its scale: ``|q|/|z|`` starts near 1,
            against far below 1 for small random codes (:ref:`scale-check-lambda0`),
            and with the automatic resets it beats k-means codes without them and
            small codes in the study's record (:ref:`the defaults table <scale-defaults>`). Until the first
            training batch the codebook holds a normal(0, ``init_scale``)
            placeholder, which eval-mode calls use as is. ``"normal"`` (std
            ``init_scale``) and ``"uniform"`` (on ``[-init_scale, init_scale]``)
            draw the codes at construction.
        init_scale: std / half-width of the random init and placeholder (> 0).
        kmeans_iters: Lloyd iterations for ``init="kmeans"`` (>= 0).
        kmeans_max_points: most batch vectors (all ranks together) the k-means init uses (>= 1).
        dead_code_threshold: ``None`` (default): automatic. A code is dead once
            ``DEAD_CODE_PATIENCE * K`` = ``16 K`` vectors in a row (over steps and
            ranks) were assigned to other codes; a code with its fair share ``1/K``
            of the data survives such a gap with probability ``1 - e^-16``. The unit
            is the expected count, so the rule is the same at any ``K`` and batch
            size, and it acts early: a code unused from the start is replaced after
            ``16 K / N`` steps (N vectors per step), where a threshold on
            ``cluster_size`` (EMA from 1 with decay 0.99) could not fire before step
            69. A float ``> 0``: the classic rule, ``cluster_size < threshold``. 0:
            never. Dead codes are replaced by the batch vectors that the current
            codebook serves worst (largest ``|z - q|^2``, from all ranks), which is
            deterministic, identical on all ranks, and compiles. On by default
            because idle codes are the failure the scaling study measures: in its
            record the resets remove the STE's deficit with small codes
            (:ref:`scale-check-idle`); measured here
            (tests/test_quantizer.py), a never-chosen code of K = 64 is replaced at
            step 1 with N = 1024 and at step 4 with N = 256 vectors per step.
        memory_budget: bytes per chunk of the (eager) nearest-code search.
        sync: keep the state identical on all ranks of ``process_group`` in training
            mode (default ``True``; no effect without ``torch.distributed``).
            Eval-mode calls run no collective, so evaluating on one rank is safe.
        process_group: the group to synchronise over (``None``: the default group).
        generator: optional ``torch.Generator`` for the random init and the
            k-means init (``None``: torch's global generator).
        freeze: start frozen (see :attr:`frozen`): training calls change no state and a
            learned codebook gets no gradient.
        manual_update: accumulate training calls' updates and apply them with
            :meth:`update` (gradient accumulation: several micro-batches, one EMA and
            dead-code step equal to one on their union; ``rotvq._pending``).
        zero_masked: masked positions get ``quantized = 0`` and ``indices = -1`` (default:
            their nearest code and its index); :meth:`get_codes_from_indices` then maps ``-1``
            to zeros.

    Several processes. With ``sync=True`` the per-code counts and sums of each
    training batch are summed over ranks before the EMA and dead-code updates, the
    k-means init runs on rank 0 of the group from a sample of every rank's batch
    and is broadcast, and dead codes are replaced from candidates of every rank.
    The state is then identical on every rank and the EMA state equals, up to
    floating-point summation order, that of one process fed all ranks' batches.
    Every training call runs the same collectives with the same shapes on every
    rank (one ``all_reduce``, plus one ``all_gather`` when dead codes are on), so
    an empty or fully masked batch on one rank cannot hang the others. Under DDP,
    the per-forward buffer broadcast (``broadcast_buffers=True``, called
    ``forward_sync_buffers`` in newer torch) is harmless, because the buffers are
    already equal on all ranks, and turning it off saves one broadcast per step;
    both are tested. (Without ``sync`` that broadcast would only hide divergence:
    rank 0's EMA state would overwrite the others'.) The first training call (and
    the first after ``load_state_dict``) broadcasts rank 0's whole state, then runs
    the k-means init if rank 0's ``initialized`` is false: loading a checkpoint on
    rank 0 only is enough. What the layer cannot check without a collective of its
    own, and the caller must keep equal on every rank: the constructor arguments,
    the mode (``train()``/``eval()``: a rank in training mode waits for the others
    in its collectives), the input dtype (the reduced tensors are in
    ``promote(codebook dtype, input dtype, float32)``), and calling
    ``load_state_dict`` on all ranks or none. An argument error (wrong shape,
    dtype or mask) raises on that rank before any collective; the other ranks then
    block in the step's ``all_reduce`` until the process group's timeout.

    Bad batches. An input with NaN or inf in an unmasked row raises
    ``ValueError`` (how many rows, the first index) before any state change. The
    check reuses the rows' norms that the statistics need anyway (a finite norm
    proves a finite row; only rows with a non-finite norm are read again) and costs
    one host synchronisation per call. With synchronisation, the count is summed
    over ranks first, so every rank raises together. Under ``torch.compile`` no
    exception can be raised from data: there a bad batch leaves the whole state
    unchanged (every update is gated by the check) and the outputs are NaN.
    """

    def __init__(self, dim: int, codebook_size: int, *, estimator: str | JacobianSurrogate = "rotation",
                 distance: str = "euclidean", channel_first: bool | None = None,
                 codebook_weight: float | None = None, commitment_weight: float = 1.0, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, init: str = "kmeans", init_scale: float = 1.0,
                 kmeans_iters: int = 10, kmeans_max_points: int = 65536,
                 dead_code_threshold: float | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 sync: bool = True, process_group=None, generator: torch.Generator | None = None,
                 freeze: bool = False, manual_update: bool = False, zero_masked: bool = False) -> None:
        QuantizerBase.__init__(self)
        for name, value in (("dim", dim), ("codebook_size", codebook_size),
                            ("kmeans_max_points", kmeans_max_points), ("memory_budget", memory_budget)):
            check_positive_int(name, value)
        check_nonnegative_int("kmeans_iters", kmeans_iters)
        if ema and codebook_weight is not None and codebook_weight != 1.0:
            raise ValueError(f"codebook_weight={codebook_weight!r} has no effect with ema=True: the EMA update moves "
                             "the codes and the loss has no codebook term; leave codebook_weight unset")
        codebook_weight = 1.0 if codebook_weight is None else codebook_weight
        for name, value in (("freeze", freeze), ("manual_update", manual_update), ("zero_masked", zero_masked)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        for name, value in (("commitment_weight", commitment_weight), ("decay", decay), ("eps", eps),
                            ("init_scale", init_scale), ("codebook_weight", codebook_weight),
                            ("dead_code_threshold", dead_code_threshold)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"{name} must be a real number, got {value!r}")
        checks = (("codebook_weight", codebook_weight >= 0), ("commitment_weight", commitment_weight >= 0),
                  ("decay", 0 < decay < 1), ("eps", eps > 0), ("init_scale", init_scale > 0),
                  ("dead_code_threshold", dead_code_threshold is None or dead_code_threshold >= 0))
        for name, ok in checks:
            if not ok:
                raise ValueError(f"invalid {name}={locals()[name]!r} (weights, iters and threshold "
                                 "must be >= 0, decay in (0, 1), eps and init_scale > 0)")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
        if channel_first not in (None, True, False):
            raise TypeError(f"channel_first must be True, False or None, got {channel_first!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.estimator = estimator
        self._op = self._resolve_estimator(estimator)  # resolved once: forward only applies it
        self.dim, self.codebook_size, self.distance, self.ema = dim, codebook_size, distance, bool(ema)
        self.channel_first = channel_first
        self.codebook_weight, self.commitment_weight = float(codebook_weight), float(commitment_weight)
        self.decay, self.eps, self.init, self.init_scale = float(decay), float(eps), init, float(init_scale)
        self.kmeans_iters, self.kmeans_max_points = kmeans_iters, kmeans_max_points
        self.dead_code_threshold = None if dead_code_threshold is None else float(dead_code_threshold)
        self.memory_budget, self.sync, self.process_group = memory_budget, bool(sync), process_group
        self.generator, self.zero_masked = generator, zero_masked
        self._init_state()
        self.frozen = freeze
        self._init_pending(manual_update)

    @staticmethod
    def _resolve_estimator(estimator: str | JacobianSurrogate) -> JacobianSurrogate:
        if isinstance(estimator, JacobianSurrogate):
            return estimator
        if isinstance(estimator, str):
            if estimator not in SURROGATE_NAMES:
                raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(SURROGATE_NAMES)} "
                                 "or a rotvq.JacobianSurrogate")
            return get_surrogate(estimator)
        raise TypeError(f"estimator must be a name or a JacobianSurrogate, got {type(estimator).__name__}")

    def extra_repr(self) -> str:
        est = self.estimator if isinstance(self.estimator, str) else type(self.estimator).__name__
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, estimator={est!r}, "
                f"distance={self.distance!r}, channel_first={self.channel_first}, ema={self.ema}, "
                f"init={self.init!r}")

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> VQOutput:
        """Quantise ``z``, compute the VQ losses and statistics, and (training) update the codebook.

        The steps: assign (nearest codes) → estimate (gradient estimator) → losses →
        statistics → update (training mode: k-means init on the first batch, EMA,
        dead codes, all *after* choosing the codes: ``quantized`` holds the codes as
        they were before this call's update). An empty batch (or every position
        masked, on every rank) gives zero losses, usage 0, perplexity 1 and updates
        nothing.

        Args:
            z: encoder outputs, ``(..., D)`` or, with ``channel_first=True``,
                ``(B, D, *spatial)``; floating point (float16/bfloat16: the search
                runs in float32, and codes are cast to ``z.dtype`` before the
                estimator, so the forward value is the code rounded to that dtype).
            mask: optional bool tensor of the leading shape (``(B, *spatial)`` or
                ``z.shape[:-1]``), True = real data. Masked positions train nothing
                (losses, EMA, k-means, dead codes) and count in no statistic: every
                output except ``quantized``/``indices`` equals that of ``vq(z[mask])``.
                They are still quantised (``quantized`` and ``indices`` are filled
                there too, and may be used), but they pass no gradient back to ``z``:
                the estimator and the losses see the code itself there (``z := q``), so
                padding full of NaN cannot leak into gradients.

        Returns:
            :class:`VQOutput`; ``quantized`` has the layout and dtype of ``z``.

        Raises:
            TypeError: non-floating input, non-bool mask.
            ValueError: wrong channel size, ambiguous layout (see ``channel_first``),
                mask of the wrong shape, NaN or inf in an unmasked row.
        """
        return super().forward(z, mask)

    def quantize_rows(self, flat: torch.Tensor, real: torch.Tensor | None, lead: torch.Size) -> Rows:
        """:meth:`forward` on rows ``(N, D)``: assign → estimate → losses → statistics → update.

        Args:
            flat: ``(N, D)`` encoder outputs (any floating dtype).
            real: ``(N,)`` bool (True = real data) or ``None``.
            lead: the input's leading shape (error messages name positions in it).

        Returns:
            :class:`rotvq._base.Rows`: ``z_q`` and ``q`` ``(N, D)``, ``indices`` ``(N,)``, the scalars.
        """
        group = self._group()
        acc = at_least_float32(torch.promote_types(self.embedding.dtype, flat.dtype))
        z_norm_rows, bad = check_rows(flat, real, acc)  # (N,) norms reused by the statistics, (N,) NaN/inf
        if self.training:
            self._run_setup(flat.detach(), real, bad, lead, group)  # pending: state broadcast, k-means init

        # assign: the nearest code (exact; fixed shapes when compiled)
        zg = flat if real is None else torch.where(real[:, None], flat, flat.detach())  # no gradient to padding
        zs = F.normalize(zg, dim=1) if self.distance == "cosine" else zg  # (N, D) what is quantised
        table = self.codes()  # (K, D), carries the codebook's gradient when learned by gradient
        indices = nearest_code(zs.detach(), table.detach(), distance=self.distance,
                               memory_budget=self.memory_budget)  # (N,)
        codes = table[indices]  # (N, D)
        q = codes.detach().to(flat.dtype)  # (N, D) chosen codes in the input dtype

        # estimate: z_q = sg[G] z + sg[q - G z] (eq. gen-def), and |z - q|^2 per row
        z_q, err_rows, zs = estimate(zs, q, codes.detach(), self._op, real, acc)

        # losses: this rank's real rows (DDP averages their gradients)
        w = None if real is None else real.to(acc)[:, None]  # (N, 1)
        learned = not (self.ema or self.frozen)  # a codebook term only for a codebook learned by gradient
        loss, codebook_loss, commitment_loss = vq_losses(
            err_rows, codes if learned else None, zs, w, self.dim, self.commitment_weight,
            self.codebook_weight if learned else None, acc)

        # statistics (global batch with synchronisation), then the update
        with torch.no_grad():
            stats = self._statistics(z_norm_rows, err_rows.detach(), zs.detach(), table.detach(), indices, w,
                                     bad, acc)
            D_.all_reduce_sum(stats.packed, group)
            counts, n, sums = stats.unpack()
            raise_if_bad(stats.bad_global, bad, lead)
            usage, perplexity = code_usage(counts, n, acc)
            z_norm, q_norm, quantization_error = stats.means()
            if self.training:
                self._update(counts, n, sums, stats, zs.detach(), codes.detach(), real, group)
        return Rows(z_q, q, indices, loss, codebook_loss, commitment_loss, usage, perplexity, z_norm, q_norm,
                    quantization_error)

    def _group(self):
        """The process group this training call synchronises over (``None``: none, and in eval mode)."""
        return D_.resolve_group(self.sync, self.process_group) if self.training else None

    def _make_output(self, quantized, indices, rows: Rows, cf: bool, lead: torch.Size) -> VQOutput:
        return VQOutput(quantized, indices, *rows.scalars())

    def _check_device(self, z: torch.Tensor) -> None:
        if z.device != self.embedding.device:  # before the k-means init could copy CPU codes into a GPU layer
            raise ValueError(f"input is on {z.device}, the codebook on {self.embedding.device}")

    def _index_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,)

    def _allows_missing(self) -> bool:
        return self.zero_masked

    def _codes_rows(self, indices: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        codes = self.codes().detach()[indices.clamp_min(0)]  # (..., D)
        codes = torch.where((indices >= 0)[..., None], codes, torch.zeros_like(codes))  # -1: no code
        return codes if dtype is None else codes.to(dtype)

    def get_codes_from_indices(self, indices: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The codes of ``indices`` in the layer's layout.

        Args:
            indices: int64 ``(B, *spatial)`` (channel-first) or ``(...)``, values in ``[0, K)``.
            dtype: output dtype (default: the codebook's); pass the input's dtype to
                get, in eval mode, exactly the ``quantized`` of the call that produced
                ``indices`` (bitwise).

        Returns:
            ``(B, D, *spatial)`` with ``channel_first=True``, else ``(..., D)``; unit
            codes for cosine distance.
        """
        return super().get_codes_from_indices(indices, dtype)
