"""The exercise checker's machinery: run learner code safely, compare, explain.

Learner code runs in a worker thread with a time limit; whatever it does (raise,
return None or garbage, produce NaN, print a lot, sleep, loop forever) becomes
feedback, never an exception or a hang of the checker itself.

Two rules keep the checker from being fooled:

* the expected answers are computed once, from the cases, when the exercise
  modules are imported (:meth:`Exercise.prepare`), with package functions the
  modules bound at import time; a learner who later reassigns
  ``attn_course.basics.masked_softmax`` moves no target;
* whatever the learner's function returns is turned, inside the worker thread,
  into plain data (tensors, numbers, tuples and lists of them, or a short
  description of anything else), so that comparing it can neither raise nor hang.
"""

from __future__ import annotations

import ctypes
import math
import numbers
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_TIMEOUT = 10.0
OUTPUT_LIMIT = 2000          # characters of a learner's printed output shown per check
_MAX_ITEMS = 64              # longer lists and tuples are described, not compared


@dataclass
class Case:
    """One test input: positional and keyword arguments and a line describing it."""

    description: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass
class Exercise:
    """An auto-checked exercise.

    ``expected`` computes the right answer with the tested package code (bound at
    import time); ``solution`` is the from-scratch reference solution a learner may
    ask for; ``hint(case, got, expected)`` explains a wrong value (or returns None);
    ``verify(case, fn, got)``, run once a case's value is right, checks what a value
    cannot show (gradients, memory) and returns a problem or None;
    ``raise_hint(case, message)`` explains an exception the learner's code raised.
    """

    name: str
    signature: str
    cases: Callable[[], list[Case]]
    expected: Callable
    solution: Callable
    hint: Callable | None = None
    atol: float = 1e-5
    rtol: float = 1e-4
    verify: Callable | None = None
    raise_hint: Callable | None = None
    _prepared: list | None = field(default=None, init=False, repr=False, compare=False)
    _error: BaseException | None = field(default=None, init=False, repr=False, compare=False)

    def prepare(self) -> None:
        """Build the cases and compute every expected answer now, before any learner code runs."""
        if self._prepared is not None or self._error is not None:
            return
        try:
            prepared = []
            with torch.random.fork_rng(devices=[]):   # importing must not move the global RNG
                for case in self.cases():
                    expected = self.expected(*clone_tree(case.args), **clone_tree(case.kwargs))
                    prepared.append((case, clone_tree(expected)))
            self._prepared = prepared
        except Exception as exc:  # noqa: BLE001 - a broken reference is reported when checked
            self._error = exc

    def prepared(self) -> list[tuple[Case, object]]:
        """The cases with their expected answers; raises if the reference could not compute them."""
        self.prepare()
        if self._error is not None:
            raise RuntimeError(f"the reference answers of {self.name} could not be computed "
                               f"(a bug in the course, not in your code): {self._error!r}")
        return self._prepared


class CheckTimeout(BaseException):
    """Raised inside a learner's function that ran past the time limit."""


# --- running learner code ---------------------------------------------------------------------

class _ThreadOutput:
    """Stands in for ``sys.stdout``: keeps (the start of) what one thread prints, passes the rest on."""

    def __init__(self, original, thread_ids: set, limit: int):
        self._original, self._ids, self._limit = original, thread_ids, limit
        self.kept: list[str] = []
        self.size = 0          # characters printed
        self.stored = 0        # characters kept

    def write(self, s):
        if threading.get_ident() not in self._ids:
            return self._original.write(s)
        s = s if isinstance(s, str) else str(s)
        self.size += len(s)
        room = self._limit - self.stored
        if room > 0:
            self.kept.append(s[:room])
            self.stored += min(room, len(s))
        return len(s)

    def flush(self):
        if threading.get_ident() not in self._ids:
            self._original.flush()

    def writable(self):
        return True

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self._original, name)


