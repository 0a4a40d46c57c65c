"""What a chapter page is made of, as a reader sees it: claims tables, visible code, checks.

Opens each chapter of a built book in headless Chromium at 1280 px (the DevTools client of
``tests/test_browser.py``, no extra dependency) and reports, per page:

* the height of the article (the page's text column, from its title to its last line);
* the share of that height taken by the "Claims checked" section (the generated cell at
  the end of each chapter, plus any other section whose heading starts with "Claims");
* the share taken by code inputs a reader sees without clicking (inputs behind a
  "show" toggle are not counted);
* of the visible code lines, the share that is check code: ``assert`` statements and
  calls of ``glue``, ``print`` or an ``assert_*`` function (found with :mod:`ast`, so a
  statement spread over several lines counts with all its lines).

Usage::

    python tools/page_composition.py                       # _build/html
    python tools/page_composition.py --html /tmp/w/before/_build/html --markdown
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAPTERS = ("ste", "generalized", "rotation", "scaling", "estimates", "benchmarks")
WIDTH = 1280

MEASURE = r"""
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await Promise.all([...document.images].map(img => img.complete ? null :
      new Promise(done => { img.addEventListener("load", done); img.addEventListener("error", done); })));
  await document.fonts.ready;
  await new Promise(done => setTimeout(done, 500));
  const article = document.querySelector("article.bd-article") || document.querySelector("main");
  const height = el => el.getBoundingClientRect().height;
  const claims = [...article.querySelectorAll("section")].filter(s => {
    const h = s.querySelector(":scope > h1, :scope > h2, :scope > h3");
    return h && /^\s*([A-Z]?[0-9.]*\s*)?Claims/.test(h.textContent);
  });
  // an input behind a closed "show" toggle is not seen (Chromium still lays it out)
  const inputs = [...article.querySelectorAll("div.cell_input")]
    .filter(el => el.offsetParent !== null && !el.closest("details:not([open])"));
  return {
    page: height(article),
    claims: claims.reduce((a, s) => a + height(s), 0),
    code: inputs.reduce((a, el) => a + height(el), 0),
    inputs: inputs.map(el => (el.querySelector("pre") || el).textContent),
  };
})()
"""

_CHECK_CALL = re.compile(r"^(print|glue|assert\w*|.*\.assert\w*)$")


def _call_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _call_name(node.value) + "." + node.attr
    return ""


def check_lines(source: str) -> tuple[int, int]:
    """(code lines, check lines) of a cell: non-blank lines, and those in a check statement."""
    lines = source.splitlines()
    code = {i for i, line in enumerate(lines, 1) if line.strip() and not line.strip().startswith("#")}
    checks: set[int] = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython syntax: fall back to the first word of each line
        checks = {i for i in code if re.match(r"\s*(assert\b|print\(|glue\()", lines[i - 1])}
        return len(code), len(checks)
    for node in ast.walk(tree):
        is_check = isinstance(node, ast.Assert) or (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and _CHECK_CALL.match(_call_name(node.value.func)))
        if is_check:
            checks.update(range(node.lineno, node.end_lineno + 1))
    return len(code), len(checks & code)


def _browser_class():
    spec = importlib.util.spec_from_file_location("rotvq_test_browser", ROOT / "tests" / "test_browser.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Browser, module.find_chromium()


def measure(html: pathlib.Path, chapters=CHAPTERS) -> dict[str, dict]:
    Browser, chromium = _browser_class()
    if chromium is None:
        raise SystemExit("no Chromium found (apt-get install chromium, or set CHROMIUM)")
    browser = Browser(chromium, width=WIDTH, height=900)
    out = {}
    try:
        for name in chapters:
            page = html / "book" / f"{name}.html"
            if not page.is_file():
                continue
            browser.open(page.as_uri())
            r = browser.evaluate(MEASURE)
            code_lines = check = 0
            for text in r["inputs"]:
                n, c = check_lines(text)
                code_lines += n
                check += c
            out[name] = {
                "page_px": round(r["page"]),
                "claims_px": round(r["claims"]),
                "claims_share": r["claims"] / r["page"],
                "code_px": round(r["code"]),
                "code_share": r["code"] / r["page"],
                "visible_cells": len(r["inputs"]),
                "code_lines": code_lines,
                "check_lines": check,
                "check_share": check / code_lines if code_lines else 0.0,
            }
    finally:
        browser.close()
    return out


def table(rows: dict[str, dict]) -> str:
    head = ("| chapter | page height (px) | claims tables | visible code | visible code cells "
            "| visible code lines | check lines of it |\n|---|---:|---:|---:|---:|---:|---:|")
    body = [f"| {name} | {r['page_px']:,} | {100 * r['claims_share']:.0f} % | "
            f"{100 * r['code_share']:.0f} % | {r['visible_cells']} | {r['code_lines']} | "
            f"{r['check_lines']} ({100 * r['check_share']:.0f} %) |" for name, r in rows.items()]
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=pathlib.Path, default=ROOT / "_build" / "html")
    parser.add_argument("--chapters", nargs="+", default=list(CHAPTERS))
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    rows = measure(args.html.resolve(), args.chapters)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
