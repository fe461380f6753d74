"""Exercises: attention pooling, a learned bandwidth, masked softmax, scaled
dot-product attention, additive scores.

Each has a from-scratch ``solution`` (what a learner may write) and an
``expected`` computed with the tested package code, bound here at import time (so
that a learner who reassigns ``attn_course.basics.masked_softmax`` moves no target).
Above each exercise, a comment lists the mistakes learners make; a case catches
each one, and a hint names it only when the answer really is that mistake (``_core.Hint``).
Each exercise's ``conditions`` list what its statement promises; every case also runs in
the other floating-point precision.
"""

from __future__ import annotations

import math

import torch

from ..basics import AdditiveAttention as _AdditiveAttention
from ..basics import masked_softmax as _masked_softmax
from ..basics import nadaraya_watson as _nadaraya_watson
from ..basics import scaled_dot_product_attention as _sdpa
from ._core import Case, Exercise, close, fact, finite, first_match, in_both_precisions

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
    x = torch.sort(5 * torch.rand(10, generator=g)).values
    cases.append(Case("queries near and far (60 bandwidths away) in one call, bandwidth 0.3",
                      (x, torch.cos(x), torch.tensor([2.0, -20.0, 3.5, 30.0]), 0.3)))
    cases.append(Case("queries near and far (60 bandwidths away) in one call, bandwidth 2.5",
                      (x, torch.sin(x), torch.tensor([1.0, 160.0, 4.5, -150.0]), 2.5)))
    return in_both_precisions(cases)


def _far(x_train, y_train, x_query, bandwidth):
    """Some query is so far from every training point that exp(-d^2 / 2 h^2) underflows (float64 too)."""
    d = (x_query.double()[:, None] - x_train.double()[None, :]).abs().amin(1) / bandwidth
    return bool((d > 40).any())


def _weights_of(got):
    return got[1]


def _nw_hint(case, got, expected):
    x_train, y_train, x_query, h = case.args
    pair = _pair(got)
    if pair is None:
        return None
    y_pred, weights = pair
    exp_w = expected[1]
    d = (x_query[:, None] - x_train[None, :]).to(x_train.dtype)
    if weights.shape == exp_w.shape and not finite(weights):
        naive = torch.exp(-0.5 * (d / h) ** 2)              # in the inputs' precision, as the learner
        naive = naive / naive.sum(1, keepdim=True)
        return first_match(got, expected, [(naive, "far from the data every exp(-d^2 / 2h^2) underflows "
                                                   "to 0, and 0 / 0 is NaN: use torch.softmax, which "
                                                   "subtracts each row's maximum first.")],
                           where=_weights_of)
    d = d.double()
    kernel = -0.5 * (d / h) ** 2
    hint = first_match(got, expected, [
        (torch.softmax(kernel, 0), "normalise over the training points (dim=1), not the queries."),
        (torch.exp(kernel), "each row of weights must sum to 1: use a softmax over the training "
                            "points, not exp() alone."),
        (torch.softmax(-((d / h) ** 2), 1), "check the kernel exp(-((x_q - x_i) / sigma)**2 / 2): "
                                            "you dropped the 1/2."),
        (torch.softmax(-0.5 * d**2 / h, 1), "check the kernel: divide the distance by sigma before "
                                            "squaring, ((x_q - x_i) / sigma)**2."),
        (torch.softmax(-0.5 * (d * h) ** 2, 1), "check the kernel: divide by the bandwidth, do not "
                                                "multiply."),
        (torch.softmax(-0.5 * (d / h).abs(), 1), "check the kernel: square the distance.")],
        where=_weights_of)
    if hint:
        return hint
    if close(weights, exp_w) and not close(y_pred, expected[0]):
        return fact("the weights are right; the prediction is weights @ y_train.")
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
    x, y, xv, yv = cases[0].args[:4]
    cases.append(Case("steps = 0: sigma stays where it starts", (x, y, xv, yv, 0, 0.5)))
    return in_both_precisions(cases)


_FIT_MEMO: dict = {}


def _fit_reference_cached(args, kwargs: tuple) -> float:
    """:func:`_fit_reference` for the hints, remembered per case (a hint may be asked many times)."""
    key = tuple(a.double().numpy().tobytes() if isinstance(a, torch.Tensor) else a for a in args) + kwargs
    if key not in _FIT_MEMO:
        if len(_FIT_MEMO) > 256:
            _FIT_MEMO.clear()
        _FIT_MEMO[key] = _fit_reference(*args, **dict(kwargs))
    return _FIT_MEMO[key]


