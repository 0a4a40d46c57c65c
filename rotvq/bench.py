"""Benchmarks of the estimators, the compiled backend, the nearest-code search and the VQ layer.

The command line is ``python benchmarks/run.py`` (see ``benchmarks/README.md``); this
module holds the measurements so that the book's appendix (``book/benchmarks.ipynb``)
can import them and read the stored results (:func:`load_results`) without path tricks.

Everything is measured in one process and *interleaved*: each round runs every method of
a group in a rotating order, so that a slow spell of a shared machine hits all methods
alike; each method runs twice in a row and only the second call is timed (its own data
then sits in the caches, whatever ran before it). Reported per method: the minimum and
the median over the rounds (after warm-up rounds), their ratios to the reference of the
group, and the minor page faults per timed call. :func:`run_all` first makes the C
allocator keep freed memory (:func:`steady_allocator`). The load average of the machine
(``os.getloadavg``) is recorded before and after every group: on a shared machine the
minima are the figures to compare, the medians show the noise.

Groups (forward + backward of ``z_q`` with a fixed upstream gradient ``g``):

* ``estimators``: the textbook STE ``z + (q - z).detach()`` (reference), ``rotvq.ste``,
  ``rotvq.rotation_trick`` under the eager and the compiled backend
  (:mod:`rotvq.backend`), the rotation trick in plain autograd operations, the explicit
  ``d × d`` route (timed on a subset of rows and scaled to ``N``, marked ``*``) and
  ``vector_quantize_pytorch``'s ``rotate_to`` when installed, the traffic floor
  (:func:`traffic_floor`), the two steps of the compiled backend's backward timed
  alone (:func:`backward_kernel`, :func:`flagged_rows`), and the rotation trick under the
  compiled backend with its kernel clocked from inside the call (:func:`clocked_inside`);
* ``compiled``: ``torch.compile(fullgraph=True)`` of a function calling the textbook
  STE (reference) against the same for ``rotvq.rotation_trick``, under each backend
  (inside a compiled graph the backward is one custom operator that runs the backend),
  and for ``rotvq.ste`` (the compiled caller's own cost), with the same floor and steps,
  and the compiled rotation trick and textbook STE on :data:`CALL_ROWS` rows, warm and
  right after an untimed pass over the full-size data (:func:`call_row_name`), where the
  kernels cost little; the compiled textbook STE's forward alone (:data:`STE_FORWARD`) and
  the number of kernels inductor generates for it (:func:`generated_kernels`); a compiled
  caller whose backward is the kernel alone (:func:`kernel_only_caller`); and the compiled rotation
  trick with its kernel clocked from inside the call (:func:`clocked_inside`: the time
  before, in and after the kernel, fields ``before_kernel_ms``, ``kernel_ms``,
  ``after_kernel_ms`` of the timed call that gave the row's minimum);
* ``sweep``: the estimators over ``d`` at a fixed number of entries ``N d``;
* ``search``: :func:`rotvq.nearest_code` against a bare ``torch.addmm`` + ``argmin``
  over the whole ``N × K`` score matrix (code norms precomputed), with agreement and
  peak memory;
* ``layer``: a training step of :class:`rotvq.VectorQuantizer` (EMA codebook, STE and
  rotation) against the bare search alone, with :func:`rotvq.nearest_code` in the same
  rounds (the search the step runs).
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None

import torch

import rotvq
from rotvq.backend import get_backend, set_backend
from rotvq import _cpu_kernel
from rotvq.operators import fused_span
from rotvq.search import nearest_code

try:  # optional benchmark extra: pip install rotvq[bench]
    from vector_quantize_pytorch import VectorQuantize
    from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to
except ImportError:  # pragma: no cover - depends on the environment
    VectorQuantize = rotate_to = None

__all__ = ["SHAPES", "SEARCH_CONFIGS", "RESULTS_FILE", "FLOOR", "GROUPS", "load_results", "run_all", "interleaved",
           "traffic_floor", "steady_allocator", "KERNEL", "FLAGGED", "backward_kernel",
           "flagged_rows", "CALL_ROWS", "CALL_METHODS", "call_row_name", "INSIDE", "ESTIMATOR_INSIDE",
           "clocked_name", "clocked_inside", "cpu_caches", "STE_FORWARD", "generated_kernels",
           "KERNEL_ONLY", "kernel_only_caller",
           "saved_for_backward", "estimator_methods", "bench_estimators", "bench_compiled",
           "bench_search", "bench_layer", "fmt_table"]

#: (N, d) of the estimator benchmarks.
SHAPES = [(65536, 64), (16384, 256), (4096, 1024)]
#: (N, d, K) of the search and layer benchmarks.
SEARCH_CONFIGS = [(16384, 256, 1024), (65536, 64, 512), (8192, 64, 16384)]
#: The stored full run that the book's appendix reads.
RESULTS_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "cpu.json"


def load_results(path: str | os.PathLike | None = None) -> dict:
    """The stored results of a full run (default: ``benchmarks/results/cpu.json``)."""
    with open(RESULTS_FILE if path is None else path) as f:
        return json.load(f)


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


# ------------------------------------------------------------------------------------
# Estimators


def textbook_ste(z, q):
    return z + (q - z).detach()  # straight-through estimator, as usually written


def autograd_rotation(z, q):
    """The rotation trick with plain autograd ops (Fifty et al. 2024, section 4.2:
    ``λ [z - 2 (z·w) w + 2 (z·ẑ) q̂]``, ``w = (ẑ + q̂)/|ẑ + q̂|``, coefficients detached)."""
    with torch.no_grad():
        nz = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        nq = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
        zh, qh = z / nz, q / nq
        w = zh + qh
        w = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        lam = nq / nz
    rz = z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * zh).sum(-1, keepdim=True) * qh  # R z
    return lam * rz


def dense_matrix(z, q):
    """The explicit route: ``G = (|q|/|z|) R`` of shape ``(N, d, d)`` built by
    :meth:`rotvq.Rotation.matrix`, applied by :func:`rotvq.generalized_ste`."""
    with torch.no_grad():
        G = rotvq.Rotation().matrix(z.detach(), q)  # (N, d, d)
    return rotvq.generalized_ste(z, q, G)


class _BackendRun:
    """fwd + bwd of an estimator with the backend set for the backward as well."""

    def __init__(self, backend, fn):
        self.backend, self.fn = backend, fn


def estimator_methods() -> dict:
    methods = {
        "textbook_ste": textbook_ste,
        "rotvq.ste": rotvq.ste,
        "rotvq.rotation_trick[eager]": _BackendRun("eager", rotvq.rotation_trick),
        "rotvq.rotation_trick[compiled]": _BackendRun("compiled", rotvq.rotation_trick),
        "autograd_rotation": autograd_rotation,
        "dense_matrix": dense_matrix,
    }
    if rotate_to is not None:
        methods["vqp.rotate_to"] = rotate_to
    return methods


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def interleaved(fns: dict, device: torch.device, repeats: int, warmup: int = 2, before: dict | None = None) -> dict:
    """Time every callable of ``fns`` ``repeats`` times, round-robin (rotating start).

    In each round every callable runs twice in a row and only the second call is timed:
    it then starts with its own inputs in the caches, whichever method ran before it.
    (Timing the first call instead made a method's time depend on its neighbour in the
    round: on a machine whose last-level cache holds the whole working set, the kernel of
    the compiled backend alone measured slower than the full backward that contains it.)

    ``before``: for some names, a callable run untimed between the two calls (for example a
    pass over other data, so that the timed call starts with that data in the caches).

    Returns ``{name: {"min": s, "median": s, "times": [...], "faults": n}}`` with ``faults``
    the median number of minor page faults per timed call (fresh memory the call touched
    for the first time; see :func:`steady_allocator`).
    """
    before = before or {}
    names = list(fns)
    times = {k: [] for k in names}
    faults = {k: [] for k in names}
    for _ in range(warmup):
        for k in names:
            fns[k]()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            fns[k]()  # untimed: warms the caches with this method's data
            if k in before:
                before[k]()
            sync(device)
            f0 = _minor_faults()
            t0 = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
            faults[k].append(_minor_faults() - f0)
    return {k: {"min": min(v), "median": statistics.median(v), "times": v,
                "faults": statistics.median(faults[k])} for k, v in times.items()}


#: glibc's ``mallopt`` parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator(limit: int = 2**30) -> str:
    """Make this process's C allocator keep freed memory, as a training loop's allocator does.

    With its defaults, glibc's ``malloc`` hands a large freed block back to the operating
    system (``mmap`` blocks, and the top of the heap above the trim threshold), so the next
    allocation of that size starts on fresh pages: a ``16 MiB`` output costs 4,096 page
    faults, measured here as about 3 ms on top of a 2.3 ms pass, and charged to whichever
    method happened to allocate after a trim. In a training loop the allocator keeps and
    reuses such blocks (PyTorch's CUDA caching allocator; jemalloc or tcmalloc on the
    CPU), so its steady state has no faults. This sets glibc's mmap and trim thresholds to
    ``limit`` bytes (``mallopt``), so blocks below that size stay in the process.

    Returns what was done, for the results file: ``"glibc mallopt: ..."``, or why nothing
    was (not glibc, or ``mallopt`` refused).
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit < 2**31:
        raise ValueError(f"limit must be an int of bytes in (0, 2**31) (mallopt takes a C int); got {limit!r}")
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (AttributeError otherwise)
    except (OSError, AttributeError):
        return "unchanged (not glibc)"
    ok = mallopt(_M_TRIM_THRESHOLD, limit) == 1 and mallopt(_M_MMAP_THRESHOLD, limit) == 1
    return (f"glibc mallopt: trim and mmap thresholds {limit} bytes (freed memory kept)" if ok
            else "unchanged (mallopt refused)")


