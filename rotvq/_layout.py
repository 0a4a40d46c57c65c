"""Input layouts shared by rotvq's quantizers: channel-last ``(..., D)`` or channel-first ``(B, D, *spatial)``.

Every quantizer computes on rows ``(N, D)``. These helpers turn an input into rows and back,
and validate masks and index tensors, identically for every quantizer, so that a layout
rule (never guess the channel axis of a 4-D tensor) is written once.
"""
from __future__ import annotations

import torch

from ._checks import compiling

__all__ = ["resolve_channel_first", "to_rows", "from_rows", "check_mask", "check_indices", "indices_layout"]


def resolve_channel_first(z: torch.Tensor, dim: int, channel_first: bool | None, owner: str) -> bool:
    """Whether ``z`` is channel-first, from the quantizer's ``channel_first`` setting.

    ``None``: 1-D and 2-D inputs are ``(..., D)``; a 3-D input is ``(B, T, D)`` unless
    ``shape[1] == D`` too (ambiguous: raises); 4-D or larger raises (``owner`` names the class).
    """
    if channel_first is not None:
        return channel_first
    if z.dim() >= 4:
        raise ValueError(f"input of shape {tuple(z.shape)} has {z.dim()} dimensions: pass "
                         "channel_first=True for (B, C, *spatial) feature maps or channel_first=False "
                         f"for (..., C) when constructing the {owner} (the layout is not "
                         "guessed from sizes)")
    if z.dim() == 3 and z.shape[1] == dim == z.shape[2]:
        raise ValueError(f"input of shape {tuple(z.shape)} is ambiguous: both axis 1 and axis 2 have "
                         f"size dim={dim}; pass channel_first=True or False at construction "
                         "(channel_first=False for (B, T, D) sequences whose length may equal dim)")
    return False


def to_rows(z: object, dim: int, channel_first: bool | None, owner: str
            ) -> tuple[torch.Tensor, bool, torch.Size]:
    """``(rows (N, D), channel_first, leading shape)`` of a validated input.

    Raises:
        TypeError: ``z`` is not a floating-point tensor.
        ValueError: the channel axis does not have size ``dim``, or the layout is ambiguous.
    """
    if not isinstance(z, torch.Tensor) or not torch.is_floating_point(z):
        raise TypeError(f"input must be a floating-point tensor, got "
                        f"{z.dtype if isinstance(z, torch.Tensor) else type(z).__name__}")
    cf = resolve_channel_first(z, dim, channel_first, owner)
    axis = 1 if cf else -1
    if z.dim() < (2 if cf else 1) or z.shape[axis] != dim:
        where = "axis 1 (channel_first=True)" if cf else "last axis"
        hint = ""
        if not cf and z.dim() >= 2 and z.shape[1] == dim:
            hint = "; for a channel-first (B, C, *spatial) input construct the layer with channel_first=True"
        raise ValueError(f"the input's {where} must have size dim={dim}, got shape {tuple(z.shape)}{hint}")
    zl = z.movedim(1, -1) if cf else z  # (..., D)
    return zl.reshape(-1, dim), cf, zl.shape[:-1]


def from_rows(rows: torch.Tensor, cf: bool, lead: torch.Size) -> torch.Tensor:
    """Rows ``(N, C)`` back in the input's layout: ``(*lead, C)``, or ``(B, C, *spatial)``."""
    out = rows.reshape(*lead, rows.shape[-1])
    return out.movedim(-1, 1) if cf else out


def check_mask(mask: object, lead: torch.Size, z: torch.Tensor) -> torch.Tensor | None:
    """The mask as rows ``(N,)`` bool (True = real data), or ``None``.

    Raises:
        TypeError: not a bool tensor.
        ValueError: not the input's leading shape, or another device.
    """
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


def check_indices(indices: object, sizes: tuple[int, ...], allow_missing: bool) -> torch.Tensor:
    """Validate an index tensor whose trailing axes are ``sizes[1:]`` and values in ``[0, sizes[0])``.

    Args:
        indices: int64 or int32 tensor.
        sizes: ``(K,)`` for one index per position, ``(K, Q)`` for ``Q`` per position, ...
        allow_missing: accept ``-1`` ("no code": a masked position or a dropped stage).

    Raises:
        TypeError: not an int64/int32 tensor.
        ValueError: wrong trailing shape, values out of range (checked eagerly only: a compiled graph
            cannot raise from data).
    """
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be an int64 or int32 tensor, got "
                        f"{indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__}")
    k, trailing = sizes[0], tuple(sizes[1:])
    if trailing and tuple(indices.shape[indices.dim() - len(trailing):]) != trailing:
        raise ValueError(f"indices must end with the axes {trailing}, got shape {tuple(indices.shape)}")
    if not compiling() and indices.numel():  # negative indices would wrap around silently
        low, high = int(indices.min()), int(indices.max())
        if low < (-1 if allow_missing else 0) or high >= k:
            valid = f"[0, {k})" + (" or -1" if allow_missing else "")
            raise ValueError(f"indices must lie in {valid}, got values in [{low}, {high}]")
    return indices


def indices_layout(codes: torch.Tensor, channel_first: bool | None, index_dims: int) -> torch.Tensor:
    """Codes gathered at ``(..., C)`` moved to the quantizer's layout (channel axis 1 when channel-first
    and the positions have at least one axis)."""
    return codes.movedim(-1, 1) if channel_first and index_dims >= 1 else codes
