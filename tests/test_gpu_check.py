"""tools/gpu_check.py, the prepared GPU check, tested without a GPU: its exit without CUDA,
its arithmetic, its stage runner and its list of CUDA tests against the test files."""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from rotvq import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(gpu_check)

SUBPROCESS_TIMEOUT_S = 120


# ------------------------------------------------------------------ without CUDA


@pytest.mark.parametrize("how", ["sh", "python"])
def test_without_cuda_it_exits_3_at_once_and_writes_nothing(how, tmp_path):
    out = tmp_path / "results" / "cuda.json"
    cmd = ([os.path.join(ROOT, "tools", "gpu_check.sh")] if how == "sh"
           else [sys.executable, os.path.join("tools", "gpu_check.py")])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}  # no GPU, even on a GPU host
    t0 = time.monotonic()
    run = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT_S)
    assert run.returncode == gpu_check.EXIT_NO_CUDA == 3, run.stdout + run.stderr
    assert run.stderr.strip() == gpu_check.NO_CUDA_MESSAGE and "no CUDA device" in run.stderr
    assert run.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert time.monotonic() - t0 < 60  # "at once": the time to import torch, nothing run


@pytest.mark.parametrize("argv", [["--budget", "0"], ["--budget", "nan"], ["--budget", "soon"],
                                  ["--repeats", "0"], ["--steps", "2.5"], ["--stages", "tests,device"],
                                  ["--stages", ","], ["--no-such-option"]])
def test_bad_arguments_exit_2_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    assert exit_info.value.code == gpu_check.EXIT_USAGE == 2
    assert "error:" in capsys.readouterr().err


def test_stage_option_keeps_the_given_order():
    args = gpu_check.parse_args(["--stages", "train_step, device", "--budget", "60"])
    assert args.stages == ["train_step", "device"] and args.budget == 60.0
    assert gpu_check.parse_args([]).stages == list(gpu_check.STAGES)


# ------------------------------------------------------------------ peak bandwidth and arithmetic


@pytest.mark.parametrize("name, model, tbps", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM5 80GB", 3.35),
    ("NVIDIA H100 PCIe", "H100 PCIe", 2.0),
    ("NVIDIA H100 NVL", "H100 NVL", 3.9),
    ("NVIDIA H200", "H200", 4.8),
    ("NVIDIA H200 NVL", "H200", 4.8),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 2.039),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 1.935),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB", 1.555),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB", 1.555),
])
def test_peak_bandwidth_of_known_models(name, model, tbps):
    assert gpu_check.peak_bandwidth(name) == (model, tbps)


@pytest.mark.parametrize("name", ["NVIDIA GH200 480GB", "NVIDIA H100", "NVIDIA H800", "NVIDIA A100",
                                  "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", ""])
def test_peak_bandwidth_of_other_models_is_unknown(name):
    assert gpu_check.peak_bandwidth(name) is None


def test_peak_bandwidth_needs_a_name():
    with pytest.raises(TypeError, match="str"):
        gpu_check.peak_bandwidth(None)


def test_bandwidth_arithmetic():
    # 4 tensors of 2^20 x 64 float32 = 2^30 bytes in 1 ms: 1.073741824 TB/s
    got = gpu_check.bandwidth(2**20, 64, 1e-3, 4, peak_tbps=3.35)
    assert got["bytes"] == 2**30
    assert got["achieved_TBps"] == pytest.approx(1.073741824, rel=1e-12)
    assert got["fraction_of_peak"] == pytest.approx(1.073741824 / 3.35, rel=1e-12)
    half = gpu_check.bandwidth(1000, 10, 2.0, 6, itemsize=2)  # 120,000 bytes in 2 s, peak unknown
    assert half == {"bytes": 120_000, "achieved_TBps": pytest.approx(6e-8), "fraction_of_peak": None}


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(d=1.5), dict(tensors=True), dict(seconds=0.0),
                                    dict(seconds=float("nan")), dict(peak_tbps=0.0), dict(itemsize=-4)])
