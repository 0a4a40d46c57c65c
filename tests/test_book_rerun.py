"""A chapter reopens and reruns as a reader would run it: `jupyter nbconvert --execute`.

nbval (in the default `pytest` run) re-executes every chapter cell by cell inside pytest.
This test does what a reader does instead: one chapter, top to bottom, in a fresh kernel
started by the `jupyter` command line, with the notebook's own folder as the working
folder.  It runs the fastest chapter (see book/_timings.json); it fails if any cell
raises, if a cell is left unexecuted, or if a cell not tagged ``raises-exception``
stores an error.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTER = BOOK / "benchmarks.ipynb"  # the fastest chapter in book/_timings.json


def jupyter_command() -> list[str]:
    """The `jupyter` of this environment (the reader's), else `python -m jupyter`."""
    candidate = Path(sys.executable).with_name("jupyter")
    if candidate.is_file():
        return [str(candidate)]
    found = shutil.which("jupyter")
    return [found] if found else [sys.executable, "-m", "jupyter"]


def test_rerun_chapter_is_among_the_fastest():
    """Keep this test cheap: the chapter it reruns is (near) the fastest one measured."""
    timings = json.loads((BOOK / "_timings.json").read_text(encoding="utf-8"))
    fastest = min(timings, key=lambda name: timings[name]["seconds"])
    ours = timings[CHAPTER.stem]["seconds"]
    assert ours <= 1.5 * timings[fastest]["seconds"], (
        f"{fastest} ({timings[fastest]['seconds']} s) is much faster than {CHAPTER.stem} "
        f"({ours} s): rerun that one here instead"
    )


@pytest.mark.slow
def test_chapter_reruns_top_to_bottom_with_nbconvert(tmp_path):
    pytest.importorskip("nbconvert")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("MPLBACKEND", None)  # let the kernel choose its inline backend, as for a reader
    result = subprocess.run(
        [*jupyter_command(), "nbconvert", "--execute", "--to", "notebook",
         "--ExecutePreprocessor.kernel_name=python3", "--ExecutePreprocessor.timeout=600",
         "--output-dir", str(tmp_path), str(CHAPTER)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, f"nbconvert failed:\n{result.stderr[-4000:]}"
    executed = json.loads((tmp_path / CHAPTER.name).read_text(encoding="utf-8"))
    code = [c for c in executed["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, "the chapter has no code cells"
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), f"not run top to bottom: {counts}"
    for index, cell in enumerate(code):
        if "raises-exception" in cell["metadata"].get("tags", []):
            continue
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"code cell {index} raised: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    # The run reproduces what the chapter shows: the same kinds of output in each cell.
    stored = [c for c in json.loads(CHAPTER.read_text(encoding="utf-8"))["cells"]
              if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    kinds = lambda cells: [sorted({o["output_type"] for o in c.get("outputs", [])}) for c in cells]  # noqa: E731
    assert kinds(code) == kinds(stored)
