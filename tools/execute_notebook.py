"""Execute chapter notebooks in place, reproducibly, so their outputs can be committed.

Usage::

    python tools/execute_notebook.py book/ste.ipynb [book/other.ipynb ...]

Each notebook runs in a fresh ``python3`` kernel with its own folder as the working
directory (as Jupyter Book and nbval run it).  Timing metadata and execution
timestamps are not recorded, and machine-specific notebook metadata is dropped, so
re-running an unchanged notebook gives a byte-identical file.  A cell that raises
stops the run and the notebook is not written.

The wall time of each successful run is recorded in ``book/_timings.json`` (next to the
notebook, keyed by its name); each chapter states it near its top, through the book's
Sphinx extension (``book/_ext/rotvq_book.py``), so a reader knows how long a rerun takes.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

KEEP_METADATA = ("kernelspec", "language_info")
TIMINGS = "_timings.json"


def clean(nb: nbformat.NotebookNode) -> None:
    nb.metadata = nbformat.NotebookNode(
        {k: v for k, v in nb.metadata.items() if k in KEEP_METADATA}
    )
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    lang = nb.metadata.get("language_info", {})
    nb.metadata["language_info"] = {"name": "python", **{k: v for k, v in lang.items() if k in ("name", "pygments_lexer", "mimetype", "file_extension", "codemirror_mode", "nbconvert_exporter")}}
    nb.metadata["language_info"].pop("version", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("collapsed", None)
        cell.metadata.pop("scrolled", None)


def record_timing(path: pathlib.Path, seconds: float) -> None:
    """Store the wall time of a run of ``path`` in ``_timings.json`` beside it."""
    if not (isinstance(seconds, (int, float)) and seconds >= 0):
        raise ValueError(f"seconds must be a non-negative number, got {seconds!r}")
    timings_path = path.parent / TIMINGS
    timings = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.is_file() else {}
    timings[path.stem] = {"seconds": round(seconds, 1), "cpus": os.cpu_count()}
    timings_path.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def execute(path: pathlib.Path, timeout: int) -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    clean(nb)
    nbformat.write(nb, path)
    record_timing(path, seconds)
    print(f"{path}: {seconds:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        print(f"executing {path}", file=sys.stderr)
        execute(path, args.timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