@dataclass
class Printed:
    """What learner code printed during one check, capped at ``limit`` characters."""

    limit: int = OUTPUT_LIMIT
    parts: list = field(default_factory=list)
    size: int = 0

    @property
    def room(self) -> int:
        return max(0, self.limit - sum(len(p) for _, p in self.parts))

    def add(self, label: str, text: str, size: int) -> None:
        self.size += size
        if text:
            self.parts.append((label, text))

    def report(self) -> str:
        if not self.size:
            return ""
        shown = sum(len(p) for _, p in self.parts)
        lines = [f"\n   Your function printed {self.size:,} characters"
                 + (f" (the first {shown:,} are shown):" if shown < self.size else ":")]
        for label, text in self.parts:
            lines.append(f"   --- {label} ---\n" + text.rstrip("\n"))
        return "\n".join(lines)


def call_with_timeout(job: Callable, timeout: float, printed: Printed | None = None,
                      label: str = "") -> tuple[str, object]:
    """Run ``job()`` in a worker thread, capturing what it prints.

    Returns ``("ok", value)``, ``("raised", exc)``, ``("timeout", False)`` or
    ``("timeout", True)`` when the worker is still running after the limit.
    """
    box: dict = {}
    ids: set = set()

    def target():
        ids.add(threading.get_ident())
        try:
            box["value"] = job()
        except BaseException as exc:  # noqa: BLE001 - learner code may raise anything
            box["error"] = exc

    worker = threading.Thread(target=target, name="attn-course-check", daemon=True)
    original = sys.stdout
    capture = _ThreadOutput(original, ids, printed.room if printed is not None else OUTPUT_LIMIT)
    sys.stdout = capture
    try:
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            # Interrupt pure-Python loops; a thread blocked in C (a sleep, a huge matmul)
            # is left to finish on its own.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident),
                                                       ctypes.py_object(CheckTimeout))
            worker.join(0.5)
    finally:
        if sys.stdout is capture:
            sys.stdout = original
        if printed is not None:
            printed.add(label, "".join(capture.kept), capture.size)
    if worker.is_alive():
        return "timeout", True
    if isinstance(box.get("error"), CheckTimeout):
        return "timeout", False
    if "error" in box:
        return "raised", box["error"]
    return "ok", box.get("value")


def safe_str(x, limit: int = 300) -> str:
    """``str(x)`` that cannot raise, cut to ``limit`` characters."""
    try:
        s = str(x)
    except BaseException:  # noqa: BLE001
        s = "<a message that cannot be printed>"
    return s if len(s) <= limit else s[:limit] + " ..."


def _type_name(x) -> str:
    try:
        return type(x).__name__
    except BaseException:  # noqa: BLE001
        return "object"


class Opaque:
    """Stands for a returned object the checker does not compare (a generator, a module...)."""

    def __init__(self, description: str):
        self.description = description


def plain(x, depth: int = 0):
    """Learner output as plain data: tensors, numbers, NumPy arrays, tuples/lists of them, or Opaque.

    Runs in the worker thread, so that a hostile object can at worst time out.
    """
    try:
        if x is None or type(x) in (bool, int, float, str):
            return x
        if isinstance(x, torch.Tensor):
            return x if type(x) is torch.Tensor else torch.Tensor.as_subclass(x, torch.Tensor)
        if isinstance(x, np.ndarray):
            return np.asarray(x)
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, (tuple, list)):
            n = len(x)
            if depth >= 4 or n > _MAX_ITEMS:
                return Opaque(f"a {type(x).__name__} of {n} items")
            items = [plain(v, depth + 1) for v in tuple(x)[:n]]
            return items if isinstance(x, list) else tuple(items)
        if isinstance(x, bool):
            return bool(x)
        if isinstance(x, numbers.Integral):
            return int(x)
        if isinstance(x, numbers.Real):
            return float(x)
        if isinstance(x, numbers.Complex):
            return Opaque(f"a complex number ({_type_name(x)})")
    except BaseException:  # noqa: BLE001
        pass
    return Opaque(_a(_type_name(x)))


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
    if isinstance(b, torch.Tensor):
        return (type(a) is torch.Tensor and a.layout == b.layout == torch.strided
                and a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(torch.nan_to_num(a.detach()), torch.nan_to_num(b)))
    if isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same_tree(x, y) for x, y in zip(a, b)))
    if isinstance(b, dict):
        return type(a) is dict and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in b)
    return True


