r"""Gradient estimators for vector quantization: forward ``q``, backward ``G^T g``.

* :func:`ste` — the straight-through estimator ``z + sg[q - z]`` (Bengio et al. 2013;
  van den Oord et al. 2017), backward ``g``.
* :func:`generalized_ste` — ``sg[G] z + sg[q - G z]`` for a dense ``G`` or a
  :class:`~rotvq.operators.JacobianSurrogate` (Su 2024), backward ``G^T g``.
* :func:`rotation_trick` — ``G = (|q|/|z|) R`` (Fifty et al. 2024).
* :func:`rotation_matrix` — the explicit rotation ``R``, for teaching and tests.

**Exact forward value.** Written literally, ``z + (q - z)`` is ``q`` only up to
rounding (in float32, ``1e-8 + (1.0 - 1e-8)`` is ``1.0`` but ``0.1 + (0.3 - 0.1)`` is
``0.30000001``). rotvq's estimators return ``q`` itself — the same values, bitwise, in
every dtype — through a custom :class:`torch.autograd.Function` whose backward applies
``G^T``. The returned tensor is a view of ``q``; ``q`` receives no gradient from the
estimator (it sits inside ``sg[·]``: codebooks learn through their own loss or EMA).

**Precision.** float16 and bfloat16 gradients are computed in float32 and returned in
the input dtype; near-degenerate rows of the rotation family are recomputed in float64
(see :mod:`rotvq.operators`).

**Speed and** ``torch.compile``. The rotation family's backward runs eagerly or as one
fused kernel (:func:`rotvq.backend.set_backend`, environment variable
``ROTVQ_BACKEND``). Every estimator here also traces whole into
``torch.compile(fn, fullgraph=True)``: the forward stays bitwise ``q`` and the backward
uses fixed shapes only (no data-dependent branch).
"""
from __future__ import annotations

import torch

from ._checks import check_vector_pair
from .operators import (
    _cpu_chunk_rows,
    ClippedRotation,
    Dense,
    Householder,
    Identity,
    InterpolatedRotation,
    JacobianSurrogate,
    Rotation,
    TangentRotation,
)

__all__ = [
    "ste",
    "generalized_ste",
    "rotation_trick",
    "rotation_matrix",
    "get_surrogate",
    "apply_estimator",
    "SURROGATE_NAMES",
]


class _SurrogateSTE(torch.autograd.Function):
    """Forward: return ``q`` unchanged. Backward: ``dL/dz = G^T g``, ``dL/dq = 0``."""

    @staticmethod
    def forward(ctx, z, q, op):
        ctx.op = op
        if op.needs_inputs:
            ctx.save_for_backward(z, q)  # only what G^T needs; nothing for the STE
        return q  # autograd turns a returned input into a view: bitwise q, no copy

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        op = ctx.op
        if isinstance(op, Identity):
            return g, None, None  # straight-through: the gradient passes unchanged
        if op.needs_inputs:
            z, q = ctx.saved_tensors
            return op.vjp(g, z, q), None, None
        return op.vjp(g, g, g), None, None  # G does not depend on (z, q)


def _row_blocks(x: torch.Tensor) -> list[slice]:
    """Slices of the rows of ``x`` ``(N, D)``, cache-sized on CPU (one slice elsewhere)."""
    n, d = x.shape
    if torch.compiler.is_compiling():
        return [slice(None)]  # one block: no loop over a symbolic size in a compiled graph
    step = max(1, n) if x.device.type != "cpu" else _cpu_chunk_rows(d)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)] or [slice(0, 0)]


class _SurrogateSTEWithError(torch.autograd.Function):
    """:class:`_SurrogateSTE` plus the per-row squared error ``|z - t|^2`` (the commitment
    term of a VQ layer, ``t`` the code) in one node.

    Forward: ``(q, e)`` with ``e_i = |z_i - t_i|^2`` in ``acc``. Backward: ``G^T g +
    2 g_e (z - t)`` written into one buffer. ``z - t`` is formed block by block (in
    cache), never as a whole ``(N, D)`` tensor, and the commitment gradient is added in
    place to the estimator's instead of being materialised and accumulated separately.
    """

    @staticmethod
    def forward(ctx, z, q, target, op, acc):
        parts = [torch.linalg.vector_norm(z[b].to(acc) - target[b].to(acc), dim=1) for b in _row_blocks(z)]
        ctx.op, ctx.acc = op, acc
        ctx.save_for_backward(z, q, target)
        return q, (parts[0] if len(parts) == 1 else torch.cat(parts)).square()

    @staticmethod
    def backward(ctx, g, g_err):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        z, q, target = ctx.saved_tensors
        op, acc = ctx.op, ctx.acc
        if g is None:
            base = None
        elif isinstance(op, Identity):
            base = g  # straight-through: G^T g = g (the caller's tensor: never written in place)
        else:
            base = op.vjp(g, z, q) if op.needs_inputs else op.vjp(g, g, g)  # a fresh tensor
        if g_err is None:
            return base, None, None, None, None
        coef = (2 * g_err)[:, None]
        if base is not None and base is not g and base.dtype == acc:
            out = base  # add the commitment gradient in place
        else:
            out = torch.empty(z.shape, dtype=acc, device=z.device)
        for b in _row_blocks(z):
            diff = z[b].to(acc) - target[b].to(acc)
            if base is None:
                torch.mul(diff, coef[b], out=out[b])
            else:
                torch.addcmul(base[b].to(acc), diff, coef[b], out=out[b])
        return out.to(z.dtype), None, None, None, None


