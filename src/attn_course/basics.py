"""Chapter 1, attention basics: attention pooling, scoring functions, masking.

Shapes follow the book's notation: ``query (..., L_q, d_k)``,
``key (..., L_k, d_k)``, ``value (..., L_k, d_v)``; boolean masks broadcast to
``(..., L_q, L_k)`` and ``True`` means "may attend".
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _checks

__all__ = [
    "softmax",
    "masked_softmax",
    "nadaraya_watson",
    "scaled_dot_product_attention",
    "AdditiveAttention",
    "MultiplicativeAttention",
    "FixedSelectionPool",
    "ContentAttentionPool",
]


def softmax(x, axis: int = -1, temperature: float = 1.0) -> np.ndarray:
    r"""Numerically stable softmax of a NumPy array along ``axis``.

    .. math:: \mathrm{softmax}(x / T)_i = \frac{e^{(x_i - m)/T}}{\sum_j e^{(x_j - m)/T}},
              \quad m = \max_j x_j

    Subtracting the maximum changes nothing mathematically and keeps ``exp``
    from overflowing. A low temperature ``T`` sharpens the distribution
    towards the arg-max, a high one flattens it towards uniform. Entries of
    ``-inf`` get weight 0; a slice that is ``-inf`` throughout gets zeros.

    Example:
        >>> import numpy as np
        >>> from attn_course.basics import softmax
        >>> x = np.array([1.0, 2.0, 3.0])
        >>> softmax(x).round(4).tolist(), round(float(softmax(x).sum()), 6)
        ([0.09, 0.2447, 0.6652], 1.0)
        >>> softmax(x, temperature=0.01).round(4).tolist()    # cold: the arg-max
        [0.0, 0.0, 1.0]
        >>> softmax(x, temperature=100.0).round(2).tolist()   # hot: nearly uniform
        [0.33, 0.33, 0.34]
        >>> softmax(np.array([1000.0, 1000.0, -np.inf])).tolist()   # no overflow; -inf gets 0
        [0.5, 0.5, 0.0]
    """
    if isinstance(x, torch.Tensor):
        raise TypeError("x must be a NumPy array (this is the NumPy softmax); "
                        "for tensors use attn_course.basics.masked_softmax")
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"x must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.result_type(x.dtype, np.float32), copy=False)
    temperature = _checks.positive_number("temperature", temperature)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {x.shape}")
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp((x - m) / temperature)
    total = np.sum(e, axis=axis, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    r"""Softmax of ``scores`` over ``dim`` in which masked-out entries get weight 0.

    .. math:: a_{ij} = \frac{m_{ij}\, e^{s_{ij}}}{\sum_{j'} m_{ij'}\, e^{s_{ij'}}}

    ``mask`` is boolean, broadcasts to ``scores`` and is ``True`` where a key
    may be attended to. A row whose entries are all masked gets all-zero
    weights (never NaN).

    Example:
        >>> import torch
        >>> from attn_course.basics import masked_softmax
        >>> scores = torch.tensor([[1.0, 1.0, 5.0], [2.0, 3.0, 4.0]])
        >>> mask = torch.tensor([[True, True, False], [False, False, False]])
        >>> masked_softmax(scores, mask)   # row 2: every key masked, zeros rather than NaN
        tensor([[0.5000, 0.5000, 0.0000],
                [0.0000, 0.0000, 0.0000]])
    """
    _checks.float_tensor("scores", scores)
    if not -scores.ndim <= dim < scores.ndim:
        raise ValueError(f"dim {dim} is out of range for scores of shape {tuple(scores.shape)}")
    if mask is None:
        return torch.softmax(scores, dim=dim)
    _checks.bool_mask("mask", mask, tuple(scores.shape), scores.device)
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=dim)
    # Fully masked rows are softmax(-inf, ..., -inf) = NaN: zero them (and every masked entry).
    return weights.masked_fill(~mask, 0.0)


def nadaraya_watson(x_train: torch.Tensor, y_train: torch.Tensor, x_query: torch.Tensor,
                    bandwidth: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Nadaraya-Watson kernel regression: attention pooling with a Gaussian kernel.

    .. math:: \hat y(x) = \sum_i \alpha(x, x_i)\, y_i, \qquad
              \alpha(x, x_i) = \mathrm{softmax}_i\Big(-\tfrac12 \big(\tfrac{x - x_i}{\sigma}\big)^2\Big)

    The query is ``x``, the keys are ``x_i``, the values are ``y_i`` and the
    bandwidth ``sigma`` (the argument ``bandwidth``) sets how local the average is
    (Nadaraya 1964; Watson 1964).

    Args:
        x_train: ``(n_train,)`` keys.
        y_train: ``(n_train,)`` values.
        x_query: ``(n_query,)`` queries.
        bandwidth: ``sigma > 0``, a number or a 0-d float tensor (a learnable ``sigma``: gradients flow
            through it).

    Returns:
        ``y_pred (n_query,)`` and ``weights (n_query, n_train)``, rows summing to 1.

    Example:
        A narrow kernel returns the nearest key's value, a wide one the mean of all values:

        >>> import torch
        >>> from attn_course.basics import nadaraya_watson
        >>> x_train, y_train = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 1.0, 5.0])
        >>> x_query = torch.tensor([1.0])
        >>> y_narrow, weights = nadaraya_watson(x_train, y_train, x_query, bandwidth=0.05)
        >>> y_wide, _ = nadaraya_watson(x_train, y_train, x_query, bandwidth=1000.0)
        >>> round(y_narrow.item(), 4), round(y_wide.item(), 4), tuple(weights.shape)
        (1.0, 2.0, (1, 3))
    """
    _checks.float_tensor("x_train", x_train, ndim=1)
    _checks.float_tensor("y_train", y_train, ndim=1)
    _checks.float_tensor("x_query", x_query, ndim=1)
    _checks.same_dtype_device(x_train=x_train, y_train=y_train, x_query=x_query)
    if y_train.shape != x_train.shape:
        raise ValueError(f"y_train must have the shape of x_train {tuple(x_train.shape)}, "
                         f"got {tuple(y_train.shape)}")
    if x_train.numel() == 0:
        raise ValueError("x_train must hold at least one point, got shape (0,)")
    if isinstance(bandwidth, torch.Tensor):
        # a learnable sigma (a 0-d tensor, possibly requires_grad): gradients flow through it
        if bandwidth.ndim != 0 or not bandwidth.is_floating_point():
            raise TypeError(f"bandwidth must be a number or a 0-d float tensor, got a tensor of shape "
                            f"{tuple(bandwidth.shape)} and dtype {bandwidth.dtype}")
        if not bool(bandwidth.detach() > 0):
            raise ValueError(f"bandwidth must be > 0, got {bandwidth.item()!r}")
        h = bandwidth.to(device=x_query.device, dtype=x_query.dtype)
    else:
        h = _checks.positive_number("bandwidth", bandwidth)
    diff = (x_query[:, None] - x_train[None, :]) / h  # (n_query, n_train)
    weights = torch.softmax(-0.5 * diff**2, dim=-1)
    return weights @ y_train, weights


def _check_qkv(query, key, value) -> torch.Size:
    """Validate query/key/value; return the broadcast batch shape."""
    _checks.float_tensor("query", query, min_ndim=2)
    _checks.float_tensor("key", key, min_ndim=2)
    _checks.float_tensor("value", value, min_ndim=2)
    _checks.same_dtype_device(query=query, key=key, value=value)
    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same length L_k (dim -2); got {shapes}")
    try:
        return torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        raise ValueError(f"the batch dimensions of query, key and value do not broadcast; "
                         f"got {shapes}") from None


def _attend(scores: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared last step: masked softmax over keys, optional dropout, weighted sum of values."""
    weights = masked_softmax(scores, mask)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights @ value, weights


def causal_mask(length_q: int, length_k: int, device=None) -> torch.Tensor:
    """``(L_q, L_k)`` bool mask, ``True`` where ``j <= i`` (top-left aligned, as torch's SDPA)."""
    return torch.ones(length_q, length_k, dtype=torch.bool, device=device).tril()


def _scores_setup(query, key, value, mask, is_causal: bool, scale) -> tuple[float, torch.Tensor | None]:
    """Validate dense attention's inputs; return the scale and the mask with the causal part
    folded in (``None`` when every key is allowed). Shared by every dense attention here."""
    batch = _check_qkv(query, key, value)
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same feature size d_k (dim -1); got "
                         f"query {tuple(query.shape)}, key {tuple(key.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number or None, got {scale!r}")
    L_q, L_k = query.shape[-2], key.shape[-2]
    if mask is not None:
        _checks.bool_mask("mask", mask, (*batch, L_q, L_k), query.device)
    if is_causal:
        causal = causal_mask(L_q, L_k, device=query.device)
        mask = causal if mask is None else mask & causal
    return float(scale), mask


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 mask: torch.Tensor | None = None, *, is_causal: bool = False,
                                 scale: float | None = None, dropout_p: float = 0.0
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Scaled dot-product attention (Vaswani et al., 2017), returning the weights too.

    .. math:: \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\Big(\frac{Q K^\top}{\sqrt{d_k}}\Big) V

    Args:
        query: ``(..., L_q, d_k)``.
        key: ``(..., L_k, d_k)``.
        value: ``(..., L_k, d_v)``.
        mask: bool, broadcasts to ``(..., L_q, L_k)``; ``True`` = may attend.
        is_causal: also hide keys ``j > i`` (combined with ``mask`` if both are given).
        scale: multiplies the scores; defaults to ``1 / sqrt(d_k)``.
        dropout_p: dropout on the weights (always applied when > 0, as in torch).

    Returns:
        ``output (..., L_q, d_v)`` equal to ``torch.nn.functional.scaled_dot_product_attention``
        and ``weights (..., L_q, L_k)``. A query whose keys are all masked gets
        zero weights and a zero output.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.basics import scaled_dot_product_attention
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(2, 4, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 5)
        >>> out, weights = scaled_dot_product_attention(q, k, v)
        >>> tuple(out.shape), tuple(weights.shape)
        ((2, 4, 5), (2, 4, 6))
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
        True
        >>> torch.allclose(weights.sum(-1), torch.ones(2, 4))
        True
        >>> _, causal = scaled_dot_product_attention(q, q, v[:, :4], is_causal=True)
        >>> causal[0, 0]                      # the first query sees only the first key
        tensor([1., 0., 0., 0.])
    """
    scale, mask = _scores_setup(query, key, value, mask, is_causal, scale)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    scores = (query @ key.transpose(-2, -1)) * scale  # (..., L_q, L_k)
    return _attend(scores, value, mask, float(dropout_p))


class AdditiveAttention(nn.Module):
    r"""Additive (Bahdanau) attention (Bahdanau et al., 2014).

    .. math:: s(q, k) = w_v^\top \tanh(W_q q + W_k k)

    Queries and keys may have different sizes; a one-hidden-layer MLP scores each pair.
    ``forward(query (..., L_q, query_dim), key (..., L_k, key_dim), value (..., L_k, d_v),
    mask=None) -> (output (..., L_q, d_v), weights (..., L_q, L_k))``.

    Example:
        >>> import torch
        >>> from attn_course.basics import AdditiveAttention
        >>> _ = torch.manual_seed(0)
        >>> attention = AdditiveAttention(query_dim=4, key_dim=6, hidden_dim=8)
        >>> q, k, v = torch.randn(2, 3, 4), torch.randn(2, 5, 6), torch.randn(2, 5, 7)
        >>> padding = torch.tensor([True, True, True, False, False])   # the last two keys are padding
        >>> out, weights = attention(q, k, v, padding)
        >>> tuple(out.shape), weights[..., 3:].abs().max().item()
        ((2, 3, 7), 0.0)
        >>> s = attention.w_v(torch.tanh(attention.W_q(q[0, 0]) + attention.W_k(k[0, 1])))
        >>> torch.allclose(attention.scores(q, k)[0, 0, 1], s[0])   # w_v^T tanh(W_q q + W_k k)
        True
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int):
        super().__init__()
        for name, v in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim)):
            _checks.positive_number(name, v, integer=True)
        self.W_q = nn.Linear(query_dim, hidden_dim, bias=False)
        self.W_k = nn.Linear(key_dim, hidden_dim, bias=False)
        self.w_v = nn.Linear(hidden_dim, 1, bias=False)

    def scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``(..., L_q, L_k)`` additive scores."""
        features = self.W_q(query).unsqueeze(-2) + self.W_k(key).unsqueeze(-3)  # (..., L_q, L_k, h)
        return self.w_v(torch.tanh(features)).squeeze(-1)

    def forward(self, query, key, value, mask=None):
        batch = _check_qkv(query, key, value)
        _check_features("query", query, self.W_q.in_features, "query_dim")
        _check_features("key", key, self.W_k.in_features, "key_dim")
        if mask is not None:
            _checks.bool_mask("mask", mask, (*batch, query.shape[-2], key.shape[-2]), query.device)
        return _attend(self.scores(query, key), value, mask)


class MultiplicativeAttention(nn.Module):
    r"""Multiplicative attention, Luong et al.'s (2015) "general" score.

    .. math:: s(q, k) = q^\top W k

    ``forward(query (..., L_q, query_dim), key (..., L_k, key_dim), value (..., L_k, d_v),
    mask=None) -> (output (..., L_q, d_v), weights (..., L_q, L_k))``. Unscaled, as in the paper.

    Example:
        >>> import torch
        >>> from attn_course.basics import MultiplicativeAttention
        >>> _ = torch.manual_seed(0)
        >>> attention = MultiplicativeAttention(query_dim=4, key_dim=6)
        >>> q, k, v = torch.randn(1, 3, 4), torch.randn(1, 5, 6), torch.randn(1, 5, 2)
        >>> out, weights = attention(q, k, v)
        >>> tuple(out.shape), tuple(weights.shape)
        ((1, 3, 2), (1, 3, 5))
        >>> W = attention.W.weight                                 # (query_dim, key_dim)
        >>> torch.allclose(attention.scores(q, k), q @ W @ k.transpose(-2, -1), atol=1e-6)
        True
    """

    def __init__(self, query_dim: int, key_dim: int):
        super().__init__()
        _checks.positive_number("query_dim", query_dim, integer=True)
        _checks.positive_number("key_dim", key_dim, integer=True)
        self.W = nn.Linear(key_dim, query_dim, bias=False)  # k -> W k

    def scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``(..., L_q, L_k)`` bilinear scores ``q^T W k``."""
        return query @ self.W(key).transpose(-2, -1)

    def forward(self, query, key, value, mask=None):
        batch = _check_qkv(query, key, value)
        _check_features("query", query, self.W.out_features, "query_dim")
        _check_features("key", key, self.W.in_features, "key_dim")
        if mask is not None:
            _checks.bool_mask("mask", mask, (*batch, query.shape[-2], key.shape[-2]), query.device)
        return _attend(self.scores(query, key), value, mask)


def _check_features(name: str, x: torch.Tensor, expected: int, arg: str) -> None:
    if x.shape[-1] != expected:
        raise ValueError(f"{name} has {x.shape[-1]} features (shape {tuple(x.shape)}) but the "
                         f"module was built with {arg}={expected}")


# --- The "is attention feature selection?" experiment ------------------------------------

class FixedSelectionPool(nn.Module):
    r"""Selection as a baseline: one learned weighting of positions, the same for every input.

    Seen as feature selection on the flattened input, it selects among the value
    features ``x[..., i, 0]`` (one per position) and ignores the other channels.

    .. math:: \hat y = \sum_i \mathrm{softmax}(\theta)_i\, v_i

    ``forward(x (B, L, d)) -> (y (B,), weights (B, L))`` with ``v_i = x[..., i, 0]``.
    The course's baseline, not a paper's model: a softmax relaxation of selecting one input
    feature, like one selector unit of the concrete autoencoder (Abid et al., 2019), with a
    plain softmax where they sample a Gumbel-softmax.

    Example:
        >>> import torch
        >>> from attn_course.basics import FixedSelectionPool
        >>> pool = FixedSelectionPool(length=4)
        >>> x = torch.randn(2, 4, 3)
        >>> y, weights = pool(x)
        >>> weights.tolist()              # before training: uniform, and the same for every input
        [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]
        >>> torch.allclose(y, x[..., 0].mean(-1))
        True
    """

    def __init__(self, length: int):
        super().__init__()
        _checks.positive_number("length", length, integer=True)
        self.logits = nn.Parameter(torch.zeros(length))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(self.logits, dim=0).expand(x.shape[0], -1)
        return (weights * x[..., 0]).sum(-1), weights


class ContentAttentionPool(nn.Module):
    r"""Attention pooling: weights computed from each position's content.

    .. math:: \hat y = \sum_i \mathrm{softmax}_i(q^\top W x_i)\, v_i

    A single learned query ``q`` scores every position's features ``x_i``, so
    the weights move with the input. ``forward(x (B, L, d)) -> (y (B,), weights (B, L))``.
    It is the feed-forward attention of Raffel and Ellis (2015) with a linear scorer,
    pooling the value channel ``v_i = x[..., i, 0]``.

    Example:
        >>> import torch
        >>> from attn_course.basics import ContentAttentionPool
        >>> _ = torch.manual_seed(0)
        >>> pool = ContentAttentionPool(num_features=2)
        >>> x = torch.randn(3, 5, 2)
        >>> y, weights = pool(x)
        >>> tuple(y.shape), torch.allclose(weights.sum(-1), torch.ones(3))
        ((3,), True)
        >>> torch.allclose(pool(x.flip(1))[1], weights.flip(1))   # the weights follow the content
        True
    """

    def __init__(self, num_features: int):
        super().__init__()
        _checks.positive_number("num_features", num_features, integer=True)
        self.score = nn.Linear(num_features, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(self.score(x).squeeze(-1), dim=-1)
        return (weights * x[..., 0]).sum(-1), weights