def saved_for_backward(fn, z, q) -> tuple[int, int]:
    """Bytes of the distinct storages the autograd graph of ``fn(z, q)`` keeps: (all, extra).

    ``extra`` excludes the storages of ``z`` and ``q`` themselves (held by the caller)."""
    if isinstance(fn, _BackendRun):
        fn = fn.fn
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(z, q)
    # tensors a custom Function keeps outside save_for_backward (rotvq.Dense holds its G)
    stack, visited = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            for t in (value, *getattr(value, "__dict__", {}).values()):
                if isinstance(t, torch.Tensor):
                    pack(t)
        stack.extend(f for f, _ in node.next_functions)
    del out
    own = {z.untyped_storage().data_ptr(), q.untyped_storage().data_ptr()}
    total = sum(seen.values())
    extra = sum(b for p, b in seen.items() if p not in own)
    return total, extra


def fwd_bwd(fn, z, q, g):
    backend = None
    if isinstance(fn, _BackendRun):
        backend, fn = fn.backend, fn.fn

    def run():
        before = get_backend()
        if backend is not None:
            set_backend(backend)
        try:
            zq = fn(z, q)
            return torch.autograd.grad(zq, z, g)[0]  # dL/dz for the upstream gradient g
        finally:
            set_backend(before)

    return run


