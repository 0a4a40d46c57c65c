"""The built book as a reader sees it: every page opened in headless Chromium, offline.

Each HTML page of ``_build/html`` is loaded from ``file://`` in one headless Chromium
(Debian's ``chromium``; driven over the DevTools protocol on a pipe, no extra Python
package), with the network closed to it.  After the page's scripts ran (MathJax
included), the test fails on:

* raw TeX left in the rendered text outside code (``\\(``, ``\\[``, ``$$``, ``\\sg``,
  ``\\frac``, any ``\\command``) -- math that MathJax did not typeset -- and on MathJax's
  own error boxes (an unknown macro, say);
* a page where MathJax is not loaded (the sidebar has math on every page);
* an image that does not load (``naturalWidth == 0`` after loading);
* an internal link to a missing file or to a missing ``#anchor``;
* a ``<title>`` that shows TeX source;
* Markdown table syntax left in the rendered text outside code (a delimiter row such as
  ``| --- |``, or ``|—|`` once smart quotes made the dashes an em dash): a table that was
  rendered as a paragraph of pipes instead of a table;
* a display equation wider than its column (MathJax's display container scrolls
  sideways: break the equation, e.g. with ``aligned``);
* a code block wider than its box (a reader would have to scroll sideways), input or
  output, including the code behind a "show" toggle (every ``<details>`` is opened first);
* a code line that wraps: code keeps its line structure (no CSS wrapping), so a line too
  long for the column is caught by the previous check instead of being folded to column 0;
* a request to the network (the book must read offline).

A screenshot of the top of each page is written to ``_build/screenshots/<page>.png``.

Where no built book or no Chromium is found, the tests are skipped and say why; with
``--browser-check`` (as ``.ci/run`` runs them, after building the book) that is a
failure instead.  ``ROTVQ_BOOK_HTML`` points the test at another build folder and
``CHROMIUM`` at another browser binary.
"""
from __future__ import annotations

import base64
import fcntl
import html.parser
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = Path(os.environ.get("ROTVQ_BOOK_HTML", ROOT / "_build" / "html")).resolve()
SCREENSHOTS = HTML.parent / "screenshots"
# Sphinx's own pages: the index of terms and the search page (needs a query).
SKIP_PAGES = {"search.html"}
PAGE_TIMEOUT_S = 60.0
_REDIRECT = re.compile(r'<meta http-equiv="Refresh" content="0; url=([^"]+)"', re.IGNORECASE)


def find_chromium() -> str | None:
    """The Chromium binary: ``$CHROMIUM``, else ``chromium`` (Debian) or Chrome on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else shutil.which(explicit)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def built_pages(html_root: Path = HTML) -> list[Path]:
    """The book's HTML pages under ``html_root`` (not ``_static``/``_sources``/``_images``)."""
    if not (html_root / "index.html").is_file():
        return []
    return sorted(
        p for p in html_root.rglob("*.html")
        if not any(part.startswith("_") for part in p.relative_to(html_root).parts[:-1])
        and p.name not in SKIP_PAGES
    )


PAGES = built_pages()
CHROMIUM = find_chromium()


def _missing_reason() -> str | None:
    if not PAGES:
        return (f"no built book at {HTML} (build it first: jupyter-book build -W -n --keep-going ., "
                f"or set ROTVQ_BOOK_HTML)")
    if CHROMIUM is None:
        return ("no Chromium found (apt-get install -y chromium, or set CHROMIUM to a "
                "Chromium/Chrome binary)")
    return None


