"""Sphinx glue for the course book.

The intro's course map (chapters, what each builds on, reading time, exercises, and the
questions learners bring with the section that answers each) is generated at build time from
``book/course_map.yml`` and the chapter notebooks themselves, so it cannot go stale when a
chapter moves or grows: see :func:`course_map_markdown`.

Jupyter Book 1.x's extensions register some inline scripts twice (sphinx-thebe's
``const THEBE_JS_URL = ...``, sphinx-togglebutton's selector). The second copy of a
``const`` declaration is a JavaScript error on every page, so each page keeps only
the first copy of every identical script.
"""


def _unique_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        # the same file or inline body, whatever priority each copy was registered with
        key = (str(getattr(js, "filename", js) or ""),  # inline scripts: None or ""
               tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def _install_line(app, config):
    """``{{ pip_install }}`` in the book: the pip command with the repository's address from
    ``_config.yml`` (``repository.url``, which Jupyter Book passes on as the theme's
    ``repository_url``), as a code block a reader can copy without editing."""
    url = (config.html_theme_options or {}).get("repository_url", "").rstrip("/")
    if not url:
        raise ValueError("_config.yml must set repository.url (the setup page's install line uses it)")
    subs = dict(config.myst_substitutions or {})
    subs["pip_install"] = f'```bash\npip install "attn-course @ git+{url}"\n```'
    config.myst_substitutions = subs


WORDS_PER_MINUTE = 200    # reading prose and code together
MAP_MARKER = "<!-- course-map -->"


def _yaml(path):
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def chapter_facts(path):
    """Title, the chapters a notebook's **Prerequisites.** paragraph links to, its headings, word
    count and number of exercises, read from the notebook itself."""
    import re

    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    first = nb.cells[0].source
    title = next(line[2:].strip() for line in first.splitlines() if line.startswith("# "))
    prerequisites = re.search(r"\*\*Prerequisites\.\*\*(.*?)(\n\n|$)", first, flags=re.S)
    links = re.findall(r"\{doc\}`(\d\d_[a-z0-9_]+)`", prerequisites.group(1) if prerequisites else "")
    builds_on = sorted(set(links) - {path.stem})
    headings, words, exercises = [], 0, 0
    for cell in nb.cells:
        words += len(re.findall(r"\w+", cell.source))
        if cell.cell_type == "markdown":
            headings += [h.strip() for h in re.findall(r"^#+ (.+)$", cell.source, flags=re.M)]
            exercises += len(re.findall(r"^```\{exercise\}", cell.source, flags=re.M))
    run = nb.metadata.get("attn_course", {})        # recorded by `python -m attn_course.authoring execute`
    return {"title": title, "builds_on": builds_on, "headings": headings,
            "minutes": max(5, 5 * round(words / WORDS_PER_MINUTE / 5)), "exercises": exercises,
            "run_seconds": run.get("run_seconds"), "run_on": run.get("run_on")}


def _minutes(seconds):
    """``"1.5"``: seconds in minutes, to the nearest half minute (at least half a minute)."""
    half_minutes = max(1, round(seconds / 30))
    return f"{half_minutes // 2}{'.5' if half_minutes % 2 else ''}"


def run_time(seconds):
    """``"~1.5 min"``: a run time to the nearest half minute (at least half a minute)."""
    return "—" if seconds is None else f"~{_minutes(seconds)} min"


def course_map_markdown(root):
    """The intro's course map as MyST Markdown, from ``book/course_map.yml`` and the notebooks."""
    from pathlib import Path

    root = Path(root)
    data = _yaml(root / "book" / "course_map.yml")
    toc = _yaml(root / "_toc.yml")
    order = [f["file"].split("/")[-1] for part in toc["parts"] for f in part.get("chapters", [])
             if f["file"].startswith("chapters/")]
    number = {stem: i + 1 for i, stem in enumerate(order)}
    facts = {stem: chapter_facts(root / "chapters" / f"{stem}.ipynb") for stem in order}
    lines = ["| | chapter | builds on | reading | run all | exercises |", "| --- | --- | --- | --- | --- | --- |"]
    for stem in order:
        f = facts[stem]
        deps = ", ".join(str(number[d]) for d in f["builds_on"] if d in number) or "—"
        lines.append(f"| {number[stem]} | {{doc}}`../chapters/{stem}`: {data['chapters'][stem]} | {deps} "
                     f"| ~{f['minutes']} min | {run_time(f['run_seconds'])} | {f['exercises']} |")
    machines = sorted({f["run_on"] for f in facts.values() if f["run_on"]})
    if machines:
        lines += ["", f"*Run all* is the time the notebook took, start to end in a fresh kernel, when the "
                      f"outputs on these pages were made, on {' and '.join(machines)}."]
    lines += ["", "**The questions learners bring**, and where each is answered with an experiment:", "",
              "| question | answered in |", "| --- | --- |"]
    for q in sorted(data["questions"], key=lambda q: number[q["chapter"]]):   # in book order
        lines.append(f"| {q['question']} | {number[q['chapter']]}, {{doc}}`../chapters/{q['chapter']}`: "
                     f"*{q['section']}* |")
    return "\n".join(lines) + "\n"


def _course_map(app, docname, source):
    if MAP_MARKER in source[0]:
        from pathlib import Path

        source[0] = source[0].replace(MAP_MARKER, course_map_markdown(Path(app.srcdir)))


def used_in(root):
    """``{"attn_course.flash.flash_attention": ["08_exact_attention_in_tiles", ...], ...}``: the
    chapters whose code cells use each public name of the package, read from the notebooks'
    imports (``from attn_course.m import f``) and attribute uses of imported modules (``m.f``)."""
    import ast
    from pathlib import Path

    import nbformat

    root = Path(root)
    found: dict[str, set] = {}
    for path in sorted((root / "chapters").glob("[0-9][0-9]_*.ipynb")):
        modules = {}
        for cell in nbformat.read(str(path), as_version=4).cells:
            if cell.cell_type != "code":
                continue
            source = "\n".join(line for line in cell.source.splitlines()
                               if not line.lstrip().startswith(("%", "!")))
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attn_course"):
                    for alias in node.names:
                        full = f"{node.module}.{alias.name}"
                        found.setdefault(full, set()).add(path.stem)
                        if node.module == "attn_course":
                            modules[alias.asname or alias.name] = full
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in modules):
                    found.setdefault(f"{modules[node.value.id]}.{node.attr}", set()).add(path.stem)
    return {name: sorted(stems) for name, stems in found.items()}


