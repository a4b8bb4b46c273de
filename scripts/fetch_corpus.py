#!/usr/bin/env python3
"""Build velox's English text corpora from the Debian package ``python3.11-doc``.

Downloads the .deb with ``apt-get download`` (``apt-get update`` only if that
fails), unpacks it with ``dpkg -x`` into a git-ignored cache (default
``.cache/corpus/``), extracts the prose of the Sphinx HTML pages with the stdlib
``html.parser`` and writes into ``velox/data/``:

* ``calib_python_docs.txt`` -- calibration text from tutorial/ then library/ pages;
* ``eval_python_docs.txt``  -- evaluation text from faq/ and howto/ pages;
* ``LICENSE-PSF.txt``       -- the licence text shipped in the package;
* ``SOURCES.md``            -- provenance: version, page lists, sha256s.

Output is deterministic (sorted page lists, no timestamps), so running the
script twice gives byte-identical files.  ``--check`` regenerates into a temp
dir and reports whether the sha256s match the files in ``velox/data/``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import cache
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "velox" / "data"
PACKAGE = "python3.11-doc"
HTML_ROOT = "usr/share/doc/python3.11/html"

# Byte-size windows; the lower bounds are in KiB and the upper ones in kB so
# the files fit "100-120 KB" / "60-80 KB" under either reading of "KB".
CALIB_RANGE = (100 * 1024, 120_000)
EVAL_RANGE = (60 * 1024, 80_000)
MIN_PAGE_BYTES = 2_000  # pages shorter than this are tables of contents, not prose
CHUNK = 200  # eval/calib overlap check: no shared substring of this length

# Elements whose text we never want, even inside the main body.
SKIP_TAGS = {"script", "style", "nav"}  # <nav class="contents"> = local TOC
SKIP_CLASSES = {"headerlink", "toctree-wrapper", "contents"}  # "¶" links, TOCs
VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "wbr", "source"}
BLOCK_TAGS = {
    "p", "div", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "dl",
    "ul", "ol", "section", "table", "tr", "blockquote", "aside", "figure", "caption",
}


class BodyText(HTMLParser):
    """Collects paragraphs from ``<div class="body" role="main">`` only.

    Sphinx output is well-formed, so a simple tag stack tells us whether the
    current text is inside the main body and not inside a skipped element.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        # (tag, classes, in_body, skipped) for every open element.
        self.stack: list[tuple[str, set[str], bool, bool]] = []
        self.buf: list[str] = []
        self.blocks: list[str] = []

    def _active(self) -> bool:
        return bool(self.stack) and self.stack[-1][2] and not self.stack[-1][3]

    def _in_cell(self) -> bool:
        return any(t in ("td", "th") for t, *_ in self.stack)

    def _flush(self, verbatim: bool) -> None:
        text = "".join(self.buf).replace("¶", "").replace("\xa0", " ")
        self.buf = []
        # Code blocks keep their layout; prose gets its whitespace collapsed.
        text = text.strip("\n").rstrip() if verbatim else re.sub(r"\s+", " ", text).strip()
        if text:
            self.blocks.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        active = self._active()
        if tag in VOID_TAGS:
            if active and tag in ("br", "hr") and not self._in_cell():
                self._flush(verbatim=False)
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        parent_classes = self.stack[-1][1] if self.stack else set()
        in_body = (self.stack[-1][2] if self.stack else False) or (
            tag == "div" and "body" in classes and a.get("role") == "main")
        skipped = (self.stack[-1][3] if self.stack else False) or (
            tag in SKIP_TAGS or bool(classes & SKIP_CLASSES))
        if active and tag in ("td", "th"):
            if "".join(self.buf).strip():
                self.buf.append(" | ")  # one table row per line: "a | b | c"
        elif active and tag in BLOCK_TAGS and not self._in_cell():
            # A footnote's "[1]" label stays on the line of its text.
            if not (tag == "p" and "footnote" in parent_classes):
                self._flush(verbatim=False)
        self.stack.append((tag, classes, in_body, skipped))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS or all(t != tag for t, *_ in self.stack):
            return
        while self.stack:  # pop up to the matching tag (tolerates unclosed ones)
            t, _, in_body, skipped = self.stack.pop()
            if t == tag:
                break
        if in_body and not skipped and tag in BLOCK_TAGS and not self._in_cell():
            self._flush(verbatim=(tag == "pre"))

    def handle_data(self, data: str) -> None:
        if self._active():
            self.buf.append(data)


