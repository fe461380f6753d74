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

What the checker enforces, for every exercise that needs it (issue 28):

* inputs come back unchanged, except those an exercise names in ``may_modify``
  (a state update may be done in place); the feedback names the argument changed;
* integer answers in the exact dtype (indices in int64, as gather and cross_entropy
  need), masks in bool;
* ``in_both_precisions`` runs every case in float32 and float64; ``conditions`` list
  what a statement names, and the tests hold each exercise to test each condition in
  both precisions and every two together;
* ``square_free`` (a ``verify``): no L x L tensor, nor as much memory in NumPy or Python
  (``Footprint`` watches ``tracemalloc`` too), and, with a budget, work linear in L,
  counted over torch operations (NumPy's work is refused as uncounted);
* ``builds_nothing`` (a ``verify``): a count is derived, not read off a built object;
* hints return ``Hint`` objects: ``mistake(text, variant)`` is shown only when the
  answer equals the mistake's value on the case (``first_match`` names every mistake
  that fits), ``fact`` and ``generic`` otherwise.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import numbers
import sys
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_TIMEOUT = 10.0
OUTPUT_LIMIT = 2000          # characters of a learner's printed output shown per check
_MAX_ITEMS = 64              # longer lists and tuples are described, not compared


@dataclass
class Case:
    """One test input: positional and keyword arguments and a line describing it.

    Example:
        >>> import torch
        >>> from attn_course.exercises import Case
        >>> case = Case("3x5 scores, no mask", (torch.zeros(3, 5),), {"mask": None})
        >>> case.description, tuple(case.args[0].shape), case.kwargs
        ('3x5 scores, no mask', (3, 5), {'mask': None})
    """

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

    Example:
        A tiny exercise: its expected answers are computed once, by ``prepare()``.

        >>> import torch
        >>> from attn_course.exercises import Case, Exercise
        >>> double = Exercise(
        ...     name="demo.double", signature="double(x) -> 2 * x",
        ...     cases=lambda: [Case("three numbers", (torch.tensor([0.0, 1.0, 2.0]),))],
        ...     expected=lambda x: 2 * x, solution=lambda x: x + x)
        >>> [(case.description, expected.tolist()) for case, expected in double.prepared()]
        [('three numbers', [0.0, 2.0, 4.0])]
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
    may_modify: tuple = ()
    conditions: dict = field(default_factory=dict)
    exclusive: tuple = ()
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


def changed_inputs(args: tuple, kwargs: dict, case: Case, may_modify: tuple = ()) -> tuple:
    """The arguments (positions, keyword names) that differ from the case's after a call.

    Those named in ``may_modify`` are left out; an argument that cannot be compared counts as changed.
    """
    changed = []
    for i, (a, b) in enumerate(itertools.zip_longest(args, case.args)):
        if i not in may_modify and not _same(a, b):
            changed.append(i)
    for k in case.kwargs:
        if k not in may_modify and not _same(kwargs.get(k), case.kwargs[k]):
            changed.append(k)
    return tuple(changed)


def _same(a, b) -> bool:
    try:
        return same_tree(a, b)
    except Exception:  # noqa: BLE001
        return False


def arg_names(signature: str) -> list[str]:
    """The parameter names of a signature line like ``"f(query (B, L, d), key, k=3) -> ..."``."""
    names, depth, piece = [], 0, ""
    for ch in signature[signature.find("(") + 1:]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            names.append(piece)
            piece = ""
        else:
            piece += ch
    names.append(piece)
    out = []
    for p in names:
        word = p.strip().split("=")[0].split(" ")[0].strip("*")
        out.append(word if word.isidentifier() else "")
    return out


def _names(arguments, signature: str = "") -> str:
    known = arg_names(signature) if signature else []
    words = []
    for i in arguments:
        if isinstance(i, int):
            words.append(f"`{known[i]}`" if i < len(known) and known[i] else f"argument {i + 1}")
        else:
            words.append(f"`{i}`")
    return ", ".join(words) if words else "an argument"


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