def _used_in_lines(app, what, name, obj, options, lines):
    if what not in ("function", "class") or name.count(".") != 2:
        return
    uses = getattr(app.env, "_course_used_in", None)
    if uses is None:
        from pathlib import Path

        uses = app.env._course_used_in = used_in(Path(app.srcdir))
    if name in uses:
        links = ", ".join(f":doc:`/chapters/{stem}`" for stem in uses[name])
        lines.extend(["", f"**Used in:** {links}"])


def run_range(root):
    """``"20 seconds to 2.5 minutes"``: the shortest and longest *Run all* time of the chapters, as
    recorded in their notebooks, for the pages that promise how long a chapter takes."""
    from pathlib import Path

    seconds = [f["run_seconds"] for f in (chapter_facts(p) for p in sorted(Path(root, "chapters").glob(
        "[0-9][0-9]_*.ipynb"))) if f["run_seconds"]]
    if not seconds:
        raise ValueError("no chapter notebook records its run time: run `make notebooks`")

    def words(s):
        if s < 60:
            return f"{max(10, 10 * round(s / 10))} seconds"
        return f"{_minutes(s)} minute{'s' if _minutes(s) != '1' else ''}"

    return f"{words(min(seconds))} to {words(max(seconds))}"


def _run_range(app, config):
    """``{{ run_range }}`` in the book: how long the chapters take, from their notebooks."""
    subs = dict(config.myst_substitutions or {})
    subs["run_range"] = run_range(app.srcdir)
    config.myst_substitutions = subs


def setup(app):
    app.connect("autodoc-process-docstring", _used_in_lines)
    app.connect("config-inited", _install_line)
    app.connect("config-inited", _run_range)
    app.connect("source-read", _course_map)
    app.connect("html-page-context", _unique_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