def _fit_hint(case, got, expected):
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = float(got.detach())
    if not isinstance(got, (int, float)) or not math.isfinite(got):
        return None
    pairs = [(math.log(expected), "that is log sigma: return the bandwidth itself, sigma = exp(log_sigma).")]
    for kwargs, text in (
            ({"accumulate": True}, "zero the gradient after every step (or use torch.autograd.grad): "
                                   "backward() adds to .grad, so old gradients pile up."),
            ({"on": "h"}, "take the steps on log_sigma (sigma = exp(log_sigma) stays positive), not on sigma."),
            ({"reduce": "sum"}, "the loss is the mean squared error over the validation points, "
                                "not the sum."),
            ({"sign": -1.0}, "step downhill: log_sigma -= lr * gradient."),
            ({"queries": "train"}, "predict at x_val and compare with y_val: the training points "
                                   "are the keys and values.")):
        variant = _fit_reference_cached(case.args, tuple(sorted(kwargs.items())))
        pairs.append((variant if math.isfinite(variant) else None, text))
    return first_match(float(got), expected, pairs, atol=1e-4, rtol=1e-3)


# --- basics.masked_softmax --------------------------------------------------------------------
# Mistakes: ignoring the mask; inverting it (True means keep); zeroing masked weights after the
# softmax without renormalising; the softmax over the wrong axis; NaN for a row whose keys are
# all masked (softmax of all -inf); filling with -1e9 instead of -inf, which gives such a row
# uniform weights instead of zeros; filling with a finite -1e4, which ties with allowed scores of
# -1e4 (the statement allows scores of magnitude 1e4, so a row whose allowed scores all sit at
# -1e4 hands the weight to masked keys); exp() without subtracting the maximum (overflow at
# 1000); subtracting the maximum over ALL keys, masked ones included: a masked key with score
# 1e4 makes every allowed exp(s - 1e4) underflow to 0 (the case [1e4 masked, 0, 1]); changing
# scores in place. The last two cases hold every condition at once, with a full and with a
# broadcast mask, and every case runs in float32 and float64.

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
    huge_masked = torch.tensor([[1e4, 0.0, 1.0], [2.0, -1e4, 0.5]])
    keep = torch.tensor([[False, True, True], [True, False, True]])
    cases.append(Case("a masked key with a huge score: [1e4 (masked), 0, 1]", (huge_masked, keep)))
    low = torch.tensor([[-1e4, 3.0, -1e4, 0.0, -9999.0], [-9998.0, -1e4, -5e3, -1e4, -1e4]])
    keep = torch.tensor([[True, False, True, False, True], [True, True, False, True, False]])
    cases.append(Case("every allowed score of a row at about -1e4 (masked keys at 3, 0, -5e3)", (low, keep)))
    everything = torch.tensor([[[1e4, -1e4, 5e3, 0.0], [0.0, 1e4, 2.0, 1.0], [-1e4, 7.0, -1e4, -9999.0]],
                               [[1000.0, 999.0, 1e4, -1000.0], [3.0, -2.0, 0.5, 1.0], [-1e4, -1e4, 1e4, 2.0]]])
    keep = torch.tensor([[[False, False, False, False], [True, False, True, True], [True, False, True, True]],
                         [[True, True, False, True], [True, True, True, True], [True, True, False, False]]])
    cases.append(Case("all at once: a row with every key masked, huge masked keys, allowed scores at "
                      "-1e4 and at 1000", (everything, keep)))
    scores = torch.tensor([[[1e4, 2.0, -1e4, 0.0]] * 2, [[-1e4, 1e4, -9999.0, 5.0]] * 2])
    scores[0, 1] = torch.tensor([-3.0, 1000.0, 999.0, 1e4])
    scores[1, 1] = torch.tensor([1000.0, 1e4, 999.0, 2.0])
    pad = torch.tensor([[False] * 4, [True, False, True, False]])[:, None, :]       # (2, 1, 4)
    cases.append(Case("all at once with a padding mask (2, 1, 4): sequence 0 all padding",
                      (scores, pad)))
    return in_both_precisions(cases)


