"""Sphinx extension for the rotvq book: offline MathJax and plain-text titles.

Loaded by Jupyter Book through ``sphinx.local_extensions`` in ``_config.yml``.

* **Offline math.**  MathJax 3 comes from the pinned ``django-static-mathjax`` package (an
  importable ``mathjax`` folder holding MathJax 3.2.2's ``es5`` bundle, Apache-2.0; it
  needs no Django).  The files the book uses are copied into ``_build/html/_static/mathjax``
  and every page loads ``_static/mathjax/tex-mml-chtml.js``, so no page needs the network.
  The script is added to *every* page, also to pages without math of their own, because the
  navigation sidebar contains chapter titles with math.
* **Running times.**  ``{{ runtime_<chapter> }}`` in a chapter's markdown is the wall time
  of its last run by ``tools/execute_notebook.py`` (``book/_timings.json``).
* **Lettered appendices.**  The pages of the toc's unnumbered "Appendix" part are
  Appendix A and B (their titles say so); their equations and figures are numbered
  ``(A.1)``, ``Figure B.2`` and so on, in the page and in every reference to them, instead
  of a number that could be read as a chapter's (:data:`APPENDICES`).
* **Verdicts next to the source's statements.**  ``{{ claim_<id> }}`` is the registry's
  paraphrase of claim ``<id>`` of ``book/claims.yml`` and ``{{ verdict_<id> }}`` a line with
  its verdict and a link to the part of the claim audit that lists it (``-`` in an id is
  written ``_``).  A chapter shows a theorem of the source in a ``prf:`` box with these two,
  so the verdict it shows is the registry's and cannot drift from it.
* **Plain-text titles.**  The browser tab's ``<title>`` and the text of ``{ref}`` links are
  plain text: where a section title contains math, TeX such as ``\\sg{G}z`` is rewritten as
  ``sg[G]z`` (:func:`tex_to_text`) instead of being shown as TeX source.
"""
from __future__ import annotations

import functools
import json
import re
import shutil
import unicodedata
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: Where the script lives in the built site, relative to ``_static``.
MATHJAX_SCRIPT = "mathjax/tex-mml-chtml.js"
#: What of MathJax's ``es5`` folder the book needs: the combined TeX/MathML-to-CHTML
#: component, its fonts, and what it loads on demand (TeX extensions, the menu and
#: accessibility components with the speech-rule engine).  The alternative bundles
#: (SVG output, the "full" variants) are left out.
MATHJAX_PARTS = (
    "tex-mml-chtml.js",
    "a11y",
    "adaptors",
    "input",
    "output/chtml",
    "output/chtml.js",
    "sre",
    "ui",
)

_GREEK = {
    name: chr(code)
    for name, code in (
        ("alpha", 0x3B1), ("beta", 0x3B2), ("gamma", 0x3B3), ("delta", 0x3B4),
        ("epsilon", 0x3B5), ("theta", 0x3B8), ("lambda", 0x3BB), ("mu", 0x3BC),
        ("pi", 0x3C0), ("sigma", 0x3C3), ("tau", 0x3C4), ("phi", 0x3C6), ("omega", 0x3C9),
        ("Delta", 0x394), ("Sigma", 0x3A3),
    )
}
_SYMBOLS = {
    "partial": "\u2202", "top": "\u1D40", "cdot": "\u00B7", "times": "\u00D7",
    "le": "\u2264", "leq": "\u2264", "ge": "\u2265", "geq": "\u2265", "to": "\u2192",
    "infty": "\u221E", "approx": "\u2248", "ne": "\u2260", "|": "\u2016", ",": " ",
    ";": " ", "!": "", " ": " ",
}


def _group(text: str, start: int) -> tuple[str, int]:
    """Return the braced group (or single token) of ``text`` at ``start`` and its end."""
    while start < len(text) and text[start] == " ":
        start += 1
    if start >= len(text):
        return "", start
    if text[start] != "{":
        if text[start] == "\\":
            match = re.match(r"\\([A-Za-z]+|.)", text[start:])
            return match.group(0), start + match.end()
        return text[start], start + 1
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + 1:end], end + 1
    raise ValueError(f"unbalanced braces in TeX {text!r}")


