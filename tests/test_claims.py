"""The claim registry book/claims.yml and what is generated from it, and the code-to-book labels.

* the registry is well formed: known fields, one of the four verdicts, no duplicate ids;
* every evidence label exists in book/ (a ``(label)=`` target or a math ``:label:``);
* each chapter's closing "Claims checked" cell (its verdict counts and a link to its part
  of the audit) and Appendix B, book/claim_audit.md, are exactly what tools/claims.py
  renders from the registry (run ``python tools/claims.py --write`` after editing the
  registry); no page keeps a claims table of its own, and ``--chapters`` writes only the
  chapters it names;
* the registry and the audit page name the derivation notes as such (never "the
  appendix", "the appended notes" or "the second file");
* every ``:eq:`` / ``:ref:`` label cited in a docstring or comment of ``rotvq/`` exists in book/.
"""
from __future__ import annotations

import copy
import importlib.util
import pathlib
import re
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("claims_tool", ROOT / "tools" / "claims.py")
claims_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims_tool)


@pytest.fixture(scope="module")
def claims():
    return claims_tool.load()


@pytest.fixture(scope="module")
def labels():
    return claims_tool.book_labels()


def test_registry_is_well_formed(claims):
    assert len(claims) >= 100
    ids = [c["id"] for c in claims]
    assert len(ids) == len(set(ids))
    assert {c["verdict"] for c in claims} <= set(claims_tool.VERDICTS)
    assert {c["source"] for c in claims} == set(claims_tool.SOURCES)  # every part of the source


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(verdict="plausible"), "verdict"),
        (lambda c: c.update(source="blog"), "source"),
        (lambda c: c.pop("evidence"), "missing"),
        (lambda c: c.update(evidence=[]), "evidence"),
        (lambda c: c.update(colour="red"), "unknown field"),
        (lambda c: c.update(claim=r"$|q|$ is small"), "Vert"),
        (lambda c: c.update(note="{glue:text}`x`"), "ipynb::<key>"),
        (lambda c: c.update(note="{glue:text}`intro.ipynb::k:s`"), "ipynb::<key>"),
        (lambda c: c.update(claim="{glue:text}`scaling.ipynb::k:s`"), "only a note"),
        (lambda c: c.update(id="Bad_Id"), "id"),
        (lambda c: c.pop("note", None) or c.pop("argument", None), "exactly one of note or argument"),
    ],
)
def test_validate_rejects_malformed_entries(claims, change, message):
    entry = copy.deepcopy(claims[0])
    change(entry)
    with pytest.raises(claims_tool.RegistryError, match=message):
        claims_tool.validate([entry])


def test_validate_rejects_duplicate_ids(claims):
    with pytest.raises(claims_tool.RegistryError, match="duplicate"):
        claims_tool.validate([claims[0], copy.deepcopy(claims[0])])


def test_evidence_labels_exist(claims, labels):
    missing = claims_tool.missing_evidence(claims, labels)
    assert not missing, f"evidence labels not defined anywhere in book/: {missing}"


def test_glued_notes_quote_keys_their_chapter_glues(claims):
    missing = claims_tool.missing_glue(claims)
    assert not missing, f"notes quote glue keys that no chapter output records: {missing}"
    fake = [dict(claims[0], note="{glue:text}`ste.ipynb::no-such-key:s`")]
    assert claims_tool.missing_glue(fake) == [f"{claims[0]['id']}: ste::no-such-key"]


def test_every_chapter_lists_claims(claims, labels):
    for chapter in claims_tool.CHAPTERS:
        assert any(claims_tool.chapter_of(c, labels) == chapter for c in claims), chapter


@pytest.mark.parametrize("chapter", claims_tool.CHAPTERS)
def test_chapter_table_matches_registry(claims, labels, chapter):
    nb = claims_tool.nbformat.read(ROOT / "book" / f"{chapter}.ipynb", as_version=4)
    i = claims_tool.table_cell(nb)
    assert i is not None, f"book/{chapter}.ipynb has no '## Claims checked' cell"
    expected = claims_tool.chapter_table(claims, chapter, labels)
    assert nb.cells[i].source == expected, (
        f"book/{chapter}.ipynb's closing claims cell differs from book/claims.yml; run "
        f"`python tools/claims.py --write --chapters {chapter}` (under the notebook's flock)")
    assert i == len(nb.cells) - 1, "the generated claims cell is the chapter's last cell"
    heads = [c for c in nb.cells if c.cell_type == "markdown" and claims_tool.TABLE_HEADING in c.source]
    assert len(heads) == 1, "a second, hand-written claims table"
    by_hand = [c.source.splitlines()[0][:60] for c in nb.cells if c.cell_type == "markdown"
               and re.search(r"^\|[^\n]*\bclaim\b[^\n]*\|[ \t]*$", c.source, re.M | re.I)]
    assert not by_hand, f"a claims table written by hand, outside the registry: {by_hand}"


