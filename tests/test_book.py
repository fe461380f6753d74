"""The course's structure: config, table of contents, and what every chapter notebook must hold."""

import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from attn_course import authoring
from attn_course.exercises import list_exercises

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
CHAPTERS = authoring.chapter_notebooks(ROOT)
URL = authoring.repository_url(ROOT)


def test_config_renders_stored_outputs_offline_with_colab_buttons():
    assert CONFIG["execute"]["execute_notebooks"] == "off"
    assert CONFIG["only_build_toc_files"] is True
    assert "sphinx_exercise" in CONFIG["sphinx"]["extra_extensions"]
    assert CONFIG["bibtex_bibfiles"] == ["book/references.bib"]
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    mathjax = CONFIG["sphinx"]["config"]["mathjax_path"]
    assert not mathjax.startswith(("http:", "https:", "//")), "MathJax must be served by the site"
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", URL)


def test_the_repository_url_lives_in_one_place():
    """Only _config.yml spells the address; notebooks carry it in their stamped install cell."""
    skip = {".git", ".venv", "_build", "node_modules", ".pytest_cache", ".hypothesis", ".ruff_cache"}
    spelled = []
    for path in ROOT.rglob("*"):
        if path.is_dir() or skip & set(path.relative_to(ROOT).parts) or path.suffix in {".png", ".pyc"}:
            continue
        if "egg-info" in str(path):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if URL in text and path.suffix != ".ipynb":
            spelled.append(str(path.relative_to(ROOT)))
    assert spelled == ["_config.yml"]


