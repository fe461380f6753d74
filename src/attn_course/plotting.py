"""One figure style for the whole course, and the attention heatmap every chapter uses.

The style sets an explicit white background, so that figures stay readable on
the site's dark theme, and black text and axes on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["STYLE", "set_style", "attention_heatmap", "to_numpy"]

STYLE: dict = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "savefig.transparent": False,
    "text.color": "black",
    "axes.labelcolor": "black",
    "axes.edgecolor": "black",
    "xtick.color": "black",
    "ytick.color": "black",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "font.size": 10,
    "legend.frameon": False,
    "figure.figsize": (6.4, 3.6),
    "figure.dpi": 100,
    "image.cmap": "viridis",
    "lines.linewidth": 1.8,
}


def set_style() -> None:
    """Apply the course style to matplotlib (call once, in a notebook's setup cell).

    Example:
        >>> import matplotlib.pyplot as plt
        >>> from attn_course.plotting import set_style
        >>> set_style()
        >>> plt.rcParams["figure.facecolor"], plt.rcParams["axes.labelcolor"]
        ('white', 'black')
    """
    plt.rcParams.update(STYLE)


def to_numpy(x) -> np.ndarray:
    """A NumPy copy of a tensor (any device or dtype) or array-like, for plotting.

    Example:
        >>> import torch
        >>> from attn_course.plotting import to_numpy
        >>> a = to_numpy(torch.tensor([0.5, 1.0], dtype=torch.bfloat16, requires_grad=True))
        >>> a, a.dtype
        (array([0.5, 1. ], dtype=float32), dtype('float32'))
    """
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x)


def attention_heatmap(weights, *, x_labels: Sequence[str] | None = None,
                      y_labels: Sequence[str] | None = None, ax=None, title: str | None = None,
                      xlabel: str = "key position", ylabel: str = "query position",
                      cmap: str = "viridis", vmin: float | None = 0.0, vmax: float | None = None,
                      colorbar: bool = True, annotate: bool = False, cbar_label: str = "weight"):
    """Draw a ``(L_q, L_k)`` matrix of attention weights with labelled axes and a colorbar.

    ``x_labels`` / ``y_labels`` name the keys (columns) and queries (rows),
    e.g. tokens. ``annotate`` writes each weight in its cell (small maps
    only). The same function draws any ``(rows, columns)`` matrix, e.g. scores or biases:
    name it with ``cbar_label``. Returns the axes.

    Example:
        >>> import matplotlib.pyplot as plt
        >>> import torch
        >>> from attn_course.plotting import attention_heatmap
        >>> tokens = ["the", "cat", "sat"]
        >>> weights = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
        >>> ax = attention_heatmap(weights, x_labels=tokens, y_labels=tokens, annotate=True)
        >>> ax.get_xlabel(), [t.get_text() for t in ax.get_xticklabels()]
        ('key position', ['the', 'cat', 'sat'])
        >>> ax.figure.axes[-1].get_ylabel()   # the colorbar
        'weight'
        >>> plt.close(ax.figure)
    """
    w = to_numpy(weights)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D (L_q, L_k), got shape {w.shape}")
    for name, labels, n in (("x_labels", x_labels, w.shape[1]), ("y_labels", y_labels, w.shape[0])):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} labels for {n} {'columns' if name[0] == 'x' else 'rows'}")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.45 * max(w.shape[1], 6), 0.8 + 0.4 * max(w.shape[0], 5)))
    im = ax.imshow(w, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if x_labels is not None:
        ax.set_xticks(range(w.shape[1]), [str(s) for s in x_labels],
                      rotation=90 if max(map(len, map(str, x_labels)), default=0) > 3 else 0)
    if y_labels is not None:
        ax.set_yticks(range(w.shape[0]), [str(s) for s in y_labels])
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, label=cbar_label, fraction=0.046, pad=0.04)
    if annotate:
        hi = np.nanmax(w) if w.size else 0
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if w[i, j] > 0.6 * hi else "white")
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    return ax
