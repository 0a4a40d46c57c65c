"""Collectives that keep a VQ layer's state identical on every data-parallel rank.

:class:`rotvq.VectorQuantizer` calls these helpers in training mode. Each one
runs the same collectives, with the same tensor shapes, on every rank whatever the
local data (an empty batch, every row masked, no dead code), so that no rank can
wait for a collective that another rank skips: that is what makes a hang
impossible. With no process group (``torch.distributed`` not initialised, one
rank, or ``sync=False`` in the layer) every helper is the single-process identity
and runs no collective at all.

Backends. Only ``all_reduce``, ``all_gather`` and ``broadcast`` of dense tensors
are used, which gloo (CPU) and NCCL (CUDA) both provide; tensors stay on the
layer's device, as NCCL requires.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["resolve_group", "world_size", "all_reduce_sum", "all_gather_rows", "broadcast_from_first"]


def resolve_group(sync: bool, process_group=None):
    """The process group the layer synchronises over, or ``None`` for no synchronisation.

    ``None`` when ``sync`` is false, when ``torch.distributed`` is unavailable or
    not initialised, or when the group has a single rank. Otherwise
    ``process_group`` (``None`` there means the default group, returned as
    ``dist.group.WORLD``).
    """
    if not sync or not dist.is_available() or not dist.is_initialized():
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def world_size(group) -> int:
    """Number of ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group``, in place; the identity for ``None``."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_rows(rows: torch.Tensor, group) -> torch.Tensor:
    """Concatenate fixed-size blocks of rows from every rank, in rank order.

    Args:
        rows: ``(M, C)``, the same ``M``, ``C`` and dtype on every rank (pad, and
            mark padding in a column of its own).
        group: the process group, or ``None`` (returns ``rows``).

    Returns:
        ``(W * M, C)`` for ``W`` ranks: rank 0's rows, then rank 1's, ...; identical
        on every rank. When each rank holds a contiguous slice of a global batch,
        the valid rows come back in the global batch's order, so what is computed
        from them equals what one process computes from the whole batch.
    """
    if group is None:
        return rows
    out = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, rows.contiguous(), group=group)
    return torch.cat(out)


def broadcast_from_first(tensor: torch.Tensor, group) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with its value on the group's first rank (in place)."""
    if group is not None:
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return tensor
