"""Cost of the rotation trick: estimators, the VQ layer and the nearest-code search.

Usage::

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--threads T] [--out results.json]
                             [--profile]

Everything is measured in one process and *interleaved*: each round runs every method of
a group once, in a rotating order, so that a slow spell of a shared machine hits all
methods alike. Reported per method: the minimum and the median over the rounds (after
warm-up rounds), and their ratios to the reference of the group (the textbook
straight-through estimator ``z + (q - z).detach()``, or rotvq's layer with the STE).

Memory kept for the backward pass is measured with
:class:`torch.autograd.graph.saved_tensors_hooks` (custom autograd Functions included):
``saved`` sums the distinct storages that the graph holds, ``extra`` leaves out the
storages of ``z`` and ``q``, which the caller holds anyway. For the search, the peak
memory is ``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, the growth of the peak
resident set of a fresh subprocess that runs the search once.

Methods (estimators, forward + backward of ``z_q`` with a fixed upstream gradient):

* ``textbook_ste``: ``z + (q - z).detach()`` (the reference);
* ``rotvq.ste``: :func:`rotvq.ste` (forward exactly ``q``, backward ``g``);
* ``rotvq.rotation_trick``: :func:`rotvq.rotation_trick`;
* ``autograd_rotation``: the rotation trick written with plain autograd ops
  (Fifty et al. 2024, section 4.2: ``λ [z - 2 (z·w) w + 2 (z·ẑ) q̂]`` with
  ``w = (ẑ + q̂)/|ẑ + q̂|`` and the coefficients detached);
* ``dense_matrix``: the explicit route: ``G = λ R`` of shape ``(N, d, d)`` from
  :func:`rotvq.rotation_matrix`, applied with :func:`rotvq.generalized_ste`. It needs
  ``N d²`` floats; it is timed on a subset of rows (at most ``--dense-elements`` matrix
  entries) and its time and memory are scaled to ``N`` (marked ``*``);
* ``vqp.rotate_to``: ``vector_quantize_pytorch``'s ``rotate_to``, when installed
  (``pip install rotvq[bench]``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import rotvq
from rotvq.search import nearest_code

try:  # optional benchmark extra: pip install rotvq[bench]
    from vector_quantize_pytorch import VectorQuantize
    from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to
except ImportError:
    VectorQuantize = rotate_to = None

SHAPES = [(65536, 64), (16384, 256), (4096, 1024)]
QUICK_SHAPES = [(8192, 64), (2048, 256), (512, 1024)]


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


VQP_VERSION = _package_version("vector-quantize-pytorch") if VectorQuantize is not None else None


# ------------------------------------------------------------------------------------
# Estimators


def textbook_ste(z, q):
    return z + (q - z).detach()  # straight-through estimator, as usually written


def autograd_rotation(z, q):
    """The rotation trick with plain autograd ops (only ``z`` is differentiated)."""
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
    """The explicit route: ``G = (|q|/|z|) R`` with the textbook
    ``R = I + 2 q̂ ẑᵀ - (q̂ + ẑ)(q̂ + ẑ)ᵀ/(1 + cos θ)``, shape (N, d, d), applied as
    ``sg[G] z + sg[q - G z]`` by :func:`rotvq.generalized_ste` (backward: a batched product)."""
    with torch.no_grad():
        nz = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        nq = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
        zh, qh = z / nz, q / nq
        s = zh + qh
        c = (zh * qh).sum(-1, keepdim=True)
        G = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device) + 2 * qh[:, :, None] * zh[:, None, :]
        G.sub_(s[:, :, None] * (s / (1 + c))[:, None, :]).mul_((nq / nz)[:, :, None])  # (N, d, d)
    return rotvq.generalized_ste(z, q, G)


def estimator_methods() -> dict:
    methods = {
        "textbook_ste": textbook_ste,
        "rotvq.ste": rotvq.ste,
        "rotvq.rotation_trick": rotvq.rotation_trick,
        "autograd_rotation": autograd_rotation,
        "dense_matrix": dense_matrix,
    }
    if rotate_to is not None:
        methods["vqp.rotate_to"] = rotate_to
    return methods


# ------------------------------------------------------------------------------------
# Measurement helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """Time every callable of ``fns`` ``repeats`` times, round-robin (rotating start).

    Returns ``{name: {"min": s, "median": s, "times": [...]}}``.
    """
    names = list(fns)
    times = {k: [] for k in names}
    for _ in range(warmup):
        for k in names:
            fns[k]()
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: {"min": min(v), "median": statistics.median(v), "times": v} for k, v in times.items()}


def saved_for_backward(fn, z, q) -> tuple[int, int]:
    """Bytes of the distinct storages the autograd graph of ``fn(z, q)`` keeps: (all, extra).

    ``extra`` excludes the storages of ``z`` and ``q`` themselves (held by the caller)."""
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
    def run():
        zq = fn(z, q)
        return torch.autograd.grad(zq, z, g)[0]  # dL/dz for the upstream gradient g

    return run


def bench_estimators(shapes, device, repeats, dense_elements, rng_seed=0) -> list[dict]:
    rows = []
    for n, d in shapes:
        gen = torch.Generator(device="cpu").manual_seed(rng_seed)
        z = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
        q = torch.randn(n, d, generator=gen).to(device)
        g = torch.randn(n, d, generator=gen).to(device)
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
        res = interleaved(fns, device, repeats)
        ref = res["textbook_ste"]
        for name in methods:
            s, zz, qq = scale[name]
            total, extra = saved_for_backward(methods[name], zz, qq)
            r = res[name]
            rows.append({
                "N": n, "d": d, "method": name + ("*" if s != 1.0 else ""),
                "min_ms": 1e3 * r["min"] * s, "median_ms": 1e3 * r["median"] * s,
                "ratio_min": r["min"] * s / ref["min"], "ratio_median": r["median"] * s / ref["median"],
                "saved_MiB": total * s / 2**20, "extra_MiB": extra * s / 2**20,
                "scaled_from_rows": None if s == 1.0 else int(round(n / s)),
            })
    return rows


# ------------------------------------------------------------------------------------
# Layer level


def bench_layers(n, d, k, device, repeats, seed=0) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
    g = torch.randn(n, d, generator=gen).to(device)
    layers = {}
    for est in ("ste", "rotation"):
        torch.manual_seed(seed)
        layers[f"rotvq.VectorQuantizer({est})"] = rotvq.quantizer.VectorQuantizer(
            d, k, estimator=est, ema=True, decay=0.99, commitment_weight=0.25).to(device).train()

    def rotvq_step(layer):
        def run():
            out = layer(x)
            loss = (out.quantized * g).sum() + out.loss
            return torch.autograd.grad(loss, x)[0]
        return run

    fns = {name: rotvq_step(layer) for name, layer in layers.items()}
    if VectorQuantize is not None:
        for rot in (False, True):
            torch.manual_seed(seed)
            vq = VectorQuantize(dim=d, codebook_size=k, decay=0.99, commitment_weight=0.25,
                                kmeans_init=False, rotation_trick=rot, straight_through=not rot,
                                threshold_ema_dead_code=0).to(device).train()
            xb = x.unsqueeze(0)  # vector-quantize-pytorch wants (batch, seq, dim)

            def vqp_step(vq=vq, xb=xb):
                quantized, _, commit = vq(xb)
                loss = (quantized[0] * g).sum() + commit.sum()
                return torch.autograd.grad(loss, x)[0]

            fns[f"vqp.VectorQuantize({'rotation' if rot else 'ste'})"] = vqp_step
    res = interleaved(fns, device, repeats)
    ref = res["rotvq.VectorQuantizer(ste)"]
    return [{"N": n, "d": d, "K": k, "method": name, "min_ms": 1e3 * r["min"], "median_ms": 1e3 * r["median"],
             "ratio_min": r["min"] / ref["min"], "ratio_median": r["median"] / ref["median"]}
            for name, r in res.items()]


# ------------------------------------------------------------------------------------
# Nearest-code search


def _search_fns(z, codebook):
    return {
        "rotvq.search.nearest_code": lambda: nearest_code(z, codebook),
        "torch.cdist+argmin": lambda: torch.cdist(z, codebook).argmin(-1),
    }


_PEAK_CHILD = r"""
import sys, torch
from rotvq.search import nearest_code
n, d, k, which, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
fns = {"rotvq.search.nearest_code": nearest_code, "torch.cdist+argmin": lambda z, e: torch.cdist(z, e).argmin(-1)}
gen = torch.Generator().manual_seed(0)
z, cb = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
fns[which](z[:8], cb[:8])  # load the kernels before measuring
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set (VmHWM) to the current one
fns[which](z, cb)
print(status("VmHWM:") - before)
"""


def search_peak_bytes(n, d, k, which, device, threads) -> int | None:
    if device.type == "cuda":
        gen = torch.Generator(device="cpu").manual_seed(0)
        z, cb = torch.randn(n, d, generator=gen).to(device), torch.randn(k, d, generator=gen).to(device)
        fn = _search_fns(z, cb)[which]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None  # not Linux: no resettable peak RSS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # rotvq importable uninstalled
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(n), str(d), str(k), which, str(threads)],
                         capture_output=True, text=True, env=env)
    return int(out.stdout.strip()) if out.returncode == 0 else None


def bench_search(configs, device, repeats, threads) -> list[dict]:
    rows = []
    for n, d, k in configs:
        gen = torch.Generator(device="cpu").manual_seed(0)
        z, cb = torch.randn(n, d, generator=gen).to(device), torch.randn(k, d, generator=gen).to(device)
        fns = _search_fns(z, cb)
        res = interleaved(fns, device, repeats, warmup=1)
        agree = (fns["rotvq.search.nearest_code"]() == fns["torch.cdist+argmin"]()).float().mean().item()
        ref = res["torch.cdist+argmin"]
        for name, r in res.items():
            peak = search_peak_bytes(n, d, k, name, device, threads)
            rows.append({"N": n, "d": d, "K": k, "method": name, "min_ms": 1e3 * r["min"],
                         "median_ms": 1e3 * r["median"], "ratio_min": r["min"] / ref["min"],
                         "peak_MiB": None if peak is None else peak / 2**20, "agreement": agree})
    return rows


# ------------------------------------------------------------------------------------
# Reporting


def machine_info(device: torch.device, threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "python": platform.python_version(), "torch": torch.__version__, "rotvq": rotvq.__version__,
        "vector_quantize_pytorch": VQP_VERSION, "platform": platform.platform(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "threads": threads, "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def fmt_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
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


EST_COLS = [("N", "N", "d"), ("d", "d", "d"), ("method", "method", "s"), ("min_ms", "min ms", ".2f"),
            ("median_ms", "median ms", ".2f"), ("ratio_min", "min / textbook STE", ".2f"),
            ("ratio_median", "median / textbook STE", ".2f"), ("extra_MiB", "kept for backward, extra MiB", ".1f")]
LAYER_COLS = [("method", "layer", "s"), ("min_ms", "min ms", ".1f"), ("median_ms", "median ms", ".1f"),
              ("ratio_min", "min / rotvq STE", ".2f"), ("ratio_median", "median / rotvq STE", ".2f")]
SEARCH_COLS = [("N", "N", "d"), ("d", "d", "d"), ("K", "K", "d"), ("method", "method", "s"),
               ("min_ms", "min ms", ".1f"), ("median_ms", "median ms", ".1f"),
               ("ratio_min", "min / cdist", ".2f"), ("peak_MiB", "peak MiB", ".0f")]


def profile_backward(shapes, device) -> str:
    """torch.profiler table of rotvq.rotation_trick's forward + backward, per shape."""
    parts = []
    for n, d in shapes:
        z = torch.randn(n, d, device=device).requires_grad_(True)
        q, g = torch.randn(n, d, device=device), torch.randn(n, d, device=device)
        run = fwd_bwd(rotvq.rotation_trick, z, q, g)
        run()
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                run()
            sync(device)
        parts.append(f"### N={n}, d={d} (5 calls)\n\n```\n"
                     + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14) + "\n```")
    return "\n\n".join(parts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (about a minute)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per group")
    ap.add_argument("--dense-elements", type=int, default=2**24,
                    help="most d×d-matrix entries the dense route materialises (default 2**24)")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--profile", action="store_true", help="append a profiler table of rotvq.rotation_trick")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or cores
    torch.set_num_threads(threads)
    quick = args.quick
    reps = args.repeats or (5 if quick else 15)
    shapes = QUICK_SHAPES if quick else SHAPES
    total = 2**19 if quick else 2**22
    sweep = [(total // d, d) for d in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    layer = (4096, 256, 1024) if quick else (16384, 256, 1024)
    search = [(4096, 256, 1024)] if quick else [(16384, 256, 1024), (32768, 64, 8192)]

    info = machine_info(device, threads)
    print("# rotvq benchmarks\n")
    print("command: python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print("machine: " + json.dumps(info))
    t_start = time.perf_counter()
    results = {"machine": info, "args": vars(args)}

    results["estimators"] = bench_estimators(shapes, device, reps, args.dense_elements)
    print("\n## Estimators: forward + backward\n")
    print(fmt_table(results["estimators"], EST_COLS))
    results["sweep"] = bench_estimators(sweep, device, max(3, reps // 3), args.dense_elements)
    print(f"\n## d sweep at N·d = {total}\n")
    print(fmt_table(results["sweep"], EST_COLS))
    results["layers"] = bench_layers(*layer, device, max(3, reps // 2))  # 7 rounds in a full run
    print(f"\n## VQ layer, training step (N={layer[0]}, d={layer[1]}, K={layer[2]}, EMA codebook)\n")
    print(fmt_table(results["layers"], LAYER_COLS))
    results["search"] = bench_search(search, device, max(3, reps // 3), threads)
    print("\n## Nearest-code search\n")
    print(fmt_table(results["search"], SEARCH_COLS))
    print("\n(`*`: the dense route timed on a subset of rows and scaled to N; `extra`: memory the "
          "graph keeps beyond z and q; peak MiB: growth of the peak RSS of a fresh process on CPU "
          "(VmHWM reset before the search), "
          "cuda.max_memory_allocated on CUDA)")
    if args.profile:
        results["profile"] = profile_backward(shapes, device)
        print("\n## Profile: rotvq.rotation_trick forward + backward\n")
        print(results["profile"])
    results["seconds"] = time.perf_counter() - t_start
    print(f"\ntotal time: {results['seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
