r"""Jacobian surrogates: the ``G`` of the generalized straight-through estimator.

The generalized estimator (Su 2024, after Fifty et al. 2024) is

.. math:: z_q = \mathrm{sg}[G]\, z + \mathrm{sg}[q - G z],

whose forward value is ``q`` and whose backward pass sends an upstream gradient ``g``
to ``G^T g``. An operator in this module represents ``G`` as a function of the pair
``(z, q)`` and applies ``G^T`` to a gradient *without* materialising a ``d × d`` matrix.

Writing a new surrogate means subclassing :class:`JacobianSurrogate` and implementing
:meth:`JacobianSurrogate.apply_transpose`, which receives validated tensors of shape
``(..., d)`` in the compute dtype (float32 for float16/bfloat16 inputs) and returns
``G^T g``. Everything else (validation, dtype handling, the dense matrix for teaching,
the autograd wiring in :func:`rotvq.generalized_ste`) is inherited.

Notation: ``ẑ = z/|z|``, ``q̂ = q/|q|``, ``c = cos θ = ẑ·q̂``, ``λ = |q|/|z|``, and
``R`` the rotation taking ``ẑ`` to ``q̂`` in the plane they span, fixing the orthogonal
complement (derived in the book, chapter "The rotation construction"):

.. math:: R = I + 2\hat q \hat z^T - \frac{(\hat q + \hat z)(\hat q + \hat z)^T}{1 + \cos\theta}.

**How** ``R^T g`` **is evaluated.** For rows with ``θ ≤ 120°`` rotvq uses that formula
rearranged as ``R^T g = g + (2a - k) ẑ - k q̂`` with ``a = q̂·g``, ``k = (q̂·g + ẑ·g)/(1 + c)``
(:eq:`rot-span` of :ref:`ch-rotation`; O(d), a few inner products and one combine). Rows
where that form loses accuracy (``1 + c < 1/2``), or whose squared norms under- or
overflow, are recomputed in float64 in the *plane form* (:eq:`rot-plane-form`): an
orthonormal basis ``e₁ = ẑ``, ``e₂ ⟂ ẑ`` of the plane of ``z`` and ``q`` (Gram–Schmidt
applied twice), and ``R = I + (cos θ - 1)(e₁e₁ᵀ + e₂e₂ᵀ) + sin θ (e₂e₁ᵀ - e₁e₂ᵀ)``. Near
``θ = π`` the error of this route is the conditioning of the problem itself, about
``10⁻¹⁶/(π - θ)`` relative, where the textbook formula divides two vanishing quantities.

**One definition per variant.** Every member of the family is a :class:`Variant`:
``G^T g = s(λ) P T^T g + u g`` with the scale policy ``s(λ) = m·clip(λ, lo, hi)``, an
optional tangent projection ``P = I - ẑẑᵀ``, a weight ``u`` of the identity and
``T ∈ {R, H}``. The span form (eager, in cache-sized chunks), the fused kernel of the
compiled backend (:mod:`rotvq.backend`) and the float64 plane form all evaluate ``G^T g``
from those fields; a subclass only chooses them.

**Backends and** ``torch.compile``. :func:`rotvq.backend.set_backend` chooses between the
eager span form and one fused kernel (``"compiled"``); both send the same rows to the
plane form. Inside ``torch.compile(fn, fullgraph=True)`` the backward of the rotation
family is one custom operator, ``torch.ops.rotvq.rotation_family_vjp``, which the
compiler does not trace into: it runs the selected backend (row routing included) and
gives the same gradients as outside ``torch.compile``.

**Degenerate inputs** (no NaN, no inf, forward always exactly ``q``):

* ``z`` *degenerate* — ``|z| ≤ ε|q|`` with ``ε`` the machine epsilon of the input dtype
  (``z`` is below the resolution of ``q``), including ``z = 0``: no linear map takes
  ``0`` to ``q``, so every operator of the rotation family falls back to ``G = I`` (the
  straight-through estimator) on that row.
* ``q = 0`` (its squared norm underflows even in float64): the scale ``λ`` is 0 and ``R``
  is taken as ``I``; so the scaled rotation gives ``G = 0``, the unscaled one ``G = I``.
* ``q = -c z`` (antiparallel, ``c > 0``): the rotation by ``π`` is not unique. rotvq
  rotates in the plane of ``ẑ`` and ``p = (e_k - ẑ_k ẑ)/|e_k - ẑ_k ẑ|`` where ``e_k`` is
  the coordinate axis with the smallest ``|ẑ_k|`` (lowest ``k`` on ties), so
  ``R = I - 2ẑẑᵀ - 2ppᵀ``. "Antiparallel" means ``sin θ ≤ max(ε/2, 16ε₆₄)``, with ``ε``
  the machine epsilon of the input dtype and ``ε₆₄`` that of float64: rounding
  ``q = -c z`` to the input dtype moves it by at most ``ε/2`` in angle, so closer than
  that the inputs themselves do not determine a plane. In ``d = 1`` there is no
  rotation taking ``ẑ`` to ``-ẑ``; rotvq uses ``R = -1``, the only orthogonal map that does.
* Exactly parallel ``q = c z``: ``R = I``. For the Householder reflection the mirror is
  then the hyperplane orthogonal to ``p`` above (a reflection that fixes ``ẑ``).

References: Fifty et al., *Restructuring Vector Quantization with the Rotation Trick*
(2024, arXiv 2410.06424), section 4; Su, *VQ的旋转技巧* (Scientific Spaces, 2024);
Householder, *Unitary triangularization of a nonsymmetric matrix* (JACM, 1958).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ._checks import check_vector_pair, compute_dtype, input_eps
from . import _cpu_kernel
from .backend import compiled as backend_compiled
from .backend import get_backend

__all__ = [
    "JacobianSurrogate",
    "Identity",
    "Dense",
    "Rotation",
    "ClippedRotation",
    "InterpolatedRotation",
    "TangentRotation",
    "Householder",
    "Variant",
]

# Rows with 1 + cos θ below this go through the float64 plane form (θ > 120°).
_FAST_PATH_MIN_ONE_PLUS_COS = 0.5
# Entries per operand and per thread in one chunk of the CPU fast path (512 KiB in
# float32): a chunk's z, q, g and output then stay in the cores' L2 caches across its
# passes. Measured on a 2-core Xeon (2 MiB L2 per core), forward + backward at
# N x d = 65536 x 64, 16384 x 256, 4096 x 1024: 2**17 per thread was best at one and at two
# threads (one thread: 13.8 / 11.1 / 11.7 ms against 16.3 / 14.4 / 14.8 ms for the former
# fixed 2**19; two threads: chunks of 2**18 entries, 7.6 / 6.1 / 6.0 against 9.1 / 7.0 /
# 7.2 ms); 2**15 and below lose to per-operation overhead.
_CPU_CHUNK_ELEMENTS = 2**17


def _cpu_chunk_rows(d: int) -> int:
    """Rows per chunk of the CPU fast path for vectors of size ``d`` (at least one)."""
    return max(1, _CPU_CHUNK_ELEMENTS * torch.get_num_threads() // max(d, 1))


class JacobianSurrogate:
    """Base class: a Jacobian surrogate ``G(z, q)`` applied as ``G^T g``.

    Subclasses implement :meth:`apply_transpose`. Set the class attribute
    ``needs_inputs = False`` when ``G`` does not depend on ``z`` and ``q`` (the
    estimator then does not keep them alive for the backward pass).
    """

    needs_inputs: bool = True

    def apply_transpose(self, g: torch.Tensor, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Return ``G(z, q)^T g``.

        Args:
            g, z, q: ``(..., d)`` tensors of one shape, in the compute dtype.

        Returns:
            ``(..., d)`` tensor ``G^T g`` (same dtype).
        """
        raise NotImplementedError

    def check(self, z: torch.Tensor, q: torch.Tensor) -> None:
        """Raise ``ValueError`` if this operator cannot act on vectors like ``z``."""

    def vjp(self, g: torch.Tensor, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Validated ``G^T g`` for tensors ``(..., d)``, computed in float32 for
        float16/bfloat16 inputs and returned in the dtype of ``z``."""
        check_vector_pair(z, q)
        check_vector_pair(g, z, names=("g", "z"))
        self.check(z, q)
        return self._vjp(g, z, q)

    def _vjp(self, g, z, q):
        # validated inputs; the rotation family overrides this to choose a backend
        cd = compute_dtype(z.dtype)
        return self.apply_transpose(g.to(cd), z.to(cd), q.to(cd)).to(z.dtype)

    def matrix(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The dense ``G``, shape ``(..., d, d)`` — O(d²) memory, for teaching and tests.

        Built column by column from :meth:`vjp` applied to the unit vectors:
        ``G[..., i, :] = (G^T e_i)``.
        """
        d = check_vector_pair(z, q)
        self.check(z, q)
        shape = (*z.shape[:-1], d, d)
        eye = torch.eye(d, dtype=z.dtype, device=z.device).expand(shape)
        zz = z.unsqueeze(-2).expand(shape)
        qq = q.unsqueeze(-2).expand(shape)
        return self.vjp(eye, zz, qq)  # row i is G^T e_i, i.e. column i of G^T = row i of G

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Identity(JacobianSurrogate):
    """``G = I``: the straight-through estimator (Bengio et al. 2013; van den Oord et al. 2017)."""

    needs_inputs = False

    def apply_transpose(self, g, z, q):
        return g


class Dense(JacobianSurrogate):
    """A given matrix ``G`` of shape ``(d, d)`` or ``(..., d, d)``.

    The leading dimensions of ``G`` broadcast against the leading dimensions of ``z``
    (they may be smaller, never larger). ``G`` sits inside the stop-gradient: it
    receives no gradient.
    """

    needs_inputs = False

    def __init__(self, G: torch.Tensor):
        if not isinstance(G, torch.Tensor):
            raise TypeError(f"G must be a torch.Tensor or a JacobianSurrogate, got {type(G).__name__}")
        if not G.is_floating_point():
            raise TypeError(f"G must be a real floating-point tensor, got dtype {G.dtype}")
        if G.dim() < 2 or G.shape[-1] != G.shape[-2]:
            raise ValueError(f"G must have shape (d, d) or (..., d, d); got {tuple(G.shape)}")
        self.G = G.detach()

    def check(self, z, q):
        d = z.shape[-1]
        G = self.G
        if G.shape[-1] != d:
            raise ValueError(f"G has shape {tuple(G.shape)} but the vectors have d = {d} (shape {tuple(z.shape)})")
        lead = z.shape[:-1]
        try:
            out = torch.broadcast_shapes(G.shape[:-2], lead)
        except RuntimeError:
            out = None
        if out != lead:
            raise ValueError(
                f"the leading dimensions of G {tuple(G.shape[:-2])} must broadcast to those of z "
                f"{tuple(lead)} (G has shape {tuple(G.shape)}, z has shape {tuple(z.shape)})"
            )
        if G.device != z.device:
            raise ValueError(f"G is on {G.device} but z is on {z.device}")

    def apply_transpose(self, g, z, q):
        G = self.G.to(g.dtype)
        return (g.unsqueeze(-2) @ G).squeeze(-2)  # (G^T g)_i = sum_j g_j G_ji


# ----------------------------------------------------------------------------------
# The rotation family.
#
# A variant is one small definition, a :class:`Variant`: the scale policy
# s(λ) = m·clamp(λ, lo, hi), a weight u of the identity, an optional tangent projection,
# and whether the orthogonal map is the rotation R or the Householder reflection H:
#
#     G^T g = s(λ) · P(T^T g) + u · g,      T ∈ {R, H},   P = I - ẑẑᵀ (tangent) or I.
#
# The evaluators serve every variant from that definition alone (its fields, as numbers):
#   * the span form (_span_coefficients), used by the eager chunked fast path and by the
#     kernel torch.compile generates for the compiled backend (_span_kernel);
#   * the C++ kernel of the compiled backend on the CPU (rotvq/_cpu_kernel.py), which writes
#     the same three coefficients in C++ (tests/test_backend.py holds it to the eager
#     backend for every variant, degenerate rows bitwise);
#   * the float64 plane form (Variant.combine), for degenerate rows and for the reflection.


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1, keepdim=True)  # (..., 1)


