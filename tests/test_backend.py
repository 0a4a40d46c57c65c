"""The backends of the rotation family: selection, the fused kernel, the fallback, and
estimators inside ``torch.compile(fullgraph=True)``.

The whole estimator suite (tests/test_estimators.py) runs under both backends; this
module checks what is specific to the choice of backend.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import rotvq
from rotvq import backend
from rotvq.backend import BackendFallbackWarning, get_backend, set_backend
from reference import OPERATORS as ALL_OPERATORS

OPERATORS = {name: options for name, options in ALL_OPERATORS.items() if name != "ste"}  # the rotation family
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def restore_backend():
    before = get_backend()
    yield
    set_backend(before)


def grad_of(z, q, g, est):
    z = z.detach().clone().requires_grad_(True)
    out = rotvq.apply_estimator(z, q, est)
    (grad,) = torch.autograd.grad(out, z, g)
    return out, grad


def test_set_get_and_bad_names(restore_backend):
    assert backend.BACKENDS == ("eager", "compiled")
    for name in backend.BACKENDS:
        set_backend(name)
        assert get_backend() == name
    for bad in ("Compiled", "inductor", "", None, 1):
        with pytest.raises(ValueError, match="backend must be one of"):
            set_backend(bad)
        assert get_backend() == "compiled", "a rejected name must not change the backend"


def test_environment_variable():
    code = "import rotvq; print(rotvq.backend.get_backend())"
    env = {k: v for k, v in os.environ.items() if k != "ROTVQ_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ROTVQ_BACKEND": "compiled"},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "compiled"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ROTVQ_BACKEND": "fast"},
                         capture_output=True, text=True)
    assert out.returncode != 0 and "ROTVQ_BACKEND" in out.stderr and "'fast'" in out.stderr


def degenerate_batch(dtype, d=9, seed=0):
    """Generic rows mixed with every degenerate kind the plane form exists for: rows 0-4
    and 6-8 (6 and 7 only in float32 and float64) are degenerate; row 5 (parallel) and
    rows 9-15 are generic."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(16, d, generator=gen, dtype=torch.float64)
    q = torch.randn(16, d, generator=gen, dtype=torch.float64)
    q[0] = -2.0 * z[0]  # antiparallel
    q[1] = -0.5 * z[1] + 1e-9 * q[1]  # nearly antiparallel
    z[2] = 0.0  # zero z
    z[3] = 1e-30 * z[3]  # z below the resolution of q
    q[4] = 0.0  # zero q
    q[5] = 3.0 * z[5]  # parallel
    if dtype in (torch.float32, torch.float64):  # half precision is computed in float32
        z[6] *= torch.finfo(dtype).max ** 0.75  # squared norm overflows
        q[7] *= torch.finfo(dtype).tiny ** 0.75  # squared norm underflows
    q[8] = -z[8] + 0.3 * q[8]  # more than 120 degrees apart
    g = torch.randn(16, d, generator=gen, dtype=torch.float64)
    return z.to(dtype), q.to(dtype), g.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPERATORS))