def _data(n, d, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
    q = torch.randn(n, d, generator=gen).to(device)
    g = torch.randn(n, d, generator=gen).to(device)
    return z, q, g


#: Name of the traffic floor in the estimator tables.
FLOOR = "floor: addcmul(g, z, q)"
#: Ablations in the estimator tables: the compiled backend's kernel alone (no autograd, the
#: flagged rows not recomputed), and the recomputation of the flagged rows alone.
KERNEL = "backward kernel alone [compiled]"
FLAGGED = "flagged rows recomputed alone [compiled]"


def traffic_floor(z, q, g):
    """One elementwise pass that reads ``g``, ``z``, ``q`` and writes one ``(N, d)`` tensor:
    the memory traffic any backward that needs all three must do, the floor of
    ``G^T g`` for a ``G`` that depends on ``z`` and ``q``."""
    z = z.detach()
    return lambda: torch.addcmul(g, z, q)


def backward_kernel(z, q, g):
    """The compiled backend's kernel for the rotation trick alone
    (:func:`rotvq.operators.fused_span`): no autograd, no validation, the rows it flags
    not recomputed."""
    z, variant = z.detach(), rotvq.Rotation().variant
    return lambda: fused_span(g, z, q, variant)


def flagged_rows(z, q, g):
    """``(callable, k)``: the recomputation, in the float64 plane form, of the ``k`` rows
    the compiled backend's kernel flags for the rotation trick on ``(z, q)``, alone (the
    step of the backward after :func:`backward_kernel`; independent random ``z`` and ``q``
    have rows beyond 120°: about one in 65,536 at ``d = 64``, 2 % at ``d = 16``)."""
    z, op = z.detach(), rotvq.Rotation()
    result = fused_span(g, z, q, op.variant)
    if result is None:  # no compiled backend here: nothing is flagged
        return (lambda: None), 0
    out, rows = result
    return (lambda: op._recompute_rows(out, rows, g, z, q)), int(rows.numel())


def clocked_name(method: str) -> str:
    """Name of the row that times ``method`` with its kernel clocked from inside
    (:func:`clocked_inside`)."""
    return f"{method}, kernel clocked inside"


def _split_fields(splits, result, warmup: int = 2) -> dict:
    """``before_kernel_ms``, ``kernel_ms``, ``after_kernel_ms`` of the timed call that gave the
    row's minimum (``result``: its entry of :func:`interleaved`, run with ``warmup`` rounds);
    ``None`` when the calls did not run the CPU kernel.

    :func:`interleaved` calls a method ``warmup`` times, then twice per round (untimed, timed),
    so the timed calls are the splits ``warmup + 1, warmup + 3, ...`` in order of the rounds.
    """
    times = result["times"]
    if len(splits) != warmup + 2 * len(times):  # not the CPU kernel (or not one kernel per call)
        return {f"{part}_ms": None for part in ("before_kernel", "kernel", "after_kernel")}
    fastest = splits[warmup + 1 + 2 * times.index(min(times))]
    return {f"{part}_ms": 1e3 * v for part, v in zip(("before_kernel", "kernel", "after_kernel"), fastest)}


def clocked_inside(run):
    """``(call, splits)``: ``call`` runs ``run`` (a forward + backward) with the compiled
    backend's CPU kernel (``rotvq._cpu_kernel.span_rows``) clocked from inside, and appends
    ``(before, kernel, after)`` in seconds to ``splits``: the time from the start of the
    call to the kernel's start, in the kernel, and from its end to the end of the call.
    Nothing is appended when the call did not run that kernel exactly once (CUDA, half
    precision, the eager backend)."""
    splits, marks = [], []
    kernel = _cpu_kernel.span_rows

    def clocked(*args):
        marks.append(time.perf_counter())
        result = kernel(*args)
        marks.append(time.perf_counter())
        return result

    def call():
        marks.clear()
        _cpu_kernel.span_rows = clocked
        try:
            t0 = time.perf_counter()
            run()
            t1 = time.perf_counter()
        finally:
            _cpu_kernel.span_rows = kernel
        if len(marks) == 2:
            splits.append((marks[0] - t0, marks[1] - marks[0], t1 - marks[1]))

    return call, splits


#: The compiled group's row of the compiled textbook STE's forward alone (detached ``z``, no
#: autograd): its one kernel and the compiled call, the counterpart of :data:`KERNEL`.
STE_FORWARD = "compiled textbook_ste, forward alone (no autograd)"
# A kernel that inductor's generated module defines (C++ on the CPU, Triton on CUDA).
_KERNEL_DEF = re.compile(r"^\w+ = async_compile\.(?:cpp_pybinding|cpp|triton)\(", re.M)


def generated_kernels(run) -> int:
    """Number of kernels inductor generates while ``run()`` calls compiled functions (each
    compiled anew for this count; forward and backward if ``run`` runs both). The compiled
    textbook STE generates one: a single pass over ``z`` and ``q``.

    ``torch._inductor.utils.run_and_get_code`` first resets ``torch.compile``'s caches
    (``torch._dynamo.reset()``): every compiled function recompiles on its next call, so
    call this before a timing's warm-up rounds, as :func:`bench_compiled` does."""
    from torch._inductor.utils import run_and_get_code  # private API, as in PyTorch's own tests

    _, codes = run_and_get_code(run)
    return sum(len(_KERNEL_DEF.findall(code)) for code in codes)


#: The compiled group's row of a compiled caller whose backward is only the kernel
#: (:func:`kernel_only_caller`), on the CPU.
KERNEL_ONLY = "compiled caller of the kernel alone (no rotvq code around it)"
_KERNEL_ONLY: dict = {}


class _KernelOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, q):
        ctx.save_for_backward(z, q)
        return q

    @staticmethod
    def backward(ctx, g):
        z, q = ctx.saved_tensors
        return torch.ops.rotvq_bench.kernel_only(g, z, q), None


