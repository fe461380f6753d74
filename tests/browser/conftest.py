"""Fixtures for the browser tests of the built site (`make test` runs them after the build).

A local HTTP server on 127.0.0.1 serves _build/html, and Playwright drives Debian's
Chromium (`/usr/bin/chromium`, installed by `make test`; set ATTN_COURSE_CHROMIUM to
use another binary; without either, Playwright's own browser is used).
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
SITE_LIMIT_MB = 50

# Flags that keep Chromium from calling home: this must work with no network at all.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions"]


def site_pages() -> list[str]:
    """Every HTML page of the site, relative to its root (no theme assets)."""
    if not (SITE / "index.html").exists():
        pytest.exit("no site in _build/html: run `make book` (or `make test`) first", returncode=2)
    pages = []
    for p in sorted(SITE.rglob("*.html")):
        rel = p.relative_to(SITE).as_posix()
        if rel.startswith(("_static/", "_sources/", "_images/")):
            continue
        pages.append(rel)
    return pages


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output readable
        pass


@pytest.fixture(scope="session")
def base_url():
    handler = functools.partial(_Quiet, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    exe = os.environ.get("ATTN_COURSE_CHROMIUM") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Visit:
    """A page opened in a fresh context, with every request, failure and console error recorded."""

    def __init__(self, browser, base_url, path, color_scheme="light"):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme=color_scheme)
        self.page = self.context.new_page()
        self.requests, self.failures, self.errors = [], [], []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("requestfailed", lambda r: self.failures.append(f"{r.url} ({r.failure})"))
        self.page.on("response", lambda r: self.failures.append(f"{r.url} (HTTP {r.status})") if r.status >= 400 else None)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(f"{base_url}/{path}", wait_until="load")
        # MathJax typesets asynchronously: wait until it has finished (pages with math load it)
        self.page.wait_for_function(
            "() => !window.MathJax || !window.MathJax.startup || window.MathJax.startup.promise"
            " && (window.__typeset || (window.MathJax.startup.promise.then(() => window.__typeset = true), false))",
            timeout=20000)

    def close(self):
        self.context.close()


@pytest.fixture
def visit(browser, base_url):
    opened = []

    def _open(path, **kwargs):
        v = Visit(browser, base_url, path, **kwargs)
        opened.append(v)
        return v

    yield _open
    for v in opened:
        v.close()


def pytest_terminal_summary(terminalreporter):
    if not SITE.exists():
        return
    sizes = {p: p.stat().st_size for p in SITE.rglob("*") if p.is_file()}
    total = sum(sizes.values()) / 2**20
    pages = sorted(((s, p) for p, s in sizes.items() if p.suffix == ".html"), reverse=True)[:5]
    terminalreporter.section("site weight")
    terminalreporter.write_line(f"_build/html: {total:.1f} MiB in {len(sizes)} files (limit {SITE_LIMIT_MB} MiB)")
    for s, p in pages:
        terminalreporter.write_line(f"  {s / 2**20:6.2f} MiB  {p.relative_to(SITE)}")