def tex_to_text(tex: str) -> str:
    """Render a short TeX snippet (a title's inline math) as readable plain text.

    Covers what titles and link texts of this book use: the book's macro ``\\sg{x}``
    (written ``sg[x]`` as in the README), ``\\frac``, ``\\hat``, norms, Greek letters and
    common symbols.  Unknown commands lose their backslash, so no TeX source is left.

    Args:
        tex: TeX source without the ``$`` delimiters, e.g. ``"\\sg{G}z"``.

    Returns:
        Plain text, e.g. ``"sg[G]z"``.

    Raises:
        TypeError: if ``tex`` is not a string.
        ValueError: if its braces are unbalanced.
    """
    if not isinstance(tex, str):
        raise TypeError(f"tex must be a str, got {type(tex).__name__}")
    out: list[str] = []
    i = 0
    while i < len(tex):
        char = tex[i]
        if char == "\\":
            match = re.match(r"\\([A-Za-z]+ *|.)", tex[i:])  # a control word eats its spaces
            name = match.group(1).rstrip(" ") or " "
            i += match.end()
            if name == "sg":
                arg, i = _group(tex, i)
                out.append(f"sg[{tex_to_text(arg)}]")
            elif name in ("frac", "tfrac", "dfrac"):
                num, i = _group(tex, i)
                den, i = _group(tex, i)
                out.append(f"{_atom(tex_to_text(num))}/{_atom(tex_to_text(den))}")
            elif name in ("hat", "widehat"):
                arg, i = _group(tex, i)
                out.append(tex_to_text(arg) + "\u0302")
            elif name in ("operatorname", "mathrm", "text", "mathbf", "mathcal", "mathbb", "boldsymbol"):
                if tex[i:i + 1] == "*":
                    i += 1
                arg, i = _group(tex, i)
                out.append(tex_to_text(arg))
            elif name in ("left", "right", "big", "Big", "bigl", "bigr"):
                continue
            elif name in _GREEK:
                out.append(_GREEK[name])
            elif name in _SYMBOLS:
                out.append(_SYMBOLS[name])
            else:
                out.append(name)
        elif char in "{}":
            if char == "{":
                arg, i = _group(tex, i)
                out.append(tex_to_text(arg))
                continue
            raise ValueError(f"unbalanced braces in TeX {tex!r}")
        elif char == "^" and tex[i + 1:i + 2] in ("{", "\\") or char == "_":
            i += 1
            arg, i = _group(tex, i)
            out.append(("^" if char == "^" else "_") + _atom(tex_to_text(arg)))
        else:
            out.append(char)
            i += 1
    text = re.sub(r" {2,}", " ", "".join(out)).replace("^\u1D40", "\u1D40")
    return unicodedata.normalize("NFC", text)


def _atom(text: str) -> str:
    """``text`` in parentheses when it would otherwise change the meaning of a/b or x^y."""
    return f"({text})" if re.search(r"[\s+\-/=,]", text) else text


def node_text(node: nodes.Node) -> str:
    """Plain text of a title node: its text, with inline math through :func:`tex_to_text`."""
    if isinstance(node, nodes.math):
        return tex_to_text(node.astext())
    if isinstance(node, nodes.Text):
        return str(node)
    return "".join(node_text(child) for child in node.children)


def _plain_ref_titles(app: Sphinx, doctree: nodes.document) -> None:
    """Give ``{ref}`` targets whose section title has math a plain-text link text."""
    labels = app.env.domaindata["std"]["labels"]
    docname = app.env.docname
    for name, (doc, labelid, sectname) in list(labels.items()):
        if doc != docname or "\\" not in sectname:
            continue
        target = doctree.ids.get(labelid)
        if isinstance(target, nodes.section) and isinstance(target[0], nodes.title):
            labels[name] = (doc, labelid, node_text(target[0]))


def _use_local_mathjax(app: Sphinx, config: Any) -> None:
    # A relative mathjax_path is resolved against _static of the built site.
    config.mathjax_path = MATHJAX_SCRIPT


def _force_mathjax_everywhere(app: Sphinx) -> None:
    # Sphinx adds MathJax only to pages with equations unless the assets policy is
    # "always"; the sidebar shows chapter titles with math on every page.
    app.set_html_assets_policy("always")


_INLINE_MATH = re.compile(r"\\\((.*?)\\\)")


def plain_title(title: str) -> str:
    """``title`` (HTML or text) with each inline ``\\(...\\)`` math turned into plain text."""
    return _INLINE_MATH.sub(lambda match: tex_to_text(match.group(1)), title)


def _plain_page_title(app: Sphinx, pagename: str, templatename: str,
                      context: dict[str, Any], doctree: nodes.document | None) -> None:
    # <title> is the page title with its tags stripped, so math would show as TeX
    # source; the print header (sphinx-book-theme's ``pagetitle``) likewise.
    title = context.get("title")
    if isinstance(title, str) and "\\(" in title:
        context["title"] = plain_title(title)
    if "\\" in str(context.get("pagetitle", "")) and doctree is not None:
        first = next(iter(doctree.findall(nodes.title)), None)
        if first is not None:
            context["pagetitle"] = node_text(first)