class LargestTensor:
    """Records the largest tensor storage created while active (in this thread only).

    ``with LargestTensor() as spy: fn(...)``; then ``spy.largest`` elements, of a tensor of
    shape ``spy.shape``. Views count with their base's storage, so ``expand`` is free and
    ``torch.ones(L, L)`` is not.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        spy = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        try:
                            n = t.untyped_storage().nbytes() // max(1, t.element_size())
                        except Exception:  # noqa: BLE001 - sparse and other storage-less tensors
                            n = t.numel()
                        if n > spy.largest:
                            spy.largest, spy.shape = n, tuple(t.shape)
                return out

        self.largest, self.shape = 0, None
        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


# --- comparing --------------------------------------------------------------------------------

def describe(x) -> str:
    if isinstance(x, Opaque):
        return x.description
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, np.ndarray):
        return f"a NumPy array of shape {x.shape}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)} items"
    return _a(_type_name(x))


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" and noun[:1] else "a ") + noun


def fmt(x) -> str:
    """A number for a message: ints with thousands separators, floats with 6 digits."""
    if isinstance(x, int):
        if abs(x) < 10**18:
            return f"{x:,}"
        return f"a whole number of about {int(x.bit_length() * math.log10(2)) + 1:,} digits"
    return f"{x:.6g}"


def _tensor_kind_problem(got: torch.Tensor, what: str) -> str | None:
    """Tensors that hold no ordinary values: sparse, meta, quantized, nested, complex."""
    if got.is_sparse or got.layout != torch.strided:
        return (f"{what} is a {got.layout} tensor (sparse); return an ordinary dense tensor "
                f"(.to_dense() converts).")
    if got.device.type == "meta":
        return (f"{what} is a tensor on the 'meta' device: it has a shape but no values. "
                f"Compute it from the inputs (do not create tensors with device='meta').")
    if got.is_quantized or getattr(got, "is_nested", False):
        return f"{what} is a quantized or nested tensor; return an ordinary tensor."
    if got.is_complex():
        return f"{what} has the complex dtype {got.dtype}; the answer is real."
    return None


def compare(got, expected, what: str, atol: float, rtol: float) -> str | None:
    """Explain how ``got`` (plain data) differs from ``expected`` (None if it matches)."""
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return _compare_number(got, expected, what, atol, rtol)
    if isinstance(expected, tuple):
        if got is None:
            return (f"{what} is None: did you forget the `return`? Expected a tuple of "
                    f"{len(expected)} items.")
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{what} should be a tuple of {len(expected)} items, got {describe(got)}."
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
    kind = _tensor_kind_problem(got, what)
    if kind:
        return kind
    if got.shape != expected.shape:
        msg = f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}."
        if got.ndim >= 2 and got.shape[:-2] + got.shape[-2:][::-1] == expected.shape:
            msg += " The last two axes look swapped: check which axis is queries and which is keys."
        elif got.numel() == expected.numel():
            msg += " The numbers may be right but arranged differently: check your reshapes."
        return msg
    if expected.dtype == torch.bool or not expected.is_floating_point():
        exact = "bool" if expected.dtype == torch.bool else "integer"
        if (got.dtype == torch.bool) != (expected.dtype == torch.bool) or got.is_floating_point():
            article = "a" if exact == "bool" else "an"
            return f"{what} has dtype {got.dtype}; return {article} {exact} tensor like {expected.dtype}."
        g = got.detach().cpu()
        wrong = g != expected
        if wrong.any():
            idx = tuple(int(i) for i in wrong.nonzero()[0])
            return (f"{what} is wrong in {int(wrong.sum())} of {wrong.numel()} entries (first at index "
                    f"{idx}: got {g[idx].item()}, expected {expected[idx].item()}).")
        return None
    if not got.is_floating_point():
        return f"{what} has dtype {got.dtype}; expected floating point like the inputs."
    got = got.detach().to("cpu", torch.float64)
    exp = expected.detach().to("cpu", torch.float64)
    bad = torch.isnan(got) & ~torch.isnan(exp)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        return (f"{what} contains NaN in {int(bad.sum())} of {bad.numel()} entries (first at index "
                f"{where}) where the answer is a number. NaN comes from 0/0, inf - inf or 0 * inf: "
                f"look at rows whose keys are all masked, and at exp() of large numbers.")
    if (torch.isinf(got) & ~torch.isinf(exp)).any():
        return f"{what} contains inf where the answer is finite: did exp() overflow?"
    if not torch.allclose(got, exp, atol=atol, rtol=rtol, equal_nan=True):
        err = (got - exp).abs().nan_to_num(0.0)
        idx = tuple(int(i) for i in (err == err.max()).nonzero()[0])
        return (f"{what} differs from the answer by up to {err.max().item():.3g} "
                f"(at index {idx}: got {got[idx].item():.6g}, expected {exp[idx].item():.6g}).")
    return None


def _ratio(got: float, expected: float) -> str:
    if not (got and expected) or not (math.isfinite(got) and math.isfinite(expected)):
        return ""
    r = got / expected
    for value, words in ((r, "too large"), (1 / r, "too small")):
        k = round(value)
        if k >= 2 and abs(value - k) < 1e-9 * k:
            return f", {k} times {words}"
    if r < 0 and abs(r + 1) < 1e-9:
        return ", the right size with the wrong sign"
    return ""


def _compare_number(got, expected, what, atol, rtol) -> str | None:
    if isinstance(got, torch.Tensor):
        kind = _tensor_kind_problem(got, what)
        if kind:
            return kind
        if got.numel() != 1:
            return f"{what} should be a single number, got {describe(got)}."
        got = got.detach().cpu().item()
    if got is None:
        return f"{what} is None: did you forget the `return`?"
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return f"{what} should be a number, got {describe(got)}."
    if isinstance(got, int) and isinstance(expected, int) and got == expected:
        return None
    try:
        g = float(got)
    except OverflowError:
        return (f"{what}: got {fmt(got)}, far too large for any count here; expected "
                f"{fmt(expected)}.")
    if math.isnan(g):
        return f"{what} is NaN; expected {fmt(expected)}."
    if math.isinf(g):
        return f"{what} is infinite; expected {fmt(expected)}."
    exact = isinstance(expected, int) and atol == 0 and rtol == 0
    if not exact and math.isclose(g, expected, rel_tol=rtol, abs_tol=atol):
        return None
    if exact and g == expected and not isinstance(got, int):
        return None  # e.g. 16576.0 for 16576
    off = got - expected if isinstance(got, int) and isinstance(expected, int) else g - expected
    return (f"{what}: got {fmt(got)}, expected {fmt(expected)} (off by {fmt(off)}"
            f"{_ratio(g, float(expected))}).")


def _plain_for_hint(x) -> bool:
    """Only ordinary values go to hint functions (they compute with them)."""
    if isinstance(x, torch.Tensor):
        return _tensor_kind_problem(x, "") is None
    if isinstance(x, (tuple, list)):
        return all(_plain_for_hint(v) for v in x)
    return x is None or type(x) in (int, float)


# --- helpers for hint functions ---------------------------------------------------------------

def close(a, b, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """Whether two tensors have one shape and (in float64) close values, never raising."""
    try:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
        return bool(torch.isfinite(a).all()) and torch.allclose(a, b, atol=atol, rtol=rtol)
    except Exception:  # noqa: BLE001
        return False


def matches(got, variant, expected, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """``got`` equals a known wrong ``variant`` that the right answer does not equal.

    Use it to give a hint only when it really distinguishes the mistake.
    """
    return close(got, variant, atol, rtol) and not close(variant, expected, atol, rtol)


def finite(x) -> bool:
    try:
        return isinstance(x, torch.Tensor) and bool(torch.isfinite(x.detach()).all())
    except Exception:  # noqa: BLE001
        return False


# --- evaluating -------------------------------------------------------------------------------

def _timeout_message(head: str, where: str, timeout: float, alive: bool) -> str:
    msg = (f"❌ {head}: {where} did not finish within {timeout:g} s. It may be a loop that never "
           f"ends, a very slow operation (a Python loop over every entry of a big tensor, say) "
           f"or a sleep or input() call.")
    if alive:
        msg += (" Your code is still running in the background and cannot be stopped from here: "
                "restart the kernel (Kernel > Restart) before you go on.")
    return msg


def evaluate(ex: Exercise, fn, timeout: float) -> tuple[bool, str]:
    """Run all of ``ex``'s cases on ``fn``; return (passed, feedback)."""
    head = f"{ex.name}"
    if not callable(fn):
        return False, (f"❌ {head}: check needs your function itself, got {describe(plain(fn))}. "
                       f"Pass the function's name without calling it. Expected: {ex.signature}")
    prepared = ex.prepared()
    printed = Printed()
    for i, (case, expected) in enumerate(prepared, 1):
        where = f"test {i} of {len(prepared)} ({case.description})"
        args, kwargs = clone_tree(case.args), clone_tree(case.kwargs)

        def run(args=args, kwargs=kwargs, case=case):
            value = fn(*args, **kwargs)
            try:
                changed = not (same_tree(args, case.args) and same_tree(kwargs, case.kwargs))
            except Exception:  # noqa: BLE001
                changed = True
            return plain(value), changed

        status, result = call_with_timeout(run, timeout, printed, f"test {i}")
        failed = _failure(head, where, ex, status, result, timeout, case)
        if failed:
            return False, failed + printed.report()
        value, changed = result
        if changed:
            return False, (f"❌ {head}: {where}: your function changed its inputs in place. "
                           f"Work on new tensors (e.g. masked_fill, not masked_fill_)."
                           + printed.report())
        try:
            problem = compare(value, expected, "the result", ex.atol, ex.rtol)
        except Exception as exc:  # noqa: BLE001 - the checker must never crash
            problem = (f"the result ({describe(value)}) could not be compared with the answer "
                       f"({type(exc).__name__}: {safe_str(exc)}).")
        if problem:
            hint = None
            if ex.hint is not None and _plain_for_hint(value):
                try:
                    hint = ex.hint(Case(case.description, clone_tree(case.args), clone_tree(case.kwargs)),
                                   value, clone_tree(expected))
                except Exception:  # noqa: BLE001 - a hint must never crash the checker
                    hint = None
            return False, (f"❌ {head}: {where}: {problem}" + (f"\n   Hint: {hint}" if hint else "")
                           + printed.report())
        if ex.verify is not None:
            fresh = Case(case.description, clone_tree(case.args), clone_tree(case.kwargs))
            status, result = call_with_timeout(lambda fresh=fresh, value=value: ex.verify(fresh, fn, value),
                                               timeout, printed, f"test {i}, checked again")
            failed = _failure(head, where, ex, status, result, timeout, fresh)
            if failed:
                return False, failed + printed.report()
            if result:
                return False, f"❌ {head}: {where}: {safe_str(result, 2000)}" + printed.report()
    return True, f"✅ {head}: passed all {len(prepared)} tests." + printed.report()


def _failure(head, where, ex, status, result, timeout, case) -> str | None:
    if status == "timeout":
        return _timeout_message(head, where, timeout, bool(result))
    if status == "raised":
        if isinstance(result, NotImplementedError):
            return (f"✏️ {head}: not answered yet. Replace `raise NotImplementedError` "
                    f"with your code. Expected: {ex.signature}")
        message = safe_str(result)
        hint = None
        if ex.raise_hint is not None:
            try:
                hint = ex.raise_hint(case, message)
            except Exception:  # noqa: BLE001 - a hint must never crash the checker
                hint = None
        return (f"❌ {head}: {where}: your function raised "
                f"{_type_name(result)}: {message}\n   Expected: {ex.signature}"
                + (f"\n   Hint: {hint}" if hint else ""))
    return None
