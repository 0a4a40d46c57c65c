"""rotvq on one GPU: one prepared check that fits a short lease (default 240 s in all).

Usage::

    bash tools/gpu_check.sh [--budget 240] [--out benchmarks/results/cuda.json]
                            [--repeats 5] [--quick] [--steps 20] [--stages device,tests_eager,...]

(``tools/gpu_check.sh`` runs ``python tools/gpu_check.py`` with the same arguments.)

Stages, in this order, each with its share of the total budget (``--budget``; a stage may
also use what the stages before it left unused, never what is reserved for the stages
after it), each recorded as passed / failed / skipped with its reason and seconds; a
stage that fails or runs out of time does not stop the others:

``device``
    the GPU (name, compute capability, memory), driver, torch, CUDA, cuDNN, Triton and
    Python versions, and the card's published peak memory bandwidth (:data:`PEAKS`).
``tests_eager``, ``tests_compiled``
    every single-GPU CUDA test of the package (:data:`CUDA_TESTS`; the two-GPU NCCL test
    is out of scope, :data:`OUT_OF_SCOPE`) in a pytest subprocess under
    ``ROTVQ_BACKEND=eager``, then ``ROTVQ_BACKEND=compiled``. A CUDA test that skips on
    the GPU counts as a failure (it did not run).
``benchmarks``
    the ``estimators``, ``search`` and ``layer`` groups of :func:`rotvq.bench.run_all` on
    CUDA (full sizes, ``--repeats`` rounds; ``--quick`` divides the sizes by 8).
``bandwidth``
    the memory bandwidth that the fused rotation backward (the compiled backend's kernel
    alone) and the textbook STE reach, in TB/s and as a fraction of the card's peak: from
    the ``estimators`` rows at the benchmark's shapes (where part of the data may sit in
    the GPU's L2 cache), and from a dedicated run on tensors far larger than any L2
    (:data:`LARGE_SHAPE`). :data:`TRAFFIC` says exactly which bytes are counted.
``train_step``
    a training step of a convolutional VQ-VAE (:func:`train_step_timing`) in bfloat16
    autocast, eager and under ``torch.compile(model, fullgraph=True)``: median and minimum
    of ``--steps`` timed steps after warm-up, each step between two ``torch.cuda.synchronize``.

Results go to ``--out`` (default ``benchmarks/results/cuda.json``), rewritten after every
stage so that a run cut short still leaves what it measured: the top-level keys of
``benchmarks/results/cpu.json`` (``machine``, ``quick``, ``repeats``, ``runs``,
``seconds``: the benchmarks' own seconds, ``command``, ``date``) plus ``budget_s``,
``total_seconds``, ``stages``, ``bandwidth`` and ``train_step``.

Exit statuses: 0 every stage passed; 1 a stage failed or was skipped (the results file
is written); 2 bad arguments; 3 no CUDA device (``torch.cuda.is_available()`` is false):
one line says so, nothing is run and nothing is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/gpu_check.py` without rotvq installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cuda.json"
NO_CUDA_MESSAGE = ("gpu_check: no CUDA device found (torch.cuda.is_available() is False): "
                   "nothing was run and nothing was written")

# ------------------------------------------------------------------------------------
# The card's published peak memory bandwidth

#: ``(model, pattern of torch.cuda.get_device_name, peak TB/s)``, tried in order
#: (case-insensitive). Peak bandwidths in decimal TB/s from NVIDIA's product specification
#: pages: https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM and H200 NVL: 4.8 TB/s),
#: https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: 3.35 TB/s, H100 NVL: 3.9 TB/s;
#: H100 PCIe: 2 TB/s), https://www.nvidia.com/en-us/data-center/a100/ (A100 80GB SXM:
#: 2,039 GB/s, A100 80GB PCIe: 1,935 GB/s, A100 40GB: 1,555 GB/s). ``\bH200`` does not
#: match GH200 (a different memory system); an H100 name without a form factor other than
#: "80GB" (``NVIDIA H100 80GB HBM3``) is the SXM5 card.
PEAKS = (
    ("H200", r"\bH200\b", 4.8),
    ("H100 NVL", r"\bH100\b.*\bNVL\b", 3.9),
    ("H100 PCIe", r"\bH100\b.*\bPCIe\b", 2.0),
    ("H100 SXM5 80GB", r"\bH100\b(?=.*\b80GB\b)", 3.35),
    ("A100 80GB PCIe", r"\bA100\b(?=.*\b80GB\b)(?=.*\bPCIe)", 1.935),
    ("A100 80GB SXM", r"\bA100\b(?=.*\b80GB\b)(?=.*\bSXM)", 2.039),
    ("A100 40GB", r"\bA100\b(?=.*\b40GB\b)", 1.555),
)


def peak_bandwidth(device_name: str) -> tuple[str, float] | None:
    """``(model, peak TB/s)`` of the first :data:`PEAKS` entry matching ``device_name``;
    ``None`` for a model not in the table."""
    if not isinstance(device_name, str):
        raise TypeError(f"device_name must be a str, got {type(device_name).__name__}")
    for model, pattern, tbps in PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return model, tbps
    return None


# ------------------------------------------------------------------------------------
# Bandwidth arithmetic

#: Bytes of one element of the benchmarks' tensors (float32, ``rotvq.bench._data``).
FLOAT32_BYTES = 4
#: (N, d) of the dedicated bandwidth run: 2^26 float32 entries, 256 MiB per tensor, far
#: beyond the L2 cache of any GPU in :data:`PEAKS` (50 MB on an H100).
LARGE_SHAPE = (2**20, 64)


#: ``{benchmark row name: (tensors of N x d moved, what is counted)}``; the names are
#: ``rotvq.bench.KERNEL``, ``"textbook_ste"`` and ``rotvq.bench.FLOOR`` (written out here so
#: that this module imports without rotvq; a test checks they agree).
TRAFFIC = {
    "backward kernel alone [compiled]": (
        4, "fused rotation backward (the compiled backend's kernel alone): reads z, q, g and writes G^T g, "
        "four (N, d) tensors; its (N,) row flags and the nonzero() over them are not counted"),
    "textbook_ste": (
        6, "forward + backward of z + (q - z).detach() in eager PyTorch: q - z reads q, z and writes a "
        "temporary t, z + t reads z, t and writes z_q, six (N, d) tensors; the backward hands g on "
        "unchanged (nothing moved)"),
    "floor: addcmul(g, z, q)": (
        4, "torch.addcmul(g, z, q): reads g, z, q and writes one (N, d) tensor, the least traffic of any "
        "backward that needs all three"),
}


def bandwidth(n: int, d: int, seconds: float, tensors: int, itemsize: int = FLOAT32_BYTES,
              peak_tbps: float | None = None) -> dict:
    """Memory bandwidth of a pass that moves ``tensors`` tensors of ``n x d`` elements of
    ``itemsize`` bytes in ``seconds``: bytes, achieved TB/s (decimal, as NVIDIA states
    peaks) and the fraction of ``peak_tbps`` (``None`` when the peak is unknown)."""
    for name, value in (("n", n), ("d", d), ("tensors", tensors), ("itemsize", itemsize)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds!r}")
    if peak_tbps is not None and not peak_tbps > 0:
        raise ValueError(f"peak_tbps must be positive or None, got {peak_tbps!r}")
    moved = tensors * n * d * itemsize
    achieved = moved / seconds / 1e12
    return {"bytes": moved, "achieved_TBps": achieved,
            "fraction_of_peak": None if peak_tbps is None else achieved / peak_tbps}


def bandwidth_rows(rows: list[dict], peak_tbps: float | None) -> list[dict]:
    """Bandwidth entries for the benchmark rows of :data:`TRAFFIC`'s methods (from the
    minimum time of each row, and from its median)."""
    entries = []
    for row in rows:
        if row["method"] not in TRAFFIC:
            continue
        tensors, counted = TRAFFIC[row["method"]]
        best = bandwidth(row["N"], row["d"], row["min_ms"] / 1e3, tensors, peak_tbps=peak_tbps)
        typical = bandwidth(row["N"], row["d"], row["median_ms"] / 1e3, tensors, peak_tbps=peak_tbps)
        entries.append({"method": row["method"], "N": row["N"], "d": row["d"], "tensors": tensors,
                        "counted": counted, "min_ms": row["min_ms"], "median_ms": row["median_ms"], **best,
                        "achieved_TBps_median": typical["achieved_TBps"],
                        "fraction_of_peak_median": typical["fraction_of_peak"]})
    return entries


# ------------------------------------------------------------------------------------
# The CUDA tests

#: Every single-GPU CUDA test of the package: ``"all"`` runs every item of the function
#: (it carries a CUDA skip marker), ``"cuda-params"`` only its items whose parameters
#: include ``cuda`` (parametrized over a device list that holds "cuda" where CUDA is).
CUDA_TESTS = {
    "tests/test_backend.py::test_compiled_cuda_matches_cpu": "all",
    "tests/test_distributed.py::test_gloo_with_cuda_tensors": "all",
    "tests/test_estimators.py::test_cuda_matches_cpu": "all",
    "tests/test_estimators.py::test_runs_on_every_device": "cuda-params",
    "tests/test_quantizer.py::test_cuda": "all",
    "tests/test_quantizer.py::test_input_on_another_device_raises_before_the_kmeans_init": "all",
    "tests/test_search.py::test_cuda_matches_cpu_and_memory": "all",
    "tests/test_training.py::test_cuda_run": "all",
}
#: CUDA tests this check leaves out, with the reason.
OUT_OF_SCOPE = {"tests/test_distributed.py::test_nccl_two_gpus": "needs two GPUs (NCCL with two ranks)"}


def select_cuda_items(collected: list[str]) -> list[str]:
    """The collected test ids (``file::function[params]``) that :data:`CUDA_TESTS` runs."""
    chosen = []
    for item in collected:
        function, _, params = item.partition("[")
        kind = CUDA_TESTS.get(function)
        if kind == "all" or (kind == "cuda-params" and "cuda" in params.rstrip("]").split("-")):
            chosen.append(item)
    return chosen


def pytest_command(*args: str) -> list[str]:
    """``python -m pytest`` in-process (``-n 0`` where xdist is installed), without the
    project's ``addopts`` (nbval, xdist workers) and without the cache."""
    xdist = ["-n", "0"] if importlib.util.find_spec("xdist") is not None else []
    return [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", *xdist, *args]


def run_bounded(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` in the project root in its own process group: ``(status, output)``,
    status ``None`` when it ran past ``timeout`` seconds (the whole group is then killed,
    as it is when anything interrupts the wait)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 0.1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, proc.communicate()[0]
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group run_bounded started, children included
    except ProcessLookupError:  # already gone
        pass


def _test_env(backend: str | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if backend is not None:
        env["ROTVQ_BACKEND"] = backend
    return env


def collect_cuda_items(timeout: float) -> list[str]:
    """Collect :data:`CUDA_TESTS` with pytest (``--collect-only -q``) and select their CUDA items."""
    status, out = run_bounded(pytest_command("--collect-only", "-q", *CUDA_TESTS), timeout, _test_env())
    if status != 0:
        raise StageFailure(f"collecting the CUDA tests {'timed out' if status is None else f'exited {status}'}",
                           {"output_tail": out[-3000:]})
    return select_cuda_items([line.strip() for line in out.splitlines() if "::" in line])


def junit_summary(path: str | os.PathLike) -> dict:
    """Counts and the failing / skipped test ids of a pytest ``--junitxml`` report."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failing, skipped = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        test_id = f"{module}.py::{case.get('name')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skipped[test_id] = outcome.get("message", "")
        else:
            counts["failed"] += 1
            failing.append(test_id)
    return {**counts, "failing": failing, "skipped_reasons": skipped}


def run_cuda_tests(backend: str, items: list[str], timeout: float) -> dict:
    """Run ``items`` under ``ROTVQ_BACKEND=backend``; raises :class:`StageFailure` unless
    every one ran and passed."""
    if not items:
        raise StageFailure("no CUDA test was collected", {})
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        status, out = run_bounded(pytest_command("-rs", f"--junitxml={junit}", *items), timeout,
                                  _test_env(backend))
        print(out[-6000:], flush=True)
        details = {"backend": backend, "items": len(items), "exit_status": status, "output_tail": out[-3000:]}
        if junit.exists():
            details.update(junit_summary(junit))
    if status is None:
        raise StageFailure(f"pytest timed out after {timeout:.0f} s", details)
    if status != 0 or "passed" not in details:
        raise StageFailure(f"pytest exited {status}: {details.get('failed', 'unknown number of')} tests failed",
                           details)
    if details["passed"] != len(items):  # a CUDA test that skips on a CUDA machine did not run
        raise StageFailure(f"{details['passed']} of {len(items)} CUDA tests passed, {details['skipped']} "
                           "skipped on a CUDA machine", details)
    return details


# ------------------------------------------------------------------------------------
# Stage runner


class StageFailure(Exception):
    """A stage's failure with the details it gathered (recorded beside the reason)."""

    def __init__(self, reason: str, details: dict):
        super().__init__(reason)
        self.details = details


class StageTimeout(Exception):
    """Raised inside a stage (by a timer signal) when its time limit is reached."""


def _alarm(seconds: float):
    """Arm a timer that raises :class:`StageTimeout` in the main thread after ``seconds``;
    returns the function that disarms it (a no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return lambda: None

    def fire(signum, frame):
        raise StageTimeout(f"ran past its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)

    def disarm():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    return disarm


#: A stage does not start with less than this many seconds left for it.
MIN_STAGE_S = 1.0


def _log(message: str) -> None:
    print(message, flush=True)


def run_stages(stages: list[tuple], budget_s: float, clock=time.monotonic, log=_log, after=None) -> dict:
    """Run ``stages``, a list of ``(name, share, fn)``, within ``budget_s`` seconds in all.

    Stage ``i`` gets ``budget_s * share_i / sum(shares)`` seconds, plus whatever the stages
    before it left unused: its limit is the time left minus the budgets of the stages after
    it. ``fn(limit_s)`` returns a dict of details. Each outcome, ``{"status": "passed" |
    "failed" | "skipped", "seconds", "limit_s", "reason", "details"}``, is recorded and the
    next stage runs whatever happened; ``after(outcomes)`` is called after each stage.
    """
    if not 0 < budget_s < float("inf"):
        raise ValueError(f"budget_s must be positive and finite, got {budget_s!r}")
    if not all(share > 0 for _, share, _ in stages):
        raise ValueError(f"every stage's share must be positive, got {[share for _, share, _ in stages]}")
    total = sum(share for _, share, _ in stages)
    budgets = [budget_s * share / total for _, share, _ in stages]
    start, outcomes = clock(), {}
    for i, (name, _, fn) in enumerate(stages):
        limit = budget_s - (clock() - start) - sum(budgets[i + 1:])
        if limit < MIN_STAGE_S:
            outcomes[name] = {"status": "skipped", "seconds": 0.0, "limit_s": max(limit, 0.0),
                              "reason": f"the total budget of {budget_s:.0f} s is spent (under "
                                        f"{MIN_STAGE_S:.0f} s left for this stage)"}
        else:
            log(f"\n=== stage {name} (limit {limit:.0f} s) ===")
            outcomes[name] = _run_one(fn, limit, clock)
        log(f"=== stage {name}: {outcomes[name]['status']} ({outcomes[name]['seconds']:.1f} s)"
            + (f": {outcomes[name]['reason']}" if outcomes[name].get("reason") else ""))
        if after is not None:
            after(outcomes)
    return outcomes


def _run_one(fn, limit: float, clock) -> dict:
    t0 = clock()
    disarm = _alarm(limit)
    try:
        try:
            outcome = {"status": "passed", "details": fn(limit)}
        finally:
            disarm()  # before the handlers below, so the timer cannot interrupt them
    except StageFailure as err:
        outcome = {"status": "failed", "reason": str(err), "details": err.details}
    except StageTimeout as err:
        outcome = {"status": "failed", "reason": f"timed out: {err}"}
    except Exception as err:  # noqa: BLE001 - any failure of a stage is recorded, the next runs
        outcome = {"status": "failed", "reason": f"{type(err).__name__}: {err}",
                   "details": {"traceback": traceback.format_exc()[-3000:]}}
    return {**outcome, "seconds": clock() - t0, "limit_s": limit}


# ------------------------------------------------------------------------------------
# The stages' measurements


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - not installed
        return None


def driver_version() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``, else ``/proc/driver/nvidia/version``)."""
    if shutil.which("nvidia-smi"):
        status, out = run_bounded(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], 15)
        if status == 0 and out.strip():
            return out.strip().splitlines()[0]
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def device_info(device: torch.device) -> dict:
    """The GPU, the software versions and the card's peak memory bandwidth."""
    import rotvq

    props = torch.cuda.get_device_properties(device)
    peak = peak_bandwidth(props.name)
    return {
        "name": props.name, "capability": f"{props.major}.{props.minor}",
        "memory_GiB": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
        "driver": driver_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "triton": _version("triton") or _version("pytorch-triton"),
        "python": platform.python_version(), "rotvq": rotvq.__version__,
        "peak_model": None if peak is None else peak[0], "peak_TBps": None if peak is None else peak[1],
        "peak_note": ("NVIDIA's published peak memory bandwidth for this model (see PEAKS in tools/gpu_check.py)"
                      if peak else f"model {props.name!r} not in the table of peaks: fractions of peak are null"),
    }


def large_bandwidth(device: torch.device, repeats: int, peak_tbps: float | None, shape=LARGE_SHAPE) -> list[dict]:
    """The fused rotation backward, the textbook STE and the traffic floor on ``shape``
    (:data:`LARGE_SHAPE`), timed as the benchmarks time them (:func:`rotvq.bench.interleaved`)."""
    import rotvq
    from rotvq.bench import FLOOR, KERNEL, backward_kernel, fwd_bwd, interleaved, textbook_ste, traffic_floor
    from rotvq.operators import fused_span

    n, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    z, q, g = (torch.randn(n, d, device=device, generator=gen) for _ in range(3))
    z.requires_grad_(True)
    if fused_span(g, z.detach(), q, rotvq.Rotation().variant) is None:
        raise RuntimeError("the compiled backend's CUDA kernel could not be built (rotvq fell back to eager)")
    fns = {KERNEL: backward_kernel(z, q, g), "textbook_ste": fwd_bwd(textbook_ste, z, q, g),
           FLOOR: traffic_floor(z, q, g)}
    res = interleaved(fns, device, repeats)
    rows = [{"method": k, "N": n, "d": d, "min_ms": 1e3 * r["min"], "median_ms": 1e3 * r["median"]}
            for k, r in res.items()]
    return bandwidth_rows(rows, peak_tbps)


def _time_steps(step, device: torch.device, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"steps": steps, "warmup": warmup, "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times)}


def train_step_timing(device: torch.device, steps: int = 20, warmup: int = 3, batch: int = 128, size: int = 32,
                      hidden: int = 128, latent_dim: int = 32, codebook_size: int = 1024,
                      compile: bool = True, out: dict | None = None) -> dict:
    """One training step of a ConvVQVAE (3 x ``size`` x ``size`` inputs, two stride-2 stages,
    rotation trick, Adam) in bfloat16 autocast: eager, then under
    ``torch.compile(model, fullgraph=True)`` (``compile``), each the median and minimum of
    ``steps`` timed steps after ``warmup`` steps.

    Fills and returns ``out`` (a new dict if ``None``): a caller that passes its own keeps
    the eager timing when the compiled one fails."""
    from rotvq.lab.models import ConvVQVAE

    torch.manual_seed(0)
    model = ConvVQVAE(3, hidden=hidden, latent_dim=latent_dim, codebook_size=codebook_size, downsamples=2,
                      estimator="rotation").to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)

    def step(net):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = net(x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    grid = size // 4
    result = {} if out is None else out
    result.update({"model": f"ConvVQVAE(3, hidden={hidden}, latent_dim={latent_dim}, codebook_size={codebook_size}, "
                       "downsamples=2, estimator='rotation'), Adam", "batch": batch, "input": [3, size, size],
              "vectors_per_step": batch * grid * grid, "d": latent_dim, "K": codebook_size,
              "autocast": "bfloat16"})
    # The first eager step (a warm-up step) initialises the codebook by k-means on the batch.
    result["eager"] = _time_steps(lambda: step(model), device, steps, max(warmup, 1))
    if compile:
        # torch.compile(model, fullgraph=True) fails on a fresh model: the k-means initialisation
        # on the first call puts a data-dependent guard in the graph. The eager steps above have
        # initialised the codebook, so the compiled model traces one whole graph.
        compiled = torch.compile(model, fullgraph=True)
        t0 = time.perf_counter()
        step(compiled)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        result["compiled"] = {**_time_steps(lambda: step(compiled), device, steps, warmup),
                              "first_call_s": first, "after_eager_steps": True}
        result["speedup_median"] = result["eager"]["median_ms"] / result["compiled"]["median_ms"]
    return result


# ------------------------------------------------------------------------------------
# The check


#: Stage names with their shares of the default 240 s budget.
#: (Estimates: on a 2-core CPU the train step's first compiled call took 40 s; a 16-core GPU
#: host compiles Triton kernels in parallel. Unused seconds roll over to the later stages.)
STAGES = {"device": 5, "tests_eager": 55, "tests_compiled": 45, "benchmarks": 55, "bandwidth": 15,
          "train_step": 65}
BENCH_GROUPS = ("estimators", "search", "layer")


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _stage_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"stages must be comma-separated names from {', '.join(STAGES)}; "
                                         f"got {text!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n\n")[0],
                                 epilog="exit statuses: 0 all stages passed, 1 a stage failed or was skipped, "
                                        "2 bad arguments, 3 no CUDA device (nothing run or written)")
    ap.add_argument("--budget", type=_positive(float), default=240.0, help="total seconds (default 240)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON (default benchmarks/results/cuda.json)")
    ap.add_argument("--repeats", type=_positive(int), default=5, help="timed rounds per benchmark group (default 5)")
    ap.add_argument("--quick", action="store_true", help="benchmark sizes divided by 8")
    ap.add_argument("--steps", type=_positive(int), default=20, help="timed training steps (default 20)")
    ap.add_argument("--stages", type=_stage_list, default=list(STAGES),
                    help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Run the check on the GPU; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return EXIT_NO_CUDA
    command = "python tools/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return run_check(args, torch.device("cuda"), command)


@dataclasses.dataclass
class Check:
    """One run of the check: its arguments, device, command line and what the stages found."""

    args: argparse.Namespace
    device: torch.device
    command: str
    state: dict = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.monotonic)
    date: str = dataclasses.field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def stage_device(check: Check, limit: float) -> dict:
    """(a) The GPU and the software versions (kept for ``machine.gpu_details``)."""
    info = check.state["device"] = device_info(check.device)
    print(json.dumps(info, indent=1))
    return {"name": info["name"], "peak_TBps": info["peak_TBps"]}


def stage_tests(check: Check, limit: float, backend: str) -> dict:
    """(b) The CUDA tests under ``ROTVQ_BACKEND=backend`` (collected once for both backends)."""
    deadline = time.monotonic() + limit - 1  # pytest ends before the stage's own timer fires
    if "items" not in check.state:
        check.state["items"] = collect_cuda_items(min(60.0, limit / 2))
    return run_cuda_tests(backend, check.state["items"], deadline - time.monotonic())


def stage_benchmarks(check: Check, limit: float) -> dict:
    """(c) The ``estimators``, ``search`` and ``layer`` groups of :func:`rotvq.bench.run_all`;
    fails if the compiled backend fell back to eager (its rows would not time its kernel)."""
    from rotvq.backend import BackendFallbackWarning
    from rotvq.bench import run_all

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BackendFallbackWarning)
        check.state["bench"] = run_all(check.device, [torch.get_num_threads()], quick=check.args.quick,
                                       repeats=check.args.repeats, groups=BENCH_GROUPS)
    fallback = [str(w.message) for w in caught if issubclass(w.category, BackendFallbackWarning)]
    if fallback:
        check.state["fallback"] = fallback
        raise StageFailure("the compiled backend fell back to eager during the benchmarks", {"warnings": fallback})
    return {"groups": list(BENCH_GROUPS), "seconds": check.state["bench"]["seconds"]}


def stage_bandwidth(check: Check, limit: float) -> dict:
    """(c) Bandwidth of the fused rotation backward and the textbook STE, at the benchmark's
    shapes (if the benchmarks ran) and at :data:`LARGE_SHAPE`."""
    peak = peak_bandwidth(torch.cuda.get_device_name(check.device))
    tbps = None if peak is None else peak[1]
    result = check.state["bandwidth"] = {
        "peak_model": None if peak is None else peak[0], "peak_TBps": tbps,
        "peak_note": ("NVIDIA's published peak (PEAKS in tools/gpu_check.py)" if peak else
                      "device model not in the table of published peaks: fractions of peak are null"),
        "unit": "TB/s = 1e12 bytes/s; times as the benchmarks take them (perf_counter between two "
                "torch.cuda.synchronize, launch overhead included)",
        "counted": {k: v[1] for k, v in TRAFFIC.items()}}
    bench = check.state.get("bench")
    if bench is None or check.state.get("fallback"):
        result["benchmark_shapes"] = None
        result["benchmark_shapes_note"] = "no estimator benchmark of the compiled backend to read"
    else:  # 16 MiB per tensor: on an H100 (50 MB of L2) part of a shape's data may be cache-resident
        result["benchmark_shapes"] = bandwidth_rows(next(iter(bench["runs"].values()))["estimators"], tbps)
    result["large"] = large_bandwidth(check.device, max(check.args.repeats, 5), tbps)
    return {"entries": len(result["large"]) + len(result["benchmark_shapes"] or [])}


def stage_train_step(check: Check, limit: float) -> dict:
    """(d) The VQ-VAE training step, eager and compiled, under rotvq's compiled backend."""
    from rotvq.backend import get_backend, set_backend

    before = get_backend()
    set_backend("compiled")
    result = check.state.setdefault("train_step", {})
    try:
        train_step_timing(check.device, steps=check.args.steps, out=result)
    finally:
        result["rotvq_backend"] = get_backend()  # "eager" if the compiled backend fell back
        set_backend(before)
    return {"speedup_median": result.get("speedup_median")}


def results_document(check: Check, outcomes: dict) -> dict:
    """The results file: ``cpu.json``'s keys, then the stages' outcomes and measurements."""
    from rotvq.bench import machine_info

    bench = check.state.get("bench") or {}
    return {
        "machine": {**machine_info(check.device), "allocator": "unchanged",
                    "gpu_details": check.state.get("device")},
        "quick": check.args.quick, "repeats": bench.get("repeats", check.args.repeats),
        "runs": bench.get("runs", {}), "seconds": bench.get("seconds"), "command": check.command,
        "date": check.date, "budget_s": check.args.budget, "total_seconds": time.monotonic() - check.started,
        "stages": outcomes, "bandwidth": check.state.get("bandwidth"), "train_step": check.state.get("train_step"),
    }


def write_json(path: str | os.PathLike, document: dict) -> None:
    """Write ``document`` to ``path`` (its folder made if needed) through a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(path)


STAGE_FUNCTIONS = {"device": stage_device, "tests_eager": functools.partial(stage_tests, backend="eager"),
                   "tests_compiled": functools.partial(stage_tests, backend="compiled"),
                   "benchmarks": stage_benchmarks, "bandwidth": stage_bandwidth, "train_step": stage_train_step}


def run_check(args: argparse.Namespace, device: torch.device, command: str) -> int:
    """The stages of ``args.stages`` on ``device`` (CUDA; :func:`main` checks that), the
    results written to ``args.out`` after each stage; returns the exit status."""
    check = Check(args, device, command)
    stages = [(name, STAGES[name], functools.partial(STAGE_FUNCTIONS[name], check)) for name in args.stages]
    outcomes = run_stages(stages, args.budget, after=lambda o: write_json(args.out, results_document(check, o)))
    print(f"\nresults: {args.out}")
    for name, o in outcomes.items():
        print(f"  {name:15s} {o['status']:8s} {o['seconds']:6.1f} s  {o.get('reason', '')}")
    return EXIT_OK if all(o["status"] == "passed" for o in outcomes.values()) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
