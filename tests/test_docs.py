"""Every public name of the package has a docstring (the API reference is generated from them)."""

import importlib
import inspect

import pytest

MODULES = ["attn_course", "attn_course.basics", "attn_course.seq2seq", "attn_course.variants",
           "attn_course.multihead", "attn_course.positional", "attn_course.sparse", "attn_course.flash",
           "attn_course.distributed", "attn_course.modern", "attn_course.transformer", "attn_course.interpret",
           "attn_course.exercises", "attn_course.report", "attn_course.widgets", "attn_course.plotting",
           "attn_course.data", "attn_course.train", "attn_course.bench"]


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_has_a_docstring(name):
    module = importlib.import_module(name)
    assert (module.__doc__ or "").strip(), f"{name} has no module docstring"
    assert hasattr(module, "__all__"), f"{name} must list its public names in __all__"
    missing = []
    for public in module.__all__:
        obj = getattr(module, public)
        if not callable(obj):
            continue
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(public)
        if inspect.isclass(obj):
            missing += [f"{public}.{m}" for m, f in vars(obj).items()
                        if not m.startswith("_") and callable(f) and not (inspect.getdoc(f) or "").strip()]
    assert not missing, f"{name}: no docstring for {missing}"


def test_every_module_has_a_page_in_the_api_reference():
    from pathlib import Path

    pages = Path(__file__).resolve().parents[1] / "book" / "api"
    documented = {line.split("automodule:: ")[1].strip() for page in pages.glob("*.md")
                  for line in page.read_text().splitlines() if "automodule:: " in line}
    assert documented == set(MODULES)
