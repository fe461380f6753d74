"""Auto-checked exercises: ``check(name, my_fn)`` tells a learner at once whether an answer is right.

>>> from attn_course.exercises import check, list_exercises
>>> check("basics.masked_softmax", my_masked_softmax)  # doctest: +SKIP
✅ basics.masked_softmax: passed all ... tests.

Each chapter's exercises live in a module of this package named for the chapter's topic
(``basics``, ``sparse``, ``serving``, ...), never its number, so a chapter can move without
renaming them. Each holds a list ``EXERCISES`` whose ids start with the module's name;
modules are discovered, so adding a chapter touches nothing here.

Every exercise's cases and expected answers are computed here, when the package is
imported, before any learner code runs: reassigning a package function afterwards
(``attn_course.basics.masked_softmax = mine``) cannot move a target.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable

from ._core import DEFAULT_TIMEOUT, Case, Exercise, evaluate

__all__ = ["list_exercises", "solution", "check", "Exercise", "Case"]


def _discover() -> dict[str, Exercise]:
    registry: dict[str, Exercise] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for ex in module.EXERCISES:
            if not ex.name.startswith(info.name + ".") or ex.name in registry:
                raise RuntimeError(f"exercise {ex.name!r} in {info.name} must be unique and start "
                                   f"with {info.name + '.'!r}")
            registry[ex.name] = ex
    return registry


_REGISTRY: dict[str, Exercise] = _discover()
for _exercise in _REGISTRY.values():
    _exercise.prepare()
del _exercise


def list_exercises() -> list[str]:
    """The names of all auto-checked exercises, like ``"basics.masked_softmax"``, sorted.

    Each name is ``"<topic>.<name>"``, the topic being a module of this package.

    Example:
        >>> from attn_course.exercises import list_exercises
        >>> names = list_exercises()
        >>> "basics.masked_softmax" in names, names == sorted(names)
        (True, True)
        >>> topics = {name.split(".")[0] for name in names}   # one per exercise module
        >>> {"basics", "sparse", "flash"} <= topics
        True
    """
    return sorted(_REGISTRY)


def _get(name) -> Exercise:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str like 'basics.masked_softmax', got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        renamed = [known for known in _REGISTRY if known.split(".", 1)[1] == name.split(".", 1)[-1]]
        if re.fullmatch(r"ch\d\d\.\w+", name) and len(renamed) == 1:  # ids before topic names
            raise KeyError(f"unknown exercise name {name!r}: exercise ids are named by topic now, "
                           f"use {renamed[0]!r}") from None
        raise KeyError(f"unknown exercise name {name!r}; known exercises: "
                       f"{', '.join(list_exercises())}") from None


def solution(name: str) -> Callable:
    """The reference solution of exercise ``name``.

    Example:
        >>> import torch
        >>> from attn_course.exercises import solution
        >>> masked_softmax = solution("basics.masked_softmax")
        >>> masked_softmax(torch.zeros(1, 4), torch.tensor([[True, True, False, False]]))
        tensor([[0.5000, 0.5000, 0.0000, 0.0000]])
    """
    return _get(name).solution


def check(name: str, fn: Callable, *, strict: bool = False, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Check ``fn`` against exercise ``name``'s test cases and print feedback.

    Never raises because of the learner's code: an exception, a wrong type or
    shape, NaN, or running past ``timeout`` seconds is reported. Returns
    whether every case passed; with ``strict=True`` a failure raises
    ``AssertionError`` carrying the feedback (used to test the solutions).

    Example:
        A right answer, a wrong one (the mask ignored) and one not written yet:

        >>> import torch
        >>> from attn_course.exercises import check
        >>> def mine(scores, mask):
        ...     weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        ...     return weights.nan_to_num(0.0)
        >>> check("basics.masked_softmax", mine)
        ✅ basics.masked_softmax: passed all ... tests.
        True
        >>> check("basics.masked_softmax", lambda scores, mask: torch.softmax(scores, dim=-1))
        ❌ basics.masked_softmax: test ...: the result differs from the answer by up to ...
           Hint: masked keys got weight: the mask is ignored. ...
        False
        >>> def stub(scores, mask):
        ...     raise NotImplementedError
        >>> check("basics.masked_softmax", stub)
        ✏️ basics.masked_softmax: not answered yet. Replace `raise NotImplementedError` with your code. ...
        False
    """
    ex = _get(name)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    passed, feedback = evaluate(ex, fn, float(timeout))
    print(feedback)
    if strict and not passed:
        raise AssertionError(feedback)
    return passed