def format_seconds(seconds: float) -> str:
    """``seconds`` as a reader-friendly duration: "8 s", "2 min 5 s"."""
    if not (isinstance(seconds, (int, float)) and seconds >= 0):
        raise ValueError(f"seconds must be a non-negative number, got {seconds!r}")
    whole = round(seconds)
    if whole < 60:
        return f"{max(whole, 1)} s"
    minutes, rest = divmod(whole, 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def runtime_substitutions(timings_file: Path) -> dict[str, str]:
    """MyST substitutions ``runtime_<chapter>`` from ``book/_timings.json``.

    The file is written by ``tools/execute_notebook.py`` each time it produces a chapter's
    stored outputs, so the number a chapter states is measured, not typed.
    """
    if not timings_file.is_file():
        return {}
    timings = json.loads(timings_file.read_text(encoding="utf-8"))
    return {f"runtime_{name}": format_seconds(entry["seconds"]) for name, entry in timings.items()}


def _runtime_substitutions(app: Sphinx, config: Any) -> None:
    found = runtime_substitutions(Path(app.srcdir) / "book" / "_timings.json")
    config.myst_substitutions = {**found, **(config.myst_substitutions or {})}


def _claims_tool(root: Path) -> Any:
    """``tools/claims.py`` of the book at ``root``, imported by path (it is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rotvq_claims_tool", root / "tools" / "claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def claim_substitutions(root: Path) -> dict[str, str]:
    """MyST substitutions ``claim_<id>`` and ``verdict_<id>`` from the claim registry.

    ``claims_total``, ``claims_<verdict>`` and ``claims_notes`` count the registry's entries
    (all of them, by verdict, and those about the derivation notes), for the introduction.
    ``claim_<id>`` is the claim as the registry states it; ``verdict_<id>`` reads
    "Verdict: **wrong** (registry entry ``id``; {ref}`claim audit <audit-ste>`)", the link
    going to the part of Appendix B that lists the claim with its note and evidence.
    """
    registry = root / "book" / "claims.yml"
    if not registry.is_file():
        return {}
    tool = _claims_tool(root)
    tool.BOOK = root / "book"
    claims = tool.load(registry)
    labels = tool.book_labels(root / "book")
    out = {"claims_total": str(len(claims))}
    for verdict in tool.VERDICTS:
        out[f"claims_{verdict}"] = str(sum(c["verdict"] == verdict for c in claims))
    out["claims_notes"] = str(sum(c["source"] == "notes" for c in claims))
    for c in claims:
        key = c["id"].replace("-", "_")
        part = tool.part_label(tool.chapter_of(c, labels))
        out[f"claim_{key}"] = " ".join(c["claim"].split())
        out[f"verdict_{key}"] = (f"Verdict: **{c['verdict']}** (registry entry `{c['id']}`; "
                                 f"{{ref}}`claim audit <{part}>`)")
    return out


def _claim_substitutions(app: Sphinx, config: Any) -> None:
    found = claim_substitutions(Path(app.srcdir))
    config.myst_substitutions = {**found, **(config.myst_substitutions or {})}


#: Appendix pages and their letters (the toc lists them in an unnumbered part).
APPENDICES = {"book/benchmarks": "A", "book/claim_audit": "B"}


def letter_numbers(fignumbers: dict[str, dict[str, tuple]], letter: str) -> dict[str, dict[str, tuple]]:
    """Figure/equation numbers of one page renumbered ``(letter, 1)``, ``(letter, 2)``, ...

    Sphinx numbers the figures and equations of an unnumbered page with one counter shared
    by all unnumbered pages; an appendix counts its own, in the page's order, per type.
    """
    out = {}
    for figtype, numbers in fignumbers.items():
        order = sorted(numbers, key=lambda key: numbers[key])
        out[figtype] = {key: (letter, i + 1) for i, key in enumerate(order)}
    return out


def _letter_appendices(app: Sphinx, env: Any) -> list[str]:
    # Runs after Sphinx's TocTreeCollector has assigned env.toc_fignumbers (same event).
    for docname, letter in APPENDICES.items():
        if docname in env.toc_fignumbers:
            env.toc_fignumbers[docname] = letter_numbers(env.toc_fignumbers[docname], letter)
    return []


def _tuples_for_nitpick(app: Sphinx, config: Any) -> None:
    # YAML gives lists, Sphinx compares (type, target) tuples: a YAML
    # nitpick_ignore entry would otherwise never match.
    config.nitpick_ignore = [tuple(entry) for entry in config.nitpick_ignore]
    config.nitpick_ignore_regex = [tuple(entry) for entry in config.nitpick_ignore_regex]


@functools.lru_cache(maxsize=None)
def _lookup(path: str) -> Any:
    """The Python object at dotted ``path`` (module prefix, then attributes), or None."""
    import importlib

    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except Exception:  # noqa: BLE001 - any import problem means "not this prefix"
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


_MISSING = object()


def _resolve_reexports(app: Sphinx, env: Any, node: nodes.Element,
                       contnode: nodes.Node) -> nodes.Node | None:
    """Resolve a Python cross-reference to the documented entry of the same object.

    The API page documents the library under the names a user imports
    (``rotvq.rotation_trick``), while docstrings refer to the same objects by their
    short or defining-module names (``rotation_trick`` inside ``rotvq.estimators``,
    ``rotvq.search.nearest_code``).  A reference Sphinx cannot resolve is tied to the
    documented ``rotvq...`` entry that *is the same Python object* (checked by
    importing both; for plain values such as tuples and numbers the trailing names must
    agree too), or, for a bare name, to the documented entry of that name in the
    referencing module.  An object that exists in the package but has no entry on the
    API page is shown as code without a link.  A name that exists nowhere stays
    unresolved, and ``-n`` reports it.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    module, cls = node.get("py:module"), node.get("py:class")
    domain = env.get_domain("py")
    documented = [name for name in domain.objects if name.startswith("rotvq")]
    paths = [target]
    if module:
        paths.append(f"{module}.{target}")
        if cls:
            paths.append(f"{module}.{cls}.{target}")
    # Inside an autodoc docstring, also look in the module that defines the documented
    # object (``rotvq.lab.train`` is defined in ``rotvq.lab.training``).
    origin = re.search(r"docstring of ([\w.]+)", str(node.source or ""))
    if origin:
        owner = _lookup(origin.group(1))
        defining = getattr(owner, "__module__", None) or (
            origin.group(1) if isinstance(owner, type(re)) else None)
        if defining:
            paths.append(f"{defining}.{target}")
            qualname = getattr(owner, "__qualname__", "")
            if "." in qualname:
                paths.append(f"{defining}.{qualname.rsplit('.', 1)[0]}.{target}")
    obj = _MISSING
    for path in paths:
        found = _lookup(path)
        if found is not None:
            obj = found
            break
    if obj is not _MISSING:
        plain = isinstance(obj, (int, float, str, bytes, tuple, frozenset, type(None)))
        tail = target.rsplit(".", 1)[-1]
        matches = [name for name in documented if _lookup(name) is obj
                   and (not plain or name.rsplit(".", 1)[-1] == tail)]
    elif module:
        matches = [name for name in documented
                   if name.endswith("." + target)
                   and (name.startswith(module + ".")
                        or getattr(_lookup(name), "__module__", None) == module)]
    else:
        matches = []
    if not matches:
        # An object that exists but has no entry on the API page (a module constant,
        # say) is shown as code, not as a link; a name that exists nowhere still warns.
        exists_here = obj is not _MISSING and ("." not in target or target.startswith("rotvq"))
        return contnode if exists_here else None
    matches.sort(key=len)  # the shortest documented name: the one a user imports
    from sphinx.util.nodes import make_refnode

    entry = domain.objects[matches[0]]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id,
                        contnode, matches[0])


