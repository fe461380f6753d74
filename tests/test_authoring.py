import os

import nbformat
import pytest

from attn_course import authoring


def _nb(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), nbformat.v4.new_code_cell("import torch")]
    path = tmp_path / "01_x.ipynb"
    nbformat.write(nb, path)
    return path


def test_stamp_inserts_then_updates_the_install_cell(tmp_path):
    path = _nb(tmp_path)
    assert authoring.stamp(path, "https://github.com/a/b") is True
    nb = nbformat.read(path, as_version=4)
    cell = nb.cells[1]
    assert 'git+https://github.com/a/b"' in cell.source and 'if "google.colab" in sys.modules' in cell.source
    assert set(cell.metadata.tags) == {"colab-install", "remove-cell"}
    assert authoring.stamp(path, "https://github.com/a/b") is False
    assert authoring.stamp(path, "https://github.com/c/d") is True
    nb = nbformat.read(path, as_version=4)
    assert len(nb.cells) == 3 and "github.com/c/d" in nb.cells[1].source


def test_install_cell_is_valid_ipython(tmp_path):
    from IPython.core.inputtransformer2 import TransformerManager

    src = authoring.install_cell_source("https://github.com/a/b")
    python = TransformerManager().transform_cell(src)
    compile(python, "<cell>", "exec")
    assert '"attn-course @ git+https://github.com/a/b"' in src
    assert '[sys.executable, "-m", "pip", "install"' in src


def test_install_cell_explains_an_unreachable_repository(tmp_path, monkeypatch, capsys):
    """On 'Colab', with an address pip cannot reach: a message saying what to do, no traceback."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    src = authoring.install_cell_source(f"file://{tmp_path}/no-such-repository")
    with pytest.raises(SystemExit) as stop:
        exec(compile(src, "<cell>", "exec"), {})
    message = str(stop.value)
    assert "Could not install the course package" in message and "set COURSE" in message
    assert "no-such-repository" in message


def test_repository_url_and_chapters_come_from_the_config(tmp_path):
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://github.com/x/y/\n")
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nparts:\n- chapters:\n  - file: chapters/01_a\n  - file: book/setup\n")
    assert authoring.repository_url(tmp_path) == "https://github.com/x/y"
    assert authoring.chapter_notebooks(tmp_path) == [tmp_path / "chapters/01_a.ipynb"]
    (tmp_path / "_config.yml").write_text("title: t\n")
    with pytest.raises(ValueError, match="repository.url"):
        authoring.repository_url(tmp_path)


def test_two_install_cells_are_refused(tmp_path):
    path = _nb(tmp_path)
    nb = nbformat.read(path, as_version=4)
    for _ in range(2):
        nb.cells.append(nbformat.v4.new_code_cell("x", metadata={"tags": ["colab-install"]}))
    nbformat.write(nb, path)
    with pytest.raises(ValueError, match="more than one"):
        authoring.stamp(path, "https://github.com/a/b")


def test_command_line_stamps_and_executes_a_notebook(tmp_path, capsys, monkeypatch):
    path = _nb(tmp_path)
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source = "from attn_course.widgets import is_static\nprint(is_static())"
    nbformat.write(nb, path)
    monkeypatch.delenv("ATTN_COURSE_STATIC", raising=False)
    assert authoring.main(["stamp", str(path)]) == 0
    assert "stamped" in capsys.readouterr().out
    assert authoring.main(["execute", str(path)]) == 0
    assert "done in" in capsys.readouterr().out
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.tags == ["colab-install", "remove-cell"] and code[0].execution_count == 1
    assert code[1].outputs[0]["text"] == "True\n"   # executed for the book: static mode
    assert "execution" not in code[1].metadata      # no timestamps stored
    run = nb.metadata["attn_course"]                  # how long Run all took, and where (the course map shows it)
    import torch

    assert 0 < run["run_seconds"] < 600
    assert run["run_on"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                             else f"{len(os.sched_getaffinity(0))} CPU core" + ("s" if len(os.sched_getaffinity(0)) > 1 else ""))


def test_default_notebooks_are_the_toc_chapters():
    assert authoring.chapter_notebooks() == sorted(authoring.ROOT.glob("chapters/*.ipynb"))
