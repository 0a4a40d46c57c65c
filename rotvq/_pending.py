"""Accumulated codebook updates: gradient-accumulation micro-batches make one EMA / dead-code step.

With ``manual_update=True`` a :class:`rotvq.VectorQuantizer`'s training calls do not update
its state; they add the batch's global code counts, row count, per-code sums (EMA) and this
rank's dead-code candidates to float64 accumulators, and :meth:`PendingUpdates.update`
applies them as one update, the one a single call on the union of the micro-batches would
make (up to float summation order): counts and sums add, and the worst-served rows of a
union are the worst-served of the micro-batches' worst-served rows. Every micro-batch is
quantised with the same codebook, as the rows of one large batch would be.
"""
from __future__ import annotations

import torch

from . import distributed as D_

__all__ = ["PendingUpdates"]


class PendingUpdates:
    """Mixin of :class:`rotvq._codebook_state.CodebookState`: the accumulators and :meth:`update`."""

    def _init_pending(self, manual_update: bool) -> None:
        self.manual_update = manual_update
        if not manual_update:
            return
        k, d = self.codebook_size, self.dim
        f64 = dict(dtype=torch.float64, device=self.embedding.device)
        self.register_buffer("_pending_counts", torch.zeros(k, **f64), persistent=False)
        self.register_buffer("_pending_n", torch.zeros((), **f64), persistent=False)
        self.register_buffer("_pending_sums", torch.zeros(k, d, **f64) if self.ema else None, persistent=False)
        m = self._candidate_rows(1)  # the most candidates one rank keeps
        self.register_buffer("_pending_candidates", torch.zeros(m, d + 1, **f64) if self._resets() else None,
                             persistent=False)
        self._clear_pending()

    @torch.no_grad()
    def _clear_pending(self) -> None:
        self._pending_counts.zero_()
        self._pending_n.zero_()
        if self._pending_sums is not None:
            self._pending_sums.zero_()
        if self._pending_candidates is not None:
            self._pending_candidates.zero_()
            self._pending_candidates[:, -1] = -torch.inf  # no candidate yet

    @torch.no_grad()
    def _accumulate(self, counts: torch.Tensor, n: torch.Tensor, sums: torch.Tensor | None,
                    bad_global: torch.Tensor, candidates: torch.Tensor | None) -> None:
        """Add one training call's global counts, ``n`` and sums, and merge its candidates (a bad batch adds
        nothing)."""
        ok = bad_global == 0
        for total, part in ((self._pending_counts, counts), (self._pending_n, n), (self._pending_sums, sums)):
            if total is not None:
                total.add_(torch.where(ok, part.to(torch.float64), torch.zeros_like(total)))
        if candidates is not None:
            held = self._pending_candidates  # (M_max, D + 1), sorted by error, -inf padding
            merged = torch.cat([held, candidates.to(torch.float64)])
            top = merged[:, -1].topk(held.shape[0]).indices  # the worst-served rows of both
            held.copy_(torch.where(ok, merged[top], held))

    @torch.no_grad()
    def update(self) -> None:
        """Apply the updates accumulated since the last call, as one update, and clear them.

        Call it once per accumulation cycle (after the micro-batches, e.g. next to
        ``optimizer.step()``), on every rank: it runs the dead-code ``all_gather``. A frozen
        layer discards what it accumulated.

        Raises:
            RuntimeError: the layer was not constructed with ``manual_update=True``.
        """
        if not self.manual_update:
            raise RuntimeError(f"{type(self).__name__}.update() applies the updates accumulated with "
                               "manual_update=True; this layer updates its codebook in every training call")
        group = D_.resolve_group(self.sync, self.process_group)
        if not self.frozen:
            candidates = self._pending_candidates
            if candidates is not None:
                candidates = candidates[:self._candidate_rows(D_.world_size(group))]  # sorted: the top M
            self._apply_update(self._pending_counts, self._pending_n, self._pending_sums,
                               torch.zeros((), device=self._pending_n.device), candidates, group)
        self._clear_pending()