@pytest.mark.parametrize("chapter", claims_tool.CHAPTERS)
def test_chapter_cell_counts_and_links(claims, labels, chapter):
    """The closing cell gives the chapter's verdict counts and links to its audit part."""
    text = claims_tool.chapter_table(claims, chapter, labels)
    rows = [c for c in claims if claims_tool.chapter_of(c, labels) == chapter]
    n = claims_tool.counts(rows)
    assert "| " + " | ".join(str(n[v]) for v in claims_tool.VERDICTS) + " |" in text
    assert f"{len(rows)} claims" in text
    label = claims_tool.part_label(chapter)
    assert f"<{label}>`" in text
    assert f"({label})=" in claims_tool.audit_page(claims, labels)
    assert "| claim of the source |" not in text  # counts only: the rows live on the audit page


def test_audit_page_is_up_to_date(claims, labels):
    page = ROOT / "book" / "claim_audit.md"
    assert page.exists()
    assert page.read_text(encoding="utf-8") == claims_tool.audit_page(claims, labels), (
        "book/claim_audit.md is stale; run `python tools/claims.py --write`")


def test_audit_page_counts_add_up(claims, labels):
    text = claims_tool.audit_page(claims, labels)
    row = next(line for line in text.splitlines() if line.startswith("| all |"))
    assert row.rstrip(" |").endswith(str(len(claims)))
    for c in claims:
        assert text.count(f"`{c['id']}`") >= 2, c["id"]  # in its chapter part and by source
    # the chapter parts partition the registry
    per_part = [int(m) for m in re.findall(r"^(\d+) claims (?:decided in|that no chapter)", text, re.M)]
    assert sum(per_part) == len(claims)


def test_registry_names_the_derivation_notes():
    """The derivation notes are never "the appendix" (the book has its own Appendices A and
    B), "the appended notes" or "the second file"; and never attributed to Su."""
    bad = re.compile(r"derivation appendix|appended notes|second file|\bthe appendix\b"
                     r"|appendix's|\bappendix, (?:part|Prop|Def|Thm)", re.I)
    for path in (ROOT / "book" / "claims.yml", ROOT / "book" / "claim_audit.md"):
        text = path.read_text(encoding="utf-8")
        hits = [line.strip()[:100] for line in text.splitlines()
                if bad.search(line) and "VQ-VAE paper" not in line]
        assert not hits, f"{path.name} calls the derivation notes an appendix or a file: {hits}"
    assert set(claims_tool.SOURCES) == {"post", "comments", "notes"}
    assert "derivation notes" in claims_tool.SOURCE_TITLES["notes"].lower()


def test_write_selected_chapters_only(tmp_path, monkeypatch):
    """``--write --chapters ste`` rewrites the audit page and book/ste.ipynb, and leaves the
    other chapters' files untouched (another engineer may be editing them)."""
    book = tmp_path / "book"
    shutil.copytree(ROOT / "book", book, ignore=shutil.ignore_patterns("records", "_build", "*.png"))
    nb = claims_tool.nbformat.read(book / "ste.ipynb", as_version=4)
    i = claims_tool.table_cell(nb)
    nb.cells[i].source = claims_tool.TABLE_HEADING + "\n\nstale"
    claims_tool.nbformat.write(nb, book / "ste.ipynb")
    for ch in claims_tool.CHAPTERS:
        if ch != "ste":
            nb = claims_tool.nbformat.read(book / f"{ch}.ipynb", as_version=4)
            nb.cells[claims_tool.table_cell(nb)].source = claims_tool.TABLE_HEADING + "\n\nleave me"
            claims_tool.nbformat.write(nb, book / f"{ch}.ipynb")
    before = {ch: (book / f"{ch}.ipynb").read_bytes() for ch in claims_tool.CHAPTERS}
    monkeypatch.setattr(claims_tool, "BOOK", book)
    assert claims_tool.main(["--write", "--chapters", "ste"]) == 0
    assert (book / "ste.ipynb").read_bytes() != before["ste"]
    for ch in claims_tool.CHAPTERS:
        if ch != "ste":
            assert (book / f"{ch}.ipynb").read_bytes() == before[ch], ch
    assert claims_tool.main(["--check", "--chapters", "ste"]) == 0
    assert claims_tool.main(["--check"]) == 1  # the others are stale


_CODE_ROLE = re.compile(r":(eq|ref):`([^`]+)`")


def cited_labels() -> dict[str, list[str]]:
    """label -> files of rotvq/ that cite it with :eq:`label` or :ref:`text <label>`."""
    cited: dict[str, list[str]] = {}
    for path in sorted((ROOT / "rotvq").rglob("*.py")):
        for role, body in _CODE_ROLE.findall(path.read_text(encoding="utf-8")):
            m = re.search(r"<([^<>]+)>\s*$", body)
            label = (m.group(1) if m else body).strip()
            cited.setdefault(label, []).append(str(path.relative_to(ROOT)))
    return cited


def test_labels_cited_in_code_exist(labels):
    cited = cited_labels()
    missing = {lab: files for lab, files in cited.items() if lab not in labels}
    assert not missing, f"labels cited in rotvq/ but not defined in book/: {missing}"


def test_label_scanner_finds_both_kinds(labels):
    assert labels["rot-fast"][1] == "eq" and labels["ch-rotation"][1] == "target"
    assert "rot-check-code-forms" in labels and labels["rot-check-code-forms"][0] == "rotation"
