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


def setup(app):
    app.connect("config-inited", _install_line)
    app.connect("html-page-context", _unique_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
