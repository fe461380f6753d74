"""Every public name of the package has a docstring (the API reference is generated from them),
and, module by module, a small example that the tests run, so that it cannot rot."""

import doctest
import importlib
import inspect
import os
import random
import re

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

MODULES = ["attn_course", "attn_course.basics", "attn_course.seq2seq", "attn_course.variants",
           "attn_course.multihead", "attn_course.positional", "attn_course.sparse", "attn_course.flash",
           "attn_course.kernels",
           "attn_course.serving", "attn_course.distributed", "attn_course.modern", "attn_course.transformer", "attn_course.interpret",
           "attn_course.exercises", "attn_course.report", "attn_course.widgets", "attn_course.plotting",
           "attn_course.data", "attn_course.train", "attn_course.bench"]

# The modules whose public functions and classes each carry a doctested ``Example:`` section
# (Google style, as napoleon reads it). Add a module here once its examples are written.
DOCTEST_MODULES = ["attn_course", "attn_course.basics", "attn_course.seq2seq", "attn_course.variants",
                   "attn_course.multihead", "attn_course.positional", "attn_course.sparse",
                   "attn_course.flash", "attn_course.kernels", "attn_course.serving",
                   "attn_course.distributed", "attn_course.transformer",
                   "attn_course.interpret", "attn_course.modern", "attn_course.exercises", "attn_course.report", "attn_course.widgets",
                   "attn_course.plotting", "attn_course.data", "attn_course.train", "attn_course.bench"]

# The modules of models and caches: every public class there states its equation (``.. math::``
# or ``:math:``) and the paper it comes from (an author and a year, e.g. "Kwon et al., 2023").
EQUATION_MODULES = ["attn_course.basics", "attn_course.seq2seq", "attn_course.variants",
                    "attn_course.multihead", "attn_course.positional", "attn_course.serving",
                    "attn_course.transformer", "attn_course.interpret", "attn_course.modern"]

# Public objects whose every checked example line (one with an expected output) is
# ``# doctest: +SKIP``, and why. Anything else must have at least one checked line that runs.
SKIPPED_EXAMPLES = {
    "attn_course.bench.matmul_peak_gflops": "times large matrix products for several seconds",
    "attn_course.bench.run_flash": "starts a Python process per method and length",
    "attn_course.bench.run_ring": "starts world_size processes per round",
    "attn_course.kernels.triton_flash_attention": (
        "runs Triton's kernel, which needs a CUDA GPU or TRITON_INTERPRET=1 set before Triton's first "
        "import, which a doctest inside pytest cannot guarantee"),
}

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _public_callables(name):
    module = importlib.import_module(name)
    return [(public, getattr(module, public)) for public in module.__all__ if callable(getattr(module, public))]


def _doctests(name) -> list[doctest.DocTest]:
    """The module's doctests, and those of public objects it re-exports from another module."""
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = finder.find(module)
    for public, obj in _public_callables(name):
        if getattr(obj, "__module__", name) != name:
            tests += finder.find(obj, f"{name}.{public}", module=False, globs={})
    return sorted(tests, key=lambda t: t.name)


@pytest.fixture
def isolated():
    """Examples seed generators, set threads, styles and environment variables: undo it all."""
    state = (random.getstate(), np.random.get_state(), torch.get_num_threads(), dict(os.environ))
    with torch.random.fork_rng(devices=[]), matplotlib.rc_context():
        yield
    plt.close("all")
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_num_threads(state[2])
    os.environ.clear()
    os.environ.update(state[3])


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_examples_in_docstrings_run(name, isolated):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    tests = _doctests(name)
    assert tests, f"{name} has no examples"
    for test in tests:
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} failing example(s) in {name}:\n" + "".join(report)


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_every_public_function_and_class_has_an_example(name):
    parser = doctest.DocTestParser()
    skip = doctest.OPTIONFLAGS_BY_NAME["SKIP"]
    missing, only_skipped, stale = [], [], []
    for public, obj in _public_callables(name):
        full = f"{name}.{public}"
        examples = parser.get_examples(inspect.getdoc(obj) or "")
        running = [e for e in examples if not e.options.get(skip, False) and (e.want.strip() or e.exc_msg)]
        if not examples:
            missing.append(public)
        elif not running and full not in SKIPPED_EXAMPLES:
            only_skipped.append(public)
        elif running and full in SKIPPED_EXAMPLES:
            stale.append(full)
    assert not missing, f"{name}: no '>>>' example in the docstring of {missing}"
    assert not only_skipped, (f"{name}: no example of {only_skipped} checks an output that runs; "
                              f"make one, or list it in SKIPPED_EXAMPLES with the reason")
    assert not stale, f"{stale} have running examples now: remove them from SKIPPED_EXAMPLES"


_CITATION = re.compile(r"[A-Z][\w\-]+(?:\s+et\s+al\.(?:'s)?|\s+and\s+[A-Z][\w\-]+)?,?\s+\(?(?:19|20)\d\d\b")


@pytest.mark.parametrize("name", EQUATION_MODULES)
def test_every_public_class_gives_its_equation_and_paper(name):
    no_equation, no_paper = [], []
    for public, obj in _public_callables(name):
        if not inspect.isclass(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        if ".. math::" not in doc and ":math:" not in doc:
            no_equation.append(public)
        if not _CITATION.search(doc):
            no_paper.append(public)
    assert not no_equation, f"{name}: no equation (.. math:: or :math:) in the docstring of {no_equation}"
    assert not no_paper, f"{name}: no paper (Author et al., year) in the docstring of {no_paper}"


def test_the_lists_of_modules_agree():
    assert set(DOCTEST_MODULES) <= set(MODULES)
    assert set(EQUATION_MODULES) <= set(DOCTEST_MODULES)
    assert {key.rsplit(".", 1)[0] for key in SKIPPED_EXAMPLES} <= set(DOCTEST_MODULES)


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