def kernel_only_caller():
    """A compiled ``fn(z, q)`` (``fullgraph=True``) whose forward returns ``q`` and whose
    backward is one custom operator, ``torch.ops.rotvq_bench.kernel_only``, that makes the
    same call as :func:`backward_kernel` (the rotation trick's CPU kernel and its output
    allocation) and nothing else: no validation, no choice of backend, no recomputation of
    the rows the kernel flags. Timed beside ``compiled rotvq.rotation_trick[compiled]``, it
    shows how much of that call is rotvq's own code around the kernel. Float32 and float64
    on the CPU; the operator is defined on the first call."""
    if not _KERNEL_ONLY:
        lib = torch.library.Library("rotvq_bench", "DEF")
        lib.define("kernel_only(Tensor g, Tensor z, Tensor q) -> Tensor")
        variant = rotvq.Rotation().variant

        def kernel_only(g, z, q):
            return fused_span(g, z, q, variant)[0]

        lib.impl("kernel_only", kernel_only, "CompositeExplicitAutograd")
        torch.library.register_fake("rotvq_bench::kernel_only", lambda g, z, q: torch.empty_like(g), lib=lib)
        _KERNEL_ONLY.update(lib=lib, fn=torch.compile(_KernelOnly.apply, fullgraph=True, dynamic=True))
    return _KERNEL_ONLY["fn"]


