"""Sphinx glue for the course book.

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


def setup(app):
    app.connect("html-page-context", _unique_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
