"""Input validation shared by the public functions.

Every check raises ``TypeError`` or ``ValueError`` whose message names the
offending argument and shows the shapes or dtypes involved, so that a learner
never meets a bare error from deep inside a matmul.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def float_tensor(name: str, x, *, min_ndim: int = 1, ndim: int | None = None) -> torch.Tensor:
    """Check that ``x`` is a floating-point tensor of a suitable rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(x).__name__}"
            + (" (convert it with torch.as_tensor(..., dtype=torch.float32))"
               if hasattr(x, "__array__") else "")
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}"
        )
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}"
        )
    return x


def same_dtype_device(**tensors: torch.Tensor) -> None:
    """Check that all tensors share one dtype and one device."""
    items = list(tensors.items())
    (n0, t0) = items[0]
    for name, t in items[1:]:
        if t.dtype != t0.dtype:
            desc = ", ".join(f"{n}: {x.dtype}" for n, x in items)
            raise TypeError(f"{name} has dtype {t.dtype} but {n0} has {t0.dtype} ({desc})")
        if t.device != t0.device:
            desc = ", ".join(f"{n}: {x.device}" for n, x in items)
            raise ValueError(f"{name} is on {t.device} but {n0} is on {t0.device} ({desc})")


def positive_number(name: str, value, *, integer: bool = False) -> float | int:
    """Check that ``value`` is a finite number > 0 (an int if ``integer``)."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                import numpy as np

                ok = isinstance(value, np.integer)
            except ImportError:  # pragma: no cover
                ok = False
            if not ok:
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def token_ids(name: str, ids, limit: int | None = None) -> torch.Tensor:
    """Check a ``(B, L)`` int64 tensor of token ids, all in ``[0, limit)`` when ``limit`` is given."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.ndim != 2:
        raise TypeError(f"{name} must be an int64 tensor (B, L), got {getattr(ids, 'dtype', type(ids).__name__)} "
                        f"of shape {tuple(getattr(ids, 'shape', ()))}")
    # (on the meta device there are no values to check)
    if limit is not None and ids.numel() and ids.device.type != "meta" and (ids.min() < 0 or ids.max() >= limit):
        raise ValueError(f"{name} holds ids outside [0, {limit}): min {int(ids.min())}, max {int(ids.max())}")
    return ids


def bool_mask(name: str, mask, target_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Check a boolean mask that must broadcast to ``target_shape`` without enlarging it."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must have dtype torch.bool (True = may attend), got {mask.dtype}; "
            f"for a 0/1 tensor use {name}.bool()"
        )
    try:
        shape = torch.broadcast_shapes(mask.shape, target_shape)
    except RuntimeError:
        shape = None
    if shape != torch.Size(target_shape):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
            f"{tuple(target_shape)} (..., L_q, L_k)"
        )
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the scores are on {device}")
    return mask