def _no_grad(fn, *args):
    def run():
        with torch.no_grad():
            return fn(*args)

    return run


#: The estimator group's row of the rotation trick (compiled backend) with its kernel clocked
#: from inside.
ESTIMATOR_INSIDE = clocked_name("rotvq.rotation_trick[compiled]")
#: The compiled group's row of the compiled rotation trick with its kernel clocked from inside.
INSIDE = clocked_name("compiled rotvq.rotation_trick[compiled]")
#: Rows of the small calls of :func:`bench_compiled` (see :func:`call_row_name`).
CALL_ROWS = 64
#: The compiled callers that :func:`bench_compiled` also times on :data:`CALL_ROWS` rows.
CALL_METHODS = ("compiled rotvq.rotation_trick[compiled]", "compiled textbook_ste")


def call_row_name(method: str, after_pass: bool = False) -> str:
    """Name of the row of the compiled group that times ``method`` (one of
    :data:`CALL_METHODS`) on :data:`CALL_ROWS` rows, where its kernel costs little: warm, or
    (``after_pass``) right after an untimed pass over the group's full-size data
    (:func:`traffic_floor`)."""
    return f"{method} on {CALL_ROWS} rows" + (", after a pass over the data" if after_pass else "")


def _ablations(z, q, g) -> tuple[dict, dict]:
    """The rows of an estimator group that are not estimators (floor, kernel alone, flagged
    rows alone) and, per row name, extra fields for its table row."""
    recompute, k = flagged_rows(z, q, g)
    return ({FLOOR: traffic_floor(z, q, g), KERNEL: backward_kernel(z, q, g), FLAGGED: recompute},
            {FLAGGED: {"flagged_rows": k}})


def _plain_row(n, d, name, r, ref, **extra):
    """A table row for method ``name`` (timings ``r``, reference timings ``ref``)."""
    return {"N": n, "d": d, "method": name, "min_ms": 1e3 * r["min"], "median_ms": 1e3 * r["median"],
            "ratio_min": r["min"] / ref["min"], "ratio_median": r["median"] / ref["median"],
            "faults": r["faults"], **extra}