def _rows(scores, mask):
    """The scores in float64 and the mask, broadcast to the scores' shape."""
    return scores.double(), mask.expand_as(scores)


def _ms_conditions():
    def live(a):
        return a[1].expand_as(a[0]).any(-1)

    def allowed_max(a):
        s, m = _rows(*a)
        return s.masked_fill(~m, _INF).amax(-1)

    return {
        "some keys masked": lambda s, m: bool((~m).any()),
        "a row with every key masked": lambda s, m: bool((~live((s, m))).any()),
        "an allowed score of 1000 or more (exp overflows)": lambda s, m: bool(
            (_rows(s, m)[0].masked_fill(~_rows(s, m)[1], _INF) >= 1000).any()),
        "a masked key far above every allowed one": lambda s, m: bool(
            ((_rows(s, m)[0].masked_fill(_rows(s, m)[1], _INF).amax(-1) > allowed_max((s, m)) + 1000)
             & live((s, m))).any()),
        "every allowed score of a row at -1e4 or below, with masked keys above": lambda s, m: bool(
            ((allowed_max((s, m)) <= -9998) & live((s, m))
             & (_rows(s, m)[0].masked_fill(_rows(s, m)[1], _INF).amax(-1) > -9998)).any()),
        "a mask that broadcasts over the queries": lambda s, m: m.shape != s.shape,
    }


def _softmax_rows(s, dim=-1):
    return torch.softmax(s, dim).nan_to_num(0.0)


def _ms_hint(case, got, expected):
    scores, mask = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return None
    s, mask = _rows(scores, mask)
    live = mask.any(-1)
    g = got.detach().double()
    exp = expected.double()
    native = scores.masked_fill(~mask, _INF)              # the learner's precision, for overflow

    def normalised(e):                                     # e / sum, and the same with 0/0 read as 0
        e = e / e.sum(-1, keepdim=True)
        return [e.double(), e.nan_to_num(0.0).double()]

    # rows with allowed keys where a masked key's score is far above every allowed one
    trap = ((s.masked_fill(mask, _INF).amax(-1) > s.masked_fill(~mask, _INF).amax(-1) + 100) & live).any()
    over_all = normalised(torch.exp(scores - scores.amax(-1, keepdim=True)) * mask)  # max over ALL keys
    no_max = normalised(torch.exp(scores) * mask)                                   # no max: overflows
    nan_rows = torch.softmax(native, -1).double()
    overflow = bool((native.double() > math.log(torch.finfo(scores.dtype).max)).any())
    hint = first_match(g, exp, [
        (nan_rows, "a query with every key masked must get all-zero weights: the softmax of a row of "
                   "-inf is 0/0 = NaN, so replace those rows by zeros.")]
        + [(v if trap else None, "subtract the maximum over the ALLOWED keys only: here a masked key has a "
                                 "huge score, so with it as the maximum every allowed exp(score - max) "
                                 "underflows to 0 (and 0/0 is NaN).") for v in over_all]
        + [(v if overflow else None, "exp() of scores near 1000 overflows: subtract each row's maximum "
                                     "(over the allowed keys) before exp().") for v in no_max])
    if hint:
        return hint
    if not finite(g):
        bad = ~torch.isfinite(g).all(-1)                   # rows with NaN or inf
        big = (native.double() > math.log(torch.finfo(scores.dtype).max)).any(-1)
        rest = ~bad
        if bool((bad <= big).all()) and close(g[rest], exp[rest]):
            return fact("exp() of scores near 1000 overflows: the rows with NaN or inf are those with "
                        "a large allowed score. Subtract each row's maximum (over the allowed keys) "
                        "before exp().")
        return None
    return first_match(g, exp, [
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
                                                        "row ties."),
        (torch.softmax(s.masked_fill(~mask, -1e4), -1), _FINITE_FILL),
        (torch.softmax(s.masked_fill(~mask, -1e4), -1) * live[..., None], _FINITE_FILL),
        (torch.softmax(s.masked_fill(~mask, -1e4), -1) * mask, _FINITE_FILL_ZEROED)]) \
        or (fact("masked keys got weight: set their scores to -inf before the softmax.")
            if bool((g[~mask].abs() > 1e-6).any()) else None)


_FINITE_FILL = ("a finite fill such as -1e4 is not below every score: here the allowed scores of a "
                "row are -1e4 too, so masked keys tie with them and take weight. Fill with -inf (and "
                "give a row with every key masked zeros).")
