"""A frozen copy of ``rotvq.VectorQuantizer`` as of commit ef80abf (before the quantizer refactor).

``rotvq/_codebook_state.py`` and ``rotvq/quantizer.py`` of that commit, concatenated, with
package-relative imports made absolute and the class renamed :class:`FrozenVectorQuantizer`.
``tests/test_golden.py`` trains this class and ``rotvq.VectorQuantizer`` side by side and
requires bitwise equal outputs, gradients and state: the results of record of the book's
training runs were made with this code. Do not edit it (it is the reference, not a
library); helpers it imports from ``rotvq`` (search, k-means, estimators, collectives) are
shared on purpose, so the comparison isolates the layer's own code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rotvq import distributed as D_


#: Automatic dead-code rule: a code is dead once ``DEAD_CODE_PATIENCE * K`` vectors in a row
#: (summed over steps and ranks) were assigned to other codes.
DEAD_CODE_PATIENCE = 16
#: Dead-code replacement candidates gathered per step, all ranks together (at least 64 per rank).
CANDIDATE_POOL = 8192

_EXTRA = 5  # packed statistics after the K counts: n, sum|z|, sum|q|, sum|z - q|^2, non-finite rows


def compiling() -> bool:
    """True while ``torch.compile`` traces (``torch.compiler.is_compiling``; False on old torch)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


class _Stats:
    """Per-batch statistics packed in one tensor, so that one ``all_reduce`` sums them all."""

    def __init__(self, packed: torch.Tensor, k: int, dim: int) -> None:
        self.packed, self.k, self.dim = packed, k, dim

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(counts (K,), n (), sums (K, D) or None)``."""
        k = self.k
        sums = self.packed[k + _EXTRA:]
        return self.packed[:k], self.packed[k], sums.reshape(k, self.dim) if sums.numel() else None

    @property
    def bad_global(self) -> torch.Tensor:
        return self.packed[self.k + 4]

    def means(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean ``|z|``, mean ``|q|`` and mean ``|z - q|^2`` over the (global) real rows."""
        n = self.packed[self.k].clamp_min(1)
        return tuple(self.packed[self.k + i] / n for i in (1, 2, 3))