def bench_estimators(shapes, device, repeats, dense_elements=2**20, memory=True) -> list[dict]:
    """Forward + backward of every estimator method, ratios to the textbook STE."""
    rows = []
    for n, d in shapes:
        z, q, g = _data(n, d, device)
        methods = estimator_methods()
        fns, scale = {}, {}
        for name, fn in methods.items():
            if name == "dense_matrix" and n * d * d > dense_elements:
                m = max(1, dense_elements // (d * d))  # rows of the subset
                zs = z.detach()[:m].clone().requires_grad_(True)
                fns[name] = fwd_bwd(fn, zs, q[:m], g[:m])
                scale[name] = (n / m, zs, q[:m])
            else:
                fns[name] = fwd_bwd(fn, z, q, g)
                scale[name] = (1.0, z, q)
        extras, fields = _ablations(z, q, g)
        extras[ESTIMATOR_INSIDE], splits = clocked_inside(fns["rotvq.rotation_trick[compiled]"])
        fns.update(extras)
        res = interleaved(fns, device, repeats)
        fields[ESTIMATOR_INSIDE] = _split_fields(splits, res[ESTIMATOR_INSIDE])
        ref = res["textbook_ste"]
        none = dict(saved_MiB=None, extra_MiB=None) if memory else {}
        rows += [_plain_row(n, d, name, res[name], ref, **none, **fields.get(name, {})) for name in extras]
        for name in methods:
            s, zz, qq = scale[name]
            r = res[name]
            row = {"N": n, "d": d, "method": name + ("*" if s != 1.0 else ""),
                   "min_ms": 1e3 * r["min"] * s, "median_ms": 1e3 * r["median"] * s,
                   "ratio_min": r["min"] * s / ref["min"], "ratio_median": r["median"] * s / ref["median"],
                   "scaled_from_rows": None if s == 1.0 else int(round(n / s)), "faults": r["faults"]}
            if memory:
                total, extra = saved_for_backward(methods[name], zz, qq)
                row.update(saved_MiB=total * s / 2**20, extra_MiB=extra * s / 2**20)
            rows.append(row)
    return rows


def bench_compiled(shapes, device, repeats) -> list[dict]:
    """``torch.compile(fullgraph=True)`` of the textbook STE against the rotation trick.

    The compiled textbook STE is one pass (reads ``z``, ``q``, writes ``z_q``; the row of
    the reference stores ``generated_kernels``, :func:`generated_kernels`) and its backward
    passes ``g`` on: its traffic is three ``(N, d)`` tensors, below the four of any backward
    that reads ``z``, ``q`` and ``g`` (the :func:`traffic_floor` row). :data:`STE_FORWARD`
    times that pass without autograd, beside the rotation trick's kernel alone."""
    rotation = torch.compile(rotvq.rotation_trick, fullgraph=True, dynamic=True)
    fns_by_name = {
        "compiled textbook_ste": torch.compile(textbook_ste, fullgraph=True, dynamic=True),
        # the compiled caller's own cost: its forward returns q, its backward hands g on
        "compiled rotvq.ste": torch.compile(rotvq.ste, fullgraph=True, dynamic=True),
        "compiled rotvq.rotation_trick[eager]": _BackendRun("eager", rotation),
        "compiled rotvq.rotation_trick[compiled]": _BackendRun("compiled", rotation),
    }
    rows = []
    for n, d in shapes:
        z, q, g = _data(n, d, device)
        fns = {k: fwd_bwd(f, z, q, g) for k, f in fns_by_name.items()}
        extras, fields = _ablations(z, q, g)
        fns.update(extras)
        # the compiled callers on CALL_ROWS rows (their kernels cost little), warm and right
        # after an untimed pass over this shape's data
        small = _data(min(n, CALL_ROWS), d, device)
        stream = traffic_floor(z, q, g)
        before = {}
        for k in CALL_METHODS:
            fns[call_row_name(k)] = fns[call_row_name(k, after_pass=True)] = fwd_bwd(fns_by_name[k], *small)
            before[call_row_name(k, after_pass=True)] = stream
        fns[INSIDE], splits = clocked_inside(fns["compiled rotvq.rotation_trick[compiled]"])
        fns[STE_FORWARD] = _no_grad(fns_by_name["compiled textbook_ste"], z.detach(), q)
        for k in ("compiled textbook_ste", STE_FORWARD, "compiled rotvq.ste"):  # one, one, none
            fields[k] = {"generated_kernels": generated_kernels(fns[k])}
        if device.type == "cpu" and fused_span(g, z.detach(), q, rotvq.Rotation().variant) is not None:
            fns[KERNEL_ONLY] = fwd_bwd(kernel_only_caller(), z, q, g)  # the C++ kernel built: time it bare
        res = interleaved(fns, device, repeats, before=before)
        fields[INSIDE] = _split_fields(splits, res[INSIDE])
        ref = res["compiled textbook_ste"]
        rows += [_plain_row(n, d, k, r, ref, **fields.get(k, {})) for k, r in res.items()]
    return rows


# ------------------------------------------------------------------------------------
# Search and layer


def bare_search(z, codebook):
    """The unchunked brute-force baseline: one ``addmm`` over the whole ``N × K`` matrix and ``argmin``
    (code norms computed once, outside the timing)."""
    norms = (codebook * codebook).sum(1)
    return lambda: torch.addmm(norms, z, codebook.t(), alpha=-2.0).argmin(1)


_PEAK_CHILD = r"""
import sys, torch
from rotvq.bench import bare_search
from rotvq.search import nearest_code
n, d, k, which, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
gen = torch.Generator().manual_seed(0)
z, cb = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
run = (lambda: nearest_code(z, cb)) if which == "nearest_code" else bare_search(z, cb)
nearest_code(z[:8], cb[:8]); bare_search(z[:8], cb[:8])()  # load the kernels before measuring
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set (VmHWM) to the current one
run()
print(status("VmHWM:") - before)
"""


def search_peak_bytes(n, d, k, which, device, threads) -> int | None:
    """Peak memory of one search: cuda.max_memory_allocated, or on Linux the growth of the
    peak resident set of a fresh process."""
    if device.type == "cuda":
        gen = torch.Generator(device="cpu").manual_seed(0)
        z, cb = torch.randn(n, d, generator=gen).to(device), torch.randn(k, d, generator=gen).to(device)
        run = (lambda: nearest_code(z, cb)) if which == "nearest_code" else bare_search(z, cb)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None  # not Linux: no resettable peak RSS
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(n), str(d), str(k), which, str(threads)],
                         capture_output=True, text=True)
    return int(out.stdout.strip()) if out.returncode == 0 else None


