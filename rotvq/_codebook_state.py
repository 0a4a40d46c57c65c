"""The state of a VQ codebook and its training-mode update (EMA, dead codes), with fixed shapes.

Private helper of :mod:`rotvq.quantizer`: :class:`CodebookState` is the part of
:class:`rotvq.VectorQuantizer` that owns the codebook, its buffers, their one-time setup
(state broadcast and k-means init, run through :mod:`rotvq._setup`) and their
update. Everything after the setup uses only fixed-shape tensor operations
(``index_add_``, ``torch.where``, ``topk``, ``argsort``): no ``.item()``, no
``torch.unique``, no data-dependent shapes, so a training step compiles with
``torch.compile(fullgraph=True)``, and every rank runs the same collectives with
the same shapes whatever its data. A bad (non-finite) batch gates every update.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D_
from ._checks import at_least_float32, compiling, generator_device
from ._pending import PendingUpdates
from ._setup import SetupState
from ._steps import raise_if_bad
from .kmeans import kmeans

__all__ = ["CodebookState", "DEAD_CODE_PATIENCE", "compiling"]

#: Automatic dead-code rule: a code is dead once ``DEAD_CODE_PATIENCE * K`` vectors in a row
#: (summed over steps and ranks) were assigned to other codes.
DEAD_CODE_PATIENCE = 16
#: Dead-code replacement candidates gathered per step, all ranks together (at least 64 per rank).
CANDIDATE_POOL = 8192

_EXTRA = 5  # packed statistics after the K counts: n, sum|z|, sum|q|, sum|z - q|^2, non-finite rows


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


class CodebookState(PendingUpdates, SetupState):
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
        self._init_setup()  # first training call (and after a load): one state broadcast, k-means init

    @property
    def frozen(self) -> bool:
        """Whether the codebook is frozen: training calls change no state (no EMA, dead-code reset, k-means
        init or statistics buffer) and a learned codebook gets no gradient (``requires_grad=False``, so
        optimizers skip it; freeze before wrapping the model in DDP). Settable at any time."""
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"frozen must be a bool, got {value!r}")
        self._frozen = value
        if not self.ema:
            self.embedding.requires_grad_(not value)

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
        return [getattr(self, name) for name in self._synced_names()]

    def _synced_names(self) -> list[str]:
        return ["embedding", "cluster_size", "unused_for", "initialized"] + (["embed_sum"] if self.ema else [])

    def _setup(self, flat_z: torch.Tensor, real: torch.Tensor | None, bad: torch.Tensor, group,
               lead: torch.Size) -> None:
        """The pending setup, eagerly and in place (:meth:`_setup_values`)."""
        self._needs_setup = True
        self._run_setup(flat_z, real, bad, lead, group)

    @torch.no_grad()
    def _setup_values(self, state: list[torch.Tensor], flat_z: torch.Tensor, real: torch.Tensor | None,
                      bad: torch.Tensor, lead: torch.Size | None, group) -> tuple[list[torch.Tensor], bool]:
        """First training call: one broadcast of the state, then the k-means init (all ranks' data).

        The broadcast comes first, so that every rank decides on k-means from rank 0's
        ``initialized`` flag: a rank resumed from a checkpoint and a fresh one (k-means
        pending on one rank only) run the same collectives and end with the same state.
        Returns the new values of ``state`` (:meth:`_synced_tensors`) and whether the setup is
        done (not when no rank had data for the k-means init yet: it runs again next call).
        """
        # ranks constructed with different seeds agree from here on
        v = {name: D_.broadcast_from_first(t.detach().clone(), group) for name, t in zip(self._synced_names(), state)}
        zs = F.normalize(flat_z, dim=1) if self.distance == "cosine" else flat_z
        if self.init == "kmeans" and not bool(v["initialized"]):
            if self.frozen:
                return list(v.values()), False  # a frozen codebook is not initialised; it will be once unfrozen
            keep = ~bad if real is None else real & ~bad
            rows = zs[keep]
            w = D_.world_size(group)
            per_rank = max(1, math.ceil(self.kmeans_max_points / w))
            if rows.shape[0] > per_rank:
                rows = rows[self._sample(rows.shape[0], per_rank, rows.device)]
            counts = torch.stack([rows.new_tensor(rows.shape[0], dtype=torch.float64),
                                  bad.sum().to(torch.float64)])
            D_.all_reduce_sum(counts, group)
            raise_if_bad(counts[1], bad, lead)
            if int(counts[0].item()) == 0:
                return list(v.values()), False  # no data anywhere yet: stay uninitialised, try again next call
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
            centroids = D_.broadcast_from_first(centroids.contiguous(), group)
            # start from the centroids, one pseudo-observation per code
            v["embedding"] = centroids.to(v["embedding"].dtype)
            v["cluster_size"] = torch.ones_like(v["cluster_size"])
            v["unused_for"] = torch.zeros_like(v["unused_for"])
            v["initialized"] = torch.ones_like(v["initialized"])
            if self.ema:
                v["embed_sum"] = v["embedding"].clone()
        return list(v.values()), True

    def _sample(self, n: int, m: int, device: torch.device) -> torch.Tensor:
        """``m <= n`` distinct row indices in ``[0, n)``, drawn with the layer's generator."""
        dev = generator_device(self.generator, device)
        return torch.randperm(n, generator=self.generator, device=dev)[:m].to(device)

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

    def _candidate_rows(self, world: int) -> int:
        """``M = min(K, max(64, CANDIDATE_POOL // world))``, the candidates one rank offers."""
        return min(self.codebook_size, max(64, CANDIDATE_POOL // world))

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
        k = self._candidate_rows(world)
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

    def _resets(self) -> bool:
        """Whether dead codes are replaced (the automatic rule, or a threshold > 0)."""
        return self.dead_code_threshold is None or self.dead_code_threshold > 0

    @torch.no_grad()
    def _update(self, counts: torch.Tensor, n: torch.Tensor, sums: torch.Tensor | None, stats: _Stats,
                zs: torch.Tensor, codes: torch.Tensor, real: torch.Tensor | None, group) -> None:
        """Training-mode state update from this batch: now, or (``manual_update``) at :meth:`update`."""
        if self.frozen:
            return
        acc = counts.dtype
        if self.manual_update:
            candidates = (self._candidates(zs, codes, real, torch.float64, D_.world_size(group))
                          if self._resets() else None)
            self._accumulate(counts, n, sums, stats.bad_global, candidates)
            return
        candidates = self._candidates(zs, codes, real, acc, D_.world_size(group)) if self._resets() else None
        self._apply_update(counts, n, sums, stats.bad_global, candidates, group)

    @torch.no_grad()
    def _apply_update(self, counts: torch.Tensor, n: torch.Tensor, sums: torch.Tensor | None,
                      bad_global: torch.Tensor, candidates: torch.Tensor | None, group) -> None:
        """EMA of cluster sizes (and codebook), dead codes, from global ``counts (K,)``, ``n ()`` and
        ``sums (K, D)`` (EMA only), and this rank's replacement ``candidates (M, D + 1)``.

        Every new value is computed first and written only where the batch was
        good (finite, not empty): ``torch.where`` instead of Python branches.
        """
        d = self.decay
        ok = (bad_global == 0) & (n > 0)
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
            pool = D_.all_gather_rows(candidates, group)  # (W M, D + 1)
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
