"""Exercises: attention pooling, a learned bandwidth, masked softmax, scaled
dot-product attention, additive scores.

Each has a from-scratch ``solution`` (what a learner may write) and an
``expected`` computed with the tested package code, bound here at import time (so
that a learner who reassigns ``attn_course.basics.masked_softmax`` moves no target).
Above each exercise, a comment lists the mistakes learners make; a case catches
each one, and a hint names it only when the answer really looks like that mistake.
"""

from __future__ import annotations

import math

import torch

from ..basics import AdditiveAttention as _AdditiveAttention
from ..basics import masked_softmax as _masked_softmax
from ..basics import nadaraya_watson as _nadaraya_watson
from ..basics import scaled_dot_product_attention as _sdpa
from ._core import Case, Exercise, close, finite, matches

_INF = float("-inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(got):
    """``got`` as two tensors (output, weights), or None."""
    if isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(g, torch.Tensor) for g in got):
        return got[0], got[1]
    return None


# --- basics.nadaraya_watson -------------------------------------------------------------------
# Mistakes: the softmax over the wrong axis (the queries); exp() without normalising;
# dropping the 1/2; squaring the distance before dividing by h (d^2 / h), or multiplying by h
# (both invisible when h = 1, so the cases use h = 0.3 and 2.5); |d| instead of d^2; exp / sum
# without subtracting the maximum, which gives 0/0 = NaN for queries far from the data;
# weights (n_train, n_query); the prediction not computed as weights @ y_train.

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
    pair = _pair(got)
    if pair is None:
        return None
    y_pred, weights = pair
    exp_w = expected[1]
    d = (x_query[:, None] - x_train[None, :]).double()
    if weights.shape == exp_w.shape and not finite(weights):
        naive = torch.exp(-0.5 * (d / h) ** 2)
        naive = naive / naive.sum(1, keepdim=True)
        if torch.isnan(naive).any():
            return ("far from the data every exp(-d^2 / 2h^2) underflows to 0, and 0 / 0 is NaN: "
                    "use torch.softmax, which subtracts each row's maximum first.")
        return None
    kernel = -0.5 * (d / h) ** 2
    for variant, text in (
            (torch.softmax(kernel, 0), "normalise over the training points (dim=1), not the queries."),
            (torch.exp(kernel), "each row of weights must sum to 1: use a softmax over the training "
                                "points, not exp() alone."),
            (torch.softmax(-((d / h) ** 2), 1), "check the kernel exp(-((x_q - x_i) / sigma)**2 / 2): "
                                                "you dropped the 1/2."),
            (torch.softmax(-0.5 * d**2 / h, 1), "check the kernel: divide the distance by sigma before "
                                                "squaring, ((x_q - x_i) / sigma)**2."),
            (torch.softmax(-0.5 * (d * h) ** 2, 1), "check the kernel: divide by the bandwidth, do not "
                                                    "multiply."),
            (torch.softmax(-0.5 * (d / h).abs(), 1), "check the kernel: square the distance.")):
        if matches(weights, variant, exp_w):
            return text
    if close(weights, exp_w) and not close(y_pred, expected[0]):
        return "the weights are right; the prediction is weights @ y_train."
    return None


# --- basics.fit_bandwidth ---------------------------------------------------------------------
# Mistakes: not zeroing the gradient between steps (it accumulates); a step on h instead of
# log h; returning log h; the sum of squared errors instead of the mean; stepping uphill
# (w += lr * grad); predicting at x_train instead of x_val; the weights from the wrong axis.

def _fit_solution(x_train, y_train, x_val, y_val, steps, lr):
    log_h = torch.zeros((), dtype=torch.float64, requires_grad=True)   # h = exp(log_h) = 1 at first
    x_train, y_train, x_val, y_val = (t.double() for t in (x_train, y_train, x_val, y_val))
    for _ in range(steps):
        d = (x_val[:, None] - x_train[None, :]) / torch.exp(log_h)
        pred = torch.softmax(-0.5 * d**2, dim=1) @ y_train
        loss = ((pred - y_val) ** 2).mean()
        (grad,) = torch.autograd.grad(loss, log_h)                 # a fresh gradient every step
        with torch.no_grad():
            log_h -= lr * grad
    return float(torch.exp(log_h.detach()))


