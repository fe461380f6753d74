"""Results in prose come from outputs: glue measured values into the book's text.

A chapter states a finding as ``{glue:text}`name:.2f``` in its Markdown, and the
notebook cell that measured it calls :func:`glue`. The text then cannot disagree
with the output beside it, and nbval, which compares stored outputs, keeps both
current.

:func:`glue` uses myst-nb's ``glue`` (what the book's build reads) when it is
installed and is silent otherwise (on Colab, where myst-nb is not needed), so
notebooks run the same everywhere. Floats are rounded to a few significant digits
so that the stored outputs do not depend on the last bits of a CPU's arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["glue", "spread", "significant"]


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (0, inf and NaN unchanged).

    Example:
        >>> from attn_course.report import significant
        >>> significant(3.14159265), significant(0.000123456, 2), significant(123456.0, 2)
        (3.142, 0.00012, 120000.0)
        >>> significant(float("inf"))
        inf
    """
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def glue(name: str, value, *, display: bool = False, digits: int = 4) -> None:
    """Store ``value`` under ``name`` for ``{glue:text}`name``` in the chapter's prose.

    Returns None, so that a ``glue(...)`` at the end of a cell adds no output of its own.

    Numbers (Python, NumPy or one-element tensors) are rounded to ``digits``
    significant digits first; strings and other objects are glued as they are.

    Example:
        In a notebook cell (the chapter's Markdown then says ``{glue:text}`gain:.2f```):

        >>> import torch
        >>> from attn_course.report import glue, significant
        >>> glue("gain", torch.tensor(0.123456789))   # the cell shows nothing
        >>> significant(0.123456789)                   # the value stored under "gain"
        0.1235
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if hasattr(value, "item"):  # NumPy scalars, one-element arrays and tensors
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # more than one element: glued as it is
            pass
    if isinstance(value, float):
        value = significant(value, digits)
    try:
        from myst_nb import glue as _myst_glue
    except ImportError:  # a learner's environment without the book's toolchain
        if display:
            print(value)
        return None
    _myst_glue(name, value, display=display)
    return None


def spread(values: Sequence[float], fmt: str = ".2f") -> str:
    """``"mean (min to max)"`` of per-seed results, for prose and figure labels.

    Example:
        >>> from attn_course.report import spread
        >>> spread([0.91, 0.95, 0.99])
        '0.95 (0.91 to 0.99)'
        >>> spread([0.5], ".0%")   # one result: just the value
        '50%'
    """
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        raise ValueError("values must hold at least one result")
    if arr.size == 1:
        return format(arr[0], fmt)
    return f"{format(arr.mean(), fmt)} ({format(arr.min(), fmt)} to {format(arr.max(), fmt)})"