def _scale(lam, m, lo, hi):
    """The scale policy ``s(λ) = m·clamp(λ, lo, hi)``; floats or 0-d tensors alike."""
    return m * lam.clamp(lo, hi)


def _span_coefficients(s, u, tau, a, k):
    r"""Per-row ``(α, c_ẑ, c_q̂)`` with ``G^T g = α g + c_ẑ ẑ + c_q̂ q̂``.

    Implements :eq:`rot-span` of :ref:`ch-rotation` (:eq:`bench-span` of
    :ref:`ch-benchmarks`): ``R^T g = g + (2a - k) ẑ - k q̂`` with ``a = q̂·g``,
    ``k = (q̂·g + ẑ·g)/(1 + c)``; the tangent projection removes ``ẑ·R^T g = a`` from the
    ``ẑ`` coefficient (``tau = 1``); ``s`` scales, ``u`` adds ``u g``.
    """
    return s + u, s * ((2 - tau) * a - k), -s * k


def _healthy(nz, nq, c, eps_in):
    """Rows the span form evaluates accurately: squared norms neither under- nor
    overflow, ``1 + cos θ ≥ 1/2`` (θ ≤ 120°), and ``z`` above the resolution of ``q``."""
    tiny = torch.finfo(nz.dtype).tiny
    nz2, nq2 = nz * nz, nq * nq
    ok = (nz2 >= tiny) & (nq2 >= tiny) & torch.isfinite(nz2 + nq2) & ((1 + c) >= _FAST_PATH_MIN_ONE_PLUS_COS)
    return ok & (nz > eps_in * nq)