def _fit_reference(x_train, y_train, x_val, y_val, steps, lr, *, on="log_h", accumulate=False,
                   reduce="mean", sign=1.0, queries="val"):
    """Gradient descent on log h with the gradient written out by hand (no autograd).

    ``s = -d^2 / (2 h^2)`` so ``ds / dlog h = -2 s``; ``dy_hat_i = sum_j a_ij ds_ij (y_j - y_hat_i)``.
    The keyword arguments produce the mistakes above, for the hints.
    """
    xt, yt = x_train.double(), y_train.double()
    xq, yq = (x_val.double(), y_val.double()) if queries == "val" else (xt, yt)
    w, total = 0.0, 0.0
    for _ in range(steps):
        h = math.exp(w)
        s = -0.5 * ((xq[:, None] - xt[None, :]) / h) ** 2
        a = torch.softmax(s, dim=1)
        pred = a @ yt
        dpred = (a * (-2 * s) * (yt[None, :] - pred[:, None])).sum(1)      # d pred / d log h
        err = pred - yq
        grad = float((2 * err * dpred).mean() if reduce == "mean" else (2 * err * dpred).sum())
        if on == "h":
            grad = grad / h                                                  # d loss / d h
        total = total + grad if accumulate else grad
        if on == "h":
            w = math.log(max(h - sign * lr * total, 1e-300))
        else:
            w -= sign * lr * total
    return math.exp(w)


def _fit_expected(x_train, y_train, x_val, y_val, steps, lr):
    return _fit_reference(x_train, y_train, x_val, y_val, steps, lr)


def _fit_cases():
    g = _gen(5)
    cases = []
    for n_train, n_val, noise, steps, lr in ((30, 20, 0.1, 1, 0.5), (40, 25, 0.05, 20, 2.0),
                                             (25, 30, 0.3, 40, 1.0)):
        x = torch.sort(6 * torch.rand(n_train, generator=g)).values
        y = torch.sin(2 * x) + noise * torch.randn(n_train, generator=g)
        xv = 6 * torch.rand(n_val, generator=g)
        yv = torch.sin(2 * xv) + noise * torch.randn(n_val, generator=g)
        cases.append(Case(f"{n_train} training and {n_val} validation points, {steps} step(s) of "
                          f"size {lr}", (x, y, xv, yv, steps, lr)))
    return cases


def _fit_hint(case, got, expected):
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = float(got.detach())
    if not isinstance(got, (int, float)) or not math.isfinite(got):
        return None

    def near(v):
        return math.isfinite(v) and math.isclose(got, v, rel_tol=1e-3, abs_tol=1e-4) and not \
            math.isclose(v, expected, rel_tol=1e-3, abs_tol=1e-4)

    if near(math.log(expected)):
        return "that is log sigma: return the bandwidth itself, sigma = exp(log_sigma)."
    for kwargs, text in (
            ({"accumulate": True}, "zero the gradient after every step (or use torch.autograd.grad): "
                                   "backward() adds to .grad, so old gradients pile up."),
            ({"on": "h"}, "take the steps on log_sigma (sigma = exp(log_sigma) stays positive), not on sigma."),
            ({"reduce": "sum"}, "the loss is the mean squared error over the validation points, "
                                "not the sum."),
            ({"sign": -1.0}, "step downhill: log_sigma -= lr * gradient."),
            ({"queries": "train"}, "predict at x_val and compare with y_val: the training points "
                                   "are the keys and values.")):
        if near(_fit_reference(*case.args, **kwargs)):
            return text
    return None


# --- basics.masked_softmax --------------------------------------------------------------------
# Mistakes: ignoring the mask; inverting it (True means keep); zeroing masked weights after the
# softmax without renormalising; the softmax over the wrong axis; NaN for a row whose keys are
# all masked (softmax of all -inf); filling with -1e9 instead of -inf, which gives such a row
# uniform weights instead of zeros; exp() without subtracting the maximum (overflow at 1000);
# subtracting the maximum over ALL keys, masked ones included: a masked key with score 1e4 makes
# every allowed exp(s - 1e4) underflow to 0 (the case [1e4 masked, 0, 1]); changing scores in place.