def bench_search(configs, device, repeats, threads, peak=True) -> list[dict]:
    rows = []
    for n, d, k in configs:
        gen = torch.Generator(device="cpu").manual_seed(0)
        z, cb = torch.randn(n, d, generator=gen).to(device), torch.randn(k, d, generator=gen).to(device)
        fns = {"nearest_code": lambda: nearest_code(z, cb), "bare addmm+argmin": bare_search(z, cb)}
        res = interleaved(fns, device, repeats, warmup=1)
        agree = (fns["nearest_code"]() == fns["bare addmm+argmin"]()).double().mean().item()
        ref = res["bare addmm+argmin"]
        for name, r in res.items():
            b = search_peak_bytes(n, d, k, name, device, threads) if peak else None
            rows.append(_plain_row(n, d, name, r, ref, K=k, peak_MiB=None if b is None else b / 2**20,
                                   agreement=agree))
    return rows


def bench_layer(configs, device, repeats, vqp_configs=()) -> list[dict]:
    """A training step (forward, losses, backward to the input, EMA update) against the bare search.

    The rotation-trick step is timed under both backends (``[compiled]``: after
    ``rotvq.set_backend("compiled")``); the STE step does not depend on the backend.

    The gradient ``g`` arriving at ``quantized`` is passed to autograd as given (as in
    the estimator groups): forming a surrogate loss ``(quantized * g).sum()`` would time
    two ``N x D`` passes that belong to the decoder, not to the layer."""
    rows = []
    for n, d, k in configs:
        z, _, g = _data(n, d, device)
        fns = {}
        for est, backend in (("ste", "eager"), ("rotation", "eager"), ("rotation", "compiled")):
            torch.manual_seed(0)
            layer = rotvq.VectorQuantizer(d, k, estimator=est, ema=True, decay=0.99, commitment_weight=0.25,
                                          init="normal", dead_code_threshold=0.0).to(device).train()

            def step(layer=layer, backend=backend):
                before = get_backend()
                set_backend(backend)
                try:
                    out = layer(z)  # g is the gradient arriving at `quantized` (the decoder's, not timed)
                    return torch.autograd.grad([out.quantized, out.loss], z, [g, None])[0]
                finally:
                    set_backend(before)

            fns[f"rotvq.VectorQuantizer({est})" + ("[compiled]" if backend == "compiled" else "")] = step
        if VectorQuantize is not None and (n, d, k) in vqp_configs:
            torch.manual_seed(0)
            vq = VectorQuantize(dim=d, codebook_size=k, decay=0.99, commitment_weight=0.25, kmeans_init=False,
                                rotation_trick=True, straight_through=False,
                                threshold_ema_dead_code=0).to(device).train()

            def vqp_step(vq=vq):
                quantized, _, commit = vq(z.unsqueeze(0))  # vector-quantize-pytorch wants (batch, seq, dim)
                return torch.autograd.grad([quantized, commit.sum()], z, [g.unsqueeze(0), None])[0]

            fns["vqp.VectorQuantize(rotation)"] = vqp_step
        codebook = torch.randn(k, d, generator=torch.Generator().manual_seed(1)).to(device)
        fns["nearest_code"] = lambda codebook=codebook: nearest_code(z.detach(), codebook)
        fns["bare addmm+argmin"] = bare_search(z.detach(), codebook)
        res = interleaved(fns, device, repeats, warmup=1)
        ref = res["bare addmm+argmin"]
        rows += [_plain_row(n, d, name, r, ref, K=k) for name, r in res.items()]
    return rows


