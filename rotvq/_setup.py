"""One-time setup of a quantizer's state on the first training call, and again after ``load_state_dict``.

A quantizer whose state must be identical on every data-parallel rank (a codebook, whose
setup also runs the k-means init, :mod:`rotvq._codebook_state`; a residual quantizer's
quantize-dropout counter) broadcasts rank 0's state on its first training call, and on the
first one after a checkpoint was loaded. Loading a quantizer's checkpoint on rank 0 only is
then enough for its own state, and ranks constructed with different seeds agree from there on.

``torch.compile``. The setup is data-dependent (k-means samples the batch, reads
``initialized``, may find no data and try again), so it cannot be traced. Under
``torch.compile`` it runs as one opaque custom operator, ``torch.ops.rotvq.layer_setup``,
which calls the same eager code at run time and returns the new state; the graph copies it
in. A training step therefore compiles with ``fullgraph=True`` on a fresh model and after
``load_state_dict`` (no recompilation: whether a setup is pending is read at run time, not
guarded on), and computes what eager mode computes. The price, once set up, is one call of
the operator per training step and a copy of the synchronised state.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

from . import distributed as D_
from ._checks import compiling

__all__ = ["SetupState"]

_REGISTRY: "weakref.WeakValueDictionary[int, SetupState]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()
# Every call of the operator reads this counter and the graph writes back its increment: the data dependency
# orders the calls of one compiled graph as the program wrote them, so that setups drawing from one random
# generator draw in eager order.
_ORDER = torch.zeros((), dtype=torch.int64)


class SetupState:
    """Mixin for an ``nn.Module`` with state to set up: call ``_init_setup()`` in ``__init__`` and
    ``_run_setup(...)`` in training calls; implement ``_synced_tensors()`` (and, for more than a broadcast,
    ``_setup_values``)."""

    def _init_setup(self) -> None:
        self._needs_setup = True
        self.register_load_state_dict_post_hook(_after_load)
        self._register()

    def _register(self) -> None:
        key = next(_KEYS)
        self.__dict__["_setup_key"] = key  # a plain int: the compiled graph passes it to the operator
        _REGISTRY[key] = self

    def __setstate__(self, state) -> None:  # copy.deepcopy and pickle: a copy is a module of its own
        super().__setstate__(state)
        self._register()

    def _synced_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _setup_values(self, state: list[torch.Tensor], flat: torch.Tensor, real: torch.Tensor | None,
                      bad: torch.Tensor | None, lead: torch.Size | None, group) -> tuple[list[torch.Tensor], bool]:
        """``(new values of state, done)``, computed eagerly; the default broadcasts rank 0's values."""
        return [D_.broadcast_from_first(t.detach().clone(), group) for t in state], True

    @torch.no_grad()
    def _run_setup(self, flat: torch.Tensor, real: torch.Tensor | None, bad: torch.Tensor | None,
                   lead: torch.Size, group) -> None:
        """The setup, if one is pending (eagerly), or through the operator (compiled)."""
        state = self._synced_tensors()
        if compiling():
            order, *new = torch.ops.rotvq.layer_setup(self._setup_key, _ORDER, state, flat.detach(), real, bad)
            _ORDER.copy_(order)
        elif self._needs_setup:
            new, done = self._setup_values(state, flat.detach(), real, bad, lead, group)
            self._needs_setup = not done
        else:
            return
        for tensor, value in zip(state, new):
            tensor.copy_(value)


def _after_load(module: SetupState, incompatible_keys) -> None:
    module._needs_setup = True  # a loaded state may still wait for its k-means init; ranks sync again


@torch.library.custom_op("rotvq::layer_setup", mutates_args=())
def _layer_setup(key: int, order: torch.Tensor, state: list[torch.Tensor], flat: torch.Tensor,
                 real: Optional[torch.Tensor], bad: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """Run module ``key``'s pending setup eagerly: ``[order + 1, *new values of state]`` (copies when none is
    pending)."""
    module = _REGISTRY[key]
    if module._needs_setup:
        new, done = module._setup_values(state, flat, real, bad, None, module._group())
        module._needs_setup = not done
    else:
        new = state
    return [order + 1] + [v.clone() for v in new]  # an operator's outputs may not alias its inputs


@_layer_setup.register_fake
def _(key, order, state, flat, real, bad):
    return [torch.empty_like(order)] + [torch.empty_like(t) for t in state]
