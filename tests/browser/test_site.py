"""The published site as readers meet it: in a real browser, from a local server, offline."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from attn_course import authoring

from .conftest import ROOT, SHOTS, SITE, SITE_LIMIT_MB, site_pages

PAGES = site_pages()
CHAPTERS = [p.with_suffix("").relative_to(ROOT).as_posix() for p in authoring.chapter_notebooks(ROOT)]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


@pytest.mark.parametrize("path", PAGES)
def test_page_loads_offline_without_errors(visit, path):
    v = visit(path)
    outside = [u for u in v.requests if urlsplit(u).hostname not in ("127.0.0.1", None)
               and not u.startswith(("data:", "blob:"))]
    assert outside == [], f"requests to other hosts: {outside}"
    assert v.failures == [], f"failed requests: {v.failures}"
    assert v.errors == [], f"console errors: {v.errors}"


@pytest.mark.parametrize("path", PAGES)
def test_math_is_rendered_and_images_load(visit, path):
    v = visit(path)
    page = v.page
    raw_math = page.locator("span.math, div.math").count()
    if raw_math:
        assert page.locator("mjx-container").count() >= raw_math, "math left as raw TeX"
        assert page.locator("mjx-merror").count() == 0, "MathJax could not parse some math"
    broken = page.evaluate(
        "() => [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src.slice(0, 80))")
    assert broken == [], f"images that did not load: {broken}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_markdown_outputs_render_as_markdown(visit, chapter):
    """A table printed as Markdown by a notebook must reach the page as a table, not as pipes."""
    v = visit(f"{chapter}.html")
    raw = v.page.evaluate(
        "() => [...document.querySelectorAll('.cell_output p')].map(p => p.innerText)"
        ".filter(t => /^\\s*\\|.*\\|/.test(t)).map(t => t.slice(0, 60))")
    assert raw == [], f"unrendered Markdown in outputs: {raw}"


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key) and not (tag == "link" and a.get("rel") == "preload"):
                self.links.append(a[key])


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_every_internal_link_resolves():
    parsed = {p: _parse(SITE / p) for p in PAGES}
    missing = []
    for page, links in parsed.items():
        for link in links.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith(("//", "mailto:", "javascript:", "data:")):
                continue
            target = (SITE / page).parent / unquote(parts.path) if parts.path else SITE / page
            target = target.resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                missing.append(f"{page}: {link}")
            elif parts.fragment and target.suffix == ".html":
                rel = target.relative_to(SITE.resolve()).as_posix()
                ids = parsed[rel].ids if rel in parsed else _parse(target).ids
                if parts.fragment not in ids:
                    missing.append(f"{page}: {link} (no such anchor)")
    assert missing == []


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_has_colab_and_download_buttons(visit, chapter):
    owner_repo = urlsplit(CONFIG["repository"]["url"]).path.strip("/")
    branch = CONFIG["repository"]["branch"]
    expected = f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/{chapter}.ipynb"
    v = visit(f"{chapter}.html")
    colab = v.page.locator(f'a[href="{expected}"]')
    assert colab.count() == 1, f"no Open-in-Colab button pointing at {expected}"
    assert "colab" in (colab.first.text_content() or "").lower()
    download = v.page.locator(f'a.btn-download-source-button[href$="{Path(chapter).name}.ipynb"]')
    assert download.count() >= 1, "no download button for the notebook"
    assert (SITE / "_sources" / f"{chapter}.ipynb").exists()


def test_search_finds_attention(visit):
    v = visit("search.html?q=attention")
    # Sphinx appends one hit every few milliseconds and only then writes
    # "Search finished" in the summary: read the list after that, not after the first hit.
    v.page.wait_for_function(
        "() => (document.querySelector('#search-results .search-summary')?.innerText || '')"
        ".includes('Search finished')",
        timeout=30000,
    )
    hits = v.page.locator("#search-results ul.search li a").all_inner_texts()
    assert any("Attention basics" in h for h in hits), hits


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_static_sliders_move_the_figure_and_no_live_widgets(visit, chapter):
    v = visit(f"{chapter}.html")
    page = v.page
    sliders = page.locator("input.anim-slider")
    assert sliders.count() >= 1, "every chapter has an interactive figure"
    for i in range(sliders.count()):
        slider = sliders.nth(i)
        img = page.locator(".animation img").nth(i)
        img.scroll_into_view_if_needed()
        before = img.get_attribute("src")
        assert before and before.startswith("data:image/png")
        last = int(slider.get_attribute("max"))
        assert last >= 1, "a slider with one frame moves nothing"
        slider.fill(str(last))  # as a reader dragging it to the end
        after = img.get_attribute("src")
        assert after != before, f"slider {i} does not change the figure"
        slider.fill("0")
        assert img.get_attribute("src") == before
    html = page.content()
    assert "application/vnd.jupyter.widget-view+json" not in html
    assert page.locator(".jupyter-widgets, .widget-area").count() == 0


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_quick_checks_fold_out_without_a_kernel(visit, chapter):
    """The "Check yourself" questions show their question, hide the answer, and open on a click."""
    page = visit(f"{chapter}.html").page
    checks = page.locator(".admonition.quick-check")
    assert checks.count() >= 3
    for i in range(checks.count()):
        check = checks.nth(i)
        title = check.locator(".admonition-title")
        answer = check.locator("p:not(.admonition-title)").first
        title.scroll_into_view_if_needed()
        assert title.inner_text().strip().endswith("?")
        assert not answer.is_visible(), "the answer is folded until the reader asks for it"
        title.click()
        answer.wait_for(state="visible", timeout=2000)
        assert len(answer.inner_text().split()) >= 8


def test_front_matter_pages_are_reachable_from_the_intro(visit):
    page = visit("book/intro.html").page
    hrefs = page.eval_on_selector_all("article a[href]", "els => els.map(e => e.getAttribute('href'))")
    for target in ("glossary.html", "troubleshooting.html", "next.html", "notation.html"):
        assert any(h.split("#")[0].endswith(target) for h in hrefs), target
    # the generated course map: one row per chapter, each linking to its chapter
    rows = page.locator("table").first.locator("tbody tr")
    assert rows.count() == len(CHAPTERS)
    for i, chapter in enumerate(CHAPTERS):
        assert rows.nth(i).locator(f'a[href$="{chapter.split("/")[-1]}.html"]').count() == 1


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_dark_mode_keeps_figures_on_white(visit, chapter):
    v = visit(f"{chapter}.html", color_scheme="dark")
    page = v.page
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    SHOTS.mkdir(parents=True, exist_ok=True)
    name = Path(chapter).name
    page.screenshot(path=str(SHOTS / f"{name}-dark-top.png"))
    figures = page.locator(".cell_output img")
    assert figures.count() >= 1
    figures.first.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / f"{name}-dark-figure.png"))
    # The figure's own pixels are white at the corner, and the theme does not dim them.
    corners = page.evaluate("""() => [...document.querySelectorAll('.cell_output img')].map(img => {
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        return {px: [...ctx.getImageData(1, 1, 1, 1).data], filter: getComputedStyle(img).filter};
    })""")
    for c in corners:
        assert c["px"][:3] == [255, 255, 255] and c["px"][3] == 255, c
        assert c["filter"] in ("none", ""), c


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_key_figures_have_captions_and_alt_text(visit, chapter):
    v = visit(f"{chapter}.html")
    figures = v.page.locator("figure")
    assert figures.count() >= 2
    for i in range(figures.count()):
        fig = figures.nth(i)
        caption = fig.locator("figcaption").inner_text().strip()
        assert len(caption) > 20, f"figure {i} has no real caption"
        assert re.search(r"\S", fig.locator("img").first.get_attribute("alt") or ""), f"figure {i} has no alt text"


def test_site_weight_is_under_the_limit():
    total = sum(p.stat().st_size for p in SITE.rglob("*") if p.is_file()) / 2**20
    assert total < SITE_LIMIT_MB, f"the site weighs {total:.1f} MiB"
