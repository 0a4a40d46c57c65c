"""Project-wide pytest configuration for rotvq.

* Makes nbval's ``--nbval-sanitize-with`` path (set in ``pyproject.toml``) independent
  of the folder pytest is started from: nbval opens it relative to the current folder,
  so a relative path is resolved against the project root here.
* Adds one extra test per chapter notebook under ``book/``
  (``book/<name>.ipynb::committed-outputs``).  Strict nbval compares stored outputs
  with fresh ones, so a notebook saved *without* outputs passes while comparing
  nothing.  This test fails unless the notebook was executed top to bottom in one
  fresh kernel (execution counts 1, 2, 3, ... on every non-empty code cell, as
  ``tools/execute_notebook.py`` writes them), uses the ``python3`` kernelspec, and
  leaves no machine paths and no unexpected error (a cell not tagged
  ``raises-exception``) in its outputs.
* Adds the ``--browser-check`` option of ``tests/test_browser.py``.
* Registers a Hypothesis profile without a per-example deadline: CI machines are
  small and shared, and a wall-clock deadline there makes property tests flaky.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
BOOK = ROOT / "book"

# Absolute machine paths that must never appear in committed notebook outputs.
_MACHINE_PATH = re.compile(r"(?<![\w.])/(?:tmp|root|work|home)/")

try:  # hypothesis is in the `test` extra; keep conftest importable without it
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("rotvq", deadline=None, print_blob=True)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "rotvq"))
except ImportError:  # pragma: no cover - only without the test extra
    pass


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--browser-check",
        action="store_true",
        default=False,
        help="tests/test_browser.py: fail, instead of skipping, when no built book "
        "(_build/html) or no Chromium is found (CI runs it so after the book build)",
    )


def pytest_configure(config: pytest.Config) -> None:
    option = getattr(config.option, "nbval_sanitize_with", None)
    if option and not os.path.isabs(option) and not os.path.exists(option):
        candidate = config.rootpath / option
        if not candidate.is_file():
            raise pytest.UsageError(
                f"nbval sanitizer file {option!r} not found in the current folder "
                f"or in the project root {config.rootpath}"
            )
        config.option.nbval_sanitize_with = str(candidate)


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if (
        file_path.suffix == ".ipynb"
        and file_path.resolve().parent == BOOK
        and ".ipynb_checkpoints" not in file_path.parts
    ):
        return CommittedOutputsFile.from_parent(parent, path=file_path)
    return None


class CommittedOutputsFile(pytest.File):
    def collect(self):
        yield CommittedOutputsItem.from_parent(self, name="committed-outputs")


class CommittedOutputsItem(pytest.Item):
    def runtest(self) -> None:
        problems = notebook_problems(self.path)
        if problems:
            raise NotebookHygieneError(problems)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, NotebookHygieneError):
            lines = "\n".join(f"  - {p}" for p in excinfo.value.args[0])
            return (
                f"{self.path.name} is not committed with fresh, reproducible outputs:\n"
                f"{lines}\n"
                f"Re-run: python tools/execute_notebook.py book/{self.path.name}"
            )
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::committed-outputs"


class NotebookHygieneError(Exception):
    """Raised with a list of problems found in a committed notebook."""


def notebook_problems(path: Path) -> list[str]:
    """Return the reasons why ``path`` is not a cleanly executed, committed notebook.

    Args:
        path: a ``.ipynb`` file.

    Returns:
        A list of human-readable problems; empty when the notebook is fine.
    """
    nb = json.loads(path.read_text(encoding="utf-8"))
    problems: list[str] = []
    kernel = nb.get("metadata", {}).get("kernelspec", {}).get("name")
    if kernel != "python3":
        problems.append(f"kernelspec.name is {kernel!r}, expected 'python3'")
    code_cells = [
        c for c in nb.get("cells", [])
        if c.get("cell_type") == "code" and "".join(c.get("source", "")).strip()
    ]
    if not code_cells:
        problems.append("no code cells")
    counts = [c.get("execution_count") for c in code_cells]
    if any(n is None for n in counts):
        missing = sum(n is None for n in counts)
        problems.append(f"{missing} of {len(counts)} code cells were never executed")
    elif counts != list(range(1, len(counts) + 1)):
        problems.append(
            f"execution counts {counts} are not 1..{len(counts)}: "
            "not run top to bottom in one fresh kernel"
        )
    if code_cells and not any(c.get("outputs") for c in code_cells):
        problems.append("no stored outputs at all: strict nbval would compare nothing")
    for index, cell in enumerate(nb.get("cells", [])):
        expected_error = "raises-exception" in cell.get("metadata", {}).get("tags", [])
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error" and not expected_error:
                problems.append(f"cell {index} stores an error output")
            texts = [output.get("text", "")]
            texts += [v for k, v in output.get("data", {}).items() if k.startswith("text/")]
            for text in texts:
                text = "".join(text) if isinstance(text, list) else str(text)
                match = _MACHINE_PATH.search(text)
                if match:
                    problems.append(f"cell {index} output contains a machine path {match.group(0)!r}")
                    break
    return problems