# --- what a function allocates, and how much work it does -----------------------------------

# Work, in units of one multiply-add or one element produced: matrix products count their
# multiply-adds, reductions the elements they read, every other operation the elements it
# produces; views are free. "Arithmetic" leaves out pure data movement (copies, conversions,
# concatenation, indexing, padding, creation), so that an answer computed in NumPy and handed
# to torch at the end shows (almost) none.
_FREE = {"_unsafe_view", "lift_fresh", "lift_fresh_copy", "detach", "alias", "empty", "empty_like",
         "empty_strided", "scalar_tensor", "_local_scalar_dense", "set_", "resize_", "_reshape_alias",
         "_to_dense", "item", "is_nonzero", "equal", "sym_size", "sym_stride", "sym_numel"}
_MOVES = {"copy_", "_to_copy", "clone", "cat", "stack", "index", "index_select", "gather", "take",
          "constant_pad_nd", "reflection_pad1d", "replication_pad1d", "zeros", "zeros_like", "ones",
          "ones_like", "full", "full_like", "arange", "linspace", "fill_", "zero_", "fill", "scatter",
          "scatter_", "index_put", "index_put_", "_index_put_impl_", "index_copy", "index_copy_",
          "masked_scatter", "masked_scatter_", "repeat", "flip", "roll", "slice_scatter",
          "select_scatter", "diagonal_scatter", "as_strided_scatter", "new_zeros", "new_ones",
          "new_full", "new_empty", "new_empty_strided", "eye", "tril", "triu", "_unsafe_index",
          "unfold_copy", "expand_copy", "view_copy", "permute_copy", "transpose_copy", "split_with_sizes_copy",
          "randn", "rand", "randint", "normal_", "uniform_", "bernoulli_", "randperm", "random_"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "logsumexp", "linalg_vector_norm",
               "norm", "var", "std", "var_mean", "std_mean", "any", "all", "argmax", "argmin", "topk",
               "sort", "kthvalue", "median", "nansum", "count_nonzero", "aminmax", "_softmax",
               "_log_softmax", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"}


_PRODUCTS = {"mm", "addmm", "_addmm_activation", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
             "scaled_dot_product_attention", "_scaled_dot_product_attention_math"}


def _numel(x) -> int:
    try:
        return int(x.numel()) if isinstance(x, torch.Tensor) else 0
    except Exception:  # noqa: BLE001
        return 0


def _op_work(func, args, kwargs, out) -> tuple[int, bool]:
    """(units of work, whether it is arithmetic) of one aten operation (see the note above)."""
    from torch.utils._pytree import tree_leaves

    if getattr(func, "is_view", False):
        return 0, False
    name = func._schema.name.split("::")[-1]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if name in _FREE:
        return 0, False
    shapes = [tuple(t.shape) for t in tensors]
    try:
        if name in ("mm", "addmm", "_addmm_activation"):
            a, b = (shapes[-2], shapes[-1])
            return a[0] * a[1] * b[1], True
        if name in ("bmm", "baddbmm", "addbmm"):
            a, b = (shapes[-2], shapes[-1])
            return a[0] * a[1] * a[2] * b[2], True
        if name in ("mv", "addmv"):
            a = shapes[-2]
            return a[0] * a[1], True
        if name in ("dot", "vdot"):
            return shapes[0][0], True
        if name in ("convolution", "_convolution", "mkldnn_convolution", "_slow_conv2d_forward",
                    "slow_conv_dilated2d", "slow_conv3d_forward"):
            weight = tensors[1]
            return _numel(outs[0]) * (_numel(weight) // max(1, weight.shape[0])), True
        if "scaled_dot_product" in name:
            q, k, v = shapes[:3]
            batch = math.prod(q[:-2])
            return batch * q[-2] * k[-2] * (q[-1] + v[-1]), True
        if name in ("index_put", "index_put_", "_index_put_impl_"):
            idx = [t for t in tree_leaves(args[1]) if isinstance(t, torch.Tensor)]
            return max([_numel(args[2])] + [_numel(t) for t in idx]), False
        if name in ("copy_",):
            return _numel(args[1]), False
    except Exception:  # noqa: BLE001 - an unexpected signature: count what it produces
        pass
    produced = sum(_numel(t) for t in outs)
    if name in _REDUCTIONS:
        return max([produced] + [_numel(t) for t in tensors]), True
    return produced, name not in _MOVES


class Footprint:
    """Records what a function allocates and how much work it does, while active.

    ``with Footprint() as spy: fn(...)``; then

    * ``spy.largest`` elements, of the largest torch tensor storage created (shape
      ``spy.shape``), in this thread only: views count with their base's storage, so
      ``expand`` is free and ``torch.ones(L, L)`` is not;
    * ``spy.host_bytes``: the peak of the memory traced by :mod:`tracemalloc` above where it
      stood at the start: NumPy registers its arrays' data with it, and Python objects are
      traced too, so an L x L array computed in NumPy (or as nested lists) shows here, which
      the torch spy cannot see. Torch's own tensors are not traced. (All threads count; in a
      check the other threads wait.)
    * ``spy.work``: multiply-adds of matrix products plus elements produced by every other
      torch operation (reductions: elements read; views: free), and ``spy.arithmetic``, the
      same without pure data movement (copies, conversions, indexing, padding, creation);
      ``spy.products``, the multiply-adds of the matrix products (and fused attention) alone.
      Work done in NumPy or plain Python is not counted: exercises that count work say
      "use torch operations", and reject an answer whose arithmetic is not in torch.
    """

    def __init__(self, host: bool = True):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        spy = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                try:
                    units, arithmetic = _op_work(func, args, kwargs, out)
                except Exception:  # noqa: BLE001 - never let the spy break the learner's code
                    units, arithmetic = 0, False
                spy.work += units
                spy.arithmetic += units if arithmetic else 0
                if func._schema.name.split("::")[-1] in _PRODUCTS:
                    spy.products += units
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
        self.work = self.arithmetic = self.products = 0
        self.host_bytes = 0
        self._host = host
        self._started = False
        self._mode = _Mode()

    def __enter__(self):
        _warm_up()
        self._mode.__enter__()
        if self._host:
            self._started = not tracemalloc.is_tracing()
            if self._started:
                tracemalloc.start()
            tracemalloc.reset_peak()
            self._base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc):
        if self._host:
            self.host_bytes = max(0, tracemalloc.get_traced_memory()[1] - self._base)
            if self._started:
                tracemalloc.stop()
        return self._mode.__exit__(*exc)


_WARM: list = []


def _warm_up() -> None:
    """The first dispatch mode of a process imports a good part of torch (megabytes of Python
    objects): do it once, untraced, so that it does not count against the learner's function."""
    if _WARM:
        return
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Plain(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with _Plain():
        x = torch.ones(2, 3)
        (x @ x.T).sum() + torch.softmax(x, -1).cumsum(-1)[:, [0]].exp()
    _WARM.append(True)


class LargestTensor(Footprint):
    """:class:`Footprint` under its first name (it recorded only the largest torch tensor)."""


def square_free(length: Callable[[Case], int], *, what: str, advice: str, min_length: int = 0,
                work: Callable[[Case], float] | None = None,
                floor: Callable[[Case], float] | None = None) -> Callable:
    """A ``verify`` for exercises that promise memory (and, with ``work``, time) linear in a length.

    On the cases whose ``length(case)`` is at least ``min_length`` it re-runs the learner's
    function under a :class:`Footprint` and rejects

    * a torch tensor of ``L * L`` elements or more (not even a mask);
    * as many bytes outside torch (NumPy arrays, Python lists) as an ``L x L`` float32 array;
    * with ``work``: more work than ``work(case)`` (a budget that every linear answer stays
      well under and the quadratic one, however chunked, is well over; None: not counted on
      this case, too short to tell them apart), and, with ``floor``,
      less torch arithmetic than ``floor(case)``: the work was done where it is not counted.

    ``what`` names the computation ("Banded attention"), ``advice`` says how to avoid L x L.
    """

    def verify(case, fn, got):
        L = length(case)
        if L < min_length:
            return None
        with Footprint() as spy:
            fn(*clone_tree(case.args), **clone_tree(case.kwargs))
        if spy.host_bytes >= 4 * L * L:    # a first call may import modules (Python objects): again
            with Footprint() as again:
                fn(*clone_tree(case.args), **clone_tree(case.kwargs))
            spy.host_bytes = again.host_bytes
        if spy.largest >= L * L:
            return (f"the values are right, but your function created a tensor of shape {spy.shape} "
                    f"({spy.largest:,} elements, at least L x L = {L * L:,} for L = {L}). {what} must "
                    f"never build an L x L tensor, not even a mask: that is the memory it exists to "
                    f"save. {advice}")
        if spy.host_bytes >= 4 * L * L:
            return (f"the values are right, but your function allocated {spy.host_bytes:,} bytes "
                    f"outside torch at once (NumPy arrays or Python lists), as much as an L x L float32 "
                    f"array for L = {L} ({4 * L * L:,} bytes). {what} must never hold L x L numbers, in "
                    f"any library. {advice}")
        budget = None if work is None else work(case)
        if budget is None:
            return None
        if spy.work > budget:
            return (f"the values are right, but your function did {fmt(spy.work)} units of work "
                    f"(multiply-adds and elements computed by torch operations) for L = {L}; an answer "
                    f"linear in L needs at most about {fmt(int(budget))}. Memory linear in L is not "
                    f"enough: computing the L x L scores a block of queries at a time, or looping over "
                    f"the whole prefix for every query, still does work that grows like L^2. {advice}")
        if floor is not None and spy.arithmetic < floor(case):
            return (f"the values are right, but the checker saw almost no arithmetic in torch "
                    f"({fmt(spy.arithmetic)} units for L = {L}): it counts the work of torch operations "
                    f"only, so compute with torch (as the statement asks), not NumPy or plain Python.")
        return None

    return verify


def builds_nothing(limit: Callable[[Case], int], *, what: str) -> Callable:
    """A ``verify`` for counting exercises: derive the number, do not build the object and count.

    Re-runs the function under a :class:`Footprint` and rejects a torch tensor of ``limit(case)``
    elements or more (a module's weights, a mask, a layout). ``what`` names the object.
    """

    def verify(case, fn, got):
        n = limit(case)
        with Footprint(host=False) as spy:
            fn(*clone_tree(case.args), **clone_tree(case.kwargs))
        if spy.largest >= n:
            return (f"the number is right, but your function built a tensor of shape {spy.shape} "
                    f"({spy.largest:,} elements): it counted {what} instead of deriving the count. "
                    f"Write the count as a formula in the arguments: it is what holds at sizes no "
                    f"one can build.")
        return None

    return verify


# --- cases in both floating-point precisions --------------------------------------------------

def as_dtype(x, dtype: torch.dtype):
    """``x`` with every floating tensor (in nested tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(as_dtype(v, dtype) for v in x)
    if isinstance(x, list):
        return [as_dtype(v, dtype) for v in x]
    if isinstance(x, dict):
        return {k: as_dtype(v, dtype) for k, v in x.items()}
    return x


def float_dtypes(case: Case) -> set:
    """The floating dtypes of a case's tensors."""
    from torch.utils._pytree import tree_leaves

    return {t.dtype for t in tree_leaves((case.args, case.kwargs))
            if isinstance(t, torch.Tensor) and t.is_floating_point()}


def any_precision(predicate: Callable) -> Callable:
    """Marks a condition (see :attr:`Exercise.conditions`) that one precision tests as well as the
    other: what a function allocates or how much work it does on a long input, say."""
    predicate.any_precision = True
    return predicate


def in_both_precisions(cases: list[Case], skip: Callable[[Case], bool] | None = None) -> list[Case]:
    """The cases, then a copy of each in the other precision (float32 <-> float64).

    Statements allow either precision; an answer that is right in one may overflow, lose
    precision or mix dtypes in the other. Cases for which ``skip(case)`` holds are not copied.
    """
    copies = []
    for case in cases:
        dtypes = float_dtypes(case)
        if not dtypes or (skip is not None and skip(case)):
            continue
        other = torch.float32 if dtypes == {torch.float64} else torch.float64
        copies.append(Case(f"{case.description}, in {str(other).replace('torch.', '')}",
                           as_dtype(case.args, other), as_dtype(case.kwargs, other)))
    return cases + copies


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
    if isinstance(expected, (tuple, list)):
        kind = type(expected).__name__
        if got is None:
            return (f"{what} is None: did you forget the `return`? Expected a {kind} of "
                    f"{len(expected)} items.")
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{what} should be a {kind} of {len(expected)} items, got {describe(got)}."
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
        if exact == "integer" and got.dtype != expected.dtype:
            use = (" Indices go to torch.gather, index_select, nn.Embedding or F.cross_entropy, which "
                   "take int64 (torch.long)." if expected.dtype == torch.int64 else "")
            return f"{what} has dtype {got.dtype}; return {expected.dtype}.{use}"
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


# --- hints that name a mistake only when the answer is that mistake --------------------------

@dataclass(frozen=True)
class Hint:
    """What a hint function returns: a text, and why the checker may show it.

    * ``mistake(text, variant)``: the text names a mistake, and ``variant`` is the value that
      mistake gives on this case. The checker shows the text only if the answer equals
      ``variant`` (``where(answer)`` equals it, when the mistake concerns a part of the answer)
      and the right answer does not: a hint never names a mistake the answer did not make.
    * ``fact(text)``: a property of the answer the hint function has checked (e.g. "masked keys
      got weight"), with advice.
    * ``generic(text)``: a reminder of the rule, naming no mistake.

    A plain string (older hint functions) is shown as it is.
    """

    text: str
    kind: str = "generic"
    variant: object = None
    where: Callable | None = None
    atol: float = 1e-5
    rtol: float = 1e-4


def mistake(text: str, variant, *, where: Callable | None = None, atol: float = 1e-5,
            rtol: float = 1e-4) -> Hint:
    """A hint naming a mistake whose value on this case is ``variant`` (see :class:`Hint`)."""
    return Hint(text, "mistake", variant, where, atol, rtol)


def fact(text: str) -> Hint:
    """A hint stating a property of the answer that the hint function has checked."""
    return Hint(text, "fact")


def generic(text: str) -> Hint:
    """A hint that restates the rule and names no mistake."""
    return Hint(text, "generic")


def agrees(a, b, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """Whether two values (tensors, numbers, tuples of them) are equal, never raising.

    Floating tensors: one shape and close values, NaN and inf in the same places; bool and
    integer tensors, and whole numbers: equal.
    """
    try:
        if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
            return (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b)
                    and all(agrees(x, y, atol, rtol) for x, y in zip(a, b)))
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape:
                return False
            a, b = a.detach().cpu(), b.detach().cpu()
            if not (a.is_floating_point() or b.is_floating_point()):
                return bool(torch.equal(a.long(), b.long()))
            a, b = a.double(), b.double()
            if not torch.equal(torch.isnan(a), torch.isnan(b)):
                return False
            a, b = a.nan_to_num(0.0, 1e300, -1e300), b.nan_to_num(0.0, 1e300, -1e300)
            return bool(torch.allclose(a, b, atol=atol, rtol=rtol))
        if isinstance(a, torch.Tensor) and a.numel() == 1:
            a = a.item()
        if isinstance(b, torch.Tensor) and b.numel() == 1:
            b = b.item()
        if type(a) in (int, float) and type(b) in (int, float):
            if isinstance(a, int) and isinstance(b, int):
                return a == b
            return math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))
    except Exception:  # noqa: BLE001
        pass
    return False


