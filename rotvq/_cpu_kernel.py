r"""The compiled backend's kernel for float32 and float64 tensors on the CPU.

The span form ``G^T g = c_g g + c_z z + c_q q`` (:eq:`rot-span` of :ref:`ch-rotation`) written
as one loop over the rows in C++, compiled and cached by inductor's C++ toolchain
(``torch._inductor.codecache``: the compiler, flags, SIMD instruction set and on-disk
cache that ``torch.compile`` uses for its own CPU kernels). For each row it reads ``z``,
``q`` and ``g`` once for five fused multiply-add dot products, computes the row's three
coefficients and its health flag (``rotvq.operators._healthy``, the same float
comparisons) and writes the output row while the inputs are still in the L1 cache:
one pass over memory, the traffic of :func:`rotvq.bench.traffic_floor`.

Why not inductor's own code generation here: for this computation it emits the per-row
scalars through reductions over a padding vector and stores them between three inner
loops (see ``rotvq.operators._span_kernel``, which still serves CUDA and half
precision); measured on a 2-core EPYC at N x d = 65536 x 64, 16384 x 256, 4096 x 1024,
one thread, in two sessions, that kernel took 1.4-2.4x the time of the traffic floor and this
one 1.0-1.4x.
"""
from __future__ import annotations

import torch

from .backend import native

__all__ = ["SOURCE", "ARGTYPES", "DTYPES", "build", "span_rows"]

