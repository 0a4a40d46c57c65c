"""Command line of rotvq's benchmarks; the measurements live in :mod:`rotvq.bench`.

Usage::

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--threads 1,2] [--repeats R]
                             [--out benchmarks/results/cpu.json]

Runs every group of :mod:`rotvq.bench` (estimators, compiled estimators, d sweep,
nearest-code search, VQ layer step) at each thread count, prints markdown tables and,
with ``--out``, stores all results as JSON (the book's appendix reads
``benchmarks/results/cpu.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from rotvq.bench import run_all


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes divided by 8 and few repeats")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", default=None,
                    help="comma-separated torch thread counts, e.g. 1,2 (default: all cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per group (default 15, quick 5)")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    try:
        threads = [int(t) for t in args.threads.split(",")] if args.threads else [len(os.sched_getaffinity(0))]
    except ValueError:
        ap.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if any(t < 1 for t in threads):
        ap.error(f"--threads must be >= 1, got {args.threads!r}")
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# rotvq benchmarks\n\ncommand: {command}")
    results = run_all(device, threads, quick=args.quick, repeats=args.repeats)
    results["command"] = command
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\ntotal time: {results['seconds']:.0f} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    return results


if __name__ == "__main__":
    main()