def _ms_solution(scores, mask):
    s = scores.masked_fill(~mask, _INF)
    m = s.amax(dim=-1, keepdim=True)                             # the maximum over allowed keys only
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
    mask[:, 4] = False
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
    huge_masked = torch.tensor([[1e4, 0.0, 1.0], [2.0, -3e4, 0.5]])
    keep = torch.tensor([[False, True, True], [True, False, True]])
    cases.append(Case("a masked key with a huge score: [1e4 (masked), 0, 1]", (huge_masked, keep)))
    return cases


def _softmax_rows(s, dim=-1):
    return torch.softmax(s, dim).nan_to_num(0.0)


def _ms_hint(case, got, expected):
    scores, mask = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return None
    s, mask = scores.double(), mask.expand_as(scores)
    live = mask.any(-1)
    # rows with allowed keys where a masked key's score is far above every allowed one
    trap = (s.masked_fill(mask, _INF).amax(-1) > s.masked_fill(~mask, _INF).amax(-1) + 100) & live
    g = got.detach().double()
    dead = torch.isnan(g).any(-1) | (g.abs().sum(-1) < 1e-12)
    if (trap & dead).any():
        return ("subtract the maximum over the ALLOWED keys only: here a masked key has a huge score, "
                "so with it as the maximum every allowed exp(score - max) underflows to 0 (and 0/0 "
                "is NaN).")
    if not finite(g):
        if torch.isnan(g[~live]).any() and not torch.isnan(g[live]).any():
            return ("a query with every key masked must get all-zero weights: the softmax of a row "
                    "of -inf is 0/0 = NaN, so replace those rows by zeros.")
        if (s.abs() > 500).any():
            return "exp() of scores near 1000 overflows: subtract each row's maximum before exp()."
        return None
    for variant, text in (
            (_softmax_rows(s), "masked keys got weight: the mask is ignored. Set the scores of masked "
                               "keys to -inf before the softmax (scores.masked_fill(~mask, float('-inf')))."),
            (_softmax_rows(s.masked_fill(mask, _INF)), "the mask is inverted: True means the key MAY "
                                                      "be attended to; fill where ~mask."),
            (_softmax_rows(s) * mask, "zeroing masked weights after the softmax leaves rows that do not "
                                      "sum to 1: mask the scores (-inf) before the softmax."),
            (_softmax_rows(s.masked_fill(~mask, _INF), -2), "did you normalise over the last axis "
                                                           "(dim=-1)? Each query's weights over its keys "
                                                           "sum to 1."),
            (torch.softmax(s.masked_fill(~mask, -1e9), -1), "a query with every key masked must get "
                                                            "all-zero weights, not uniform ones: with "
                                                            "-1e9 instead of -inf every key of such a "
                                                            "row ties.")):
        if matches(g, variant, expected):
            return text
    if (g[~mask].abs() > 1e-6).any():
        return "masked keys got weight: set their scores to -inf before the softmax."
    return None


# --- basics.scaled_dot_product_attention ---------------------------------------------------------
# Mistakes: no scaling; dividing by d_k instead of sqrt(d_k); sqrt(d_v) instead of sqrt(d_k)
# (d_v differs from d_k in some cases); torch.bmm or key.T, which handle 2-D or 3-D inputs
# only (the (B, H, L, d) cases); the softmax over the wrong axis; weights times key instead of
# value; the mask ignored or inverted; NaN or uniform weights for a query whose keys are all
# masked (it must get zero weights and a zero output); (weights, output) in the wrong order.

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
    return _sdpa(query, key, value, mask)