class CodebookState:
    """Codebook, buffers and training-mode update of :class:`rotvq.VectorQuantizer` (mixin)."""

    def _init_state(self) -> None:
        gen, k, d = self.generator, self.codebook_size, self.dim
        weight = torch.empty(k, d, device=gen.device if gen is not None else torch.device("cpu"))
        if self.init == "uniform":
            weight.uniform_(-self.init_scale, self.init_scale, generator=gen)
        else:  # "normal", and the placeholder of "kmeans"
            weight.normal_(0.0, self.init_scale, generator=gen)
        weight = weight.cpu()
        if self.ema:
            self.register_buffer("embedding", weight)
            # one pseudo-observation at each code: embed_sum / cluster_size == codebook
            self.register_buffer("embed_sum", weight.clone())
        else:
            self.embedding = nn.Parameter(weight)
        self.register_buffer("cluster_size", torch.ones(k))  # EMA of per-batch counts
        self.register_buffer("unused_for", torch.zeros(k))  # vectors (all ranks) since last chosen
        self.register_buffer("initialized", torch.tensor(self.init != "kmeans"))
        self._needs_setup = True  # first training call: k-means init and one state broadcast
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def codebook(self) -> torch.Tensor:
        """The stored codes, shape ``(K, D)``: an ``nn.Parameter``, or a buffer with ``ema=True``."""
        return self.embedding

    def codes(self) -> torch.Tensor:
        """The codes the layer quantises to, ``(K, D)``: unit rows for cosine distance.

        For cosine with a learned codebook the normalisation is part of the graph
        (the codebook term's gradient flows through it); it normalises a copy, so
        in-place updates of the parameter after the forward leave backward intact.
        """
        if self.distance == "cosine":
            return F.normalize(self.embedding.clone(), dim=1)
        return self.embedding

    def _synced_tensors(self) -> list[torch.Tensor]:
        names = ["embedding", "cluster_size", "unused_for", "initialized"] + (["embed_sum"] if self.ema else [])
        return [getattr(self, name) for name in names]

    @torch.no_grad()
    def _load_codes(self, centroids: torch.Tensor) -> None:
        """Start from ``centroids`` (k-means init): one pseudo-observation per code."""
        self.embedding.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.unused_for.zero_()
        if self.ema:
            self.embed_sum.copy_(self.embedding)
        self.initialized.fill_(True)

    def _statistics(self, z_norm_rows: torch.Tensor, err_rows: torch.Tensor, zs: torch.Tensor,
                    table: torch.Tensor, indices: torch.Tensor, w: torch.Tensor | None, bad: torch.Tensor,
                    acc: torch.dtype) -> _Stats:
        """Counts, sums (EMA only) and sums of norms over the real rows, packed in one tensor.

        ``z_norm_rows`` and ``err_rows`` are the per-row ``|z|`` and ``|z - q|^2`` the
        forward already computed; the sum of ``|q|`` over the rows is ``Σ_k n_k |e_k|``.
        """
        k = self.codebook_size
        ones = torch.ones_like(indices, dtype=acc) if w is None else w[:, 0]  # (N,) 1 for real rows
        per_row = torch.stack([z_norm_rows, err_rows], 1)  # (N, 2)
        if w is not None:  # masked rows may hold anything (NaN too): select, never multiply
            per_row = torch.where(w > 0, per_row, torch.zeros_like(per_row))
        counts = torch.zeros(k, dtype=acc, device=zs.device).index_add_(0, indices, ones)
        q_norm_sum = (counts * torch.linalg.vector_norm(table.to(acc), dim=1)).sum()
        sums = per_row.sum(0)
        parts = [counts, ones.sum()[None], sums[:1], q_norm_sum[None], sums[1:], bad.sum().to(acc)[None]]
        if self.ema:
            za = zs.to(acc)
            rows = za if w is None else torch.where(w > 0, za, torch.zeros_like(za))
            parts.append(torch.zeros(k, self.dim, dtype=acc, device=zs.device).index_add_(0, indices, rows)
                         .reshape(-1))
        return _Stats(torch.cat(parts), k, self.dim)

    def _candidates(self, zs: torch.Tensor, codes: torch.Tensor, real: torch.Tensor | None,
                    acc: torch.dtype, world: int) -> torch.Tensor:
        """This rank's M replacement candidates: the rows served worst (largest ``|z - q|^2``).

        ``M = min(K, max(64, CANDIDATE_POOL // world))`` bounds what one ``all_gather``
        moves (about ``CANDIDATE_POOL (D + 1)`` floats in all); when more codes than
        that die in one step, candidates are reused and the duplicates die again later.
        Returns ``(M, D + 1)``: the rows and their error, ``-inf`` for padding (fewer
        than M real rows). The global top M of all ranks' rows is among the union of
        the ranks' top M, so sorting the gathered candidates gives the same
        replacements as one process with the whole batch (up to exact ties, and for
        the first M dead codes of a step).
        """
        k = min(self.codebook_size, max(64, CANDIDATE_POOL // world))
        rows = zs.to(acc)  # (N, D)
        err = (rows - codes.to(acc)).pow(2).sum(1)  # (N,)
        neg = torch.full_like(err, -torch.inf)
        err = torch.where(torch.isfinite(err), err, neg)  # non-finite rows never become codes
        if real is not None:
            err = torch.where(real, err, neg)
        if err.shape[0] < k:  # static shape: pad to M
            pad = k - err.shape[0]
            err = torch.cat([err, err.new_full((pad,), -torch.inf)])
            rows = torch.cat([rows, rows.new_zeros(pad, self.dim)])
        top = err.topk(k)
        return torch.cat([rows[top.indices], top.values[:, None]], 1)

    def _dead(self, counts: torch.Tensor, n: torch.Tensor, cluster_size: torch.Tensor
              ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(dead (K,) bool or None when off, new unused_for)``."""
        unused = torch.where(counts > 0, torch.zeros_like(self.unused_for), self.unused_for + n)
        if self.dead_code_threshold is None:
            return unused >= DEAD_CODE_PATIENCE * self.codebook_size, unused
        if self.dead_code_threshold > 0:
            return cluster_size < self.dead_code_threshold, unused
        return None, unused

    @torch.no_grad()
    def _update(self, counts: torch.Tensor, n: torch.Tensor, sums: torch.Tensor | None, stats: _Stats,
                zs: torch.Tensor, codes: torch.Tensor, real: torch.Tensor | None, group) -> None:
        """Training-mode state update: EMA of cluster sizes (and codebook), dead codes.

        Every new value is computed first and written only where the batch was
        good (finite, not empty): ``torch.where`` instead of Python branches.
        """
        d, acc = self.decay, counts.dtype
        ok = (stats.bad_global == 0) & (n > 0)
        cluster = self.cluster_size * d + counts.to(self.cluster_size.dtype) * (1 - d)  # N_k <- d N_k + (1-d) n_k
        emb = self.embedding
        if self.ema:
            embed_sum = self.embed_sum * d + sums.to(self.embed_sum.dtype) * (1 - d)  # m_k <- d m_k + (1-d) sum z
            total = cluster.sum()
            # Laplace smoothing: N_k <- (N_k + eps) / (total + K eps) * total, never 0
            smoothed = (cluster + self.eps) / (total + self.codebook_size * self.eps) * total
            emb = embed_sum / smoothed[:, None]  # e_k = m_k / N_k
            if self.distance == "cosine":  # keep the codes on the sphere
                emb = F.normalize(emb, dim=1)
        dead, unused = self._dead(counts, n, cluster)
        if dead is not None:
            pool = D_.all_gather_rows(self._candidates(zs, codes, real, acc, D_.world_size(group)),
                                      group)  # (W M, D + 1)
            rows, err = pool[:, :-1], pool[:, -1]
            order = torch.argsort(err, descending=True, stable=True)  # worst served first; padding last
            n_valid = (err > -torch.inf).sum()
            rank = (torch.cumsum(dead.to(torch.long), 0) - 1).clamp_min(0)  # i-th dead code -> i-th candidate
            pick = order[rank % n_valid.clamp_min(1)]
            reset = dead & (n_valid > 0)
            emb = torch.where(reset[:, None], rows[pick].to(emb.dtype), emb)
            fresh = 1.0 if self.dead_code_threshold is None else self.dead_code_threshold
            cluster = torch.where(reset, torch.full_like(cluster, fresh), cluster)
            unused = torch.where(reset, torch.zeros_like(unused), unused)
            if self.ema:
                embed_sum = torch.where(reset[:, None], emb * cluster[:, None], embed_sum)
        self.cluster_size.copy_(torch.where(ok, cluster, self.cluster_size))
        self.unused_for.copy_(torch.where(ok, unused, self.unused_for))
        if self.ema:
            self.embed_sum.copy_(torch.where(ok, embed_sum, self.embed_sum))
        if self.ema or dead is not None:
            self.embedding.copy_(torch.where(ok, emb, self.embedding))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the automatic dead-code rule have no `unused_for`; a state dict
        # without this layer's codebook (a partial load, strict=False) must leave it alone
        if prefix + "embedding" in state_dict:
            state_dict.setdefault(prefix + "unused_for", torch.zeros_like(self.unused_for))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _after_load(module: CodebookState, incompatible_keys) -> None:
    module._needs_setup = True  # a loaded state may still wait for its k-means init



import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rotvq._checks import at_least_float32, check_nonnegative_int, check_positive_int, generator_device
from rotvq.estimators import SURROGATE_NAMES, _apply_with_error, get_surrogate
from rotvq.kmeans import kmeans
from rotvq.operators import JacobianSurrogate
from rotvq.search import DEFAULT_MEMORY_BUDGET, DISTANCES, nearest_code


INITS = ("normal", "uniform", "kmeans")
#: Keys of :meth:`VQOutput.metrics`, in order.
METRIC_NAMES = ("loss", "codebook_loss", "commitment_loss", "usage", "perplexity", "z_norm", "q_norm",
                "quantization_error")


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
        values = torch.stack([getattr(self, name).detach().double() for name in METRIC_NAMES]).tolist()
        return dict(zip(METRIC_NAMES, values))


class FrozenVectorQuantizer(CodebookState, nn.Module):
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
        codebook_weight: beta, weight of the codebook term (>= 0, default 1.0).
        commitment_weight: gamma, weight of the commitment term (>= 0, default 0.25).
        ema: learn the codebook by exponential moving averages of cluster sizes
            and sums (a buffer, updated in training mode only; the codebook term is
            left out of ``loss``) instead of by gradient (an ``nn.Parameter``).
        decay: EMA decay in (0, 1), for the EMA codebook and ``cluster_size``.
        eps: Laplace smoothing constant of the EMA cluster sizes (> 0).
        init: ``"kmeans"`` (default): k-means (k-means++ seeding; spherical for
            cosine) on the first training batch, at most ``kmeans_max_points``
            vectors of it, gathered from all ranks. It is the default because it is
            the only choice that works at every data scale and codebook size: codes
            start where the data is, ``|q|/|z| ≈ 0.98`` against 0.08 for small
            random codes in :ref:`ch-scaling`, where random codes of the wrong
            scale leave codes idle (with the STE, a third of them). Until the first
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
            because idle codes are the failure :ref:`ch-scaling` measures (the STE
            with small codes leaves a third of them unused for good); measured here
            (tests/test_quantizer.py), a never-chosen code of K = 64 is replaced at
            step 1 with N = 1024 and at step 4 with N = 256 vectors per step.
        memory_budget: bytes per chunk of the (eager) nearest-code search.
        sync: keep the state identical on all ranks of ``process_group`` in training
            mode (default ``True``; no effect without ``torch.distributed``).
            Eval-mode calls run no collective, so evaluating on one rank is safe.
        process_group: the group to synchronise over (``None``: the default group).
        generator: optional ``torch.Generator`` for the random init and the
            k-means init (``None``: torch's global generator).

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
                 codebook_weight: float = 1.0, commitment_weight: float = 0.25, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, init: str = "kmeans", init_scale: float = 1.0,
                 kmeans_iters: int = 10, kmeans_max_points: int = 65536,
                 dead_code_threshold: float | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 sync: bool = True, process_group=None, generator: torch.Generator | None = None) -> None:
        nn.Module.__init__(self)
        for name, value in (("dim", dim), ("codebook_size", codebook_size),
                            ("kmeans_max_points", kmeans_max_points), ("memory_budget", memory_budget)):
            check_positive_int(name, value)
        check_nonnegative_int("kmeans_iters", kmeans_iters)
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
        self.generator = generator
        self._init_state()

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

    # ------------------------------------------------------------------ layout

    def _channel_first_for(self, z: torch.Tensor) -> bool:
        if self.channel_first is not None:
            return self.channel_first
        if z.dim() >= 4:
            raise ValueError(f"input of shape {tuple(z.shape)} has {z.dim()} dimensions: pass "
                             "channel_first=True for (B, C, *spatial) feature maps or channel_first=False "
                             "for (..., C) when constructing the VectorQuantizer (the layout is not "
                             "guessed from sizes)")
        if z.dim() == 3 and z.shape[1] == self.dim == z.shape[2]:
            raise ValueError(f"input of shape {tuple(z.shape)} is ambiguous: both axis 1 and axis 2 have "
                             f"size dim={self.dim}; pass channel_first=True or False at construction "
                             "(channel_first=False for (B, T, D) sequences whose length may equal dim)")
        return False

    def _to_rows(self, z: object) -> tuple[torch.Tensor, bool, torch.Size]:
        """``(flat (N, D), channel_first, leading shape)`` of a validated input."""
        if not isinstance(z, torch.Tensor) or not torch.is_floating_point(z):
            raise TypeError(f"input must be a floating-point tensor, got "
                            f"{z.dtype if isinstance(z, torch.Tensor) else type(z).__name__}")
        cf = self._channel_first_for(z)
        axis = 1 if cf else -1
        if z.dim() < (2 if cf else 1) or z.shape[axis] != self.dim:
            where = "axis 1 (channel_first=True)" if cf else "last axis"
            hint = ""
            if not cf and z.dim() >= 2 and z.shape[1] == self.dim:
                hint = "; for a channel-first (B, C, *spatial) input construct the layer with channel_first=True"
            raise ValueError(f"the input's {where} must have size dim={self.dim}, got shape "
                             f"{tuple(z.shape)}{hint}")
        if z.device != self.embedding.device:  # before the k-means init could copy CPU codes into a GPU layer
            raise ValueError(f"input is on {z.device}, the codebook on {self.embedding.device}")
        zl = z.movedim(1, -1) if cf else z  # (..., D)
        return zl.reshape(-1, self.dim), cf, zl.shape[:-1]

    def _from_rows(self, rows: torch.Tensor, cf: bool, lead: torch.Size) -> torch.Tensor:
        out = rows.reshape(*lead, rows.shape[-1])
        return out.movedim(-1, 1) if cf else out

    def _check_mask(self, mask: object, lead: torch.Size, z: torch.Tensor) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = real data), got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.shape != lead:
            raise ValueError(f"mask must have the input's leading shape {tuple(lead)} (no channel axis), "
                             f"got {tuple(mask.shape)}")
        if mask.device != z.device:
            raise ValueError(f"mask is on {mask.device}, input on {z.device}")
        return mask.reshape(-1)

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
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be an int64 or int32 tensor, got "
                            f"{indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__}")
        if not compiling() and indices.numel():  # negative indices would wrap around silently
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.codebook_size:
                raise ValueError(f"indices must lie in [0, {self.codebook_size}), got values in [{low}, {high}]")
        codes = self.codes().detach()[indices]  # (..., D)
        if dtype is not None:
            codes = codes.to(dtype)
        return codes.movedim(-1, 1) if self.channel_first and indices.dim() >= 1 else codes

    # ------------------------------------------------------------------ forward

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
        flat, cf, lead = self._to_rows(z)  # (N, D)
        real = self._check_mask(mask, lead, z)  # (N,) bool or None
        group = D_.resolve_group(self.sync, self.process_group) if self.training else None
        acc = at_least_float32(torch.promote_types(self.embedding.dtype, z.dtype))
        with torch.no_grad():
            z_norm_rows = torch.linalg.vector_norm(flat.detach().to(acc), dim=1)  # (N,) reused by the statistics
        bad = _nonfinite_rows(flat.detach(), z_norm_rows)  # (N,)
        if real is not None:
            bad = bad & real
        if self.training and self._needs_setup:
            self._setup(flat.detach(), real, bad, group, lead)

        # assign
        zg = flat if real is None else torch.where(real[:, None], flat, flat.detach())  # no gradient to padding
        zs = F.normalize(zg, dim=1) if self.distance == "cosine" else zg  # (N, D) what is quantised
        table = self.codes()  # (K, D), carries the codebook's gradient when learned by gradient
        indices = nearest_code(zs.detach(), table.detach(), distance=self.distance,
                               memory_budget=self.memory_budget)  # (N,) exact; fixed shapes when compiled
        codes = table[indices]  # (N, D)
        q = codes.detach().to(z.dtype)  # (N, D) chosen codes in the input dtype
        if real is not None:  # masked rows become their own code: zero loss, zero gradient, never NaN
            zs = torch.where(real[:, None], zs, q.to(zs.dtype))
        # estimate: forward value exactly q; backward sends G^T g to z (STE, rotation trick, ...)
        # and |z - q|^2 per row (the commitment term), in one autograd node
        z_q, err_rows = _apply_with_error(zs, q, codes.detach(), self._op, acc)
        if real is not None:  # exactly 0 on masked rows (z := q there, but q may be a rounded code)
            err_rows = torch.where(real, err_rows, torch.zeros_like(err_rows))

        # losses (this rank's real rows; DDP averages their gradients)
        w = None if real is None else real.to(acc)[:, None]  # (N, 1)
        n_local = flat.new_tensor(flat.shape[0], dtype=acc) if w is None else w.sum()
        entries = (n_local * self.dim).clamp_min(1)
        commitment_loss = err_rows.sum() / entries
        loss = self.commitment_weight * commitment_loss
        if self.ema:  # the codebook term moves nothing (the EMA update replaces it): its value only
            codebook_loss = commitment_loss.detach()  # (q - z)^2 == (z - q)^2 bitwise
        else:
            codebook_loss = (codes.to(acc) - zs.detach().to(acc)).pow(2).sum(1).sum() / entries
            loss = loss + self.codebook_weight * codebook_loss

        # statistics (global batch with synchronisation), then the update
        with torch.no_grad():
            stats = self._statistics(z_norm_rows, err_rows.detach(), zs.detach(), table.detach(), indices, w,
                                     bad, acc)
            D_.all_reduce_sum(stats.packed, group)
            counts, n, sums = stats.unpack()
            self._raise_if_bad(stats.bad_global, bad, lead)
            p = counts / n.clamp_min(1)
            perplexity = torch.exp(-torch.special.xlogy(p, p).sum())
            usage = (counts > 0).to(acc).mean()
            z_norm, q_norm, quantization_error = stats.means()
            if self.training:
                self._update(counts, n, sums, stats, zs.detach(), codes.detach(), real, group)
        return VQOutput(self._from_rows(z_q, cf, lead), indices.reshape(lead), loss, codebook_loss,
                        commitment_loss, usage, perplexity, z_norm, q_norm, quantization_error)

    def _raise_if_bad(self, bad_global: torch.Tensor, bad: torch.Tensor, lead: torch.Size) -> None:
        """ValueError for non-finite rows (eager only; compiled code gates the updates instead)."""
        if compiling():
            return
        total = int(bad_global.item())
        if total == 0:
            return
        local = int(bad.sum().item())
        if local:
            first = int(torch.nonzero(bad)[0].item())
            where = []
            for size in reversed(lead):  # the flat row index as an index into the leading shape
                first, rest = divmod(first, size)
                where.insert(0, rest)
            where = tuple(where)
            raise ValueError(f"input has {local} row(s) with NaN or inf (first at leading index {where}); "
                             "nothing was updated")
        raise ValueError(f"another rank's input has NaN or inf in {total} row(s); nothing was updated")

    @torch.no_grad()
    def _setup(self, flat_z: torch.Tensor, real: torch.Tensor | None, bad: torch.Tensor, group,
               lead: torch.Size) -> None:
        """First training call: one broadcast of the state, then the k-means init (all ranks' data).

        The broadcast comes first, so that every rank decides on k-means from rank 0's
        ``initialized`` flag: a rank resumed from a checkpoint and a fresh one (k-means
        pending on one rank only) run the same collectives and end with the same state.
        """
        for tensor in self._synced_tensors():  # ranks constructed with different seeds agree from here on
            D_.broadcast_from_first(tensor.data, group)
        zs = F.normalize(flat_z, dim=1) if self.distance == "cosine" else flat_z
        if self.init == "kmeans" and not bool(self.initialized):
            keep = ~bad if real is None else real & ~bad
            rows = zs[keep]
            w = D_.world_size(group)
            per_rank = max(1, math.ceil(self.kmeans_max_points / w))
            if rows.shape[0] > per_rank:
                rows = rows[self._sample(rows.shape[0], per_rank, rows.device)]
            counts = torch.stack([rows.new_tensor(rows.shape[0], dtype=torch.float64),
                                  bad.sum().to(torch.float64)])
            D_.all_reduce_sum(counts, group)
            self._raise_if_bad(counts[1], bad, lead)
            if int(counts[0].item()) == 0:
                return  # no data anywhere yet: stay uninitialised, try again next call
            acc = at_least_float32(rows.dtype)
            padded = rows.new_zeros(per_rank, self.dim, dtype=acc)
            padded[:rows.shape[0]] = rows.to(acc)
            valid = torch.arange(per_rank, device=rows.device) < rows.shape[0]
            pool = D_.all_gather_rows(torch.cat([padded, valid.to(acc)[:, None]], 1), group)
            pool, pool_valid = pool[:, :-1], pool[:, -1] > 0  # rank 0's rows, then rank 1's, ...
            centroids = torch.empty(self.codebook_size, self.dim, dtype=acc, device=rows.device)
            if group is None or torch.distributed.get_rank(group) == 0:
                centroids, _ = kmeans(pool[pool_valid], self.codebook_size, iters=self.kmeans_iters,
                                      generator=self.generator, memory_budget=self.memory_budget,
                                      distance=self.distance)
            self._load_codes(D_.broadcast_from_first(centroids.contiguous(), group))
        self._needs_setup = False

    def _sample(self, n: int, m: int, device: torch.device) -> torch.Tensor:
        """``m <= n`` distinct row indices in ``[0, n)``, drawn with the layer's generator."""
        dev = generator_device(self.generator, device)
        return torch.randperm(n, generator=self.generator, device=dev)[:m].to(device)


def _nonfinite_rows(flat: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool, True on the rows of ``flat`` that hold a NaN or an inf.

    ``norms`` are the rows' 2-norms: a finite norm proves a finite row, so in eager mode
    only the rows with a non-finite norm (non-finite entries, or a sum of squares that
    overflows) are read again. Compiled code checks every entry (no data-dependent shapes).
    """
    if compiling():
        return ~torch.isfinite(flat).all(1)
    suspect = ~torch.isfinite(norms)
    if bool(suspect.any()):
        rows = suspect.nonzero().squeeze(1)
        suspect[rows] = ~torch.isfinite(flat[rows]).all(1)
    return suspect