def test_bandwidth_rejects_bad_values(kwargs):
    args = {"n": 8, "d": 8, "seconds": 1.0, "tensors": 4, **kwargs}
    with pytest.raises(ValueError):
        gpu_check.bandwidth(**args)


def test_traffic_names_the_benchmark_rows():
    assert set(gpu_check.TRAFFIC) == {bench.KERNEL, bench.FLOOR, "textbook_ste"}
    assert "textbook_ste" in bench.estimator_methods()
    assert {k: v[0] for k, v in gpu_check.TRAFFIC.items()} == {bench.KERNEL: 4, bench.FLOOR: 4, "textbook_ste": 6}


def test_bandwidth_rows_of_a_stored_run():
    rows = bench.load_results()["runs"]["1"]["estimators"]
    entries = gpu_check.bandwidth_rows(rows, peak_tbps=2.0)
    wanted = [r for r in rows if r["method"] in gpu_check.TRAFFIC]
    assert len(entries) == len(wanted) == 3 * len(bench.SHAPES)
    for row, entry in zip(wanted, entries):
        tensors = gpu_check.TRAFFIC[row["method"]][0]
        moved = tensors * row["N"] * row["d"] * 4
        assert entry["method"] == row["method"] and entry["bytes"] == moved
        assert entry["achieved_TBps"] == pytest.approx(moved / (row["min_ms"] / 1e3) / 1e12)
        assert entry["achieved_TBps_median"] == pytest.approx(moved / (row["median_ms"] / 1e3) / 1e12)
        assert entry["fraction_of_peak"] == pytest.approx(entry["achieved_TBps"] / 2.0)
    assert gpu_check.bandwidth_rows(rows, None)[0]["fraction_of_peak"] is None


# ------------------------------------------------------------------ stage runner


def test_a_failing_stage_is_recorded_and_the_next_ones_run():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the stage timer (SIGALRM) works in the main thread only")
    ran, seen = [], []

    def fails(limit):
        ran.append("fails")
        raise RuntimeError("broken on purpose")

    def hangs(limit):
        ran.append("hangs")
        time.sleep(30)

    def passes(limit):
        ran.append("passes")
        return {"limit": limit}

    def details_then_fail(limit):
        raise gpu_check.StageFailure("2 tests failed", {"failed": 2})

    t0 = time.monotonic()
    outcomes = gpu_check.run_stages([("fails", 1, fails), ("hangs", 1, hangs), ("passes", 1, passes),
                                     ("details", 1, details_then_fail)], budget_s=6.0, log=lambda m: None,
                                    after=lambda o: seen.append(list(o)))
    assert time.monotonic() - t0 < 6.0
    assert ran == ["fails", "hangs", "passes"]
    assert outcomes["fails"]["status"] == "failed" and "RuntimeError: broken on purpose" in outcomes["fails"]["reason"]
    assert "broken on purpose" in outcomes["fails"]["details"]["traceback"]
    assert outcomes["hangs"]["status"] == "failed" and outcomes["hangs"]["reason"].startswith("timed out")
    assert outcomes["hangs"]["seconds"] == pytest.approx(outcomes["hangs"]["limit_s"], abs=0.5)
    assert outcomes["hangs"]["limit_s"] == pytest.approx(3.0, abs=0.3)  # its 1.5 s and the 1.5 s 'fails' left
    assert outcomes["passes"] == {"status": "passed", "details": {"limit": outcomes["passes"]["limit_s"]},
                                  "seconds": pytest.approx(0, abs=0.3), "limit_s": pytest.approx(1.5, abs=0.3)}
    assert outcomes["details"]["status"] == "failed" and outcomes["details"]["details"] == {"failed": 2}
    assert seen == [["fails"], ["fails", "hangs"], ["fails", "hangs", "passes"], list(outcomes)]


