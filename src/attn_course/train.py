"""A small, reusable training loop with a progress bar."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import _checks
from .widgets import is_static

__all__ = ["fit"]


def fit(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        steps: int = 300, lr: float = 1e-2, batch_size: int = 64, seed: int = 0,
        desc: str = "training") -> list[float]:
    """Train ``model`` with Adam on mini-batches drawn from ``(inputs, targets)``.

    ``model(inputs)`` may return a tensor or a tuple whose first item is the
    prediction. Shows a tqdm progress bar in a live session (none when the
    book is built, where it would only print timings). Returns the loss of
    every step.
    """
    steps = _checks.positive_number("steps", steps, integer=True)
    batch_size = _checks.positive_number("batch_size", batch_size, integer=True)
    lr = _checks.positive_number("lr", lr)
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets must have the same number of examples; got "
                         f"inputs {tuple(inputs.shape)}, targets {tuple(targets.shape)}")
    loss_fn = loss_fn or nn.functional.mse_loss
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = inputs.shape[0]
    history: list[float] = []
    from tqdm.auto import trange

    model.train()
    for _ in trange(steps, desc=desc, disable=is_static(), leave=False):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(inputs.device)
        out = model(inputs[idx])
        pred = out[0] if isinstance(out, tuple) else out
        loss = loss_fn(pred, targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    model.eval()
    return history