_FINITE_FILL_ZEROED = ("a finite fill such as -1e4 is not below every score: here the allowed scores of "
                       "a row are -1e4 too, so masked keys take part in the softmax, and zeroing them "
                       "afterwards leaves a row that does not sum to 1. Fill with -inf.")


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
    one = torch.tensor([[True, True, False, True]])                               # (1, 4)
    cases.append(Case("one sequence with a mask (1, 4) shared by every query", (r(3, 8), r(4, 8), r(4, 2)),
                      {"mask": one}))
    mask = torch.rand(2, 1, 3, 5, generator=g) > 0.3
    mask[1, 0, 2] = False
    mask[0, 0, 0] = True
    cases.append(Case("all at once: heads (2, 2, 3, 16), 5 keys, d_v = 3, a mask (2, 1, 3, 5) that "
                      "broadcasts over the heads, a query with every key masked",
                      (r(2, 2, 3, 16), r(2, 2, 5, 16), r(2, 2, 5, 3)), {"mask": mask}))
    return in_both_precisions(cases)


def _sdpa_conditions():
    def full_mask(q, k, v, mask=None):
        return None if mask is None else mask.expand(*q.shape[:-1], k.shape[-2])

    return {
        "no mask": lambda q, k, v, mask=None: mask is None,
        "a mask": lambda q, k, v, mask=None: mask is not None,
        "one sequence, no batch axis": lambda q, k, v, mask=None: q.ndim == 2,
        "batch and head axes (B, H, L, d)": lambda q, k, v, mask=None: q.ndim == 4,
        "d_v differs from d_k": lambda q, k, v, mask=None: v.shape[-1] != q.shape[-1],
        "L_q differs from L_k": lambda q, k, v, mask=None: q.shape[-2] != k.shape[-2],
        "a mask that broadcasts": lambda q, k, v, mask=None: mask is not None and mask.shape != (
            *q.shape[:-1], k.shape[-2]),
        "a query with every key masked": lambda q, k, v, mask=None: mask is not None and bool(
            (~full_mask(q, k, v, mask).any(-1)).any()),
    }


_SDPA_EXCLUSIVE = (("no mask", "a mask"), ("one sequence, no batch axis", "batch and head axes (B, H, L, d)"),
                   ("no mask", "a mask that broadcasts"), ("no mask", "a query with every key masked"))


def _output_of(got):
    return got[0]


def _sdpa_hint(case, got, expected):
    query, key, value = (t.double() for t in case.args)
    mask = case.kwargs.get("mask")
    pair = _pair(got)
    if pair is None:
        return None
    out, weights = pair
    if out.shape == expected[1].shape and weights.shape == expected[0].shape and \
            out.shape != weights.shape:
        return fact("your two items have each other's shapes: return (output, weights), in that order.")
    if weights.shape != expected[1].shape:
        return None
    d_k, d_v = query.shape[-1], value.shape[-1]
    raw = query @ key.transpose(-2, -1)
    m = torch.ones_like(raw, dtype=torch.bool) if mask is None else mask.expand_as(raw)
    if not finite(weights):
        scores = (case.args[0] @ case.args[1].transpose(-2, -1) / math.sqrt(d_k)).masked_fill(~m, _INF)
        nan_rows = torch.softmax(scores, -1)                              # the learner's precision
        return first_match(got, expected, [((nan_rows @ case.args[2], nan_rows),
                                             "a query whose keys are all masked must get zero weights and "
                                             "a zero output; the softmax of a row of -inf is NaN, so zero "
                                             "the weights of masked keys afterwards.")])
    right_w = expected[1].double()
    if close(weights, right_w) and out.shape[-1] == key.shape[-1] != value.shape[-1]:
        return first_match(got, expected, [(right_w @ key, "the output mixes the values: multiply the "
                                                           "weights by value, not key.")], where=_output_of)

    def soft(s, dim=-1):
        return _softmax_rows(s.masked_fill(~m, _INF), dim)

    hint = first_match(got, expected, [
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
         "instead of -inf gives).")], where=_weights_of)
    if hint:
        return hint
    if close(weights, right_w) and not close(out, expected[0]):
        return fact("the weights are right: the output is weights @ value.")
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
    for L_q, L_k, d_q, d_k, h in ((2, 3, 4, 4, 5), (4, 6, 3, 7, 8), (1, 5, 2, 2, 16), (3, 4, 6, 6, 6),
                                  (1, 4, 3, 5, 8), (1, 3, 4, 4, 4)):
        cases.append(Case(f"query ({L_q}, {d_q}), key ({L_k}, {d_k}), hidden size {h}",
                          (r(L_q, d_q), r(L_k, d_k), r(h, d_q), r(h, d_k), r(h))))
    return in_both_precisions(cases)


