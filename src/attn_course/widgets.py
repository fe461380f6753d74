"""Interactive figures that work both in a live kernel and on the static site.

``explore(draw, temperature=[...])`` gives ipywidgets sliders in a live
kernel (Jupyter, Colab). When the notebooks are executed for the book
(``ATTN_COURSE_STATIC=1``, set by ``make notebooks`` and the tests), the same
call renders every combination of the slider values into a self-contained
HTML frame player (matplotlib's JavaScript animation writer: images and
script inline, nothing from a CDN), so the slider on the site moves the figure
too.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["explore", "is_static", "StaticExplorer", "MAX_FRAMES"]

MAX_FRAMES = 60
_ENV = "ATTN_COURSE_STATIC"


def is_static() -> bool:
    """True when notebooks are being executed for the static book (``ATTN_COURSE_STATIC=1``).

    Example:
        >>> import os
        >>> from unittest import mock
        >>> from attn_course.widgets import is_static
        >>> with mock.patch.dict(os.environ, {"ATTN_COURSE_STATIC": "1"}):
        ...     print(is_static())
        True
        >>> with mock.patch.dict(os.environ, {"ATTN_COURSE_STATIC": "0"}):
        ...     print(is_static())
        False
    """
    return os.environ.get(_ENV, "").strip().lower() in {"1", "true", "yes"}


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return str(v)


class StaticExplorer:
    """The static rendering of :func:`explore`: an HTML frame player with a slider.

    ``html`` is the self-contained player (what the notebook displays), ``names`` the
    sliders and ``frames`` one tuple of slider values per frame. Its text form lists them.

    Example:
        >>> from attn_course.widgets import StaticExplorer
        >>> player = StaticExplorer("<div>...</div>", ["window"], [(1,), (2,), (4,)])
        >>> player
        <interactive figure, 3 frames: window in [1, 2, 4]>
        >>> player._repr_html_()
        '<div>...</div>'
    """

    def __init__(self, html: str, names: Sequence[str], frames: Sequence[tuple]):
        self.html = html
        self.names = tuple(names)
        self.frames = list(frames)

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        ranges = "; ".join(
            f"{n} in [{', '.join(_fmt(v) for v in dict.fromkeys(f[i] for f in self.frames))}]"
            for i, n in enumerate(self.names))
        return f"<interactive figure, {len(self.frames)} frames: {ranges}>"


def _frames(params: dict) -> tuple[list[str], list[tuple]]:
    if not params:
        raise ValueError("explore needs at least one slider, e.g. explore(draw, temperature=[0.5, 1, 2])")
    names, grids = [], []
    for name, values in params.items():
        values = list(values.tolist() if hasattr(values, "tolist") else values)
        if not values:
            raise ValueError(f"slider {name!r} has no values")
        names.append(name)
        grids.append(values)
    frames = list(itertools.product(*grids))
    if len(frames) > MAX_FRAMES:
        sizes = " x ".join(str(len(g)) for g in grids)
        raise ValueError(f"{sizes} = {len(frames)} slider combinations is more than the static "
                         f"site can hold ({MAX_FRAMES}); use fewer values")
    return names, frames


# matplotlib's player styles its buttons with Font Awesome from a CDN; the site must work
# offline, so the stylesheet link goes and each icon becomes a plain Unicode glyph.
_ICONS = {  # glyphs that common system fonts have
    "fa-minus": "\u2212", "fa-plus": "+", "fa-fast-backward": "\u21e4", "fa-step-backward": "\u2039",
    "fa-play fa-flip-horizontal": "\u25c0", "fa-pause": "||", "fa-play": "\u25b6",
    "fa-step-forward": "\u203a", "fa-fast-forward": "\u21e5",
}


def _offline(html: str) -> str:
    html = re.sub(r"<link[^>]*font-awesome[^>]*>", "", html)

    def glyph(m: re.Match) -> str:
        classes = m.group(1).replace("fa ", "", 1).strip()
        return f'<span aria-hidden="true">{_ICONS.get(classes, "?")}</span>'

    html = re.sub(r'<i class="([^"]*)"></i>', glyph, html)
    if re.search(r"https?://", html):  # pragma: no cover - guards against a matplotlib change
        raise RuntimeError("the static player refers to an external URL; it would not work offline")
    return html


def explore(draw: Callable, *, mode: str | None = None, figsize: tuple[float, float] | None = None,
            fps: float = 2.0, **params: Sequence):
    """An interactive figure: one slider per keyword, each over a list of values.

    Args:
        draw: ``draw(fig, **values)`` draws the figure for one choice of values
            onto the (empty) matplotlib figure ``fig``.
        mode: ``"live"`` (ipywidgets sliders), ``"static"`` (HTML frame player)
            or ``None``: static when ``ATTN_COURSE_STATIC=1`` or outside a
            kernel, else live.
        figsize: the figure size in inches.
        fps: frames per second when the static player plays.
        **params: slider name -> the values it steps through (the first is shown first).

    Returns:
        The ipywidgets box (live) or a :class:`StaticExplorer` (static);
        either displays itself as the last expression of a cell.

    Example:
        >>> import numpy as np
        >>> from attn_course.widgets import explore
        >>> def draw(fig, temperature):
        ...     ax = fig.subplots()
        ...     ax.plot(np.exp(np.arange(4) / temperature))
        ...     ax.set_xlabel("key")
        >>> player = explore(draw, mode="static", temperature=[0.5, 2.0])
        >>> player
        <interactive figure, 2 frames: temperature in [0.5, 2]>
        >>> "https://" in player.html   # self-contained: works offline
        False
    """
    if not callable(draw):
        raise TypeError(f"draw must be a function draw(fig, **values), got {type(draw).__name__}")
    names, frames = _frames(params)
    if mode is None:
        mode = "static" if is_static() or not _in_kernel() else "live"
    if mode == "live":
        return _live(draw, names, frames, params, figsize)
    if mode == "static":
        return _static(draw, names, frames, figsize, fps)
    raise ValueError(f"mode must be 'live', 'static' or None, got {mode!r}")


def _live(draw, names, frames, params, figsize):
    import ipywidgets as W

    sliders = {}
    for i, name in enumerate(names):
        values = list(dict.fromkeys(f[i] for f in frames))
        sliders[name] = W.SelectionSlider(
            options=[(_fmt(v), v) for v in values], value=values[0], description=name,
            continuous_update=False, style={"description_width": "initial"},
            layout=W.Layout(width="420px"))

    def update(**values):
        fig = plt.figure(figsize=figsize, layout="constrained")
        draw(fig, **values)
        plt.show()

    out = W.interactive_output(update, sliders)
    box = W.VBox([*sliders.values(), out])
    box.sliders = sliders  # for tests and for authors who want to drive it
    return box


def _static(draw, names, frames, figsize, fps):
    from matplotlib.animation import FuncAnimation

    fig = plt.figure(figsize=figsize, layout="constrained")

    def update(i):
        fig.clear()
        values = dict(zip(names, frames[i]))
        draw(fig, **values)
        fig.suptitle("   ".join(f"{n} = {_fmt(v)}" for n, v in values.items()), fontsize=10)
        return []

    try:
        anim = FuncAnimation(fig, update, frames=len(frames), interval=1000 / fps, blit=False,
                             repeat=False)
        html = anim.to_jshtml(fps=fps, default_mode="once")
    finally:
        plt.close(fig)
    html = _offline(html)
    # matplotlib names the player with a random uuid: derive the id from the content instead,
    # so that executing a notebook twice gives the same output.
    ids = set(re.findall(r"_anim_img([0-9a-f]{32})", html))
    digest = hashlib.sha1(re.sub(r"[0-9a-f]{32}", "", html).encode()).hexdigest()[:32]
    for old in ids:
        html = html.replace(old, digest)
    return StaticExplorer(html, names, frames)