# --------------------------------------------------------------------------------------
# A minimal DevTools-protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out).
# --------------------------------------------------------------------------------------
class Browser:
    """One headless Chromium, one tab, offline; messages are JSON separated by NUL."""

    FLAGS = (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--hide-scrollbars", "--mute-audio",
        "--remote-debugging-pipe",
    )

    def __init__(self, binary: str, width: int = 1280, height: int = 1800):
        self.width = width
        self.profile = tempfile.mkdtemp(prefix="rotvq-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def pipe_to_fds_3_and_4():  # in the child, before exec
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [binary, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4, to_browser_r, from_browser_w), preexec_fn=pipe_to_fds_3_and_4,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for method in ("Page.enable", "Network.enable", "Runtime.enable"):
            self.call(method, session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width,
                  height=height, deviceScaleFactor=1, mobile=False)
        # Offline: every http(s) request fails, and is recorded by the request event.
        self.call("Network.emulateNetworkConditions", session=True, offline=True, latency=0,
                  downloadThroughput=-1, uploadThroughput=-1)

    def _send(self, message: dict) -> None:
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (status {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, timeout: float = PAGE_TIMEOUT_S, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self._send(message)
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, event: str, timeout: float = PAGE_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        for index, message in enumerate(self.events):
            if message.get("method") == event:
                return self.events.pop(index)
        while True:
            message = self._receive(deadline)
            if message.get("method") == event:
                return message
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, timeout: float = PAGE_TIMEOUT_S):
        result = self.call("Runtime.evaluate", session=True, timeout=timeout,
                           expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> list[dict]:
        """Load ``url`` and wait for its load event; return the events seen meanwhile."""
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")
        return self.events

    def screenshot(self, path: Path, max_height: int = 4000) -> None:
        height = min(max_height, int(self.evaluate("document.documentElement.scrollHeight")))
        data = self.call("Page.captureScreenshot", session=True, format="png",
                         captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


# Runs in the page once it has loaded: waits for MathJax and the images, then reports.
INSPECT = r"""
(async () => {
  for (const img of document.images) img.loading = "eager";
  const mathjax = !!(window.MathJax && window.MathJax.startup && window.MathJax.startup.promise);
  if (mathjax) await window.MathJax.startup.promise;
  await Promise.all([...document.images].map(img => img.complete ? null :
      new Promise(done => { img.addEventListener("load", done); img.addEventListener("error", done); })));
  await document.fonts.ready;
  await new Promise(done => setTimeout(done, 500));  // the theme's sidebar slides in
  const SKIP = new Set(["CODE", "PRE", "SCRIPT", "STYLE", "TEXTAREA", "KBD", "SAMP",
                        "MJX-CONTAINER", "MJX-ASSISTIVE-MML", "NOSCRIPT", "TEMPLATE"]);
  const TEX = /\\[()\[\]]|\$\$|\\[A-Za-z]+/;
  // a pipe table's delimiter row: | --- |, |:-:|, or |—| once smart quotes made --- a dash
  const PIPE_TABLE = /\|[ \t]*(?::?-{2,}|:-+|:?[\u2013\u2014]+):?[ \t]*\|/;
  const raw = [], pipes = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      for (let el = node.parentElement; el; el = el.parentElement) {
        if (SKIP.has(el.tagName) || el.classList.contains("highlight")) return NodeFilter.FILTER_REJECT;
      }
      const text = node.textContent;
      return TEX.test(text) || PIPE_TABLE.test(text) ? NodeFilter.FILTER_ACCEPT : NodeFilter.FILTER_SKIP;
    }
  });
  while (walker.nextNode()) {
    const node = walker.currentNode;
    const where = node.parentElement.closest("nav, .bd-sidebar-primary, .bd-sidebar-secondary, footer")
      ? "navigation" : "text";
    const text = node.textContent.trim();
    if (TEX.test(text)) raw.push(where + ": " + text.slice(0, 160));
    if (PIPE_TABLE.test(text)) pipes.push(text.slice(0, 160));
  }
  // Code and equations are measured with every toggle open: a long line behind a
  // "show the check" button is still a long line.
  const closed = [...document.querySelectorAll("details")].filter(details => !details.open);
  for (const details of closed) details.open = true;
  await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
  const visible = el => el.offsetParent !== null || el.getClientRects().length > 0;
  const longest = pre => pre.textContent.split("\n").reduce((a, b) => (b.length > a.length ? b : a), "").slice(0, 100);
  const codeBlocks = [...document.querySelectorAll("pre")].filter(visible);
  // a line wraps iff forbidding wrapping makes the block shorter
  const wrapped = codeBlocks.filter(pre => {
    const before = pre.getBoundingClientRect().height;
    const style = pre.getAttribute("style");
    pre.style.setProperty("white-space", "pre", "important");
    pre.style.setProperty("overflow-wrap", "normal", "important");
    const after = pre.getBoundingClientRect().height;
    if (style === null) pre.removeAttribute("style"); else pre.setAttribute("style", style);
    return before > after + 1;
  }).map(longest);
  const wideMath = [...document.querySelectorAll('mjx-container[display="true"]')]
    .filter(c => visible(c) && c.scrollWidth > c.clientWidth + 1)
    .map(c => {
      const box = c.closest("div.math, .math-wrapper, p, div") || c;
      const number = box.querySelector(".eqno");
      const tex = (c.querySelector("mjx-assistive-mml") || c).textContent.replace(/\s+/g, " ");
      return `${number ? number.textContent.replace("#", "").trim() + " " : ""}` +
             `${Math.round(c.scrollWidth)} px in ${Math.round(c.clientWidth)} px: ${tex.slice(0, 80)}`;
    });
  const report = {
    title: document.title,
    mathjax: mathjax,
    typeset: document.querySelectorAll("mjx-container").length,
    mathErrors: [...document.querySelectorAll("mjx-merror")].map(e => e.getAttribute("data-mjx-error") || e.textContent).slice(0, 10),
    rawTex: raw.slice(0, 20),
    brokenImages: [...document.images].filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.getAttribute("src")),
    images: document.images.length,
    pipeTables: pipes.slice(0, 20),
    wideMath: wideMath.slice(0, 20),
    wrapped: wrapped.slice(0, 20),
    sideways: codeBlocks.filter(pre => pre.scrollWidth > pre.clientWidth + 2).map(longest),
    links: [...document.querySelectorAll("a[href]")].map(a => a.href),
  };
  for (const details of closed) details.open = false;  // the screenshot shows the page as it opens
  return report;
})()
"""


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)


_ID_CACHE: dict[Path, set[str]] = {}


def anchors(page: Path) -> set[str]:
    """The ids (and ``name``s) a page's static HTML defines."""
    if page not in _ID_CACHE:
        parser = _Ids()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        _ID_CACHE[page] = parser.ids
    return _ID_CACHE[page]


def broken_links(links: list[str]) -> list[str]:
    """The ``file://`` links among ``links`` whose file or ``#anchor`` does not exist."""
    problems = []
    for link in sorted(set(links)):
        parsed = urllib.parse.urlparse(link)
        if parsed.scheme != "file":
            continue
        target = Path(urllib.parse.unquote(parsed.path))
        if not target.exists():
            problems.append(f"{link} (no such file)")
        elif parsed.fragment and target.suffix == ".html":
            fragment = urllib.parse.unquote(parsed.fragment)
            if fragment not in anchors(target):
                problems.append(f"{link} (no #{fragment} in {target.name})")
    return problems


def _require_book_and_browser(config: pytest.Config) -> None:
    """Skip (plain ``pytest``) or fail (``--browser-check``, as CI runs it) without a built
    book or a Chromium."""
    reason = _missing_reason()
    if reason:
        if config.getoption("--browser-check"):
            pytest.fail(f"--browser-check: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(request):
    _require_book_and_browser(request.config)
    instance = Browser(CHROMIUM)  # 1280 px wide: a laptop screen, the width the book is checked at
    yield instance
    instance.close()


def _page_id(page: Path) -> str:
    return str(page.relative_to(HTML))


@pytest.mark.parametrize("page", PAGES or [None], ids=[_page_id(p) for p in PAGES] or ["no-book"])
def test_page_reads_offline(browser, page):
    """One built page: math typeset, images loaded, links resolve, plain title, offline."""
    redirect = _REDIRECT.search(page.read_text(encoding="utf-8", errors="replace")[:2000])
    if redirect:  # Jupyter Book's index.html only forwards to the root page
        target = (page.parent / redirect.group(1)).resolve()
        assert target.is_file(), f"{_page_id(page)} redirects to a missing page: {target}"
        return
    events = browser.open(page.as_uri())
    report = browser.evaluate(INSPECT)
    shot = SCREENSHOTS / _page_id(page).replace("/", "__").replace(".html", ".png")
    browser.screenshot(shot)
    network = sorted({
        e["params"]["request"]["url"] for e in [*events, *browser.events]
        if e.get("method") == "Network.requestWillBeSent"
        and urllib.parse.urlparse(e["params"]["request"]["url"]).scheme not in ("file", "data", "blob")
    })
    problems = []
    if not report["mathjax"]:
        problems.append("MathJax is not loaded on this page")
    if "\\" in report["title"] or "$" in report["title"]:
        problems.append(f"<title> shows TeX source: {report['title']!r}")
    problems += [f"raw TeX in the rendered {text!r}" for text in report["rawTex"]]
    problems += [f"MathJax error: {err!r}" for err in report["mathErrors"]]
    problems += [f"image does not load: {src}" for src in report["brokenImages"]]
    problems += [f"broken internal link: {link}" for link in broken_links(report["links"])]
    problems += [f"requests the network: {url}" for url in network]
    problems += [f"Markdown table syntax in the rendered text: {text!r}" for text in report["pipeTables"]]
    problems += [f"display equation wider than its column, {eq}" for eq in report["wideMath"]]
    problems += [f"code block scrolls sideways, longest line {line!r}" for line in report["sideways"]]
    problems += [f"code line wraps, longest line {line!r}" for line in report["wrapped"]]
    assert not problems, (
        f"{_page_id(page)} (screenshot: {shot}):\n  " + "\n  ".join(problems)
    )


def test_pages_were_found(request):
    """The check must have pages to look at, and must cover every chapter of the toc."""
    _require_book_and_browser(request.config)
    names = {p.name for p in PAGES}
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    expected = {
        Path(line.split(":", 1)[1].strip()).with_suffix(".html").name
        for line in toc.splitlines() if line.strip().startswith(("- file:", "root:"))
    }
    assert expected <= names, f"toc pages missing from the build: {sorted(expected - names)}"


def output_tables(page: Path) -> list[str]:
    """The HTML of each ``<table>`` in a code cell's output on ``page`` (static HTML)."""
    text = page.read_text(encoding="utf-8", errors="replace")
    tables = []
    for start in (m.start() for m in re.finditer(r'<div class="cell_output\b', text)):
        depth, end = 0, start
        for tag in re.finditer(r"<div\b|</div>", text[start:]):  # the output's own <div>
            depth += 1 if tag.group(0) == "<div" else -1
            if depth == 0:
                end = start + tag.end()
                break
        tables += re.findall(r"<table.*?</table>", text[start:end], flags=re.S)
    return tables


def test_markdown_outputs_render_as_tables(request):
    """A ``display(Markdown(pipe_table))`` output is a table in the built page (MyST-NB's
    ``nb_render_markdown_format: myst``), with its math and code cells rendered too; the
    page check above fails on any that stays pipe text."""
    _require_book_and_browser(request.config)
    tables = [t for page in PAGES for t in output_tables(page)]
    assert tables, "no cell output renders a table"
    rich = [t for t in tables if re.search(r"<td[^>]*>.*?class=\"math notranslate nohighlight\"", t, re.S)
            and re.search(r"<td[^>]*>.*?<code", t, re.S)]
    assert rich, "no output table has a cell with math and a cell with code"


def test_broken_links_detects_missing_targets(tmp_path):
    """The link checker itself: a missing file and a missing anchor are reported."""
    page = tmp_path / "a.html"
    page.write_text('<html><body><h1 id="here">x</h1></body></html>', encoding="utf-8")
    good = page.as_uri() + "#here"
    assert broken_links([good, "https://example.org/x"]) == []
    bad_anchor = page.as_uri() + "#nowhere"
    bad_file = (tmp_path / "b.html").as_uri()
    problems = broken_links([bad_anchor, bad_file])
    assert len(problems) == 2 and "no #nowhere" in problems[0] and "no such file" in problems[1]


SYNTHETIC = """<!DOCTYPE html><html><head><title>synthetic</title><style>
  body { width: 400px; font: 14px monospace; }
  pre { overflow: auto; margin: 0 0 1em 0; }
  pre.folded { white-space: pre-wrap; overflow-wrap: anywhere; }
  mjx-container { display: block; overflow-x: auto; width: 300px; }
</style></head><body>
<p>| N | d | method |\n|---:|---:|---| | 1 | 2 | ste |</p>
<p>| claim | verdict |\n|\u2014|\u2014|</p>
<p>a norm |x| - |y| in prose, and a | b | c without a delimiter row</p>
<pre id="fits">short = 1</pre>
<pre id="wide">LONG</pre>
<pre class="folded">LONG</pre>
<details><summary>show</summary><pre>HIDDEN</pre></details>
<mjx-container display="true"><span style="display:inline-block;width:600px">wide</span></mjx-container>
<mjx-container display="true"><span style="display:inline-block;width:200px">narrow</span></mjx-container>
</body></html>"""


def test_inspect_detects_tables_wide_math_and_long_code(request, tmp_path):
    """The page checks themselves, on a synthetic page: pipe-table text, a display equation
    wider than its column, a code line that scrolls, one that wraps, one behind a toggle."""
    if CHROMIUM is None:
        if request.config.getoption("--browser-check"):
            pytest.fail("--browser-check: no Chromium found", pytrace=False)
        pytest.skip("no Chromium found")
    page = tmp_path / "synthetic.html"
    page.write_text(SYNTHETIC.replace("LONG", "x = " + "1 + " * 40 + "1")
                    .replace("HIDDEN", "y = " + "2 + " * 40 + "2"), encoding="utf-8")
    instance = Browser(CHROMIUM)
    try:
        instance.open(page.as_uri())
        report = instance.evaluate(INSPECT)
        still_closed = instance.evaluate("!document.querySelector('details').open")
    finally:
        instance.close()
    assert len(report["pipeTables"]) == 2, report["pipeTables"]
    assert len(report["wideMath"]) == 1 and "600 px in 300 px" in report["wideMath"][0]
    assert len(report["wrapped"]) == 1 and report["wrapped"][0].startswith("x = 1 + 1")
    # the wide block and the one behind the toggle scroll; the folded one wraps instead
    assert [line[:5] for line in report["sideways"]] == ["x = 1", "y = 2"], report["sideways"]
    assert still_closed, "the inspection must leave the toggles as it found them"
