"""Chapter 3, soft, hard, local and global attention.

Soft attention averages; hard attention picks one position, which is not
differentiable, so it is trained with REINFORCE (a score-function gradient with a
baseline; Williams, 1992) or relaxed with Gumbel-softmax and the straight-through
estimator (Jang et al., 2017). Global attention (Luong et al., 2015) scores every
source position; local-m attends to a window around the aligned position, local-p to
a window around a predicted position, scaled by a Gaussian. The module also measures
receptive fields, to compare local attention with convolutions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .basics import masked_softmax
from .sparse import sliding_window_mask

__all__ = [
    "gumbel_softmax",
    "sample_hard",
    "local_window_weights",
    "LuongAttention",
    "MarkerSelector",
    "LocalAttentionTagger",
    "ConvTagger",
    "receptive_field",
    "conv_receptive_field",
]


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, *, hard: bool = False,
                   generator: torch.Generator | None = None, dim: int = -1) -> torch.Tensor:
    r"""A Gumbel-softmax sample (Jang et al., 2017; Maddison et al., 2017).

    .. math:: y = \mathrm{softmax}\big((\ell + g) / \tau\big),\qquad g_i = -\log(-\log u_i),\ u_i \sim U(0, 1)

    With ``hard=True`` the forward value is the one-hot arg-max of ``y`` and the
    gradient is that of ``y`` (straight-through: ``onehot - y.detach() + y``).
    Unlike ``torch.nn.functional.gumbel_softmax`` it takes a ``generator``, so that
    samples can be reproduced.
    """
    _checks.float_tensor("logits", logits)
    tau = _checks.positive_number("tau", tau)
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype,
                   device="cpu" if generator is not None else logits.device).to(logits.device)
    g = -torch.log((-torch.log(u.clamp(1e-20, 1.0))).clamp_min(1e-20))
    y = torch.softmax((logits + g) / tau, dim=dim)
    if not hard:
        return y
    onehot = F.one_hot(y.argmax(dim), y.shape[dim]).movedim(-1, dim).to(y.dtype)
    return onehot - y.detach() + y


def sample_hard(scores: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard attention: sample one position per row from ``softmax(scores)``.

    Returns the positions ``(...)`` and their log-probabilities, for REINFORCE.
    """
    _checks.float_tensor("scores", scores)
    log_p = torch.log_softmax(scores, dim=-1)
    flat = log_p.detach().exp().reshape(-1, scores.shape[-1])
    idx = torch.multinomial(flat.cpu() if generator is not None else flat, 1, generator=generator)
    idx = idx.to(scores.device).view(scores.shape[:-1])
    return idx, log_p.gather(-1, idx[..., None]).squeeze(-1)