#: C++ source; ``SCALAR`` is replaced by ``float`` or ``double``.
SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
// G^T g = alpha g + bz z + bq q for every row (rot-span). aux (one allocation, int64):
// aux[0] counts the rows the span form does not evaluate accurately
// (rotvq.operators._healthy), aux[1 .. 1 + count) lists them if there are at most
// `capacity`, and the n bytes from aux + 1 + capacity flag them (1 = unhealthy).
// params: [m, lo, hi, u, tau, eps_in] of the variant (rotvq.operators.Variant).
extern "C" void kernel(const SCALAR* g, const SCALAR* z, const SCALAR* q, const SCALAR* params,
                       SCALAR* out, int64_t* aux, const int64_t n, const int64_t d, const int64_t threads,
                       const int64_t capacity)
{
    int64_t* count = aux;
    int64_t* rows = aux + 1;
    bool* unhealthy = reinterpret_cast<bool*>(aux + 1 + capacity);
    using Vec = at::vec::Vectorized<SCALAR>;
    constexpr int64_t W = Vec::size();
    const int64_t dv = d - d % W;
    const SCALAR m = params[0], lo = params[1], hi = params[2], u = params[3], tau = params[4];
    const SCALAR eps = params[5];
    const SCALAR tiny = std::numeric_limits<SCALAR>::min();
    const SCALAR one = 1, two = 2, half = 0.5;
    int64_t bad = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1) reduction(+:bad)
    for (int64_t r = 0; r < n; ++r) {
        const SCALAR* zr = z + r * d;
        const SCALAR* qr = q + r * d;
        const SCALAR* gr = g + r * d;
        SCALAR* orow = out + r * d;
        Vec zz(0), qq(0), zq(0), zg(0), qg(0);
        auto dots = [&](const Vec& zv, const Vec& qv, const Vec& gv) {
            zz = at::vec::fmadd(zv, zv, zz);
            qq = at::vec::fmadd(qv, qv, qq);
            zq = at::vec::fmadd(zv, qv, zq);
            zg = at::vec::fmadd(zv, gv, zg);
            qg = at::vec::fmadd(qv, gv, qg);
        };
        int64_t i = 0;
        for (; i < dv; i += W) dots(Vec::loadu(zr + i), Vec::loadu(qr + i), Vec::loadu(gr + i));
        if (i < d) dots(Vec::loadu(zr + i, d - i), Vec::loadu(qr + i, d - i), Vec::loadu(gr + i, d - i));
        auto add = [](Vec& x, Vec& y) { return x + y; };
        const SCALAR nz = std::sqrt(at::vec::vec_reduce_all<SCALAR>(add, zz));
        const SCALAR nq = std::sqrt(at::vec::vec_reduce_all<SCALAR>(add, qq));
        const SCALAR inz = one / nz, inq = one / nq;
        const SCALAR c = at::vec::vec_reduce_all<SCALAR>(add, zq) * inz * inq;  // cos theta
        const SCALAR a = at::vec::vec_reduce_all<SCALAR>(add, qg) * inq;        // q^ . g
        const SCALAR k = (a + at::vec::vec_reduce_all<SCALAR>(add, zg) * inz) / (one + c);
        const SCALAR s = m * std::min(std::max(nq * inz, lo), hi);             // s(lambda)
        const Vec alpha(s + u), bz(s * ((two - tau) * a - k) * inz), bq(-s * k * inq);
        const SCALAR nz2 = nz * nz, nq2 = nq * nq;
        const bool ok = (nz2 >= tiny) && (nq2 >= tiny) && std::isfinite(nz2 + nq2)
                        && ((one + c) >= half) && (nz > eps * nq);
        unhealthy[r] = !ok;
        bad += !ok;
        for (i = 0; i < dv; i += W) {
            const Vec v = at::vec::fmadd(alpha, Vec::loadu(gr + i),
                                         at::vec::fmadd(bz, Vec::loadu(zr + i), bq * Vec::loadu(qr + i)));
            v.store(orow + i);
        }
        if (i < d) {
            const int64_t k = d - i;
            const Vec v = at::vec::fmadd(alpha, Vec::loadu(gr + i, k),
                                         at::vec::fmadd(bz, Vec::loadu(zr + i, k), bq * Vec::loadu(qr + i, k)));
            v.store(orow + i, k);
        }
    }
    count[0] = bad;
    if (bad > 0 && bad <= capacity) {  // the unhealthy rows' indices, in order
        int64_t j = 0;
        for (int64_t r = 0; r < n && j < bad; ++r) if (unhealthy[r]) rows[j++] = r;
    }
}
"""

_C_TYPES = {torch.float32: "float", torch.float64: "double"}
#: The dtypes the kernel serves (others use the torch.compile kernel).
DTYPES = tuple(_C_TYPES)
# The kernel lists the unhealthy rows itself when there are at most this many.
_ROWS_LISTED = 256
ARGTYPES = ["const {t}*", "const {t}*", "const {t}*", "const {t}*", "{t}*", "int64_t*",
            "const int64_t", "const int64_t", "const int64_t", "const int64_t"]
_NO_ROWS = torch.empty(0, dtype=torch.int64)  # returned (never written) when no row is flagged


def build(dtype: torch.dtype):
    """Compile (or load from inductor's cache) the kernel for ``dtype``; raises on failure."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache  # private API: failures fall back

    t = _C_TYPES[dtype]
    return CppPythonBindingsCodeCache.load_pybinding([a.format(t=t) for a in ARGTYPES],
                                                     SOURCE.replace("SCALAR", t))


def span_rows(g: torch.Tensor, z: torch.Tensor, q: torch.Tensor, params: torch.Tensor):
    """The kernel on rows ``(n, d)`` of one dtype (float32 or float64), on the CPU.

    ``params``: ``[m, lo, hi, u, tau, eps_in]`` in that dtype. Returns ``(G^T g, rows)``
    with ``rows`` the indices of the rows that are not healthy (they may hold inf/NaN in
    ``G^T g``), or ``None`` if the kernel could not be built (``rotvq.backend.native``
    then warned and selected the eager backend).
    """
    g, z, q = g.contiguous(), z.contiguous(), q.contiguous()
    n, d = z.shape
    out = torch.empty_like(z)
    capacity = min(n, _ROWS_LISTED)
    aux = torch.empty(1 + capacity + (n + 7) // 8, dtype=torch.int64)  # count, rows, n flag bytes
    if not native(build, z.dtype, g, z, q, params, out, aux, n, d, torch.get_num_threads(), capacity):
        return None
    bad = int(aux[0])
    if bad == 0:
        return out, _NO_ROWS
    if bad <= capacity:
        return out, aux[1:1 + bad]
    return out, aux[1 + capacity:].view(torch.bool)[:n].nonzero().squeeze(1)