_ADD_CONDITIONS = {
    "d_q differs from d_k": lambda q, k, Wq, Wk, w: q.shape[-1] != k.shape[-1],
    "L_q differs from L_k": lambda q, k, Wq, Wk, w: q.shape[0] != k.shape[0],
    "a single query": lambda q, k, Wq, Wk, w: q.shape[0] == 1,
    "square W_q and W_k (h = d_q = d_k)": lambda q, k, Wq, Wk, w: Wq.shape[0] == Wq.shape[1] == Wk.shape[1],
}
_ADD_EXCLUSIVE = (("d_q differs from d_k", "square W_q and W_k (h = d_q = d_k)"),)


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
    return first_match(got, expected, variants)


_NW_CONDITIONS = {
    "bandwidth below 1": lambda x, y, q, h: h < 1,
    "bandwidth above 1": lambda x, y, q, h: h > 1,
    "a query far from every training point (the kernel underflows)": _far,
    "near and far queries in one call": lambda x, y, q, h: _far(x, y, q, h) and not _far(x, y, q[:1], h),
}
_NW_EXCLUSIVE = (("bandwidth below 1", "bandwidth above 1"),)

_FIT_CONDITIONS = {
    "no step (steps = 0)": lambda x, y, xv, yv, steps, lr: steps == 0,
    "one step": lambda x, y, xv, yv, steps, lr: steps == 1,
    "many steps": lambda x, y, xv, yv, steps, lr: steps > 1,
    "a step size above 1": lambda x, y, xv, yv, steps, lr: lr > 1,
}
_FIT_EXCLUSIVE = (("no step (steps = 0)", "one step"), ("no step (steps = 0)", "many steps"),
                  ("one step", "many steps"), ("no step (steps = 0)", "a step size above 1"),
                  ("one step", "a step size above 1"))

EXERCISES = [
    Exercise("basics.nadaraya_watson",
             "nadaraya_watson(x_train, y_train, x_query, bandwidth) -> (y_pred (n_query,), "
             "weights (n_query, n_train))",
             _nw_cases, _nadaraya_watson, _nw_solution, _nw_hint,
             conditions=_NW_CONDITIONS, exclusive=_NW_EXCLUSIVE),
    Exercise("basics.fit_bandwidth",
             "fit_bandwidth(x_train, y_train, x_val, y_val, steps, lr) -> float: the bandwidth "
             "sigma after `steps` gradient-descent steps on log sigma (starting at sigma = 1) on "
             "the mean squared error at x_val, as a Python float (a one-element tensor is accepted)",
             _fit_cases, _fit_expected, _fit_solution, _fit_hint, atol=1e-4, rtol=1e-3,
             conditions=_FIT_CONDITIONS, exclusive=_FIT_EXCLUSIVE),
    Exercise("basics.masked_softmax",
             "masked_softmax(scores, mask) -> weights of scores' shape (mask: bool, True = keep)",
             _ms_cases, _masked_softmax, _ms_solution, _ms_hint, conditions=_ms_conditions()),
    Exercise("basics.scaled_dot_product_attention",
             "scaled_dot_product_attention(query (..., L_q, d_k), key (..., L_k, d_k), value "
             "(..., L_k, d_v), mask=None) -> (output, weights)",
             _sdpa_cases, _sdpa_expected, _sdpa_solution, _sdpa_hint, raise_hint=_sdpa_raise_hint,
             conditions=_sdpa_conditions(), exclusive=_SDPA_EXCLUSIVE),
    Exercise("basics.additive_scores",
             "additive_scores(query (L_q, d_q), key (L_k, d_k), W_q (h, d_q), W_k (h, d_k), "
             "w_v (h,)) -> scores (L_q, L_k)",
             _add_cases, _add_expected, _add_solution, _add_hint, raise_hint=_add_raise_hint,
             conditions=_ADD_CONDITIONS, exclusive=_ADD_EXCLUSIVE),
]