def local_window_weights(scores: torch.Tensor, centres: torch.Tensor, window: int, *,
                         gaussian: bool = False) -> torch.Tensor:
    r"""Luong et al.'s (2015) local attention weights.

    ``scores (..., T, S)`` and window centres ``p_t (..., T)`` (float). Each query
    attends to sources ``s`` with ``|s - round(p_t)| <= window``; with ``gaussian``
    (local-p) the softmax is then scaled by
    :math:`\exp(-(s - p_t)^2 / (2\sigma^2))`, :math:`\sigma = \mathrm{window} / 2`.
    """
    _checks.float_tensor("scores", scores, min_ndim=2)
    _checks.float_tensor("centres", centres)
    if centres.shape != scores.shape[:-1]:
        raise ValueError(f"centres must have shape {tuple(scores.shape[:-1])} (one per query), "
                         f"got {tuple(centres.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    s = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype)
    offset = s - centres[..., None]                                     # (..., T, S)
    mask = (s - torch.round(centres)[..., None]).abs() <= window
    weights = masked_softmax(scores, mask)
    if gaussian:
        sigma = max(window, 1) / 2
        weights = weights * torch.exp(-(offset**2) / (2 * sigma**2))
    return weights


class LuongAttention(nn.Module):
    """Luong attention with the "general" score ``q^T W k``: global, local-m or local-p.

    ``forward(query (B, T, dq), keys (B, S, dk), values (B, S, dv)) -> (output, weights (B, T, S),
    centres (B, T) or None)``. local-m centres the window at ``t * (S - 1) / (T - 1)`` (the
    monotonic alignment); local-p predicts ``p_t = S * sigmoid(v^T tanh(W_p q_t))``.
    """

    def __init__(self, query_dim: int, key_dim: int, mode: str = "global", window: int = 2):
        super().__init__()
        if mode not in ("global", "local-m", "local-p"):
            raise ValueError(f"mode must be 'global', 'local-m' or 'local-p', got {mode!r}")
        self.mode, self.window = mode, window
        self.W = nn.Linear(key_dim, query_dim, bias=False)
        if mode == "local-p":
            self.W_p = nn.Linear(query_dim, query_dim)
            self.v_p = nn.Linear(query_dim, 1, bias=False)

    def forward(self, query, keys, values):
        _checks.float_tensor("query", query, ndim=3)
        _checks.float_tensor("keys", keys, ndim=3)
        scores = query @ self.W(keys).transpose(-2, -1)                 # (B, T, S)
        T, S = scores.shape[-2:]
        if self.mode == "global":
            weights, centres = torch.softmax(scores, dim=-1), None
        else:
            if self.mode == "local-m":
                step = (S - 1) / max(T - 1, 1)
                centres = (torch.arange(T, device=query.device, dtype=query.dtype) * step).expand(scores.shape[:-1])
            else:
                centres = (S - 1) * torch.sigmoid(self.v_p(torch.tanh(self.W_p(query)))).squeeze(-1)
            weights = local_window_weights(scores, centres, self.window, gaussian=self.mode == "local-p")
        return weights @ values, weights, centres


class MarkerSelector(nn.Module):
    """The "find the marked item" model: score every item, select, classify.

    ``mode="soft"`` averages the items with softmax weights; ``"reinforce"`` samples one
    item (hard attention) and learns the scorer with REINFORCE and a running-mean
    baseline; ``"gumbel"`` selects one item with straight-through Gumbel-softmax.
    ``loss(x (B, L, F), y (B,), generator) -> (loss, accuracy)``; ``select(x)`` gives
    the weights used at test time (soft weights, or the one-hot arg-max).
    """

    def __init__(self, num_features: int, num_classes: int, mode: str = "soft", tau: float = 1.0):
        super().__init__()
        if mode not in ("soft", "reinforce", "gumbel"):
            raise ValueError(f"mode must be 'soft', 'reinforce' or 'gumbel', got {mode!r}")
        self.mode, self.tau = mode, tau
        self.scorer = nn.Linear(num_features, 1)
        self.classifier = nn.Linear(num_features, num_classes)
        self.register_buffer("baseline", torch.tensor(0.0))

    def scores(self, x):
        """Selection scores, one per position: ``x (B, L, F) -> (B, L)``."""
        return self.scorer(x).squeeze(-1)                                # (B, L)

    def select(self, x):
        """Weights over positions ``(B, L)``: the softmax of the scores (soft), else a one-hot argmax."""
        s = self.scores(x)
        if self.mode == "soft":
            return torch.softmax(s, -1)
        return F.one_hot(s.argmax(-1), s.shape[-1]).to(x.dtype)

    def forward(self, x):
        w = self.select(x)
        return self.classifier((w[..., None] * x).sum(1)), w

    def loss(self, x, y, generator=None):
        """Training loss and accuracy on ``(x (B, L, F), y (B,))``.

        Soft: cross-entropy through the softmax weights. Gumbel: a straight-through
        Gumbel-softmax sample (Jang et al., 2017). REINFORCE: a sampled position and the
        score-function term ``(loss - baseline) log p`` (Williams, 1992), with a running-mean
        baseline updated after each call.
        """
        s = self.scores(x)
        if self.mode == "soft":
            w = torch.softmax(s, -1)
        elif self.mode == "gumbel":
            w = gumbel_softmax(s, self.tau, hard=True, generator=generator)
        else:
            idx, log_p = sample_hard(s, generator)
            w = F.one_hot(idx, s.shape[-1]).to(x.dtype)
        logits = self.classifier((w[..., None] * x).sum(1))
        per_example = F.cross_entropy(logits, y, reduction="none")
        loss = per_example.mean()
        if self.mode == "reinforce":
            advantage = per_example.detach() - self.baseline
            loss = loss + (advantage * log_p).mean()                      # score-function gradient
            with torch.no_grad():
                self.baseline.mul_(0.9).add_(0.1 * per_example.mean())
        return loss, (logits.argmax(-1) == y).float().mean().item()


class LocalAttentionTagger(nn.Module):
    """One local self-attention layer (window ``+-window``) and a per-position readout.

    ``forward(x (B, L, F)) -> (logits (B, L, C), weights (B, L, L))``.
    """

    def __init__(self, num_features: int, num_classes: int, window: int, hidden: int = 16):
        super().__init__()
        self.window = window
        self.q, self.k, self.v = (nn.Linear(num_features, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        mask = sliding_window_mask(x.shape[1], self.window).to(x.device)
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / math.sqrt(self.q.out_features)
        weights = masked_softmax(scores, mask)
        return self.out(weights @ self.v(x)), weights


class ConvTagger(nn.Module):
    """A 1-D CNN with the same receptive field: ``depth`` layers whose kernels together span
    ``2 * window + 1`` positions. ``forward(x (B, L, F)) -> (logits (B, L, C), None)``."""

    def __init__(self, num_features: int, num_classes: int, window: int, hidden: int = 16, depth: int = 1):
        super().__init__()
        depth = _checks.positive_number("depth", depth, integer=True)
        if (2 * window) % depth:
            raise ValueError(f"2 * window = {2 * window} must be divisible by depth={depth}")
        k = 2 * window // depth + 1
        layers, ch = [], num_features
        for _ in range(depth):
            layers += [nn.Conv1d(ch, hidden, k, padding=k // 2), nn.ReLU()]
            ch = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv1d(hidden, num_classes, 1)

    def forward(self, x):
        return self.out(self.body(x.transpose(1, 2))).transpose(1, 2), None


def receptive_field(fn, length: int, channels: int, position: int, *, seed: int = 0) -> torch.Tensor:
    """Which input positions can change output ``position`` of ``fn``: ``(length,)`` bool.

    Measured by the gradient of ``fn(x)[:, position]`` with respect to a random input
    ``x (1, length, channels)`` (float64).
    """
    length = _checks.positive_number("length", length, integer=True)
    if not 0 <= position < length:
        raise ValueError(f"position must be in [0, {length}), got {position}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, length, channels, generator=g, dtype=torch.float64, requires_grad=True)
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(out[:, position].sum(), x)
    return grad[0].abs().sum(-1) > 0


def conv_receptive_field(num_layers: int, kernel_size: int, dilation: int = 1) -> int:
    """Closed form: ``1 + num_layers * (kernel_size - 1) * dilation`` positions."""
    for name, v in (("num_layers", num_layers), ("kernel_size", kernel_size), ("dilation", dilation)):
        _checks.positive_number(name, v, integer=True)
    return 1 + num_layers * (kernel_size - 1) * dilation
