"""One-time setup of a quantizer's state on the first training call, and again after ``load_state_dict``.

A quantizer with state that must be identical on every data-parallel rank (a residual
quantizer's quantize-dropout counter; a codebook, whose setup also runs the k-means init in
:mod:`rotvq._codebook_state`) broadcasts rank 0's state on its first training call, and on
the first one after a checkpoint was loaded: loading a checkpoint on rank 0 only is then
enough for that state, and ranks constructed with different seeds agree from there on.
"""
from __future__ import annotations

import torch

from . import distributed as D_

__all__ = ["SetupState"]


class SetupState:
    """Mixin for an ``nn.Module``: ``_init_setup()`` in ``__init__``, ``_run_setup(group)`` in training calls,
    ``_synced_tensors()`` the tensors rank 0 broadcasts."""

    def _init_setup(self) -> None:
        self._needs_setup = True
        self.register_load_state_dict_post_hook(_after_load)

    def _synced_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def _run_setup(self, group) -> None:
        if self._needs_setup:
            for tensor in self._synced_tensors():
                D_.broadcast_from_first(tensor.data, group)
            self._needs_setup = False


def _after_load(module: SetupState, incompatible_keys) -> None:
    module._needs_setup = True
