"""Chapter 1 exercises: attention pooling, masked softmax, scaled dot-product attention,
additive scores.

Each has a from-scratch ``solution`` (what a learner may write) and an
``expected`` computed with the tested package code: the checker compares the
two implementations, and the tests check both against torch.
"""

from __future__ import annotations

import math

import torch

from .. import basics
from ._core import Case, Exercise

_INF = float("-inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows_sum_to_one(w: torch.Tensor) -> bool:
    s = w.detach().double().sum(-1)
    return bool(((s - 1).abs() < 1e-4).all())


# --- ch01.nadaraya_watson -------------------------------------------------------------------

def _nw_solution(x_train, y_train, x_query, bandwidth):
    d = (x_query.unsqueeze(1) - x_train.unsqueeze(0)) / bandwidth  # (n_query, n_train)
    weights = torch.softmax(-0.5 * d**2, dim=1)
    return weights @ y_train, weights


def _nw_cases():
    g = _gen(1)
    cases = []
    for n_train, n_query, h in ((6, 3, 1.0), (20, 8, 0.3), (12, 5, 2.5)):
        x = torch.sort(5 * torch.rand(n_train, generator=g)).values
        y = torch.sin(x) + 0.1 * torch.randn(n_train, generator=g)
        q = 5 * torch.rand(n_query, generator=g)
        cases.append(Case(f"{n_train} training points, {n_query} queries, bandwidth {h}",
                          (x, y, q, h)))
    x = torch.linspace(0, 1, 8)
    cases.append(Case("queries far from every training point", (x, x**2, torch.tensor([40.0, -60.0]), 0.5)))
    return cases


def _nw_hint(case, got, expected):
    x_train, y_train, x_query, h = case.args
    y_pred, weights = got
    if weights.shape == expected[1].shape and not _rows_sum_to_one(weights):
        return ("each row of weights must sum to 1: normalise over the training points "
                "(dim=1), e.g. with torch.softmax(..., dim=1).")
    d = x_query[:, None] - x_train[None, :]
    for kernel, text in ((torch.softmax(-(d / h) ** 2, 1), "you dropped the 1/2"),
                         (torch.softmax(-0.5 * d**2 / h, 1), "divide the distance by h before squaring"),
                         (torch.softmax(-0.5 * d**2 * h**2, 1), "divide by the bandwidth, do not multiply")):
        if torch.allclose(weights.double(), kernel.double(), atol=1e-5):
            return f"check the kernel exp(-((x_q - x_i) / h)**2 / 2): {text}."
    if torch.allclose(weights.double(), expected[1].double(), atol=1e-5):
        return "the weights are right; the prediction is weights @ y_train."
    return None


# --- ch01.masked_softmax --------------------------------------------------------------------

def _ms_solution(scores, mask):
    s = scores.masked_fill(~mask, _INF)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with every key masked
    e = torch.exp(s - m)                                         # masked keys: exp(-inf) = 0
    total = e.sum(dim=-1, keepdim=True)
    return e / total.clamp_min(torch.finfo(e.dtype).tiny)


def _ms_cases():
    g = _gen(2)
    s = torch.randn(4, 6, generator=g)
    cases = [Case("4x6 scores, nothing masked", (s, torch.ones(4, 6, dtype=torch.bool)))]
    s = torch.randn(3, 5, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    mask[:, 0] = True
    cases.append(Case("3x5 scores, some keys masked", (s, mask)))
    lengths = torch.tensor([5, 2])
    pad = (torch.arange(5)[None, :] < lengths[:, None])[:, None, :]  # (2, 1, 5)
    cases.append(Case("batch of 2 with padding, mask of shape (2, 1, 5)",
                      (torch.randn(2, 4, 5, generator=g), pad)))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    cases.append(Case("row 1 has every key masked", (torch.randn(3, 4, generator=g), mask)))
    big = torch.tensor([[1000.0, 999.0, -1000.0], [5e3, 1e4, 0.0]])
    cases.append(Case("very large scores", (big, torch.ones(2, 3, dtype=torch.bool))))
    return cases


def _ms_hint(case, got, expected):
    scores, mask = case.args
    mask = mask.expand_as(scores)
    if got.shape != expected.shape:
        return None
    if (got.detach()[~mask].abs() > 1e-6).any():
        return "masked keys got weight: set their scores to -inf before the softmax."
    live = mask.any(-1)
    if not _rows_sum_to_one(got[live]):
        return "the rows do not sum to 1: did you normalise over the last axis (dim=-1)?"
    if (got.detach()[~live].abs() > 1e-6).any():
        return "a query with every key masked must get all-zero weights."
    return None


# --- ch01.scaled_dot_product_attention ---------------------------------------------------------

def _sdpa_solution(query, key, value, mask=None):
    d_k = query.shape[-1]
    scores = query @ key.transpose(-2, -1) / math.sqrt(d_k)  # (..., L_q, L_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, _INF)
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)  # also turns fully masked (NaN) rows into 0
    return weights @ value, weights


def _sdpa_expected(query, key, value, mask=None):
    return basics.scaled_dot_product_attention(query, key, value, mask)


def _sdpa_cases():
    g = _gen(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = [
        Case("one sequence: query (3, 4), key (5, 4), value (5, 2)", (r(3, 4), r(5, 4), r(5, 2))),
        Case("a batch: query (2, 4, 8), key (2, 6, 8), value (2, 6, 3)", (r(2, 4, 8), r(2, 6, 8), r(2, 6, 3))),
        Case("d_k = 64, where scaling matters", (r(3, 64), r(7, 64), r(7, 5))),
    ]
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    cases.append(Case("a causal mask (5, 5)", (r(2, 5, 4), r(2, 5, 4), r(2, 5, 4)), {"mask": causal}))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False
    cases.append(Case("query 2 has every key masked", (r(3, 8), r(4, 8), r(4, 2)), {"mask": mask}))
    return cases


def _sdpa_hint(case, got, expected):
    query, key, value = case.args
    mask = case.kwargs.get("mask")
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return None
    out, weights = got
    if isinstance(out, torch.Tensor) and out.shape[-1] == key.shape[-1] != value.shape[-1]:
        return "the output mixes the values: multiply the weights by value, not key."
    if weights.shape != expected[1].shape:
        return None
    d_k = query.shape[-1]
    unscaled = query @ key.transpose(-2, -1)
    for factor, text in ((1.0, "did you divide the scores by sqrt(d_k)?"),
                         (1.0 / d_k, "divide by sqrt(d_k), not by d_k.")):
        ref = basics.masked_softmax(unscaled * factor, mask)
        if torch.allclose(weights.double(), ref.double(), atol=1e-5):
            return text
    if mask is not None and (weights.detach()[~mask.expand_as(weights)].abs() > 1e-6).any():
        return "masked keys got weight: fill their scores with -inf before the softmax."
    if not _rows_sum_to_one(weights[mask.any(-1).expand(weights.shape[:-1])] if mask is not None else weights):
        return "the weights should sum to 1 over the keys: softmax over the last axis (dim=-1)."
    return None


# --- ch01.additive_scores ---------------------------------------------------------------------

def _add_solution(query, key, W_q, W_k, w_v):
    q = query @ W_q.T  # (L_q, h)
    k = key @ W_k.T    # (L_k, h)
    return torch.tanh(q[:, None, :] + k[None, :, :]) @ w_v  # (L_q, L_k)


def _add_expected(query, key, W_q, W_k, w_v):
    hidden, d_q = W_q.shape
    module = basics.AdditiveAttention(d_q, W_k.shape[1], hidden).to(query.dtype)
    with torch.no_grad():
        module.W_q.weight.copy_(W_q)
        module.W_k.weight.copy_(W_k)
        module.w_v.weight.copy_(w_v[None, :])
        return module.scores(query, key)


def _add_cases():
    g = _gen(4)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []
    for L_q, L_k, d_q, d_k, h in ((2, 3, 4, 4, 5), (4, 6, 3, 7, 8), (1, 5, 2, 2, 16)):
        cases.append(Case(f"query ({L_q}, {d_q}), key ({L_k}, {d_k}), hidden size {h}",
                          (r(L_q, d_q), r(L_k, d_k), r(h, d_q), r(h, d_k), r(h))))
    return cases


def _add_hint(case, got, expected):
    query, key, W_q, W_k, w_v = case.args
    no_tanh = (query @ W_q.T)[:, None, :] + (key @ W_k.T)[None, :, :]
    if got.shape == expected.shape and torch.allclose(got.double(), (no_tanh @ w_v).double(), atol=1e-4):
        return "apply tanh to W_q q + W_k k before the dot product with w_v."
    return "score[i, j] = w_v . tanh(W_q @ query[i] + W_k @ key[j]); broadcast (L_q, 1, h) + (1, L_k, h)."


EXERCISES = [
    Exercise("ch01.nadaraya_watson",
             "nadaraya_watson(x_train, y_train, x_query, bandwidth) -> (y_pred (n_query,), "
             "weights (n_query, n_train))",
             _nw_cases, basics.nadaraya_watson, _nw_solution, _nw_hint),
    Exercise("ch01.masked_softmax",
             "masked_softmax(scores, mask) -> weights of scores' shape (mask: bool, True = keep)",
             _ms_cases, basics.masked_softmax, _ms_solution, _ms_hint),
    Exercise("ch01.scaled_dot_product_attention",
             "scaled_dot_product_attention(query, key, value, mask=None) -> (output, weights)",
             _sdpa_cases, _sdpa_expected, _sdpa_solution, _sdpa_hint),
    Exercise("ch01.additive_scores",
             "additive_scores(query (L_q, d_q), key (L_k, d_k), W_q (h, d_q), W_k (h, d_k), "
             "w_v (h,)) -> scores (L_q, L_k)",
             _add_cases, _add_expected, _add_solution, _add_hint),
]