def _apply_with_error(z: torch.Tensor, q: torch.Tensor, target: torch.Tensor, op,
                      acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(estimator(z, q), |z - target|^2 per row)`` for rows ``(N, D)``, the error in
    ``acc`` and differentiable in ``z`` only (``target``: the codes before their cast to
    ``z``'s dtype)."""
    if not (torch.is_grad_enabled() and z.requires_grad):
        with torch.no_grad():
            return q, _SurrogateSTEWithError.forward(_NoContext(), z, q, target, op, acc)[1]
    return _SurrogateSTEWithError.apply(z, q, target, op, acc)


class _NoContext:
    """Stands in for autograd's ctx when the forward runs without a graph."""

    def save_for_backward(self, *tensors):
        pass


def generalized_ste(z: torch.Tensor, q: torch.Tensor, G) -> torch.Tensor:
    r"""The generalized straight-through estimator ``z_q = sg[G] z + sg[q - G z]``.

    Args:
        z: encoder outputs, ``(..., d)``, floating point; the gradient flows to ``z``.
        q: the chosen codes, same shape, dtype and device as ``z``; no gradient flows
            to ``q`` through the estimator.
        G: the Jacobian surrogate: a tensor of shape ``(d, d)`` or ``(..., d, d)``
            (leading dimensions broadcast over those of ``z``), or a
            :class:`~rotvq.operators.JacobianSurrogate` such as
            :class:`~rotvq.operators.Rotation`.

    Returns:
        ``(..., d)`` tensor equal to ``q`` bitwise; its backward sends ``g`` to
        ``G^T g`` (a row vector convention would write ``g G``).

    Raises:
        TypeError: non-tensor or non-floating inputs, different dtypes, a ``G`` that is
            neither a tensor nor an operator.
        ValueError: shapes of ``z`` and ``q`` differ, or ``G`` does not match ``d`` or
            the leading dimensions.
    """
    check_vector_pair(z, q)
    if isinstance(G, torch.Tensor):
        G = Dense(G)
    elif not isinstance(G, JacobianSurrogate):
        raise TypeError(f"G must be a torch.Tensor or a rotvq.JacobianSurrogate, got {type(G).__name__}")
    G.check(z, q)
    return _apply(z, q, G)


def _apply(z, q, op):
    if not (torch.is_grad_enabled() and z.requires_grad):
        return q  # no backward to prepare: the value is q
    return _SurrogateSTE.apply(z, q, op)


_IDENTITY = Identity()


def ste(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""The straight-through estimator ``z + sg[q - z]``: forward ``q`` (exactly),
    backward ``dL/dz = dL/dz_q``.

    Args:
        z: ``(..., d)`` encoder outputs. q: ``(..., d)`` codes (no gradient flows to them).

    Returns:
        ``(..., d)`` tensor equal to ``q`` bitwise.
    """
    check_vector_pair(z, q)
    return _apply(z, q, _IDENTITY)


def rotation_trick(z: torch.Tensor, q: torch.Tensor, *, scale: bool = True) -> torch.Tensor:
    r"""The rotation trick of Fifty et al. (2024): ``G = (|q|/|z|) R``.

    ``R`` rotates ``ẑ = z/|z|`` onto ``q̂ = q/|q|`` in the plane they span and fixes
    the orthogonal complement; ``scale=False`` uses ``G = R``. The backward costs O(d)
    per vector (no ``d × d`` matrix). Degenerate inputs (``z = 0``, ``q = 0``,
    antiparallel ``q = -c z``) have documented finite fallbacks: see
    :mod:`rotvq.operators`.

    Args:
        z: ``(..., d)`` encoder outputs. q: ``(..., d)`` codes. scale: keep ``|q|/|z|``.

    Returns:
        ``(..., d)`` tensor equal to ``q`` bitwise; backward ``G^T g``.
    """
    check_vector_pair(z, q)
    return _apply(z, q, Rotation(scale=scale))


def rotation_matrix(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""The explicit rotation ``R`` taking ``z/|z|`` to ``q/|q|``, shape ``(..., d, d)``.

    The same conventions (and degenerate-case choices) as :func:`rotation_trick`; costs
    O(d²) per vector, so use it to teach and to test, not to train.
    """
    return Rotation(scale=False).matrix(z, q)


_FACTORIES = {
    "ste": Identity,
    "rotation": lambda **kw: Rotation(scale=True, **kw),
    "rotation_unscaled": lambda **kw: Rotation(scale=False, **kw),
    "rotation_clipped": ClippedRotation,
    "rotation_interp": InterpolatedRotation,
    "rotation_tangent": TangentRotation,
    "householder": Householder,
}
SURROGATE_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_surrogate(name: str, **options) -> JacobianSurrogate:
    """The operator registered under ``name`` (see :data:`SURROGATE_NAMES`).

    Args:
        name: one of ``"ste"``, ``"rotation"``, ``"rotation_unscaled"``,
            ``"rotation_clipped"`` (options ``lo``, ``hi``), ``"rotation_interp"``
            (option ``t``), ``"rotation_tangent"`` (option ``scale``), ``"householder"``
            (option ``scale``).
        **options: passed to the operator's constructor.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
        TypeError: an option the operator does not take.
    """
    if not isinstance(name, str) or name not in _FACTORIES:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(SURROGATE_NAMES)}")
    return _FACTORIES[name](**options)


def apply_estimator(z: torch.Tensor, q: torch.Tensor, estimator) -> torch.Tensor:
    """Apply an estimator given by name (:data:`SURROGATE_NAMES`) or as an operator/tensor.

    ``"ste"`` and :class:`~rotvq.operators.Identity` take the straight-through path.
    """
    if isinstance(estimator, str):
        estimator = get_surrogate(estimator)
    if isinstance(estimator, Identity):
        return ste(z, q)
    return generalized_ste(z, q, estimator)
