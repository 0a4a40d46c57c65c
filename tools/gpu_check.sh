#!/usr/bin/env bash
# rotvq's check on one GPU: runs tools/gpu_check.py with the same arguments (see its
# docstring or benchmarks/README.md). Exit statuses: 0 all stages passed, 1 a stage failed
# or was skipped, 2 bad arguments, 3 no CUDA device (nothing run, nothing written).
# PYTHON overrides the interpreter (default: python, else python3).
set -u
python="${PYTHON:-$(command -v python || command -v python3)}"
exec "$python" "$(dirname "$0")/gpu_check.py" "$@"
