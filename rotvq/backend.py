r"""Which implementation evaluates the backward pass of the rotation family.

Two backends compute the same ``G^T g`` (:mod:`rotvq.operators`):

* ``"eager"`` (the default): PyTorch operations, on CPU in cache-sized chunks of rows
  (about eleven elementwise operations per chunk).
* ``"compiled"``: the span form ``G^T g = c_g g + c_z z + c_q q`` of :eq:`bench-span` in
  :ref:`ch-benchmarks` runs as one fused kernel: one read of ``z``, ``q`` and ``g`` and
  one write (four tensors of traffic; the textbook straight-through estimator's forward
  and backward move six). For float32 and float64 tensors on the CPU the kernel is a
  C++ row loop written for this form (``rotvq/_cpu_kernel.py``), compiled and cached by
  inductor's C++ toolchain (the compiler, flags and SIMD instruction set that
  :func:`torch.compile` uses for its own CPU kernels); elsewhere (CUDA, half precision)
  it is the kernel :func:`torch.compile` generates from ``rotvq.operators._span_kernel``
  (Triton on CUDA). Rows the span form
  cannot evaluate accurately (antiparallel pairs, a ``z`` below the resolution of ``q``,
  ``q = 0``, squared norms that under- or overflow) are flagged by the kernel and
  recomputed by the same float64 plane form as in the eager backend, so degenerate rows
  give the same results under both backends.

Choose with :func:`set_backend` or, before ``import rotvq``, the environment variable
``ROTVQ_BACKEND``. The compiled backend costs a one-time compilation (on a 2-core CPU:
13 s for the C++ kernel's first dtype in a fresh environment, inductor's setup included,
under a second for the other; 15-30 s for a generated kernel, a few seconds for each new
dtype), then nothing (neither kernel is specialised on shapes; inductor's cache under
the system temp folder keeps the kernels between processes). Inputs with fewer than two
rows or a dimension ``d < 2`` always take
the eager path (compiling them would specialise the kernel on that size). If compiling
fails (no C++ compiler, no Triton), rotvq warns once with :class:`BackendFallbackWarning`,
switches to ``"eager"`` and carries on: the backward never fails because of the backend.

Inside code that is itself being compiled (``torch.compile(fn, fullgraph=True)``), the
rotation family's backward is one custom operator (``torch.ops.rotvq.rotation_family_vjp``)
that the compiler calls without tracing into it; it runs the backend selected here, so
``set_backend("compiled")`` speeds up compiled callers too.
"""
from __future__ import annotations

import os
import types
import warnings

import torch

__all__ = ["BACKENDS", "BackendFallbackWarning", "get_backend", "set_backend", "compiled", "native"]

#: The valid backend names.
BACKENDS: tuple[str, ...] = ("eager", "compiled")
_ENV = "ROTVQ_BACKEND"


class BackendFallbackWarning(RuntimeWarning):
    """Warned once when the compiled backend cannot compile and rotvq falls back to eager."""


def _validate(name: object, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    return name


_state = {"backend": _validate(os.environ.get(_ENV, "eager") or "eager", f"the environment variable {_ENV}")}
_kernels: dict = {}  # (function, threads) -> its torch.compile'd copy
_native: dict = {}  # (build, key) -> a C++ kernel (rotvq._cpu_kernel)


def get_backend() -> str:
    """The backend in use: ``"eager"`` or ``"compiled"``.

    After a failed compilation this is ``"eager"`` again (see :func:`set_backend`).
    """
    return _state["backend"]


def set_backend(name: str) -> None:
    """Select how the rotation family's backward pass is evaluated.

    Args:
        name: ``"eager"`` (PyTorch operations) or ``"compiled"`` (one fused kernel, see
            the module docstring; the first backward compiles it).

    Raises:
        ValueError: any other name (nothing is changed).
    """
    _state["backend"] = _validate(name, "the backend")


def compiled(fn, *args):
    """Run ``torch.compile(fn, dynamic=True)(*args)``; ``None`` if that fails.

    Inductor settings that ``fn`` carries in an ``inductor_options`` attribute (a dict) are
    passed to its compilation only (``torch.compile(..., options=...)``), never set globally.
    The compiled callable is made once per ``fn`` and torch thread count. Any exception raised while compiling
    or running the compiled kernel switches the backend to ``"eager"``, warns once with
    :class:`BackendFallbackWarning` and returns ``None``: the caller then answers the
    call with its eager implementation.
    """
    key = (fn, torch.get_num_threads())
    kernel = _kernels.get(key)
    if kernel is None:
        # one compiled copy per thread count: inductor decides at code generation whether the
        # CPU loops run in parallel, and a kernel made at one thread would stay serial. A copy
        # of the code object gives each its own compilation cache.
        code = fn.__code__.replace(co_name=f"{fn.__name__}_threads{key[1]}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        options = getattr(fn, "inductor_options", None)  # inductor settings for this kernel only
        kernel = _kernels[key] = torch.compile(copy, dynamic=True, options=options)
    try:
        return kernel(*args)
    except Exception as err:  # noqa: BLE001 - a compiler failure has many types
        _fall_back(err)
        return None


def native(build, key, *args) -> bool:
    """Run the C++ kernel ``build(key)`` makes (once per ``key``, then cached) on ``args``.

    Returns ``True`` when it ran, ``False`` if building or running it failed (with the
    same fallback to ``"eager"`` and the same one warning as :func:`compiled`).
    """
    kernel = _native.get((build, key))
    try:
        if kernel is None:
            kernel = _native[(build, key)] = build(key)
        kernel(*args)
        return True
    except Exception as err:  # noqa: BLE001 - a compiler failure has many types
        _fall_back(err)
        return False


def _fall_back(err: Exception) -> None:
    _state["backend"] = "eager"
    warnings.warn(
        f"rotvq: the compiled backend failed ({type(err).__name__}: {str(err).strip()[:300]}); "
        "falling back to the eager backend for the rest of this process "
        "(rotvq.set_backend('compiled') tries again)",
        BackendFallbackWarning,
        stacklevel=4,
    )
