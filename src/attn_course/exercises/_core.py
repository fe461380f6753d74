"""The exercise checker's machinery: run learner code safely, compare, explain.

Learner code runs in a worker thread with a time limit; whatever it does
(raise, return None or garbage, produce NaN, loop forever) becomes feedback,
never an exception or a hang of the checker itself.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_TIMEOUT = 10.0


@dataclass
class Case:
    """One test input: positional and keyword arguments and a line describing it."""

    description: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass
class Exercise:
    """An auto-checked exercise.

    ``expected`` computes the right answer with the tested package code;
    ``solution`` is the from-scratch reference solution a learner may ask for;
    ``hint(case, got, expected)`` explains a wrong value (or returns None).
    """

    name: str
    signature: str
    cases: Callable[[], list[Case]]
    expected: Callable
    solution: Callable
    hint: Callable | None = None
    atol: float = 1e-5
    rtol: float = 1e-4


class CheckTimeout(BaseException):
    """Raised inside a learner's function that ran past the time limit."""


def call_with_timeout(fn: Callable, args: tuple, kwargs: dict, timeout: float):
    """Run ``fn`` in a worker thread; return ``("ok", value)``, ``("raised", exc)`` or ``("timeout", None)``."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - learner code may raise anything
            box["error"] = exc

    worker = threading.Thread(target=target, name="attn-course-check", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        # Interrupt pure-Python loops; a thread blocked in C is left to finish on its own.
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident),
                                                   ctypes.py_object(CheckTimeout))
        worker.join(0.5)
        return "timeout", None
    if "error" in box:
        return "raised", box["error"]
    return "ok", box.get("value")


def clone_tree(x):
    """Deep copy of the tensors in nested tuples/lists/dicts (learner code may modify inputs)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        return tuple(clone_tree(v) for v in x)
    if isinstance(x, list):
        return [clone_tree(v) for v in x]
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    return x


def same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(
            torch.nan_to_num(a), torch.nan_to_num(b))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    return True


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, np.ndarray):
        return f"a NumPy array of shape {x.shape}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)} items"
    return f"a {type(x).__name__}"


def compare(got, expected, what: str, atol: float, rtol: float) -> str | None:
    """Explain how ``got`` differs from ``expected`` (None if it matches)."""
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return _compare_number(got, expected, what, atol, rtol)
    if isinstance(expected, tuple):
        if got is None:
            return (f"{what} is None: did you forget the `return`? Expected a tuple of "
                    f"{len(expected)} tensors.")
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{what} should be a tuple of {len(expected)} tensors, got {describe(got)}."
        for i, (g, e) in enumerate(zip(got, expected)):
            problem = compare(g, e, f"item {i} of {what}", atol, rtol)
            if problem:
                return problem
        return None
    if got is None:
        return f"{what} is None: did you forget the `return`?"
    if isinstance(got, np.ndarray):
        return f"{what} is a NumPy array; return a torch.Tensor (torch.as_tensor(...) converts)."
    if not isinstance(got, torch.Tensor):
        return f"{what} should be a torch.Tensor, got {describe(got)}."
    if got.shape != expected.shape:
        msg = f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}."
        if got.ndim >= 2 and got.shape[:-2] + got.shape[-2:][::-1] == expected.shape:
            msg += " The last two axes look swapped: check which axis is queries and which is keys."
        return msg
    if expected.dtype == torch.bool or not (expected.is_floating_point() or expected.is_complex()):
        exact = "bool" if expected.dtype == torch.bool else "integer"
        if (got.dtype == torch.bool) != (expected.dtype == torch.bool) or got.is_floating_point():
            article = "a" if exact == "bool" else "an"
            return f"{what} has dtype {got.dtype}; return {article} {exact} tensor like {expected.dtype}."
        wrong = (got.cpu() != expected.cpu())
        if wrong.any():
            idx = tuple(int(i) for i in wrong.nonzero()[0])
            return (f"{what} is wrong in {int(wrong.sum())} of {wrong.numel()} entries (first at index "
                    f"{idx}: got {got[idx].item()}, expected {expected[idx].item()}).")
        return None
    if not got.is_floating_point():
        return f"{what} has dtype {got.dtype}; expected floating point like the inputs."
    got = got.detach().to("cpu", torch.float64)
    exp = expected.detach().to("cpu", torch.float64)
    bad = torch.isnan(got) & ~torch.isnan(exp)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        return (f"{what} contains NaN (first at index {where}) where the answer is a number. "
                f"NaN comes from 0/0 or inf - inf: look at rows whose scores are all masked, "
                f"or at exp() of large numbers.")
    if (torch.isinf(got) & ~torch.isinf(exp)).any():
        return f"{what} contains inf where the answer is finite: did exp() overflow?"
    if not torch.allclose(got, exp, atol=atol, rtol=rtol, equal_nan=True):
        err = (got - exp).abs().nan_to_num(0.0)
        idx = tuple(int(i) for i in (err == err.max()).nonzero()[0])
        return (f"{what} differs from the answer by up to {err.max().item():.3g} "
                f"(at index {idx}: got {got[idx].item():.4g}, expected {exp[idx].item():.4g}).")
    return None


