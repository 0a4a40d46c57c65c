"""The book's Sphinx extension (book/_ext/rotvq_book.py): plain-text titles, running
times, offline MathJax.  The extension's effect on the built pages is checked in a real
browser by tests/test_browser.py; these are its parts, checked without a build."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sphinx")

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("rotvq_book", ROOT / "book" / "_ext" / "rotvq_book.py")
ext = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ext)


@pytest.mark.parametrize(
    ("tex", "text"),
    [
        (r"\sg{G}z", "sg[G]z"),
        (r"\sg{G}z + \sg{q - Gz}", "sg[G]z + sg[q - Gz]"),
        (r"\frac{\|q\|}{\|z\|} R", "‖q‖/‖z‖ R"),
        (r"\frac{a + b}{2}", "(a + b)/2"),
        (r"\hat z", "ẑ"),
        (r"G^\top g", "Gᵀ g"),
        (r"\gamma", "γ"),
        (r"O(d)", "O(d)"),
        (r"\partial q/\partial z = G", "∂q/∂z = G"),
        (r"\operatorname*{arg\,min}", "arg min"),
        (r"x_{k}", "x_k"),
        ("plain", "plain"),
    ],
)
def test_tex_to_text(tex, text):
    assert ext.tex_to_text(tex) == text


def test_tex_to_text_leaves_no_backslash_for_unknown_commands():
    assert "\\" not in ext.tex_to_text(r"\mathcal{L} \unknowncommand{x}")


def test_tex_to_text_rejects_bad_input():
    with pytest.raises(TypeError, match="tex must be a str"):
        ext.tex_to_text(3)
    with pytest.raises(ValueError, match="unbalanced braces"):
        ext.tex_to_text(r"\sg{G")
    with pytest.raises(ValueError, match="unbalanced braces"):
        ext.tex_to_text("a}b")


def test_plain_title_rewrites_only_inline_math():
    html = 'The generalized <span class="math">\\(\\sg{G}z\\)</span> form'
    assert ext.plain_title(html) == 'The generalized <span class="math">sg[G]z</span> form'
    assert ext.plain_title("2. The rotation construction") == "2. The rotation construction"


@pytest.mark.parametrize(("seconds", "text"), [(0.2, "1 s"), (24.4, "24 s"), (60, "1 min"),
                                               (125.0, "2 min 5 s")])
def test_format_seconds(seconds, text):
    assert ext.format_seconds(seconds) == text


@pytest.mark.parametrize("bad", [-1, "3", None, float("nan")])
def test_format_seconds_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="non-negative number"):
        ext.format_seconds(bad)


def test_runtime_substitutions(tmp_path):
    assert ext.runtime_substitutions(tmp_path / "missing.json") == {}
    path = tmp_path / "_timings.json"
    path.write_text(json.dumps({"ste": {"seconds": 24.4, "cpus": 2},
                                "scaling": {"seconds": 130.0, "cpus": 2}}), encoding="utf-8")
    assert ext.runtime_substitutions(path) == {"runtime_ste": "24 s", "runtime_scaling": "2 min 10 s"}


def test_mathjax_is_the_pinned_offline_copy():
    pytest.importorskip("mathjax", reason="django-static-mathjax (the `book` extra) not installed")
    es5 = ext.mathjax_source()
    assert (es5 / "tex-mml-chtml.js").is_file()
    for part in ext.MATHJAX_PARTS:
        assert (es5 / part).exists(), f"MathJax part {part} missing from {es5}"
    # The CHTML output needs its web fonts next to it, or formulas fall back to system fonts.
    assert list((es5 / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    # The version the book pins (pyproject's `book` extra): MathJax 3.2.2.
    assert "3.2.2" in (es5 / "tex-mml-chtml.js").read_text(encoding="utf-8", errors="replace")[:200000]
    pin = [line for line in (ROOT / "pyproject.toml").read_text(encoding="utf-8").splitlines()
           if "django-static-mathjax" in line]
    assert pin and "==3.2.2.1" in pin[0]


def test_config_loads_the_extension_and_numbers_equations_per_chapter():
    config = (ROOT / "_config.yml").read_text(encoding="utf-8")
    assert "rotvq_book: book/_ext" in config
    assert "math_numfig: true" in config and "numfig_secnum_depth: 1" in config
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    assert "numbered: true" in toc and "file: book/api" in toc


def test_execute_notebook_records_wall_time(tmp_path):
    """tools/execute_notebook.py keeps one measured entry per chapter in _timings.json."""
    pytest.importorskip("nbclient")
    spec = importlib.util.spec_from_file_location("execute_notebook", ROOT / "tools" / "execute_notebook.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    chapter = tmp_path / "ste.ipynb"
    tool.record_timing(chapter, 24.44)
    tool.record_timing(tmp_path / "rotation.ipynb", 44.0)
    tool.record_timing(chapter, 20.0)  # a rerun replaces the chapter's entry
    timings = json.loads((tmp_path / "_timings.json").read_text(encoding="utf-8"))
    assert set(timings) == {"ste", "rotation"}
    assert timings["ste"]["seconds"] == 20.0 and timings["rotation"]["seconds"] == 44.0
    assert ext.runtime_substitutions(tmp_path / "_timings.json")["runtime_ste"] == "20 s"
    with pytest.raises(ValueError, match="non-negative"):
        tool.record_timing(chapter, -1.0)


def test_config_renders_markdown_outputs_as_myst_and_loads_the_book_extensions():
    """A display(Markdown(pipe_table)) output becomes a table (MyST, not CommonMark), and the
    exercise and proof directives the chapters use are available."""
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    assert config["sphinx"]["config"]["nb_render_markdown_format"] == "myst"
    assert {"sphinx_exercise", "sphinx_proof"} <= set(config["sphinx"]["extra_extensions"])
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    book_extra = pyproject.split("book = [", 1)[1].split("]", 1)[0]
    assert "sphinx-exercise" in book_extra and "sphinx-proof" in book_extra


def test_claim_substitutions_follow_the_registry():
    """{{ claim_<id> }} and {{ verdict_<id> }}: the registry's text and verdict, with a link
    to the claim's part of the audit page; every one a chapter uses exists."""
    import re

    subs = ext.claim_substitutions(ROOT)
    spec = importlib.util.spec_from_file_location("claims_tool", ROOT / "tools" / "claims.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    claims = tool.load()
    labels = tool.book_labels()
    for c in claims:
        key = c["id"].replace("-", "_")
        assert subs[f"claim_{key}"] == " ".join(c["claim"].split())
        verdict = subs[f"verdict_{key}"]
        assert f"**{c['verdict']}**" in verdict and f"`{c['id']}`" in verdict
        assert f"<{tool.part_label(tool.chapter_of(c, labels))}>`" in verdict
    assert subs["claims_total"] == str(len(claims))
    assert sum(int(subs[f"claims_{v}"]) for v in tool.VERDICTS) == len(claims)
    assert subs["claims_notes"] == str(sum(c["source"] == "notes" for c in claims))
    used = set()
    for page in [*(ROOT / "book").glob("*.ipynb"), *(ROOT / "book").glob("*.md")]:
        used |= set(re.findall(r"\{\{\s*((?:claim|verdict|claims)_\w+)\s*\}\}", page.read_text(encoding="utf-8")))
    assert used, "no chapter shows a statement of the source with its verdict"
    assert used <= set(subs), f"unknown claim substitutions: {sorted(used - set(subs))}"


def test_letter_numbers_renumbers_each_type_from_one():
    numbers = {"displaymath": {"eq-b": (7,), "eq-a": (6,)}, "figure": {"fig": (3,)}}
    assert ext.letter_numbers(numbers, "A") == {
        "displaymath": {"eq-a": ("A", 1), "eq-b": ("A", 2)}, "figure": {"fig": ("A", 1)}}
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    for docname, letter in ext.APPENDICES.items():
        assert f"file: {docname}" in toc
        page = ROOT / f"{docname}.md"
        page = page if page.is_file() else page.with_suffix(".ipynb")
        assert f"Appendix {letter}:" in page.read_text(encoding="utf-8"), page.name
