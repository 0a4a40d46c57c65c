"""Chapters that read: the rules for what a reader sees, checked on the stored notebooks.

* every figure (a code cell with an image output) has a caption and a name (myst-nb
  ``mystnb.figure`` cell metadata, rendered as a numbered figure) and its plotting code
  is collapsed (tag ``hide-input``): the figure is the point, its layout code is not;
* every chapter states near its top how long it took to run, from the measured
  ``book/_timings.json`` (written by ``tools/execute_notebook.py``), not a typed number;
* every chapter in the toc links to the API reference at least once;
* the toc lists the API page, and only pages that exist;
* no stored notebook names a path of the machine that ran it (a reader's machine has none).

The rendered result is checked in a real browser by tests/test_browser.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
TOC = (ROOT / "_toc.yml").read_text(encoding="utf-8")
TOC_FILES = re.findall(r"^\s*(?:- file|root):\s*(\S+)", TOC, flags=re.MULTILINE)
CHAPTERS = sorted(ROOT / f for f in TOC_FILES if f.endswith(".ipynb"))


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def has_image(cell: dict) -> bool:
    return any("image/png" in out.get("data", {}) or "image/svg+xml" in out.get("data", {})
               for out in cell.get("outputs", []))


def test_toc_pages_exist_and_include_the_api_page():
    assert "book/api" in TOC_FILES
    for entry in TOC_FILES:
        path = ROOT / entry
        candidates = [path] if path.suffix else [path.with_suffix(".md"), path.with_suffix(".ipynb")]
        assert any(c.is_file() for c in candidates), f"_toc.yml lists {entry}, which does not exist"
    assert CHAPTERS, "no .ipynb chapters in _toc.yml"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_figures_are_captioned_and_their_code_collapsed(chapter):
    problems = []
    names = []
    for index, cell in enumerate(load(chapter)["cells"]):
        if cell["cell_type"] != "code" or not has_image(cell):
            continue
        first = "".join(cell["source"]).strip().splitlines()[0][:60]
        figure = cell["metadata"].get("mystnb", {}).get("figure", {})
        if not figure.get("caption", "").strip():
            problems.append(f"cell {index} ({first!r}): figure without a caption")
        if not figure.get("name"):
            problems.append(f"cell {index} ({first!r}): figure without a name (label)")
        names.append(figure.get("name"))
        tags = cell["metadata"].get("tags", [])
        if not {"hide-input", "remove-input"} & set(tags):
            problems.append(f"cell {index} ({first!r}): plotting code not collapsed (tag hide-input)")
    named = [n for n in names if n]
    assert len(set(named)) == len(named), f"duplicate figure names {named}"
    assert not problems, f"{chapter.name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_chapter_states_its_measured_running_time(chapter):
    cells = load(chapter)["cells"]
    key = "{{ runtime_" + chapter.stem + " }}"
    top = "".join("".join(c["source"]) for c in cells[:2] if c["cell_type"] == "markdown")
    assert key in top, f"{chapter.name} does not state its running time ({key}) near its top"
    timings = json.loads((BOOK / "_timings.json").read_text(encoding="utf-8"))
    entry = timings.get(chapter.stem)
    assert entry and entry["seconds"] > 0, (
        f"no measured running time for {chapter.stem} in book/_timings.json: "
        f"run python tools/execute_notebook.py {chapter.relative_to(ROOT)}"
    )


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_chapter_links_to_the_api_reference(chapter):
    markdown = "".join("".join(c["source"]) for c in load(chapter)["cells"] if c["cell_type"] == "markdown")
    assert re.search(r"\{py:(func|class|meth|mod|data)\}`rotvq", markdown), (
        f"{chapter.name} never links to the API reference ({{py:func}}`rotvq....`)"
    )


def test_api_page_documents_every_public_name():
    """book/api.md has an entry for each name of ``rotvq.__all__`` (the library's face)."""
    rotvq = pytest.importorskip("rotvq")
    api = (BOOK / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. (?:auto\w+|py:\w+):: (?:rotvq\.)?([\w.]+)", api, flags=re.MULTILINE))
    missing = sorted(set(rotvq.__all__) - documented)
    assert not missing, f"public names without an entry on the API page (book/api.md): {missing}"


#: Absolute paths of one machine: home and temporary folders, checkouts, virtual environments.
_MACHINE_PATH = re.compile(r"(?<![\w.])/(?:tmp|home|root|work|Users|private|var/folders)/"
                           r"|site-packages|[A-Z]:\\{1,2}Users")  # one backslash, or two in JSON


@pytest.mark.parametrize("path", CHAPTERS + sorted(BOOK.glob("*.md")), ids=lambda p: p.name)
def test_no_machine_paths_in_stored_pages(path):
    found = [m.group(0) for m in _MACHINE_PATH.finditer(path.read_text(encoding="utf-8"))]
    assert not found, f"{path.name} names paths of the machine that wrote it: {sorted(set(found))}"


def test_the_machine_path_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("out = '/tmp/quick.json'", encoding="utf-8")
    assert _MACHINE_PATH.search(page.read_text(encoding="utf-8"))
    assert not _MACHINE_PATH.search("see book/records/ and quick.json, a/tmp/b")