def _sdpa_cases():
    g = _gen(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = [
        Case("one sequence: query (3, 4), key (5, 4), value (5, 2)", (r(3, 4), r(5, 4), r(5, 2))),
        Case("a batch: query (2, 4, 8), key (2, 6, 8), value (2, 6, 3)", (r(2, 4, 8), r(2, 6, 8), r(2, 6, 3))),
        Case("d_k = 64, d_v = 5, where scaling matters", (r(3, 64), r(7, 64), r(7, 5))),
        Case("heads: query (2, 3, 4, 8), key and value (2, 3, 6, 8) and (2, 3, 6, 2)",
             (r(2, 3, 4, 8), r(2, 3, 6, 8), r(2, 3, 6, 2))),
    ]
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    cases.append(Case("a causal mask (5, 5)", (r(2, 5, 4), r(2, 5, 4), r(2, 5, 4)), {"mask": causal}))
    pad = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])[:, None, None, :]  # (2, 1, 1, 6)
    cases.append(Case("heads (2, 2, 4, 8) with a padding mask (2, 1, 1, 6)",
                      (r(2, 2, 4, 8), r(2, 2, 6, 8), r(2, 2, 6, 3)), {"mask": pad}))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False
    cases.append(Case("query 2 has every key masked", (r(3, 8), r(4, 8), r(4, 2)), {"mask": mask}))
    return cases


def _sdpa_hint(case, got, expected):
    query, key, value = (t.double() for t in case.args)
    mask = case.kwargs.get("mask")
    pair = _pair(got)
    if pair is None:
        return None
    out, weights = pair
    if out.shape == expected[1].shape and weights.shape == expected[0].shape and \
            out.shape != weights.shape:
        return "return (output, weights), in that order."
    if out.shape[-1] == key.shape[-1] != value.shape[-1] and weights.shape == expected[1].shape:
        return "the output mixes the values: multiply the weights by value, not key."
    if weights.shape != expected[1].shape:
        return None
    d_k, d_v = query.shape[-1], value.shape[-1]
    raw = query @ key.transpose(-2, -1)
    m = torch.ones_like(raw, dtype=torch.bool) if mask is None else mask.expand_as(raw)
    if not finite(weights):
        if mask is not None and (~m).all(-1).any():
            return ("a query whose keys are all masked must get zero weights and a zero output; the "
                    "softmax of a row of -inf is NaN, so zero the weights of masked keys afterwards.")
        return None

    def soft(s, dim=-1):
        return _softmax_rows(s.masked_fill(~m, _INF), dim)

    for variant, text in (
            (soft(raw), "did you divide the scores by sqrt(d_k)?"),
            (soft(raw / d_k), "divide by sqrt(d_k), not by d_k."),
            (soft(raw / math.sqrt(d_v)), "scale by the square root of the query/key size d_k = "
                                         "query.shape[-1], not of the value size."),
            (soft(raw / math.sqrt(d_k), -2), "the softmax goes over the keys, the last axis (dim=-1)."),
            (_softmax_rows(raw / math.sqrt(d_k)), "the mask is ignored: fill the scores of masked keys "
                                                  "with -inf before the softmax."),
            (_softmax_rows((raw / math.sqrt(d_k)).masked_fill(m, _INF)),
             "the mask is inverted: True means the key MAY be attended to."),
            (torch.softmax((raw / math.sqrt(d_k)).masked_fill(~m, -1e9), -1),
             "a query whose keys are all masked must get zero weights, not uniform ones (what -1e9 "
             "instead of -inf gives).")):
        if matches(weights, variant, expected[1]):
            return text
    if close(weights, expected[1]) and not close(out, expected[0]):
        return "the weights are right: the output is weights @ value."
    return None


# --- basics.additive_scores ---------------------------------------------------------------------
# Mistakes: no tanh; tanh of each projection separately (tanh(W_q q) + tanh(W_k k)); W_q and W_k
# used untransposed (query @ W_q: W_q is (h, d_q), the nn.Linear convention; the square case
# catches it); the hidden vectors summed instead of dotted with w_v; a softmax applied (the
# scores are asked for); the result transposed (L_k, L_q).

def _sdpa_raise_hint(case, message):
    if "3D" in message or "3-D" in message or "out of range" in message or "permute" in message:
        return ("handle any number of leading (batch, head) dimensions: use @ (torch.matmul) and "
                "key.transpose(-2, -1), not torch.bmm or key.T.")
    return None


def _add_solution(query, key, W_q, W_k, w_v):
    q = query @ W_q.T  # (L_q, h)
    k = key @ W_k.T    # (L_k, h)
    return torch.tanh(q[:, None, :] + k[None, :, :]) @ w_v  # (L_q, L_k)