def test_compiled_equals_eager_with_degenerate_rows(name, dtype, restore_backend):
    """Degenerate rows go through the same float64 plane form: bitwise equal to eager.
    Generic rows come from the fused kernel: equal to eager up to rounding."""
    z, q, g = degenerate_batch(dtype)
    est = rotvq.get_surrogate(name, **OPERATORS[name])
    set_backend("eager")
    out_e, grad_e = grad_of(z, q, g, est)
    set_backend("compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        out_c, grad_c = grad_of(z, q, g, est)
    assert get_backend() == "compiled"
    assert torch.equal(out_c, q) and torch.equal(out_e, q)
    assert torch.isfinite(grad_c).all()
    degenerate = torch.arange(16) < 9
    degenerate[5] = False
    if dtype in (torch.float16, torch.bfloat16):
        degenerate[6:8] = False
    assert torch.equal(grad_c[degenerate], grad_e[degenerate])
    eps = torch.finfo(dtype).eps
    scale = grad_e[~degenerate].double().abs().max()
    assert (grad_c[~degenerate].double() - grad_e[~degenerate].double()).abs().max() <= 8 * eps * scale


@pytest.mark.parametrize("backend_name", ["eager", "compiled"])
@pytest.mark.parametrize("name", list(OPERATORS))
def test_the_custom_operator_is_the_backward(name, backend_name, restore_backend):
    """``torch.ops.rotvq.rotation_family_vjp`` (what a compiled caller's graph calls) gives
    the estimator's backward bitwise, degenerate rows included, under either backend and
    for (n, d) and (..., d) inputs; ``torch.library.opcheck`` accepts its registration
    (schema, fake tensor, dynamic-shape AOT dispatch)."""
    z, q, g = degenerate_batch(torch.float64)
    est = rotvq.get_surrogate(name, **OPERATORS[name])
    v = est.variant
    fields = (v.m, v.lo, v.hi, v.u, v.tangent, v.reflect)
    set_backend(backend_name)
    _, grad = grad_of(z, q, g, est)
    assert torch.equal(torch.ops.rotvq.rotation_family_vjp(g, z, q, *fields), grad)
    batched = torch.ops.rotvq.rotation_family_vjp(g.view(2, 8, -1), z.view(2, 8, -1), q.view(2, 8, -1), *fields)
    assert batched.shape == (2, 8, z.shape[-1]) and torch.equal(batched.view_as(grad), grad)
    result = torch.library.opcheck(torch.ops.rotvq.rotation_family_vjp.default, (g, z, q, *fields),
                                   test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result
    assert get_backend() == backend_name


def test_the_custom_operator_rejects_mismatched_inputs(restore_backend):
    """Called directly, the operator validates its tensors before any kernel reads them."""
    set_backend("compiled")
    z, q, g = (torch.randn(8, 5) for _ in range(3))
    fields = (1.0, 0.0, math.inf, 0.0, False, False)
    vjp = torch.ops.rotvq.rotation_family_vjp
    with pytest.raises(ValueError, match="g and z must have the same shape"):
        vjp(g[:4], z, q, *fields)
    with pytest.raises(ValueError, match="z and q must have the same shape"):
        vjp(g, z, q[:, :3], *fields)
    with pytest.raises(TypeError, match="same dtype"):
        vjp(g, z, q.double(), *fields)


@pytest.mark.parametrize("name", list(OPERATORS))
def test_plane_form_shortcuts_equal_the_general_path(name):
    """On the CPU the float64 plane form skips its selections when no row of the call needs
    them. A generic row alone takes those shortcuts; inside the degenerate batch it takes
    every general branch: the two results are bitwise equal."""
    z, q, g = degenerate_batch(torch.float64)
    op = rotvq.get_surrogate(name, **OPERATORS[name])
    eps = torch.finfo(torch.float64).eps
    whole = op._precise(g, z, q, eps)
    for i in [5, *range(9, 16)]:  # the generic rows
        alone = op._precise(g[i:i + 1], z[i:i + 1], q[i:i + 1], eps)
        assert torch.equal(alone, whole[i:i + 1]), i


def _count_calls(table, key, monkeypatch):
    """Count the calls of the kernel ``table[key]`` from now on."""
    calls = []
    kernel = table[key]
    monkeypatch.setitem(table, key, lambda *a: calls.append(1) or kernel(*a))
    return calls


def test_compiled_backend_uses_the_fused_kernels(monkeypatch, restore_backend):
    """float32 and float64 on the CPU run the C++ kernel, half precision the kernel
    torch.compile generates: one call per backward under "compiled", none under "eager"."""
    set_backend("compiled")
    z, q, g = (torch.randn(32, 8) for _ in range(3))
    grad_of(z, q, g, "rotation")
    grad_of(z.half(), q.half(), g.half(), "rotation")
    native = _count_calls(backend._native, (rotvq._cpu_kernel.build, torch.float32), monkeypatch)
    generated = _count_calls(backend._kernels, (rotvq.operators._span_kernel, torch.get_num_threads()), monkeypatch)
    grad_of(z, q, g, "rotation_tangent")
    grad_of(z.half(), q.half(), g.half(), "rotation_tangent")
    set_backend("eager")
    grad_of(z, q, g, "rotation_tangent")
    grad_of(z.half(), q.half(), g.half(), "rotation_tangent")
    assert (len(native), len(generated)) == (1, 1), "one kernel call under 'compiled', none under 'eager'"


def test_failed_compilation_falls_back_with_one_warning(monkeypatch, restore_backend):
    """A machine without a working compiler: one warning, eager results, never an error."""

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("simulated: no working C++ compiler")
        return run

    def broken_build(dtype):
        raise RuntimeError("simulated: no working C++ compiler")

    monkeypatch.setattr(backend, "_kernels", {})
    monkeypatch.setattr(backend, "_native", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(rotvq._cpu_kernel, "build", broken_build)
    z, q, g = degenerate_batch(torch.float32)
    set_backend("eager")
    _, expected = grad_of(z, q, g, "rotation")
    set_backend("compiled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = [grad_of(z, q, g, name)[1] for name in ("rotation", "rotation", "rotation_clipped")]
    fallbacks = [w for w in caught if issubclass(w.category, BackendFallbackWarning)]
    assert len(fallbacks) == 1 and "simulated" in str(fallbacks[0].message)
    assert get_backend() == "eager"
    assert torch.equal(grads[0], expected) and torch.equal(grads[1], expected)
    # half precision takes the torch.compile kernel: its failure falls back the same way
    half = degenerate_batch(torch.float16)
    _, expected = grad_of(*half, "rotation")
    set_backend("compiled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad = grad_of(*half, "rotation")[1]
    assert [issubclass(w.category, BackendFallbackWarning) for w in caught] == [True]
    assert get_backend() == "eager" and torch.equal(grad, expected)


def every_estimator(zs, q, g, G):
    """One loss per estimator, each through its own leaf: a single graph for all."""
    outs = [rotvq.ste(zs[0], q), rotvq.rotation_trick(zs[1], q, scale=False), rotvq.generalized_ste(zs[2], q, G)]
    outs += [rotvq.apply_estimator(z, q, rotvq.get_surrogate(name, **ALL_OPERATORS[name]))
             for z, name in zip(zs[3:], rotvq.SURROGATE_NAMES)]
    loss = sum((out * g).sum() for out in outs)
    return loss, outs


def check_fullgraph(fn, count, compile_backend):
    z, q, g = degenerate_batch(torch.float32, d=8, seed=1)
    G = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    zs_e = [z.clone().requires_grad_() for _ in range(count)]
    loss_e, _ = fn(zs_e, q, g, G)
    grads_e = torch.autograd.grad(loss_e, zs_e)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)  # raises on a graph break
    zs_c = [z.clone().requires_grad_() for _ in range(count)]
    loss_c, outs = compiled(zs_c, q, g, G)
    grads_c = torch.autograd.grad(loss_c, zs_c)
    for out in outs:
        assert torch.equal(out, q)
    for a, b in zip(grads_c, grads_e):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fullgraph_capture_of_every_estimator():
    """``torch.compile(fn, fullgraph=True)`` of code using every estimator (degenerate
    rows included) captures one graph, forward and backward (AOT autograd; the
    ``aot_eager`` backend skips code generation, which the next test exercises):
    forward bitwise ``q``, gradients as in eager."""
    check_fullgraph(every_estimator, 3 + len(rotvq.SURROGATE_NAMES), "aot_eager")


def test_fullgraph_inductor_rotation_trick():
    """The same through inductor (generated C++ on CPU), for the rotation trick."""

    def fn(zs, q, g, G):
        out = rotvq.rotation_trick(zs[0], q)
        return (out * g).sum(), [out]

    check_fullgraph(fn, 1, "inductor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(OPERATORS))
def test_compiled_cuda_matches_cpu(name, restore_backend):
    z, q, g = degenerate_batch(torch.float32)
    est = rotvq.get_surrogate(name, **OPERATORS[name])
    set_backend("eager")
    _, cpu = grad_of(z, q, g, est)
    set_backend("compiled")
    out, cuda = grad_of(z.cuda(), q.cuda(), g.cuda(), est)
    assert get_backend() == "compiled" and torch.equal(out.cpu(), q)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_public_names():
    """``rotvq.set_backend`` / ``rotvq.get_backend`` are the package-level entry points."""
    assert rotvq.set_backend is set_backend and rotvq.get_backend is get_backend


def test_no_cxx_compiler_in_a_fresh_process(tmp_path):
    """The real failure, not a simulation: inductor pointed at a C++ compiler that does not
    exist (and an empty cache, so nothing compiled earlier is reused)."""
    code = """
import warnings, torch, rotvq
rotvq.set_backend("compiled")
z, q, g = torch.randn(64, 16, requires_grad=True), torch.randn(64, 16), torch.randn(64, 16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    grads = [torch.autograd.grad(rotvq.rotation_trick(z, q), z, g)[0] for _ in range(3)]
fallbacks = [w for w in caught if issubclass(w.category, rotvq.backend.BackendFallbackWarning)]
rotvq.set_backend("eager")
expected = torch.autograd.grad(rotvq.rotation_trick(z, q), z, g)[0]
print(len(fallbacks), all(torch.equal(a, expected) for a in grads))
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("ROTVQ_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "True"]


@pytest.mark.parametrize("fraction", [0.02, 0.2])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_many_rows_and_threads(dtype, threads, fraction, monkeypatch, restore_backend):
    """The C++ kernel on thousands of rows (d = 37: a partial SIMD vector at the end of each
    row), split over threads, with degenerate rows scattered through the batch (about 100,
    which the kernel lists itself, or 1000, more than it lists): those rows are bitwise the
    eager backend's (float64 plane form), the others equal to rounding."""
    gen = torch.Generator().manual_seed(7)
    n, d = 5000, 37
    z, q, g = (torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    kinds = torch.randint(0, 4, (n,), generator=gen)
    special = torch.rand(n, generator=gen) < fraction
    q[special & (kinds == 0)] = -2.0 * z[special & (kinds == 0)]  # antiparallel
    z[special & (kinds == 1)] = 0.0
    q[special & (kinds == 2)] = 0.0
    q[special & (kinds == 3)] = -z[special & (kinds == 3)] + 0.3 * q[special & (kinds == 3)]  # > 120 degrees
    z, q, g = z.to(dtype), q.to(dtype), g.to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        set_backend("eager")
        _, grad_e = grad_of(z, q, g, "rotation_clipped")
        set_backend("compiled")
        grad_of(z[:2], q[:2], g[:2], "rotation")  # builds the kernel if no test did yet
        calls = _count_calls(backend._native, (rotvq._cpu_kernel.build, dtype), monkeypatch)
        _, grad_c = grad_of(z, q, g, "rotation_clipped")
    finally:
        torch.set_num_threads(before)
    assert get_backend() == "compiled" and len(calls) == 1
    assert torch.equal(grad_c[special], grad_e[special])
    eps = torch.finfo(dtype).eps
    scale = grad_e.abs().max()
    assert (grad_c[~special] - grad_e[~special]).abs().max() <= 8 * eps * scale
