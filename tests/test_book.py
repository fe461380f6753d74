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
    for page in ("book/intro", "book/setup", "book/notation", "book/troubleshooting", "book/glossary",
                 "book/next", "book/bibliography"):
        assert page in toc and (ROOT / f"{page}.md").exists()


def _course_ext():
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        return importlib.import_module("course_ext")
    finally:
        sys.path.pop(0)


def test_the_course_map_lists_every_chapter_in_order_and_answers_questions_in_real_sections():
    """The intro's map is generated from book/course_map.yml and the notebooks; this keeps the
    file in step with _toc.yml and every question pointing at a section that exists."""
    import yaml

    ext = _course_ext()
    data = yaml.safe_load((ROOT / "book" / "course_map.yml").read_text())
    stems = [nb.stem for nb in CHAPTERS]
    assert list(data["chapters"]) == stems, "book/course_map.yml must list the _toc.yml chapters in order"
    answered = set()
    for q in data["questions"]:
        assert q["chapter"] in stems, q
        facts = ext.chapter_facts(ROOT / "chapters" / f"{q['chapter']}.ipynb")
        assert q["section"] in facts["headings"], (q, facts["headings"])
        answered.add(q["chapter"])
    assert answered == set(stems), f"chapters answering no question: {set(stems) - answered}"
    text = ext.course_map_markdown(ROOT)
    for i, stem in enumerate(stems, 1):
        assert f"| {i} | {{doc}}`../chapters/{stem}`" in text
    assert "<!-- course-map -->" in (ROOT / "book" / "intro.md").read_text()
    for stem in stems:                       # every chapter's Run all time, as `authoring execute` recorded it
        facts = ext.chapter_facts(ROOT / "chapters" / f"{stem}.ipynb")
        assert facts["run_seconds"] and facts["run_on"], f"{stem}: no run time recorded (run `make notebooks`)"
        assert f"| {ext.run_time(facts['run_seconds'])} | {facts['exercises']} |" in text
    assert "*Run all* is the time the notebook took" in text


def test_the_pages_promise_the_run_times_the_notebooks_record():
    ext = _course_ext()
    seconds = [ext.chapter_facts(nb)["run_seconds"] for nb in CHAPTERS]

    def parse(words):                                # "20 seconds" or "2.5 minutes" -> seconds
        number, unit = words.split()
        return float(number) * (1 if unit.startswith("second") else 60)

    low, high = ext.run_range(ROOT).split(" to ")
    for said, true in ((parse(low), min(seconds)), (parse(high), max(seconds))):
        assert abs(said - true) <= (5 if true < 60 else 15), (said, true)   # rounded to 10 s or half a minute
    for page in ("intro.md", "setup.md", "troubleshooting.md"):      # no fixed promise that can go stale
        source = (ROOT / "book" / page).read_text()
        assert "{{ run_range }}" in source and "about a minute" not in source


def test_run_times_are_shown_to_the_nearest_half_minute():
    run_time = _course_ext().run_time
    assert [run_time(s) for s in (3, 44, 46, 80, 119, 150)] == \
        ["~0.5 min", "~0.5 min", "~1 min", "~1.5 min", "~2 min", "~2.5 min"]
    assert run_time(None) == "—"


def test_no_chapter_builds_on_a_later_one():
    ext = _course_ext()
    stems = [nb.stem for nb in CHAPTERS]
    for i, stem in enumerate(stems):
        later = [d for d in ext.chapter_facts(ROOT / "chapters" / f"{stem}.ipynb")["builds_on"]
                 if d in stems and stems.index(d) > i]
        assert not later, f"{stem}'s prerequisites link to later chapters {later}"


def test_api_pages_say_where_each_name_is_used():
    uses = _course_ext().used_in(ROOT)
    assert "01_attention_basics" in uses["attn_course.basics.masked_softmax"] or \
        "01_attention_basics" in uses.get("attn_course.basics.scaled_dot_product_attention", [])
    assert all(stem[:2].isdigit() for stems in uses.values() for stem in stems)


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


def _stubs_and_strict(nb):
    code = _sources(nb, "code")
    stubs = {m for src in code if "raise NotImplementedError" in src
             for m in re.findall(r'check\("([\w.]+)", \w+\)', src)}
    strict = {m for src in code for m in re.findall(r'check\("([\w.]+)", \w+, strict=True\)', src)}
    return stubs, strict


def test_auto_checked_exercises_stub_then_strict_solution(chapter):
    path, nb = chapter
    stubs, strict = _stubs_and_strict(nb)
    assert len(stubs) >= 4, f"{path.name}: at least four auto-checked exercises"
    assert stubs == strict, (stubs, strict)
    assert stubs <= set(list_exercises()), stubs - set(list_exercises())
    # the stubs' stored output says "not answered yet" and the solutions' says passed
    outputs = {c.source: "".join(o.get("text", "") for o in c.outputs) for c in nb.cells if c.cell_type == "code"}
    for src, out in outputs.items():
        if "strict=True" in src:
            assert "✅" in out
        elif "raise NotImplementedError" in src and "check(" in src:
            assert "not answered yet" in out


