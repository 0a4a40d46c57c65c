"""README.md stays true: its Python examples run, and its Quick-start commands are the
ones CI runs.

* Every ```python block of README.md is executed (in order, each in a fresh namespace);
  a block that raises fails the test.
* The two Quick-start ```bash commands (the ones that create ``.venv``) must appear
  verbatim, as whole lines, in ``.ci/run``, so the README and CI cannot drift apart.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"

_FENCE = re.compile(r"^```([\w+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def fenced_blocks(text: str, language: str) -> list[str]:
    """Return the bodies of the fenced code blocks of ``text`` tagged ``language``.

    Args:
        text: Markdown source.
        language: info string of the fence, e.g. ``"python"``.

    Returns:
        The block bodies, in document order.
    """
    return [body for lang, body in _FENCE.findall(text) if lang == language]


README_TEXT = README.read_text(encoding="utf-8")
PYTHON_BLOCKS = fenced_blocks(README_TEXT, "python")
QUICKSTART_COMMANDS = [
    body.strip() for body in fenced_blocks(README_TEXT, "bash") if "python3 -m venv .venv" in body
]


def test_fence_parser_finds_blocks():
    text = "intro\n```python\nx = 1\n```\n\n```bash\necho hi\n```\n```python\ny = 2\n```\n"
    assert fenced_blocks(text, "python") == ["x = 1\n", "y = 2\n"]
    assert fenced_blocks(text, "bash") == ["echo hi\n"]


def test_readme_has_python_examples():
    assert PYTHON_BLOCKS, "README.md has no ```python block to test"


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index):
    source = PYTHON_BLOCKS[index]
    code = compile(source, f"README.md (python block {index + 1})", "exec")
    exec(code, {"__name__": f"readme_block_{index + 1}"})


def test_quickstart_has_two_single_line_commands():
    assert len(QUICKSTART_COMMANDS) == 2, (
        f"expected the two Quick-start commands (book, tests), found {len(QUICKSTART_COMMANDS)}"
    )
    for command in QUICKSTART_COMMANDS:
        assert "\n" not in command, f"Quick-start command is not a single line: {command!r}"
    book, tests = QUICKSTART_COMMANDS
    assert book.endswith("jupyter-book build -W -n --keep-going ."), book
    assert '-e ".[book]"' in book
    assert tests.endswith("&& pytest"), tests
    assert '-e ".[test]"' in tests
    for command in QUICKSTART_COMMANDS:
        assert "-c constraints/cpu.txt" in command
    assert (ROOT / "constraints" / "cpu.txt").is_file()


def test_quickstart_commands_are_what_ci_runs():
    ci_lines = {line.strip() for line in CI_SCRIPT.read_text(encoding="utf-8").splitlines()}
    for command in QUICKSTART_COMMANDS:
        assert command in ci_lines, f".ci/run does not run the README command verbatim:\n{command}"
    assert os.access(CI_SCRIPT, os.X_OK), ".ci/run is not executable"


def test_quickstart_extras_exist():
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # Python 3.10: pytest itself depends on tomli there
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    for command in QUICKSTART_COMMANDS:
        (extra,) = re.findall(r'-e "\.\[(\w+)\]"', command)
        assert extra in extras, f"README installs the unknown extra {extra!r}"
