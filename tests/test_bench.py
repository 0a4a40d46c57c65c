"""The benchmark library (rotvq.bench): its measurement helpers, not its timings."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rotvq
from rotvq import bench


@pytest.fixture
def restore_backend():
    before = rotvq.get_backend()
    yield
    rotvq.set_backend(before)


def test_kernel_and_flagged_rows_make_up_the_compiled_backward(restore_backend):
    """backward_kernel + flagged_rows are the two steps of the compiled backend's backward:
    run in that order on the kernel's output they give the gradient autograd returns."""
    z, q, g = bench._data(4096, 16, torch.device("cpu"))
    cos = torch.nn.functional.cosine_similarity(z.detach(), q, dim=-1)
    expected_rows = int((1 + cos < 0.5).sum())
    assert expected_rows > 10  # independent random pairs at d = 16 have rows beyond 120°
    recompute, k = bench.flagged_rows(z, q, g)
    assert k == expected_rows
    out, rows = bench.backward_kernel(z, q, g)()
    assert rows.numel() == k
    op = rotvq.Rotation()
    op._recompute_rows(out, rows, g, z.detach(), q)
    rotvq.set_backend("compiled")
    (grad,) = torch.autograd.grad(rotvq.rotation_trick(z, q), z, g)
    assert torch.equal(out, grad)
    recompute()  # runs on its own (the benchmark times it)


def test_estimator_group_rows_and_fault_counts():
    rows = bench.bench_estimators([(256, 16)], torch.device("cpu"), repeats=2, memory=True)
    methods = [r["method"] for r in rows]
    assert methods[:4] == [bench.FLOOR, bench.KERNEL, bench.FLAGGED, bench.ESTIMATOR_INSIDE]
    assert rows[3]["kernel_ms"] > 0 and rows[3]["before_kernel_ms"] > 0 and rows[3]["after_kernel_ms"] > 0
    assert rows[2]["flagged_rows"] >= 0
    assert {"textbook_ste", "rotvq.rotation_trick[eager]", "rotvq.rotation_trick[compiled]"} <= set(methods)
    ref = next(r for r in rows if r["method"] == "textbook_ste")
    assert ref["ratio_min"] == 1.0
    for r in rows:
        assert r["min_ms"] > 0 and r["min_ms"] <= r["median_ms"]
        assert isinstance(r["faults"], (int, float)) and r["faults"] >= 0


_ALLOCATOR_CHILD = r"""
import resource, sys, torch
from rotvq.bench import steady_allocator
if sys.argv[1] == "steady":
    print(steady_allocator(), file=sys.stderr)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(16):  # three live 64 MiB tensors (above glibc's largest automatic mmap threshold), then freed
    f0 = faults()
    x = torch.ones(2**24)
    y = x + 1
    w = y + 1
    del x, y, w
    counts.append(faults() - f0)
print(sorted(counts[4:])[6], min(counts[1:]))  # median of rounds 5-16; fewest after the first
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux fault counts")
def test_steady_allocator_keeps_freed_memory():
    """With glibc's defaults freed 64 MiB blocks go back to the system and the next ones
    fault on every page; after steady_allocator() they are reused without faults."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    counts = {}
    for mode in ("default", "steady"):
        out = subprocess.run([sys.executable, "-c", _ALLOCATOR_CHILD, mode], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        counts[mode] = [int(v) for v in out.stdout.split()]
        if mode == "steady":
            assert out.stderr.strip().startswith("glibc mallopt"), out.stderr
    pages = 3 * 2**24 * 4 // 4096
    assert counts["default"][1] >= pages // 2  # every round faults afresh: the blocks went back to the system
    assert counts["steady"][0] < 64  # reused: most rounds touch no fresh page once the heap has grown


@pytest.mark.parametrize("limit", [0, -1, 2**31, 1.5, True, "1"])
def test_steady_allocator_rejects_bad_limits(limit):
    with pytest.raises(ValueError, match="limit"):
        bench.steady_allocator(limit)


def test_interleaved_reports_min_median_and_faults():
    calls = []
    res = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                            torch.device("cpu"), repeats=3, warmup=1)
    assert calls.count("a") == calls.count("b") == 1 + 2 * 3  # warm-up, then an untimed and a timed call per round
    for r in res.values():
        assert len(r["times"]) == 3 and r["min"] <= r["median"] and r["faults"] >= 0


def test_interleaved_runs_before_between_the_two_calls():
    calls = []
    bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"),
                      repeats=2, warmup=0, before={"a": lambda: calls.append("pass")})
    # round 1 starts with a, round 2 with b; "pass" runs after a's untimed call only
    assert calls == ["a", "pass", "a", "b", "b", "b", "b", "a", "pass", "a"]