def _compare_number(got, expected, what, atol, rtol) -> str | None:
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, np.generic):
        got = got.item()
    if got is None:
        return f"{what} is None: did you forget the `return`?"
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return f"{what} should be a number, got {describe(got)}."
    if math.isnan(got):
        return f"{what} is NaN."
    if math.isclose(got, expected, rel_tol=rtol, abs_tol=atol):
        return None
    if got and expected and max(got / expected, expected / got) < 100:
        return f"{what} is {got:,} but should be {expected / got:.3g} times that."
    return f"{what} is {got:,}, which is not the answer."


def evaluate(ex: Exercise, fn, timeout: float) -> tuple[bool, str]:
    """Run all of ``ex``'s cases on ``fn``; return (passed, feedback)."""
    head = f"{ex.name}"
    if not callable(fn):
        return False, (f"❌ {head}: check needs your function itself, got {describe(fn)}. "
                       f"Pass the function's name without calling it. Expected: {ex.signature}")
    cases = ex.cases()
    for i, case in enumerate(cases, 1):
        where = f"test {i} of {len(cases)} ({case.description})"
        args, kwargs = clone_tree(case.args), clone_tree(case.kwargs)
        status, value = call_with_timeout(fn, args, kwargs, timeout)
        if status == "timeout":
            return False, (f"❌ {head}: {where} did not finish within {timeout:g} s. "
                           f"Look for a loop that never ends.")
        if status == "raised":
            if isinstance(value, NotImplementedError):
                return False, (f"✏️ {head}: not answered yet. Replace `raise NotImplementedError` "
                               f"with your code. Expected: {ex.signature}")
            return False, (f"❌ {head}: {where}: your function raised "
                           f"{type(value).__name__}: {value}\n   Expected: {ex.signature}")
        if not same_tree(args, case.args) or not same_tree(kwargs, case.kwargs):
            return False, (f"❌ {head}: {where}: your function changed its inputs in place. "
                           f"Work on new tensors (e.g. masked_fill, not masked_fill_).")
        expected = ex.expected(*clone_tree(case.args), **clone_tree(case.kwargs))
        problem = compare(value, expected, "the result", ex.atol, ex.rtol)
        if problem:
            hint = None
            if ex.hint is not None:
                try:
                    hint = ex.hint(case, value, expected)
                except Exception:  # noqa: BLE001 - a hint must never crash the checker
                    hint = None
            return False, f"❌ {head}: {where}: {problem}" + (f"\n   Hint: {hint}" if hint else "")
    return True, f"✅ {head}: passed all {len(cases)} tests."