def _per_row(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``x`` itself (``(n,)``), written as a reduction over the zeros ``pad`` so that
    inductor computes it once per row inside the fused row loop (see :func:`_span_kernel`)."""
    return (x[:, None] + pad).amin(-1)


def _span_kernel(g, z, q, params, pad, eps_in: float):
    """The whole span form on rows ``(n, d)``: the fused kernel that :func:`torch.compile`
    generates for the compiled backend on CUDA and for half precision on the CPU
    (float32 and float64 on the CPU run the C++ kernel of ``rotvq/_cpu_kernel.py``).

    Args:
        g, z, q: ``(n, d)`` in the input dtype.
        params: ``(5,)`` tensor ``[m, lo, hi, u, tau]`` of the variant, in the compute
            dtype (a tensor, so one compiled kernel serves every variant).
        pad: ``(8,)`` zeros in the compute dtype (one SIMD vector; see below).
        eps_in: machine epsilon of the input dtype.

    Returns:
        ``(G^T g, healthy)``: ``(n, d)`` in the input dtype (rows that are not healthy
        may hold inf/NaN) and ``(n,)`` in the compute dtype, 1 on the rows that
        :func:`_healthy` accepts and 0 elsewhere.

    Compiled with :data:`_SPAN_KERNEL_OPTIONS`, inductor's C++ code is one loop over the
    rows with three inner loops: the five dot products, the per-row coefficients and
    the flag, the output row. The rows of ``z``, ``q``, ``g`` are read from memory once
    (the second read hits the cache). The per-row values go through :func:`_per_row`:
    a reduction over ``pad`` keeps them in that row loop, where a plain ``(n,)`` tensor
    would be computed in a separate loop vectorised across rows, which splits the
    kernel into three passes over the data.
    """
    cd = params.dtype
    g_, z_, q_ = g.to(cd), z.to(cd), q.to(cd)
    nz = (z_ * z_).sum(-1).sqrt()  # (n,)
    nq = (q_ * q_).sum(-1).sqrt()
    inz, inq = nz.reciprocal(), nq.reciprocal()
    c = (z_ * q_).sum(-1) * inz * inq  # cos θ
    a = (q_ * g_).sum(-1) * inq  # q̂·g
    k = (a + (z_ * g_).sum(-1) * inz) / (1 + c)
    m, lo, hi, u, tau = params.unbind(0)
    alpha, czh, cqh = _span_coefficients(_scale(nq * inz, m, lo, hi), u, tau, a, k)
    alpha, bz, bq = _per_row(alpha, pad), _per_row(czh * inz, pad), _per_row(cqh * inq, pad)
    healthy = _per_row(_healthy(nz, nq, c, eps_in).to(cd), pad)
    out = alpha[:, None] * g_ + bz[:, None] * z_ + bq[:, None] * q_
    return out.to(g.dtype), healthy


#: Inductor settings for :func:`_span_kernel` (passed to its ``torch.compile`` only):
#: never store a per-row intermediate as its own buffer, so the whole kernel stays in the
#: one fused loop over rows.
_SPAN_KERNEL_OPTIONS = {
    "realize_reads_threshold": 1000,
    "realize_opcount_threshold": 10000,
    "realize_cpu_opcount_threshold": 10000,
    "realize_acc_reads_threshold": 1000,
    "realize_cpu_acc_reads_threshold": 1000,
}
_span_kernel.inductor_options = _SPAN_KERNEL_OPTIONS
_PADS: dict = {}  # (dtype, device) -> the zeros of _span_kernel


def _pad(dtype: torch.dtype, device) -> torch.Tensor:
    key = (dtype, torch.device(device))
    pad = _PADS.get(key)
    if pad is None:
        pad = _PADS[key] = torch.zeros(8, dtype=dtype, device=device)
    return pad


def _perpendicular(e1: torch.Tensor) -> torch.Tensor:
    """A deterministic unit vector orthogonal to the unit rows of ``e1`` (zero if d = 1)."""
    k = e1.abs().argmin(dim=-1, keepdim=True)  # first index of the smallest |e1_k|
    p = -e1.gather(-1, k) * e1
    p.scatter_add_(-1, k, torch.ones_like(k, dtype=e1.dtype))
    n = torch.linalg.vector_norm(p, dim=-1, keepdim=True)
    return torch.where(n > 0.5, p / n.clamp_min(0.5), torch.zeros_like(p))  # |p| ≥ 1/√2 when d ≥ 2


class _Plane:
    r"""Float64 plane form of the pair (z, q): e1 = ẑ, e2 ⟂ e1, cos θ, sin θ, norms.

    Implements :eq:`rot-plane-form` of :ref:`ch-rotation` (the rotation by θ in the plane
    of ``ẑ`` and ``q̂``, :eq:`rot-plane`) and the reflection of :eq:`rot-householder`.
    """

    def __init__(self, z: torch.Tensor, q: torch.Tensor, eps_in: float):
        z = z.double()
        q = q.double()
        self.nz = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        self.nq = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
        self.q_zero = self.nq == 0
        self.z_degenerate = self.nz <= eps_in * self.nq
        # On the CPU (where asking costs no device sync) the selections below are skipped when
        # no row needs them: the same values, bitwise, in fewer small operations (the flagged
        # rows of the compiled backend are often a handful, where per-operation cost dominates).
        self._cpu = z.device.type == "cpu"
        if self._cpu and bool((self.nz > 0).all()) and bool((self.nq > 0).all()):
            e1, qh = z / self.nz, q / self.nq
        else:
            e1 = z / torch.where(self.nz > 0, self.nz, 1.0)
            qh = q / torch.where(self.q_zero, 1.0, self.nq)
            qh = torch.where(self.q_zero, e1, qh)  # q = 0: no rotation
        w = qh - _dot(qh, e1) * e1
        w = w - _dot(w, e1) * e1  # second Gram–Schmidt pass
        s = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        c = _dot(qh, e1)
        r = torch.hypot(c, s)
        c, s = c / r, s / r
        flat = s <= max(0.5 * eps_in, 16 * torch.finfo(torch.float64).eps)
        self.e1 = e1
        if self._cpu and not bool(flat.any()):
            self.e2, self.cos, self.sin = w / s, c, s
        else:
            self.e2 = torch.where(flat, _perpendicular(e1), w / torch.where(flat, 1.0, s))
            self.cos = torch.where(flat, torch.sign(c) + (c == 0), c)
            self.sin = torch.where(flat, torch.zeros_like(s), s)

    def rotate_transpose(self, g: torch.Tensor) -> torch.Tensor:
        """``R^T g`` for float64 ``g``."""
        a, b = _dot(self.e1, g), _dot(self.e2, g)
        return g + (self.cos - 1) * (a * self.e1 + b * self.e2) - self.sin * (a * self.e2 - b * self.e1)

    def reflect(self, g: torch.Tensor) -> torch.Tensor:
        """``H g`` with ``H = I - 2vvᵀ``, ``v = sin(θ/2) e1 - cos(θ/2) e2`` (so ``H ẑ = q̂``)."""
        half = 0.5 * torch.atan2(self.sin, self.cos)
        v = torch.sin(half) * self.e1 - torch.cos(half) * self.e2
        return g - 2 * _dot(v, g) * v


_PARAMS: dict = {}  # (variant, dtype, device) -> its parameter tensor, made once


@dataclasses.dataclass(frozen=True)
class Variant:
    r"""One member of the rotation family, the whole of its definition:

    .. math:: G^\top g = s(\lambda)\, P\, T^\top g + u\, g, \qquad
              s(\lambda) = m \operatorname{clip}(\lambda, lo, hi),

    with ``λ = |q|/|z|``, ``T`` the rotation ``R`` of :eq:`rot-R` in :ref:`ch-rotation`
    (or the reflection ``H`` of :eq:`rot-householder` when ``reflect``), and ``P`` the
    projection ``I - ẑẑᵀ`` onto the tangent space of the sphere through ``z`` when
    ``tangent`` (else ``I``). The eager span form, the float64 plane form and the fused
    kernel of the compiled backend all evaluate ``G^T g`` from these fields.
    """

    m: float = 1.0  # multiplier of the clipped scale
    lo: float = 0.0  # the scale λ is clipped to [lo, hi]; lo = hi = 1 drops it
    hi: float = math.inf
    u: float = 0.0  # weight of the identity (interpolation with the STE)
    tangent: bool = False  # project T^T g onto the tangent space at z
    reflect: bool = False  # T = H (no span form: every row in the plane form)

    def params(self, dtype: torch.dtype, device, eps_in: float | None = None) -> torch.Tensor:
        """``[m, lo, hi, u, tau]`` as a tensor: the fused kernels' view of the variant
        (``[m, lo, hi, u, tau, eps_in]`` when ``eps_in`` is given, for the C++ kernel)."""
        values = [self.m, self.lo, self.hi, self.u, float(self.tangent)] + ([] if eps_in is None else [eps_in])
        if torch.compiler.is_compiling():
            return torch.tensor(values, dtype=dtype, device=device)
        key = (self, dtype, torch.device(device), eps_in)
        cached = _PARAMS.get(key)
        if cached is None:
            cached = _PARAMS[key] = torch.tensor(values, dtype=dtype, device=device)
        return cached

    def combine(self, lam, e1, g, tg):
        """Plane form: ``s(λ) P (T^T g) + u g`` for float64 rows."""
        if self.tangent:
            tg = tg - _dot(e1, tg) * e1
        out = _scale(lam, self.m, self.lo, self.hi) * tg
        return out + self.u * g if self.u else out


def fused_span(g: torch.Tensor, z: torch.Tensor, q: torch.Tensor, variant: "Variant"):
    """The compiled backend's kernel alone on rows ``(n, d)`` (``n, d >= 2``): ``(G^T g,
    rows)`` with ``rows`` the indices of the rows it flags as unhealthy (their entries
    are not yet valid), or ``None`` if the kernel could not be built (the backend is then
    eager again). :meth:`_RotationFamily._vjp` recomputes the flagged rows in the plane
    form; :mod:`rotvq.bench` times this call on its own."""
    cd = compute_dtype(z.dtype)
    eps_in = input_eps(z.dtype)
    if z.device.type == "cpu" and z.dtype in _cpu_kernel.DTYPES:  # hand-written C++ kernel
        return _cpu_kernel.span_rows(g, z, q, variant.params(cd, z.device, eps_in))
    # the kernel torch.compile generates (Triton on CUDA; half precision on CPU)
    result = backend_compiled(_span_kernel, g.contiguous(), z.contiguous(), q.contiguous(),
                              variant.params(cd, z.device), _pad(cd, z.device), eps_in)
    if result is None:
        return None
    out, healthy = result
    return out, (healthy <= 0).nonzero().squeeze(-1)  # the unhealthy rows, as the C++ kernel lists them


class _RotationFamily(JacobianSurrogate):
    """Shared machinery of the rotation family: a subclass only sets ``self.variant``.

    The degenerate-``z`` fallback ``G = I`` and the routing of rows between the span
    form and the float64 plane form are applied here, once, for every variant.
    """

    variant = property(lambda self: self._variant, doc="The :class:`Variant` this operator evaluates.")

    def _precise(self, g, z, q, eps_in):
        """The float64 plane form on rows ``(n, d)``; returned in the dtype of ``g``."""
        plane = _Plane(z, q, eps_in)
        g64 = g.double()
        degenerate = not plane._cpu or bool(plane.z_degenerate.any())  # see _Plane: skipped on the CPU if none
        lam = plane.nq / (torch.where(plane.z_degenerate, 1.0, plane.nz) if degenerate else plane.nz)
        tg = plane.reflect(g64) if self.variant.reflect else plane.rotate_transpose(g64)
        out = self.variant.combine(lam, plane.e1, g64, tg)
        return (torch.where(plane.z_degenerate, g64, out) if degenerate else out).to(g.dtype)

    def _vjp(self, g, z, q):
        if torch.compiler.is_compiling():
            # traced into a caller's graph (torch.compile(fn, fullgraph=True)): the backward is
            # one opaque operator, so no data-dependent branch is traced; it runs the code below
            v = self.variant
            return torch.ops.rotvq.rotation_family_vjp(g, z, q, v.m, v.lo, v.hi, v.u, v.tangent, v.reflect)
        flat = z.dim() != 2  # rows (n, d) as they come (the common case), else flattened
        d = z.shape[-1]
        g2, z2, q2 = (g.reshape(-1, d), z.reshape(-1, d), q.reshape(-1, d)) if flat else (g, z, q)
        n = z2.shape[0]
        if get_backend() == "compiled" and n >= 2 and d >= 2 and not self._variant.reflect:
            result = fused_span(g2, z2, q2, self._variant)
            if result is not None:  # None: compilation failed, the backend is eager again
                out, bad = result
                self._recompute_rows(out, bad, g2, z2, q2)
                return out.reshape(z.shape) if flat else out
        cd, eps_in = compute_dtype(z.dtype), input_eps(z.dtype)
        out = self.apply_transpose(g2.to(cd), z2.to(cd), q2.to(cd), eps_in=eps_in)
        return out.to(g.dtype).reshape(z.shape)

    def _recompute_rows(self, out, rows, g, z, q):
        """Overwrite ``out[rows]`` (the rows :func:`fused_span` flagged) with the float64
        plane form; ``g, z, q``: the ``(n, d)`` inputs in their own dtype."""
        if rows.numel():
            cd, eps_in = compute_dtype(z.dtype), input_eps(z.dtype)
            out[rows] = self._precise(g[rows].to(cd), z[rows].to(cd), q[rows].to(cd), eps_in).to(out.dtype)

    def apply_transpose(self, g, z, q, eps_in=None):
        """``G^T g`` in the eager backend; ``eps_in`` is the machine epsilon of the
        caller's dtype (default: of ``z``).

        Fast path, row by row: ``G^T g = c_g g + c_z z + c_q q`` with per-row scalars built
        from five inner products (``|z|``, ``|q|``, ``z·q``, ``z·g``, ``q·g``), since
        ``G^T g`` lies in ``span{g, z, q}``. On CPU the rows are processed in chunks of
        ``_CPU_CHUNK_ELEMENTS`` entries per thread so that the passes over one chunk run in
        cache; the output buffer doubles as the scratch space of the products, so the
        only ``(..., d)`` allocation is the result. Rows that fail the health test
        (see the module docstring) are then recomputed by the float64 plane form.
        """
        eps_in = input_eps(z.dtype) if eps_in is None else eps_in
        d = z.shape[-1]
        lead = z.shape[:-1]
        g2, z2, q2 = g.reshape(-1, d), z.reshape(-1, d), q.reshape(-1, d)  # (n, d), views when possible
        n = z2.shape[0]
        if self.variant.reflect:
            return self._precise(g2, z2, q2, eps_in).reshape(*lead, d) if n else g2.clone().reshape(*lead, d)
        out = torch.empty((n, d), dtype=g2.dtype, device=g2.device)
        stats = torch.empty((3, n), dtype=g2.dtype, device=g2.device)  # |z|, |q|, cos θ per row
        step = max(1, n) if g2.device.type != "cpu" else _cpu_chunk_rows(d)
        for start in range(0, n, step):
            stop = min(n, start + step)
            self._fast_chunk(g2[start:stop], z2[start:stop], q2[start:stop], out[start:stop],
                             stats[:, start:stop])
        nz, nq, c = stats
        healthy = _healthy(nz, nq, c, eps_in)
        if n and not bool(healthy.all()):
            bad = (~healthy).nonzero().squeeze(-1)
            out[bad] = self._precise(g2[bad], z2[bad], q2[bad], eps_in)
        return out.reshape(*lead, d)

    def _fast_chunk(self, g, z, q, out, stats):
        """Eager span form on rows ``(m, d)``: write ``G^T g`` into ``out``, ``|z|, |q|, cos θ``
        into ``stats`` (3, m). Unhealthy rows may hold inf/NaN here; the caller overwrites them."""
        v = self.variant
        nz = torch.linalg.vector_norm(z, dim=-1)  # (m,); measured faster than with out=
        nq = torch.linalg.vector_norm(q, dim=-1)
        zq = torch.mul(z, q, out=out).sum(-1)  # `out` is scratch space until the combine
        zg = torch.mul(z, g, out=out).sum(-1)
        qg = torch.mul(q, g, out=out).sum(-1)
        inz, inq = nz.reciprocal(), nq.reciprocal()
        stats[0].copy_(nz)
        stats[1].copy_(nq)
        c = torch.mul(zq * inz, inq, out=stats[2])  # cos θ = z·q / (|z| |q|)
        a = qg.mul_(inq)  # q̂·g
        k = torch.addcmul(a, zg, inz).div_(c + 1)  # (q̂·g + ẑ·g) / (1 + c)
        s = _scale(nq * inz, v.m, v.lo, v.hi)
        alpha, czh, cqh = _span_coefficients(s, v.u, float(v.tangent), a, k)
        torch.mul(g, alpha.unsqueeze(-1), out=out)  # G^T g = α g + (c_ẑ/|z|) z + (c_q̂/|q|) q
        out.addcmul_(z, (czh * inz).unsqueeze(-1))
        out.addcmul_(q, (cqh * inq).unsqueeze(-1))


# The backward of the rotation family inside a compiled caller's graph: one operator that
# torch.compile calls without tracing into (no data-dependent branch in the caller's graph)
# and that runs the selected backend, degenerate rows included. It is defined with
# torch.library.Library, so the dispatcher calls _rotation_family_vjp directly (measured at
# 64 x 256 on one thread: about 11 us less per call than through torch.library.custom_op's
# wrapper), and each variant's operator is made once.
_LIBRARY = torch.library.Library("rotvq", "DEF")
_LIBRARY.define("rotation_family_vjp(Tensor g, Tensor z, Tensor q, float m, float lo, float hi, float u, "
                "bool tangent, bool reflect) -> Tensor")
_FAMILY: dict = {}  # Variant fields -> the operator that evaluates them


def _rotation_family_vjp(g: torch.Tensor, z: torch.Tensor, q: torch.Tensor, m: float, lo: float, hi: float,
                         u: float, tangent: bool, reflect: bool) -> torch.Tensor:
    """``G^T g`` of the variant with these fields (``torch.ops.rotvq.rotation_family_vjp``),
    validated like :meth:`JacobianSurrogate.vjp` (the operator can be called directly)."""
    key = (m, lo, hi, u, tangent, reflect)
    op = _FAMILY.get(key)
    if op is None:
        op = _FAMILY[key] = _RotationFamily()
        op._variant = Variant(*key)
    return op.vjp(g, z, q)


_LIBRARY.impl("rotation_family_vjp", _rotation_family_vjp, "CompositeExplicitAutograd")


@torch.library.register_fake("rotvq::rotation_family_vjp", lib=_LIBRARY)
def _(g, z, q, m, lo, hi, u, tangent, reflect):
    return torch.empty_like(g)


def _check_scale_flag(scale):
    if not isinstance(scale, bool):
        raise TypeError(f"scale must be a bool, got {type(scale).__name__}")
    return scale


_UNSCALED = {"lo": 1.0, "hi": 1.0}  # clip(λ, 1, 1) = 1: the scale dropped


class Rotation(_RotationFamily):
    r"""The rotation trick: ``G = (|q|/|z|) R`` (Fifty et al. 2024), or ``G = R`` with
    ``scale=False`` ("norm-decoupled" rotation, Su 2024 §11.1).

    Implements :eq:`rot-G` of :ref:`ch-rotation`. Backward: ``G^T g = (|q|/|z|) R^T g``.
    ``G z = q`` exactly in exact arithmetic.
    """

    def __init__(self, scale: bool = True):
        self.scale = _check_scale_flag(scale)
        self._variant = Variant() if scale else Variant(**_UNSCALED)



class ClippedRotation(_RotationFamily):
    r"""Clipped scale: ``G = clip(|q|/|z|, lo, hi) R`` (Su 2024, improvement 11.3; the
    defaults ``lo = 0.5, hi = 1.5`` are the ones the text proposes)."""

    def __init__(self, lo: float = 0.5, hi: float = 1.5):
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or lo > hi:
            raise ValueError(f"ClippedRotation needs finite 0 <= lo <= hi; got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi
        self._variant = Variant(lo=lo, hi=hi)



class InterpolatedRotation(_RotationFamily):
    r"""Interpolation with the identity: ``G = t (|q|/|z|) R + (1 - t) I`` (Su 2024,
    improvement 11.2). ``t = 0`` is the STE, ``t = 1`` the rotation trick."""

    def __init__(self, t: float = 0.5):
        t = float(t)
        if not (0.0 <= t <= 1.0):
            raise ValueError(f"InterpolatedRotation needs 0 <= t <= 1; got t={t}")
        self.t = t
        self._variant = Variant(m=t, u=1 - t)



class TangentRotation(_RotationFamily):
    r"""Rotation with the radial component removed:
    ``G^T g = (|q|/|z|) (I - ẑẑᵀ) R^T g`` (``scale=False`` drops the factor).

    The encoder receives only the part of the rotated gradient tangent to the sphere of
    radius ``|z|``: the norm of ``z`` is not pushed by the reconstruction loss.
    """

    def __init__(self, scale: bool = True):
        self.scale = _check_scale_flag(scale)
        self._variant = Variant(tangent=True) if scale else Variant(tangent=True, **_UNSCALED)



class Householder(_RotationFamily):
    r"""The Householder reflection taking ``ẑ`` to ``q̂``: ``G = (|q|/|z|) H`` with
    ``H = I - 2vvᵀ``, ``v = (ẑ - q̂)/|ẑ - q̂|`` (``scale=False``: ``G = H``).

    Implements :eq:`rot-householder` of :ref:`ch-rotation`. ``H`` is symmetric, so
    ``G^T g = (|q|/|z|) H g``. Fifty et al. (2024) report that a single reflection trains
    worse than the rotation. Computed in the float64 plane form on every row (under
    both backends): near ``θ = 0`` (the common case in VQ) the textbook ``v`` is a ratio
    of vanishing quantities.
    """

    def __init__(self, scale: bool = True):
        self.scale = _check_scale_flag(scale)
        self._variant = Variant(reflect=True) if scale else Variant(reflect=True, **_UNSCALED)