def hint_text(hint, got, expected) -> str | None:
    """The text of what a hint function returned, if the checker may show it (see :class:`Hint`)."""
    if hint is None or isinstance(hint, str):
        return hint
    if not isinstance(hint, Hint):
        return None
    if hint.kind == "mistake":
        part = hint.where or (lambda x: x)
        try:
            mine, right = part(got), part(expected)
        except Exception:  # noqa: BLE001
            return None
        if not agrees(mine, hint.variant, hint.atol, hint.rtol) or agrees(right, hint.variant, hint.atol,
                                                                           hint.rtol):
            return None
    return hint.text


def first_match(got, expected, pairs, *, where: Callable | None = None, atol: float = 1e-5,
                rtol: float = 1e-4) -> Hint | None:
    """The ``(variant, text)`` of ``pairs`` that the answer equals (and the right answer does not),
    as a :func:`mistake` hint; None if there is none. A ``variant`` of None is skipped. If the
    answer equals the variants of two mistakes with different texts, the hint names both: a
    case on which two mistakes coincide cannot tell which one was made."""
    part = where or (lambda x: x)
    try:
        mine, right = part(got), part(expected)
    except Exception:  # noqa: BLE001
        return None
    found = []
    for variant, text in pairs:
        if variant is not None and agrees(mine, variant, atol, rtol) and not agrees(right, variant, atol, rtol):
            if not found:
                found.append((variant, text))
            elif text not in (t for _, t in found):
                found.append((variant, text))
    if not found:
        return None
    if len(found) == 1:
        return mistake(found[0][1], found[0][0], where=where, atol=atol, rtol=rtol)
    # two mistakes give this very answer here: name both rather than guess
    texts = "; or ".join(t.rstrip(".") for _, t in found)
    return mistake(f"more than one mistake gives this answer here: {texts}.", found[0][0], where=where,
                   atol=atol, rtol=rtol)