# ------------------------------------------------------------------------------------
# A full run


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "rotvq": rotvq.__version__,
        "vector_quantize_pytorch": _package_version("vector-quantize-pytorch") if rotate_to else None,
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "device": str(device),
    }
    info["caches"] = cpu_caches()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_caches(root: str | os.PathLike = "/sys/devices/system/cpu/cpu0/cache") -> dict:
    """The caches of the first CPU as the kernel reports them (Linux sysfs): ``{"L1d": "48K",
    "L1i": ..., "L2": ..., "L3": ...}``, each with the CPUs that share it (``"48K, CPUs 0"``);
    ``{}`` where sysfs has no such entries. On a virtual machine these are what the
    hypervisor reports, which need not be what the job can use."""
    caches = {}
    for index in sorted(Path(root).glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
            shared = (index / "shared_cpu_list").read_text().strip()
        except OSError:
            continue
        name = f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")
        caches[name] = f"{size}, CPUs {shared}"
    return caches


def _load() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


#: The groups of :func:`run_all`, in the order they run.
GROUPS = ("estimators", "compiled", "sweep", "search", "layer")


def run_all(device: torch.device, threads: list[int], quick: bool = False, repeats: int | None = None,
            log=print, keep_freed_memory: bool = True, groups=None) -> dict:
    """Every group at every thread count; returns the results (see the module docstring).

    ``keep_freed_memory``: call :func:`steady_allocator` first (recorded as
    ``results["machine"]["allocator"]``; it stays in effect for the rest of the process).
    ``groups``: the names from :data:`GROUPS` to run (one name or several; they run in the
    order of :data:`GROUPS`); ``None`` runs them all. Each run of ``results["runs"]`` holds
    only the groups run.
    """
    groups = GROUPS if groups is None else (groups,) if isinstance(groups, str) else tuple(groups)
    if not groups or any(g not in GROUPS for g in groups):
        raise ValueError(f"groups must be names from {GROUPS} (at least one); got {groups!r}")
    allocator = steady_allocator() if keep_freed_memory and device.type == "cpu" else "unchanged"
    reps = repeats or (5 if quick else 15)
    shapes = [(n // 8, d) for n, d in SHAPES] if quick else SHAPES
    configs = [(n // 8, d, k) for n, d, k in SEARCH_CONFIGS] if quick else SEARCH_CONFIGS
    total = 2**18 if quick else 2**20
    sweep = [(total // d, d) for d in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    results = {"machine": {**machine_info(device), "allocator": allocator}, "quick": quick, "repeats": reps,
               "runs": {}}
    t_start = time.perf_counter()
    for t in threads:
        torch.set_num_threads(t)
        run: dict = {"threads": t, "load": {}}
        chosen = {
            "estimators": lambda: bench_estimators(shapes, device, reps),
            "compiled": lambda: bench_compiled(shapes, device, reps),
            "sweep": lambda: bench_estimators(sweep, device, max(3, reps // 3), memory=False),
            "search": lambda: bench_search(configs, device, max(3, reps // 3), t),
            "layer": lambda: bench_layer(configs, device, max(3, reps // 3), vqp_configs=configs[:1]),
        }
        for name, fn in ((g, chosen[g]) for g in GROUPS if g in groups):
            before = _load()
            t0 = time.perf_counter()
            run[name] = fn()
            run["load"][name] = {"before": before, "after": _load(), "seconds": time.perf_counter() - t0}
            log(f"\n## {name}, {t} thread(s) (load average before/after: {before} / {_load()})\n")
            log(fmt_table(run[name], COLS[name]))
        results["runs"][str(t)] = run
    results["seconds"] = time.perf_counter() - t_start
    return results


def fmt_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """A markdown table of ``rows`` with columns ``(key, header, format)``."""
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" if c[2] == "s" else "---:" for c in cols) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, f in cols:
            v = r.get(key)
            cells.append("n/a" if v is None else (format(v, f) if f != "s" else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_EST = [("N", "N", "d"), ("d", "d", "d"), ("method", "method", "s"), ("min_ms", "min ms", ".2f"),
        ("median_ms", "median ms", ".2f"), ("ratio_min", "min / ref", ".2f"), ("ratio_median", "median / ref", ".2f"),
        ("faults", "page faults / call", ".0f")]
COLS = {
    "estimators": _EST + [("extra_MiB", "kept for backward beyond z, q (MiB)", ".1f")],
    "compiled": _EST,
    "sweep": _EST,
    "search": [("N", "N", "d"), ("d", "d", "d"), ("K", "K", "d"), ("method", "method", "s"),
               ("min_ms", "min ms", ".1f"), ("median_ms", "median ms", ".1f"), ("ratio_min", "min / bare", ".2f"),
               ("peak_MiB", "peak MiB", ".0f"), ("agreement", "agreement", ".4f"),
               ("faults", "page faults / call", ".0f")],
    "layer": [("N", "N", "d"), ("d", "d", "d"), ("K", "K", "d"), ("method", "method", "s"),
              ("min_ms", "min ms", ".1f"), ("median_ms", "median ms", ".1f"), ("ratio_min", "min / bare", ".2f"),
              ("faults", "page faults / call", ".0f")],
}