def mathjax_source() -> Path:
    """The ``es5`` folder of the installed MathJax 3 (package ``django-static-mathjax``).

    Raises:
        RuntimeError: if the package is not installed or lacks the expected files.
    """
    try:
        import mathjax  # the import name of django-static-mathjax
    except ImportError as exc:
        raise RuntimeError(
            "MathJax is served from the built book and comes from the package "
            "django-static-mathjax (in the `book` extra): pip install -e '.[book]'"
        ) from exc
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (es5 / "tex-mml-chtml.js").is_file():
        raise RuntimeError(f"no MathJax 3 es5 bundle at {es5}")
    return es5


def _copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source = mathjax_source()
    target = Path(app.outdir) / "_static" / "mathjax"
    for part in MATHJAX_PARTS:
        src, dst = source / part, target / part
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    logger.info("copied MathJax 3 from %s to %s", source, target)


def setup(app: Sphinx) -> dict[str, Any]:
    mathjax_source()  # fail at once, with the fix, when the package is missing
    app.connect("config-inited", _use_local_mathjax)
    app.connect("config-inited", _tuples_for_nitpick)
    app.connect("config-inited", _runtime_substitutions)
    app.connect("config-inited", _claim_substitutions)
    app.connect("missing-reference", _resolve_reexports)
    app.connect("builder-inited", _force_mathjax_everywhere)
    app.connect("doctree-read", _plain_ref_titles)
    app.connect("env-get-updated", _letter_appendices, priority=900)
    app.connect("html-page-context", _plain_page_title, priority=900)
    app.connect("build-finished", _copy_mathjax)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