def test_stages_past_the_total_budget_are_skipped():
    now = [0.0]

    def clock():
        return now[0]

    def overruns(limit):
        now[0] += 100.0  # as if this stage took 100 s of a 10 s budget

    outcomes = gpu_check.run_stages([("overruns", 1, overruns), ("next", 1, lambda limit: {})], budget_s=10.0,
                                    clock=clock, log=lambda m: None)
    assert outcomes["overruns"]["status"] == "passed" and outcomes["overruns"]["limit_s"] == 5.0
    assert outcomes["next"]["status"] == "skipped" and "budget of 10 s is spent" in outcomes["next"]["reason"]
    with pytest.raises(ValueError, match="budget_s"):
        gpu_check.run_stages([], budget_s=0)


# ------------------------------------------------------------------ the CUDA tests the check runs


def _cuda_tests_in_files(tests_dir) -> dict:
    """Every test function of ``tests_dir`` that needs CUDA, read from the source: ``"all"``
    for one with a skip marker that mentions CUDA (its own or the module's ``pytestmark``),
    ``"cuda-params"`` for one parametrized over a module-level list built with ``torch.cuda``."""
    found = {}
    for path in sorted(tests_dir.glob("test_*.py")):
        if path.name == "test_gpu_check.py":  # this file: its skip markers are the other way round
            continue
        text = path.read_text()
        tree = ast.parse(text)
        device_lists = {target.id for node in tree.body if isinstance(node, ast.Assign)
                        and "cuda" in ast.get_source_segment(text, node.value)
                        for target in node.targets if isinstance(target, ast.Name)}
        module_skip = any("skipif" in ast.get_source_segment(text, node.value) and
                          "cuda" in ast.get_source_segment(text, node.value)
                          for node in tree.body if isinstance(node, ast.Assign)
                          and any(getattr(t, "id", None) == "pytestmark" for t in node.targets))
        functions = [(f"tests/{path.name}::{node.name}", node) for node in tree.body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        functions += [(f"tests/{path.name}::{cls.name}::{node.name}", node) for cls in tree.body
                      if isinstance(cls, ast.ClassDef) for node in cls.body
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node_id, node in functions:
            if not node.name.startswith("test"):
                continue
            marks = [ast.get_source_segment(text, d) for d in node.decorator_list]
            names = [{n.id for n in ast.walk(d) if isinstance(n, ast.Name)} for d in node.decorator_list]
            if module_skip or any("skipif" in m and "cuda" in m for m in marks):
                found[node_id] = "all"
            elif any("parametrize" in m and n & device_lists for m, n in zip(marks, names)):
                found[node_id] = "cuda-params"
    return found


def test_the_check_runs_every_cuda_test_of_the_test_files(repo_root):
    in_files = _cuda_tests_in_files(repo_root / "tests")
    assert len(in_files) >= 9  # the parser finds what was there when the check was written
    listed = {**gpu_check.CUDA_TESTS, **{k: "all" for k in gpu_check.OUT_OF_SCOPE}}
    assert not set(gpu_check.CUDA_TESTS) & set(gpu_check.OUT_OF_SCOPE)
    assert listed == in_files, ("tools/gpu_check.py's CUDA_TESTS / OUT_OF_SCOPE must list every CUDA test "
                                f"(missing: {set(in_files) - set(listed)}, stale: {set(listed) - set(in_files)})")


def test_selection_keeps_the_cuda_items():
    collected = [
        "tests/test_estimators.py::test_runs_on_every_device[eager-cpu]",
        "tests/test_estimators.py::test_runs_on_every_device[eager-cuda]",
        "tests/test_estimators.py::test_runs_on_every_device[compiled-cuda]",
        "tests/test_estimators.py::test_cuda_matches_cpu[compiled]",
        "tests/test_quantizer.py::test_cuda[False]",
        "tests/test_quantizer.py::test_input_on_another_device_raises_before_the_kmeans_init",
        "tests/test_quantizer.py::test_cuda_something_else",
        "tests/test_distributed.py::test_nccl_two_gpus",
        "tests/test_backend.py::test_set_get_and_bad_names",
    ]
    assert gpu_check.select_cuda_items(collected) == [collected[i] for i in (1, 2, 3, 4, 5)]


def test_pytest_collects_the_listed_ids(repo_root):
    """pytest knows every id the check passes (a renamed test breaks this), and on this
    machine selects the items of the functions with a CUDA skip marker."""
    ids = [*gpu_check.CUDA_TESTS, *gpu_check.OUT_OF_SCOPE]
    status, out = gpu_check.run_bounded(gpu_check.pytest_command("--collect-only", "-q", *ids),
                                        SUBPROCESS_TIMEOUT_S, gpu_check._test_env())
    assert status == 0, out
    collected = [line.strip() for line in out.splitlines() if "::" in line]
    assert {item.partition("[")[0] for item in collected} == set(ids)
    if not torch.cuda.is_available():
        whole = [item for item in collected if gpu_check.CUDA_TESTS.get(item.partition("[")[0]) == "all"]
        assert gpu_check.select_cuda_items(collected) == whole and len(whole) >= 10


def test_run_bounded_kills_what_runs_past_its_timeout():
    t0 = time.monotonic()
    status, out = gpu_check.run_bounded([sys.executable, "-c", "print('started', flush=True); "
                                         "import time; time.sleep(60)"], timeout=2)
    assert status is None and "started" in out and time.monotonic() - t0 < 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the CUDA tests")
def test_the_check_writes_the_results_and_fails_when_the_cuda_tests_skip(tmp_path):
    """A tests stage run where CUDA is missing: every CUDA test skips, so the stage fails
    (a skipped CUDA test did not run), and the results file has cpu.json's keys."""
    out = tmp_path / "cuda.json"
    args = argparse.Namespace(stages=["tests_eager"], out=str(out), budget=120.0, repeats=5, quick=False, steps=20)
    status = gpu_check.run_check(args, torch.device("cpu"), "test")
    assert status == gpu_check.EXIT_FAILED == 1
    results = json.loads(out.read_text())
    assert set(bench.load_results()) <= set(results)
    assert {"stages", "bandwidth", "train_step", "budget_s", "total_seconds"} <= set(results)
    stage = results["stages"]["tests_eager"]
    assert stage["status"] == "failed" and stage["reason"].startswith("0 of ")
    details = stage["details"]
    assert details["backend"] == "eager" and details["passed"] == 0 and details["failed"] == 0
    assert details["skipped"] == details["items"] >= 10
    assert set(details["skipped_reasons"].values()) == {"needs CUDA"}
    assert results["runs"] == {} and results["seconds"] is None and results["command"] == "test"


# ------------------------------------------------------------------ the measurements, on the CPU


def test_train_step_timing_eager_on_the_cpu():
    result = gpu_check.train_step_timing(torch.device("cpu"), steps=2, warmup=1, batch=4, size=8, hidden=8,
                                         latent_dim=4, codebook_size=16, compile=False)
    assert result["vectors_per_step"] == 4 * 2 * 2 and result["autocast"] == "bfloat16"
    assert result["eager"]["steps"] == 2 and 0 < result["eager"]["min_ms"] <= result["eager"]["median_ms"]
    assert "compiled" not in result


def test_run_all_runs_the_chosen_groups_only(monkeypatch):
    calls = []
    for name in ("bench_estimators", "bench_compiled", "bench_search", "bench_layer"):
        monkeypatch.setattr(bench, name, lambda *a, _name=name, **k: calls.append(_name) or [])
    results = bench.run_all(torch.device("cpu"), [1], quick=True, repeats=1, log=lambda s: None,
                            keep_freed_memory=False, groups=["layer", "estimators"])
    assert calls == ["bench_estimators", "bench_layer"]  # in the order of bench.GROUPS
    assert set(results["runs"]["1"]) == {"threads", "load", "estimators", "layer"}
    assert set(results["runs"]["1"]["load"]) == {"estimators", "layer"}
    calls.clear()
    results = bench.run_all(torch.device("cpu"), [1], quick=True, repeats=1, log=lambda s: None,
                            keep_freed_memory=False)
    assert set(bench.GROUPS) <= set(results["runs"]["1"]) and len(calls) == 5  # sweep is bench_estimators
    for bad in (["search", "nope"], [], "everything"):
        with pytest.raises(ValueError, match="groups"):
            bench.run_all(torch.device("cpu"), [1], groups=bad)
