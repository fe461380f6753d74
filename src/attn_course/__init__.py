"""attn_course: the tested companion package of the attn-course book.

Each chapter of the book has a module here (``basics`` for chapter 1, ...),
and the support modules ``plotting``, ``widgets``, ``data``, ``train`` and
``exercises`` are shared by all chapters.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["get_device", "seed_everything", "__version__"]
__version__ = "0.1.0"


def _cpu_cores() -> int:
    """The CPU cores this process may use (its affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def get_device() -> torch.device:
    """The best available device: CUDA, else Apple's MPS, else the CPU.

    Every chapter's setup cell calls it once and moves its tensors and models there.

    Example:
        >>> import torch
        >>> from attn_course import get_device
        >>> device = get_device()
        >>> device.type in ("cuda", "mps", "cpu")
        True
        >>> torch.ones(2, device=device).device.type == device.type
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random number generators (CUDA's too).

    Args:
        seed: an int in ``[0, 2**32)``.

    Example:
        >>> import random
        >>> import torch
        >>> from attn_course import seed_everything
        >>> seed_everything(0)
        >>> first = (random.random(), torch.rand(2))
        >>> seed_everything(0)
        >>> second = (random.random(), torch.rand(2))
        >>> first[0] == second[0], torch.equal(first[1], second[1])
        (True, True)
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    seed = int(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