def test_toc_lists_existing_chapters_only_and_every_chapter_notebook():
    assert CHAPTERS, "no chapter in _toc.yml"
    for nb in CHAPTERS:
        assert nb.exists(), f"{nb} is listed in _toc.yml but does not exist"
    on_disk = sorted((ROOT / "chapters").glob("*.ipynb"))
    assert sorted(CHAPTERS) == on_disk, "every notebook in chapters/ must be in _toc.yml"
    names = [nb.name for nb in CHAPTERS]
    assert names == sorted(names) and all(re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", n) for n in names)


def test_front_matter_pages_exist():
    toc = (ROOT / "_toc.yml").read_text()
    for page in ("book/intro", "book/setup", "book/notation", "book/bibliography"):
        assert page in toc and (ROOT / f"{page}.md").exists()


@pytest.fixture(params=CHAPTERS, ids=lambda p: p.stem)
def chapter(request):
    return request.param, nbformat.read(request.param, as_version=4)


def _sources(nb, kind):
    return [c.source for c in nb.cells if c.cell_type == kind]


def test_install_cell_is_current_hidden_and_first(chapter):
    path, nb = chapter
    cells = [c for c in nb.cells if authoring.INSTALL_TAG in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: run `make stamp`"
    cell = cells[0]
    assert cell.source == authoring.install_cell_source(URL), f"{path.name}: stale install cell, run `make stamp`"
    assert "remove-cell" in cell.metadata["tags"]
    assert nb.cells.index(cell) == next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")


def test_notebook_was_executed_top_to_bottom_without_errors(chapter):
    path, nb = chapter
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    counts = [c.execution_count for c in code if authoring.INSTALL_TAG not in c.metadata.get("tags", [])]
    assert counts == list(range(counts[0], counts[0] + len(counts))), f"{path.name}: run `make notebooks`"
    for c in code:
        assert not [o for o in c.outputs if o.output_type == "error"], f"{path.name}: a cell raised"
        for o in c.outputs:
            assert "application/vnd.jupyter.widget-view+json" not in o.get("data", {}), \
                f"{path.name}: a live widget is stored; execute with ATTN_COURSE_STATIC=1 (make notebooks)"
    assert nb.metadata.kernelspec.name == "python3"


def test_chapter_layout_setup_sections_summary_exercises(chapter):
    path, nb = chapter
    md = "\n".join(_sources(nb, "markdown"))
    code = "\n".join(_sources(nb, "code"))
    assert re.match(r"# \S", _sources(nb, "markdown")[0]), "a title first"
    assert "Learning objectives" in md and "Prerequisites" in md
    assert "device = get_device()" in code and "seed_everything(0)" in code
    for heading in ("## Summary", "## Exercises", "## Solutions"):
        assert heading in md, f"{path.name}: missing {heading}"
    assert "{cite}" in md
    assert "explore(" in code, "an interactive figure"


def test_at_least_six_exercises_each_with_a_folded_solution(chapter):
    path, nb = chapter
    md = "\n".join(_sources(nb, "markdown"))
    labels = re.findall(r"```\{exercise\}[^\n]*\n:label: (\S+)", md)
    assert len(labels) >= 6, f"{path.name}: {len(labels)} exercises"
    solutions = re.findall(r"```\{solution-start\} (\S+)\n:class: dropdown", md)
    assert sorted(solutions) == sorted(labels), "each exercise needs one folded (dropdown) solution"
    assert md.count("{solution-end}") == len(solutions)
    assert md.index("## Solutions") > md.index("## Exercises")
    first_solution = md.index("{solution-start}")
    assert first_solution > md.index("## Solutions"), "solutions come after all the exercises"


def test_auto_checked_exercises_stub_then_strict_solution(chapter):
    path, nb = chapter
    chapter_id = "ch" + path.name[:2]
    code = _sources(nb, "code")
    registered = {n for n in list_exercises() if n.startswith(chapter_id + ".")}
    stubs = {m for src in code if "raise NotImplementedError" in src
             for m in re.findall(r'check\("([\w.]+)", \w+\)', src)}
    strict = {m for src in code for m in re.findall(r'check\("([\w.]+)", \w+, strict=True\)', src)}
    assert len(stubs) >= 3, f"{path.name}: at least three auto-checked exercises"
    assert stubs == strict == registered, (stubs, strict, registered)
    # the stubs' stored output says "not answered yet" and the solutions' says passed
    outputs = {c.source: "".join(o.get("text", "") for o in c.outputs) for c in nb.cells if c.cell_type == "code"}
    for src, out in outputs.items():
        if "strict=True" in src:
            assert "✅" in out
        elif "raise NotImplementedError" in src and "check(" in src:
            assert "not answered yet" in out


def test_key_figures_have_captions_and_alt_text(chapter):
    path, nb = chapter
    figures = [c.metadata["mystnb"]["figure"] for c in nb.cells
               if c.cell_type == "code" and "figure" in c.metadata.get("mystnb", {})]
    assert len(figures) >= 2
    assert all(f.get("caption") and f.get("name") for f in figures)


def test_notebook_json_is_clean(chapter):
    path, _ = chapter
    raw = json.loads(path.read_text())
    assert "widgets" not in raw["metadata"]
    assert "0x7f" not in path.read_text(), "memory addresses in outputs"


GLUE_REF = re.compile(r"\{glue(?::text|:md|)?\}`([\w.-]+)(?::[^`]*)?`")


def _glued_keys(nb):
    """The names a notebook's stored outputs glue (myst-nb's scrapbook records)."""
    return {o.metadata["scrapbook"]["name"] for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "scrapbook" in o.get("metadata", {})}


def test_results_in_prose_are_glued_from_the_outputs(chapter):
    # COURSE_GUIDE / issue 13: every chapter states its findings through glue, at least three of them,
    # and every reference in the prose resolves to a value its own stored outputs hold
    path, nb = chapter
    md = "\n".join(_sources(nb, "markdown"))
    referenced = set(GLUE_REF.findall(md))
    glued = _glued_keys(nb)
    assert len(referenced) >= 3, f"{path.name}: {len(referenced)} glued results in the prose"
    assert referenced <= glued, f"{path.name}: referenced but never glued: {sorted(referenced - glued)}"


def test_glue_references_are_read_by_the_pattern():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        "a {glue:text}`speedup:.2f` and {glue}`table` and {glue:text}`plain`")])
    assert set(GLUE_REF.findall(nb.cells[0].source)) == {"speedup", "table", "plain"}