def _add_expected(query, key, W_q, W_k, w_v):
    hidden, d_q = W_q.shape
    module = _AdditiveAttention(d_q, W_k.shape[1], hidden).to(query.dtype)
    with torch.no_grad():
        module.W_q.weight.copy_(W_q)
        module.W_k.weight.copy_(W_k)
        module.w_v.weight.copy_(w_v[None, :])
        return module.scores(query, key)


def _add_cases():
    g = _gen(4)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []
    for L_q, L_k, d_q, d_k, h in ((2, 3, 4, 4, 5), (4, 6, 3, 7, 8), (1, 5, 2, 2, 16), (3, 4, 6, 6, 6)):
        cases.append(Case(f"query ({L_q}, {d_q}), key ({L_k}, {d_k}), hidden size {h}",
                          (r(L_q, d_q), r(L_k, d_k), r(h, d_q), r(h, d_k), r(h))))
    return cases


def _add_raise_hint(case, message):
    if "cannot be multiplied" in message:
        return ("W_q is (h, d_q), as in nn.Linear: project with query @ W_q.T, and key @ W_k.T; then "
                "broadcast (L_q, 1, h) + (1, L_k, h).")
    return None


def _add_hint(case, got, expected):
    query, key, W_q, W_k, w_v = (t.double() for t in case.args)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    q, k = query @ W_q.T, key @ W_k.T
    hidden = q[:, None, :] + k[None, :, :]
    right = torch.tanh(hidden) @ w_v
    variants = [
        (hidden @ w_v, "apply tanh to W_q q + W_k k before the dot product with w_v."),
        ((torch.tanh(q)[:, None, :] + torch.tanh(k)[None, :, :]) @ w_v,
         "tanh goes around the sum: tanh(W_q q + W_k k), not tanh(W_q q) + tanh(W_k k)."),
        (torch.tanh(hidden).sum(-1), "take the dot product of tanh(...) with w_v, not the plain sum."),
        (torch.softmax(right, -1), "return the scores themselves, before any softmax."),
    ]
    if W_q.shape[0] == W_q.shape[1] and W_k.shape[0] == W_k.shape[1]:
        variants.append(((torch.tanh((query @ W_q)[:, None, :] + (key @ W_k)[None, :, :])) @ w_v,
                         "W_q is (h, d_q), as in nn.Linear: project with query @ W_q.T (W_q q for a "
                         "column vector q)."))
    for variant, text in variants:
        if matches(got, variant, expected):
            return text
    return None


EXERCISES = [
    Exercise("basics.nadaraya_watson",
             "nadaraya_watson(x_train, y_train, x_query, bandwidth) -> (y_pred (n_query,), "
             "weights (n_query, n_train))",
             _nw_cases, _nadaraya_watson, _nw_solution, _nw_hint),
    Exercise("basics.fit_bandwidth",
             "fit_bandwidth(x_train, y_train, x_val, y_val, steps, lr) -> float: the bandwidth "
             "sigma after `steps` gradient-descent steps on log sigma (starting at sigma = 1) on "
             "the mean squared error at x_val",
             _fit_cases, _fit_expected, _fit_solution, _fit_hint, atol=1e-4, rtol=1e-3),
    Exercise("basics.masked_softmax",
             "masked_softmax(scores, mask) -> weights of scores' shape (mask: bool, True = keep)",
             _ms_cases, _masked_softmax, _ms_solution, _ms_hint),
    Exercise("basics.scaled_dot_product_attention",
             "scaled_dot_product_attention(query (..., L_q, d_k), key (..., L_k, d_k), value "
             "(..., L_k, d_v), mask=None) -> (output, weights)",
             _sdpa_cases, _sdpa_expected, _sdpa_solution, _sdpa_hint, raise_hint=_sdpa_raise_hint),
    Exercise("basics.additive_scores",
             "additive_scores(query (L_q, d_q), key (L_k, d_k), W_q (h, d_q), W_k (h, d_k), "
             "w_v (h,)) -> scores (L_q, L_k)",
             _add_cases, _add_expected, _add_solution, _add_hint, raise_hint=_add_raise_hint),
]