def test_compiled_group_times_the_call_machinery_alone(restore_backend):
    """The compiled group has the two callers on CALL_ROWS rows, warm and after a pass over
    the full-size data, beside the full-size rows."""
    rows = bench.bench_compiled([(256, 16)], torch.device("cpu"), repeats=2)
    methods = [r["method"] for r in rows]
    assert methods[0] == "compiled textbook_ste" and "compiled rotvq.rotation_trick[compiled]" in methods
    for m in bench.CALL_METHODS:
        assert m in methods
        assert bench.call_row_name(m) in methods and bench.call_row_name(m, after_pass=True) in methods
    assert bench.call_row_name(bench.CALL_METHODS[0], after_pass=True).endswith(", after a pass over the data")
    assert len(set(methods)) == len(methods)
    for r in rows:
        assert r["min_ms"] > 0 and r["N"] == 256 and r["d"] == 16
    inside = next(r for r in rows if r["method"] == bench.INSIDE)
    parts = [inside[f"{p}_ms"] for p in ("before_kernel", "kernel", "after_kernel")]
    assert all(p > 0 for p in parts)
    assert 0.9 * inside["min_ms"] <= sum(parts) <= inside["min_ms"]  # the parts of the timed call that gave the minimum
    assert bench.STE_FORWARD in methods  # the textbook STE's pass without autograd, beside the kernel alone
    forward = next(r for r in rows if r["method"] == bench.STE_FORWARD)
    assert rows[0]["generated_kernels"] == forward["generated_kernels"] == 1  # the compiled textbook STE is one pass
    caller = next(r for r in rows if r["method"] == "compiled rotvq.ste")
    assert caller["generated_kernels"] == 0  # rotvq's STE: the compiled call alone, no kernel
    assert bench.KERNEL_ONLY in methods


def test_kernel_only_caller_runs_the_compiled_backends_kernel(restore_backend):
    """Its gradient is the kernel's output: the compiled backend's gradient on every row the
    kernel does not flag (it recomputes none)."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(512, 16, generator=gen).requires_grad_(True)
    q, g = torch.randn(512, 16, generator=gen), torch.randn(512, 16, generator=gen)
    rotvq.set_backend("compiled")
    out, flagged = rotvq.operators.fused_span(g, z.detach(), q, rotvq.Rotation().variant)
    assert flagged.numel() > 0  # at d = 16 some random pairs are beyond 120 degrees
    got = torch.autograd.grad(bench.kernel_only_caller()(z, q), z, g)[0]
    want = torch.autograd.grad(rotvq.rotation_trick(z, q), z, g)[0]
    assert torch.equal(got, out)
    keep = torch.ones(512, dtype=torch.bool)
    keep[flagged] = False
    assert torch.equal(got[keep], want[keep]) and not torch.equal(got[~keep], want[~keep])


def test_generated_kernels_counts_inductors_kernels():
    """One fused pass for the textbook STE (forward and backward), none for a view."""
    z = torch.randn(8, 4, requires_grad=True)
    q, g = torch.randn(8, 4), torch.randn(8, 4)
    ste = torch.compile(bench.textbook_ste, fullgraph=True)
    assert bench.generated_kernels(lambda: torch.autograd.grad(ste(z, q), z, g)) == 1
    sin = torch.compile(lambda x: x.sin() * 2, fullgraph=True)
    assert bench.generated_kernels(lambda: (sin(q), ste(z, q))) == 2  # counted over both compiled modules
    view = torch.compile(lambda x: x.view(-1), fullgraph=True)
    assert bench.generated_kernels(lambda: view(q)) == 0


def test_split_fields_picks_the_timed_call_of_the_minimum():
    splits = [(9, 9, 9), (9, 9, 9), (5, 5, 5), (1, 2, 3), (5, 5, 5), (0.1, 0.2, 0.3), (5, 5, 5), (2, 2, 2)]
    result = {"times": [6e-3, 0.6e-3, 6e-3]}  # warm-up 2, then (untimed, timed) per round: the 2nd round's
    assert bench._split_fields(splits, result) == {"before_kernel_ms": 100.0, "kernel_ms": 200.0,
                                                   "after_kernel_ms": 300.0}
    assert bench._split_fields(splits[:-1], result)["kernel_ms"] is None  # not one kernel per call


def test_clocked_inside_splits_a_call_at_the_kernel(restore_backend):
    z, q, g = bench._data(512, 32, torch.device("cpu"))
    rotvq.set_backend("compiled")
    call, splits = bench.clocked_inside(bench.fwd_bwd(rotvq.rotation_trick, z, q, g))
    call()
    call()
    assert len(splits) == 2 and all(len(s) == 3 and min(s) > 0 for s in splits)
    assert rotvq._cpu_kernel.span_rows is bench._cpu_kernel.span_rows  # restored after the call
    rotvq.set_backend("eager")  # no fused kernel: nothing to split
    call()
    assert len(splits) == 2


def test_cpu_caches_reads_sysfs_entries(tmp_path):
    for i, (level, kind, size, cpus) in enumerate([("1", "Data", "48K", "0"), ("1", "Instruction", "64K", "0"),
                                                   ("2", "Unified", "2048K", "0"), ("3", "Unified", "32M", "0-1")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", cpus)):
            (d / name).write_text(value + "\n")
    (tmp_path / "index9").mkdir()  # incomplete entry: skipped
    assert bench.cpu_caches(tmp_path) == {"L1d": "48K, CPUs 0", "L1i": "64K, CPUs 0", "L2": "2048K, CPUs 0",
                                          "L3": "32M, CPUs 0-1"}
    assert bench.cpu_caches(tmp_path / "missing") == {}
    assert isinstance(bench.machine_info(torch.device("cpu"))["caches"], dict)