def factor_hint(got, expected, factors) -> Hint | None:
    """For counts: the mistakes ``(factor, text)`` whose answer is ``expected * factor``.

    When several fit the answer (two factors may be equal on a case), the hint names them all.
    """
    if type(got) not in (int, float) or isinstance(got, bool) or got == expected:
        return None
    fits = [(f, text) for f, text in factors
            if f not in (0, 1) and math.isclose(got, expected * f, rel_tol=1e-12, abs_tol=0)]
    if not fits:
        return None
    value = expected * fits[0][0]
    if len(fits) == 1:
        return mistake(fits[0][1] + ".", value, atol=0, rtol=1e-12)
    return mistake("several mistakes give this number here: " + "; or ".join(t for _, t in fits) + ".",
                   value, atol=0, rtol=1e-12)


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
            return plain(value), changed_inputs(args, kwargs, case, ex.may_modify)

        status, result = call_with_timeout(run, timeout, printed, f"test {i}")
        failed = _failure(head, where, ex, status, result, timeout, case)
        if failed:
            return False, failed + printed.report()
        value, changed = result
        if changed:
            allowed = (f" (only {_names(ex.may_modify, ex.signature)} may be updated in place here)"
                       if ex.may_modify else "")
            return False, (f"❌ {head}: {where}: your function changed its inputs in place "
                           f"({_names(changed, ex.signature)}){allowed}. The statement asks you to leave them "
                           f"unchanged: work on new tensors (e.g. masked_fill, not masked_fill_; "
                           f"x = x * 2, not x *= 2)." + printed.report())
        try:
            problem = compare(value, expected, "the result", ex.atol, ex.rtol)
        except Exception as exc:  # noqa: BLE001 - the checker must never crash
            problem = (f"the result ({describe(value)}) could not be compared with the answer "
                       f"({type(exc).__name__}: {safe_str(exc)}).")
        if problem:
            hint = None
            if ex.hint is not None and _plain_for_hint(value):
                try:
                    hint = hint_text(ex.hint(Case(case.description, clone_tree(case.args),
                                                  clone_tree(case.kwargs)), value, clone_tree(expected)),
                                     value, expected)
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


def as_number(got):
    """A learner's scalar answer as a Python int or float (a one-element tensor is unwrapped), else None."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    return got if type(got) in (int, float) else None