def html_to_text(path: Path) -> str:
    parser = BodyText()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return "\n\n".join(parser.blocks)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unpack(cache_dir: Path) -> tuple[Path, str, str]:
    """Download (once) and unpack the .deb; return (html root, version, deb sha256)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / ".gitignore").write_text("*\n")  # keep the cache out of git
    debs = sorted(cache_dir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        cmd = ["apt-get", "download", PACKAGE]
        if subprocess.run(cmd, cwd=cache_dir).returncode != 0:
            subprocess.run(["apt-get", "update"], check=True)  # stale package lists
            subprocess.run(cmd, cwd=cache_dir, check=True)
        debs = sorted(cache_dir.glob(f"{PACKAGE}_*.deb"))
    if len(debs) != 1:
        sys.exit(f"expected exactly one {PACKAGE} .deb in {cache_dir}, found {len(debs)}")
    deb = debs[0]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"],
                             check=True, capture_output=True, text=True).stdout.strip()
    root = cache_dir / f"{PACKAGE}_{version}"
    if not (root / HTML_ROOT).is_dir():
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root, version, sha256(deb)


def pick(pages: list[str], text_of: Callable[[str], str], lo: int, hi: int) -> list[str]:
    """Greedily take whole pages in order, skipping any that would pass ``hi``."""
    chosen: list[str] = []
    size = 1  # trailing newline
    for page in pages:
        n = len(text_of(page).encode()) + 2  # + blank-line separator
        if n < MIN_PAGE_BYTES or size + n > hi:
            continue
        chosen.append(page)
        size += n
        if size >= lo:
            return chosen
    sys.exit(f"could not reach {lo} bytes from {len(pages)} pages")


def build(out: Path, cache_dir: Path) -> None:
    root, version, deb_sha = unpack(cache_dir)
    html = root / HTML_ROOT
    text_of = cache(lambda page: html_to_text(html / page))

    def listing(*subdirs: str) -> list[list[str]]:
        # index.html pages are only link lists, so leave them out.
        return [sorted(p.relative_to(html).as_posix() for p in (html / d).glob("*.html")
                       if p.name != "index.html") for d in subdirs]

    tutorial, library = listing("tutorial", "library")
    faq, howto = listing("faq", "howto")
    # Alternate faq/howto so the eval text mixes both kinds of page.
    mixed = [p for pair in zip(faq, howto) for p in pair]
    mixed += faq[len(howto):] + howto[len(faq):]
    calib_pages = pick(tutorial + library, text_of, *CALIB_RANGE)
    eval_pages = pick(mixed, text_of, *EVAL_RANGE)

    calib = "\n\n".join(text_of(p) for p in calib_pages) + "\n"
    evalt = "\n\n".join(text_of(p) for p in eval_pages) + "\n"
    # Disjointness: no shared page and no shared 200-character substring.
    assert not set(calib_pages) & set(eval_pages), "a page is in both sets"
    calib_grams = {calib[i:i + CHUNK] for i in range(len(calib) - CHUNK + 1)}
    shared = [i for i in range(len(evalt) - CHUNK + 1) if evalt[i:i + CHUNK] in calib_grams]
    assert not shared, f"eval text shares a {CHUNK}-char chunk with calib at {shared[0]}"

    # Licence: the copyright page plus license.html up to the third-party
    # section (which covers bundled C libraries, not the documentation).
    lic = html_to_text(html / "license.html")
    head, sep, _ = lic.partition("\n\nLicenses and Acknowledgements for Incorporated Software\n\n")
    assert sep, "license.html layout changed"
    license_text = (f"Extracted from Debian package {PACKAGE} {version}, files\n"
                    f"{HTML_ROOT}/copyright.html and {HTML_ROOT}/license.html.\n\n"
                    + html_to_text(html / "copyright.html") + "\n\n" + head + "\n")

    out.mkdir(parents=True, exist_ok=True)
    files = {"calib_python_docs.txt": calib, "eval_python_docs.txt": evalt,
             "LICENSE-PSF.txt": license_text}
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")

    def page_list(pages: list[str]) -> str:
        return "\n".join(f"- `{HTML_ROOT}/{p}`" for p in pages)

    sources = f"""# Text corpora: sources

Generated by `scripts/fetch_corpus.py` (deterministic; `--check` verifies).

- Debian package: `{PACKAGE}`, version `{version}` (Python documentation)
- .deb sha256: `{deb_sha}`
- Licence: PSF License Agreement, see `LICENSE-PSF.txt`
- Extraction: only `<div class="body" role="main">` of each Sphinx HTML page;
  navigation, sidebars, scripts, footers, local tables of contents and "¶"
  permalinks dropped; one blank line between paragraphs and between pages;
  code blocks kept as plain text.

## calib_python_docs.txt ({len(calib.encode())} bytes)

sha256 `{sha256(out / "calib_python_docs.txt")}`

Pages (tutorial/ then library/, sorted, whole pages until {CALIB_RANGE[0]}-{CALIB_RANGE[1]} bytes):

{page_list(calib_pages)}

## eval_python_docs.txt ({len(evalt.encode())} bytes)

sha256 `{sha256(out / "eval_python_docs.txt")}`

Pages (faq/ and howto/, each sorted, taken alternately, whole pages until {EVAL_RANGE[0]}-{EVAL_RANGE[1]} bytes):

{page_list(eval_pages)}

## Disjointness

Calibration and evaluation pages are disjoint: the script asserts that no
page is in both lists and that no {CHUNK}-character substring of the
evaluation text occurs in the calibration text.
"""
    (out / "SOURCES.md").write_text(sources, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "corpus",
                    help="download/unpack folder (default: .cache/corpus/)")
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temp dir and compare sha256 with velox/data/")
    args = ap.parse_args()
    if not args.check:
        build(DATA_DIR, args.cache)
        for name in ("calib_python_docs.txt", "eval_python_docs.txt", "LICENSE-PSF.txt", "SOURCES.md"):
            path = DATA_DIR / name
            print(f"{sha256(path)}  {path.stat().st_size:>7}  {path.relative_to(REPO)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.cache)
        ok = True
        for new in sorted(Path(tmp).iterdir()):
            old = DATA_DIR / new.name
            same = old.is_file() and sha256(old) == sha256(new)
            ok &= same
            print(f"{'match' if same else 'MISMATCH'}  {old.relative_to(REPO)}")
    print("all files match" if ok else "files differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