def test_quick_checks_for_readers_without_a_kernel(chapter):
    """Each chapter asks a few conceptual questions whose answers fold out on the static page."""
    path, nb = chapter
    md = "\n".join(_sources(nb, "markdown"))
    checks = re.findall(r"```\{admonition\} ([^\n]+)\n:class: dropdown quick-check\n\n(.+?)\n```", md, flags=re.S)
    assert len(checks) >= 3, f"{path.name}: {len(checks)} quick checks"
    assert all(q.strip().endswith("?") and len(a.split()) >= 8 for q, a in checks)
    # a backtick in a fence's info string ends the fence in CommonMark: the admonition would not render
    assert not [q for q, _ in checks if "`" in q], [q for q, _ in checks if "`" in q]
    assert md.index("## Check yourself") < md.index("## Summary")


def test_every_registered_exercise_is_asked_in_exactly_one_chapter():
    """Exercise ids are named by topic, not by chapter: this ties each to the one chapter that asks it."""
    asked = {}
    for path in CHAPTERS:
        for name in _stubs_and_strict(nbformat.read(path, as_version=4))[0]:
            asked.setdefault(name, []).append(path.stem)
    assert sorted(asked) == list_exercises(), set(list_exercises()) ^ set(asked)
    assert all(len(stems) == 1 for stems in asked.values()), {n: s for n, s in asked.items() if len(s) > 1}


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


# Uses of a symbol that book/notation.md retires ("Retired uses"), where a pattern can see them.
RETIRED = [
    (r"2D\s*\+\s*1|\$D\s*=\s*\d", "the window is $w$ ($2w+1$ keys), not Luong's $D$"),
    (r"window[^.$]{0,40}\$[KW](\s*=\s*\d+)?\$|\$[KW](\s*=\s*\d+)?\$[^.$]{0,25}window|"
     r"\$K\s*=\s*\d+\$ on each side", "the window is $w$ ($K$ is the keys, $W$ the world size)"),
    (r"length[s]?\s+(of\s+)?\$[NTn](\s*=\s*\d+)?\$|\$N\$ positions|first \$N\$|\$S\s*=\s*T\b",
     "a length is $L$ (or $L_\\text{train}$, $L_q$, $L_k$)"),
    (r"\$K\s*=\s*\d+\s*>|clip[^.$]{0,30}\$K|\$K\$[^.$]{0,30}clip", "the clipping distance is $\\kappa$"),
    (r"(SRAM|on-chip)[^.$]{0,40}\$M\$|\$M\s*=\s*\d", "on-chip memory is $M_\\text{sram}$ ($M$ is the mask)"),
    (r"\$r\s*=\s*(\\tfrac|\d*\.\d|\\frac)|restricted to \$r\$|residual weight \$r\$",
     "a residual weight is $\\lambda$, a neighbourhood $w$ ($r$ is a rank)"),
    (r"\$L\$ layers|layer \$L\$|\$L\s*=\s*\d+\$ layers", "a number of layers is $n_\\text{layers}$"),
]


def test_chapters_keep_to_the_notation_page(chapter):
    path, nb = chapter
    text = "\n".join(_sources(nb, "markdown"))
    found = [(m.group(0), why) for pattern, why in RETIRED for m in re.finditer(pattern, text)]
    assert not found, f"{path.name} uses symbols book/notation.md retires: {found}"


def test_the_notation_check_sees_retired_uses():
    bad = ["a window of $2D + 1$ positions", "with a window of $K = 4$ on each side",
           "trained on sequences of length $N = 16$", "with $K = 10 > 8$ the model",
           "the on-chip memory $M$", "with $r = \\tfrac12$", "a window of $W$ tokens", "$S = T = 24$"]
    for text in bad:
        assert any(re.search(p, text) for p, _ in RETIRED), text
    good = ["a window of $w = 4$", "$L_\\text{train} = 16$", "$M_\\text{sram}$ bytes of SRAM",
            "rank $r$ holds", "$W = 4$ processes", "the mask $M$", "$K = XW_K$"]
    for text in good:
        assert not any(re.search(p, text) for p, _ in RETIRED), text


def test_every_glossary_term_is_linked_from_a_chapter():
    """The glossary is reached from the text: each term is a {term} link where a chapter first uses it."""
    glossary = (ROOT / "book" / "glossary.md").read_text().split("```{glossary}")[1]
    terms = re.findall(r"^([A-Z][^\n]*?)\n  \S", glossary, flags=re.M)
    assert len(terms) >= 30
    linked = set()
    for path in CHAPTERS:
        md = "\n".join(_sources(nbformat.read(path, as_version=4), "markdown"))
        linked |= {t.lower() for t in re.findall(r"\{term\}`[^`<]*<([^>]+)>`", md)}
        linked |= {t.lower() for t in re.findall(r"\{term\}`([^`<]+)`", md)}
    assert {t.lower() for t in terms} <= linked, {t for t in terms if t.lower() not in linked}
