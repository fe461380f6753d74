"""Exercises of what attention explains: attention rollout (plain, and with heads and a
residual weight), leave-one-out erasure, gradient x input, the rank correlation of two
attributions, and the erasure test of an attribution's top token.

Expected answers come from package functions bound here at import time. Above each
exercise, a comment lists the mistakes learners make; a case catches each one.
"""

from __future__ import annotations

import torch

from ..interpret import attention_rollout as _attention_rollout
from ..interpret import gradient_times_input as _gradient_times_input
from ..interpret import leave_one_out as _leave_one_out
from ..interpret import rank_correlation as _rank_correlation
from ..interpret import top1_drop as _top1_drop
from ._core import Case, Exercise, as_number, close, finite, matches

_number = as_number  # one definition, in _core


# --- interpret.attention_rollout --------------------------------------------------------------------
# Mistakes: the residual left out (plain product of the maps); later layers multiplied on the
# right (A_1 A_2 ... instead of A_L ... A_1); no row renormalisation (the cases include maps
# whose rows do not sum to 1, e.g. after head pruning); the columns renormalised instead of the
# rows; renormalising before mixing in the identity; the elementwise product instead of the
# matrix product.

def _rollout_solution(weights):
    L = weights[0].shape[-1]
    eye = torch.eye(L, dtype=weights[0].dtype)
    rollout = eye
    for a in weights:                                # first layer first
        a = 0.5 * a + 0.5 * eye                      # the residual connection keeps half of each token
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def _rollout_expected(weights):
    return _attention_rollout([w[None] for w in weights])[0]


def _rollout_cases():
    g = torch.Generator().manual_seed(71)
    cases = []
    for layers, L in ((1, 3), (2, 4), (3, 6)):
        ws = [torch.softmax(torch.randn(L, L, generator=g), -1) for _ in range(layers)]
        cases.append(Case(f"{layers} layer(s) of {L} x {L} weights", (ws,)))
    for layers, L in ((1, 4), (2, 5)):
        ws = [torch.softmax(torch.randn(L, L, generator=g), -1) * (0.3 + torch.rand(L, 1, generator=g))
              for _ in range(layers)]
        cases.append(Case(f"{layers} layer(s) of {L} x {L} maps whose rows sum to 0.3 .. 1.3", (ws,)))
    return cases


def _rollout_variant(ws, *, residual=True, order="left", renorm="after", product="matmul"):
    ws = [w.double() for w in ws]
    eye = torch.eye(ws[0].shape[-1], dtype=torch.float64)
    out = eye
    for a in ws:
        if renorm == "before":
            a = a / a.sum(-1, keepdim=True)
        if residual:
            a = 0.5 * a + 0.5 * eye
        if renorm == "after":
            a = a / a.sum(-1, keepdim=True)
        if renorm == "columns":
            a = a / a.sum(-2, keepdim=True)
        if product == "elementwise":
            out = a * out if out is not eye else a
        else:
            out = a @ out if order == "left" else out @ a
    return out


def _rollout_hint(case, got, expected):
    (ws,) = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    for kwargs, text in (
            ({"residual": False, "renorm": "none"}, "account for the residual connection: use 0.5 * A + "
                                                    "0.5 * I per layer."),
            ({"residual": False}, "account for the residual connection: use 0.5 * A + 0.5 * I per layer."),
            ({"order": "right"}, "multiply later layers on the left: R = A_L ... A_2 A_1."),
            ({"renorm": "none"}, "renormalise each row of 0.5 * A + 0.5 * I to sum to 1: these maps' rows "
                                 "do not sum to 1."),
            ({"renorm": "columns"}, "renormalise the ROWS (a.sum(-1)), not the columns: row i is how query i "
                                    "mixes the tokens, and each row must sum to 1."),
            ({"renorm": "before"}, "renormalise AFTER adding the identity (0.5 * A + 0.5 * I, then divide "
                                   "each row by its sum)."),
            ({"product": "elementwise"}, "combine the layers with a matrix product (@), not elementwise.")):
        if matches(got, _rollout_variant(ws, **kwargs), expected):
            return text
    return None


# --- interpret.rollout_with_residual ----------------------------------------------------------------
# Per layer: average the heads, A_hat = (1 - r) * A_mean + r * I, renormalise the rows, then
# R = A_hat_L ... A_hat_1 for every batch element. Mistakes: the residual weight on the wrong
# term (r * A + (1 - r) * I); rolling out each head and averaging afterwards; summing the heads
# instead of averaging them; no renormalisation (rows that do not sum to 1 in two cases); the
# layers multiplied in the wrong order.

def _rr_solution(weights, residual):
    B, H, L, _ = weights[0].shape
    eye = torch.eye(L, dtype=weights[0].dtype)
    rollout = eye.expand(B, L, L)
    for w in weights:                                      # first layer first
        a = (1 - residual) * w.mean(dim=1) + residual * eye  # heads averaged, then the skip connection
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout                              # later layers on the left
    return rollout


def _rr_expected(weights, residual):
    r = float(residual)
    if r == 0:
        return _attention_rollout([(w.mean(1) / w.mean(1).sum(-1, keepdim=True)) for w in weights],
                                  residual=False)
    # (1 - r) A + r I is proportional to 0.5 A' + 0.5 I with A' = A (1 - r) / r; rows are renormalised
    return _attention_rollout([w.mean(1) * ((1 - r) / r) for w in weights])


def _rr_cases():
    g = torch.Generator().manual_seed(72)
    cases = []
    for (layers, B, H, L), r, stochastic in (((1, 1, 2, 3), 0.5, True), ((2, 2, 3, 4), 0.5, True),
                                             ((3, 2, 2, 5), 0.9, True), ((2, 1, 4, 4), 0.0, True),
                                             ((2, 2, 2, 5), 0.25, False), ((3, 1, 3, 4), 0.7, False)):
        ws = []
        for _ in range(layers):
            w = torch.softmax(torch.randn(B, H, L, L, generator=g), -1)
            if not stochastic:
                w = w * (0.3 + torch.rand(B, H, L, 1, generator=g))
            ws.append(w)
        rows = "" if stochastic else ", rows summing to 0.3 .. 1.3"
        cases.append(Case(f"{layers} layer(s) of (B, H, L, L) = {(B, H, L, L)}, residual {r}{rows}", (ws, r)))
    return cases


def _rr_variant(ws, r, *, swap=False, per_head=False, heads="mean", renorm=True, order="left"):
    ws = [w.double() for w in ws]
    B, H, L, _ = ws[0].shape
    eye = torch.eye(L, dtype=torch.float64)

    def mix(a):
        a = (r * a + (1 - r) * eye) if swap else ((1 - r) * a + r * eye)
        if renorm == "columns":
            return a / a.sum(-2, keepdim=True)
        return a / a.sum(-1, keepdim=True) if renorm else a

    if per_head:
        out = eye.expand(B, H, L, L)
        for w in ws:
            out = mix(w) @ out
        return out.mean(1)
    out = eye.expand(B, L, L)
    for w in ws:
        a = mix(w.mean(1) if heads == "mean" else w.sum(1))
        out = a @ out if order == "left" else out @ a
    return out


def _rr_hint(case, got, expected):
    ws, r = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    for kwargs, text in (
            ({"swap": True}, "r is the weight of the identity (the skip connection): (1 - r) * A + r * I."),
            ({"per_head": True}, "average the heads first, then roll out the averaged maps (rolling out "
                                 "each head separately mixes paths through different heads)."),
            ({"heads": "sum"}, "average the heads (mean over dim 1), do not sum them."),
            ({"renorm": "columns"}, "renormalise the ROWS (sum over the last axis), not the columns."),
            ({"renorm": False}, "renormalise the rows of (1 - r) * A + r * I to sum to 1."),
            ({"order": "right"}, "multiply later layers on the left: R = A_L ... A_1.")):
        if matches(got, _rr_variant(ws, r, **kwargs), expected):
            return text
    return None



# --- interpret.leave_one_out ------------------------------------------------------------------------
# drops[b, j] = score(keep)[b] - score(keep with token j hidden)[b], every erasure starting from the
# given keep. Mistakes: the sign flipped (hidden minus full); keeping ONLY token j instead of hiding
# it; erasures that pile up (token j hidden on top of tokens 0..j-1); starting from all True instead
# of the given keep (two cases hide some tokens already); the relative drop (divided by the full
# score); the absolute value (the mean-of-values cases have negative drops). The score functions
# check what they are given, so passing a float mask or the wrong shape says so.

def _scorer(description, fn, B, L):
    def score(keep):
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (B, L):
            raise TypeError(f"score(keep) needs keep as a bool tensor of shape {(B, L)} (True = the token is "
                            f"kept), got {getattr(keep, 'dtype', type(keep).__name__)} "
                            f"{tuple(getattr(keep, 'shape', ()))}")
        return fn(keep)
    score.__doc__ = description
    return score


def _loo_solution(score, keep):
    full = score(keep)
    drops = []
    for j in range(keep.shape[1]):
        erased = keep.clone()                       # never modify keep itself
        erased[:, j] = False
        drops.append(full - score(erased))
    return torch.stack(drops, dim=1)


def _loo_expected(score, keep):
    return _leave_one_out(score, keep)


def _loo_cases():
    g = torch.Generator().manual_seed(73)
    cases = []
    w = torch.randn(2, 4, generator=g)
    cases.append(Case("a weighted sum of the kept tokens, B = 2, L = 4",
                      (_scorer("sum of w over kept tokens", lambda k, w=w: (w * k).sum(-1), 2, 4),
                       torch.ones(2, 4, dtype=torch.bool))))
    values = torch.randn(3, 6, generator=g)
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[0, 2] = keep[2, 5] = False

    def mean_kept(k, v=values):
        k = k.to(v.dtype)
        return (v * k).sum(-1) / k.sum(-1).clamp_min(1)
    cases.append(Case("the mean of the kept values (hiding a small value raises it); keep already hides two "
                      "tokens", (_scorer("mean of kept values", mean_kept, 3, 6), keep)))
    q, keys, vals = torch.randn(2, 3, generator=g), torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, generator=g)

    def attend(k, q=q, keys=keys, vals=vals):
        s = (keys @ q[:, :, None])[..., 0].masked_fill(~k, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1))
        return (p * vals).sum(-1)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 0] = False
    cases.append(Case("softmax attention over the kept keys, read out at their values (hiding a key "
                      "renormalises the rest); keep hides one token", (_scorer("attention", attend, 2, 5), keep)))
    cases.append(Case("a single token, L = 1", (_scorer("mean of kept values", lambda k: (3.0 * k).sum(-1)
                                                                 / k.sum(-1).clamp_min(1), 1, 1),
                                                torch.ones(1, 1, dtype=torch.bool))))
    return cases


def _loo_variant(score, keep, kind):
    start = torch.ones_like(keep) if kind == "all true" else keep
    full = score(start)
    drops, erased = [], start.clone()
    for j in range(keep.shape[1]):
        if kind == "only":                              # every token hidden but j
            erased = torch.zeros_like(keep)
            erased[:, j] = keep[:, j]
        else:
            if kind != "cumulative":                    # (cumulative: the earlier erasures stay)
                erased = start.clone()
            erased[:, j] = False
        d = full - score(erased)
        drops.append({"sign": -d, "relative": d / full, "abs": d.abs()}.get(kind, d))
    return torch.stack(drops, dim=1).double()


def _loo_hint(case, got, expected):
    score, keep = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    for kind, text in (
            ("sign", "a drop is score(keep) MINUS the score with token j hidden: positive when hiding the "
                     "token lowers the score."),
            ("only", "hide only token j (keep[:, j] = False) and keep every other token as it was; do not keep "
                     "token j alone."),
            ("cumulative", "start every erasure from the given keep: hide one token at a time, so token j's "
                           "drop does not include tokens hidden before it."),
            ("all true", "start from the given keep, not from all True: tokens it already hides stay hidden "
                         "(their drop is 0)."),
            ("relative", "return the drop itself, not divided by the full score."),
            ("abs", "keep the sign: hiding a token can RAISE the score, and then its drop is negative.")):
        if matches(got, _loo_variant(score, keep, kind), expected):
            return text
    return None


# --- interpret.gradient_times_input -----------------------------------------------------------------
# a[b, j] = sum_k x[b, j, k] * d fn(x)[b] / d x[b, j, k]. Mistakes: the gradient alone (summed over
# the features); the gradient's norm (saliency); the absolute value; the mean of the scores
# backpropagated (every gradient divided by B); the sum over the tokens instead of the features
# (one case has L = d, so the shapes agree). The cases: a linear score (the attribution is each
# token's exact contribution), products of two tokens, and attention of a query over the tokens.

def _gxi_solution(fn, inputs):
    x = inputs.detach().clone().requires_grad_(True)     # a copy: inputs must not change
    fn(x).sum().backward()                                # example b's score depends on example b only
    return (x.grad * inputs).sum(-1)


def _gxi_expected(fn, inputs):
    return _gradient_times_input(fn, inputs)


def _gxi_cases():
    g = torch.Generator().manual_seed(74)
    w = torch.randn(4, 3, generator=g)
    q, v = torch.randn(4, generator=g), torch.randn(4, generator=g)

    def attend(x, q=q, v=v):                             # a query reading the tokens: weights depend on x
        p = torch.softmax(x @ q, dim=-1)                 # (B, L)
        return (p * (x @ v)).sum(-1)

    return [
        Case("a linear score sum(w * x), B = 2, L = 4, d = 3",
             (lambda x, w=w: (x * w).sum((1, 2)), torch.randn(2, 4, 3, generator=g))),
        Case("tanh of the product of tokens 0 and 1 plus the cube of token 2, B = 3, L = 3, d = 3 (L = d)",
             (lambda x: torch.tanh((x[:, 0] * x[:, 1]).sum(-1)) + (x[:, 2] ** 3).sum(-1),
              torch.randn(3, 3, 3, generator=g))),
        Case("softmax attention of a query over the tokens, B = 4, L = 5, d = 4",
             (attend, torch.randn(4, 5, 4, generator=g))),
        Case("one example, one token, one feature: exp(x)", (lambda x: x.exp()[:, 0, 0], torch.randn(1, 1, 1, generator=g))),
    ]


def _gxi_variant(fn, inputs, kind):
    x = inputs.detach().double().clone().requires_grad_(True)
    out = fn(x)
    (out.mean() if kind == "mean" else out.sum()).backward()
    grad, inp = x.grad, inputs.double()
    return {"grad": grad.sum(-1), "norm": grad.norm(dim=-1), "abs": (grad * inp).sum(-1).abs(),
            "mean": (grad * inp).sum(-1), "tokens": (grad * inp).sum(-2)}[kind]


def _gxi_hint(case, got, expected):
    fn, inputs = case.args
    B, L, d = inputs.shape
    if isinstance(got, torch.Tensor) and got.shape == (B, d) and d != L:
        return "sum over the features (the last axis), not over the tokens: one attribution per token, (B, L)."
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    for kind, text in (
            ("grad", "multiply the gradient by the input, element by element, before summing over the features."),
            ("norm", "that is the gradient's norm (saliency); gradient x input sums gradient * input over the "
                     "features, and keeps its sign."),
            ("abs", "keep the sign: a token that pushes the score down gets a negative attribution."),
            ("mean", "backpropagate the SUM of the scores: the mean divides every example's gradient by B."),
            ("tokens", "sum over the features (the last axis), not over the tokens.")):
        if matches(got, _gxi_variant(fn, inputs, kind), expected):
            return text
    return None


# --- interpret.rank_correlation ---------------------------------------------------------------------
# Spearman's rho per row: the Pearson correlation of the ranks, ties sharing the mean of their
# ranks, 0 for a row where either input is constant. Mistakes: Pearson on the raw values; the
# argsort (the order of the positions) taken for the ranks; ordinal ranks (ties not averaged);
# the formula 1 - 6 sum d^2 / (n (n^2 - 1)), right only without ties; NaN for a constant row; one
# correlation of the flattened batch.

def _spearman_solution(a, b):
    def ranks(x):                                     # 1 + (number below) + (number tied, others) / 2
        below = (x[:, None, :] < x[:, :, None]).sum(-1)
        tied = (x[:, None, :] == x[:, :, None]).sum(-1)
        return (below + (tied + 1) / 2).double()
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    norm = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    rho = (ra * rb).sum(-1) / norm.clamp_min(1e-12)
    return torch.where(norm > 0, rho, 0.0).to(a.dtype)


def _spearman_expected(a, b):
    return _rank_correlation(a, b)


def _spearman_cases():
    g = torch.Generator().manual_seed(75)
    a, b = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    ties_a = torch.randint(0, 3, (4, 8), generator=g).float()
    ties_b = torch.randint(0, 4, (4, 8), generator=g).float()
    base = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.5])
    special_a = torch.stack([base, base, torch.full((5,), 0.7), base])
    special_b = torch.stack([base.exp(), -base, base, torch.full((5,), -2.0)])
    scales_a = torch.tensor([[1e-6, 3e-6, 2e-6, 1e6], [5.0, 4.0, 1e4, -1e4]])
    scales_b = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    return [
        Case("3 rows of 6 values, no ties", (a, b)),
        Case("4 rows of 8 small integers: many ties", (ties_a, ties_b)),
        Case("same order (rho = 1), reversed order (-1), a constant row in a, a constant row in b", (special_a,
                                                                                                     special_b)),
        Case("values of very different scales (1e-6 .. 1e6)", (scales_a, scales_b)),
        Case("rows of 2 values", (torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.0, 1.0]]),
                                  torch.tensor([[3.0, 5.0], [3.0, 5.0], [3.0, 5.0]]))),
    ]


def _spearman_variant(a, b, kind):
    a, b = a.double(), b.double()

    def pearson(x, y):
        x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
        n = (x.square().sum(-1) * y.square().sum(-1)).sqrt()
        return (x * y).sum(-1) / n

    def ranks(x):
        if kind == "argsort":
            return x.argsort(-1).double()
        if kind == "ordinal":
            return torch.argsort(torch.argsort(x, dim=-1, stable=True), dim=-1).double()
        below = (x[:, None, :] < x[:, :, None]).sum(-1)
        tied = (x[:, None, :] == x[:, :, None]).sum(-1)
        return (below + (tied + 1) / 2).double()

    if kind == "pearson":
        return torch.nan_to_num(pearson(a, b))
    if kind == "formula":
        n = a.shape[-1]
        return 1 - 6 * (ranks(a) - ranks(b)).square().sum(-1) / (n * (n * n - 1))
    if kind == "flat":
        return _spearman_solution(a.reshape(1, -1), b.reshape(1, -1)).expand(a.shape[0])
    return torch.nan_to_num(pearson(ranks(a), ranks(b)))


def _spearman_hint(case, got, expected):
    a, b = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return None
    if torch.isnan(got).any() and not torch.isnan(got[expected != 0]).any():
        return "a row in which a or b is constant has no ranking to compare: return 0 for it, not NaN."
    if not finite(got):
        return None
    for kind, text in (
            ("pearson", "rank the values first: Spearman's rho is the Pearson correlation of the RANKS, not of "
                        "the values."),
            ("argsort", "argsort gives the order of the positions, not each value's rank: the rank of each "
                        "value is argsort of argsort (and tied values need the mean of their ranks)."),
            ("ordinal", "tied values share the mean of their ranks (two values tied for ranks 2 and 3 both "
                        "get 2.5)."),
            ("formula", "1 - 6 sum(d^2) / (n (n^2 - 1)) holds only without ties: compute the Pearson "
                        "correlation of the (mean) ranks."),
            ("flat", "one correlation per row, over that row's L values, not one for the whole batch.")):
        if matches(got, _spearman_variant(a, b, kind), expected):
            return text
    return None


# --- interpret.top1_drop ----------------------------------------------------------------------------
# (top, best): the drop of the allowed token with the largest attribution (the first of ties), and
# the largest drop among the allowed tokens. Mistakes: the smallest attribution; the attribution's
# magnitude instead of its value (one case has negative attributions); the not-allowed positions
# included (a case puts the largest attribution on one); the best drop over all positions; the last
# of ties; the largest drop returned as the method's.

def _top1_solution(attribution, drops, allowed):
    ranked = attribution.masked_fill(~allowed, float("-inf"))
    top = drops.gather(-1, ranked.argmax(-1, keepdim=True))[:, 0]      # argmax: the first of ties
    best = drops.masked_fill(~allowed, float("-inf")).max(-1).values
    return top, best


def _top1_expected(attribution, drops, allowed):
    return _top1_drop(attribution, drops, allowed), _top1_drop(drops, drops, allowed)


def _top1_cases():
    g = torch.Generator().manual_seed(76)
    a, d = torch.randn(3, 6, generator=g), torch.rand(3, 6, generator=g)
    everything = torch.ones(3, 6, dtype=torch.bool)
    inputs_only = torch.tensor([[True] * 4 + [False] * 2] * 3)
    a2 = a.clone()
    a2[:, 5] = 10.0                                      # the largest attribution on a position not allowed
    d2 = d.clone()
    d2[:, 4] = 2.0                                       # the largest drop too
    ties = torch.tensor([[0.5, 0.9, 0.1, 0.9, 0.0], [2.0, 2.0, 2.0, 1.0, 0.0]])
    ties_d = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.1, 0.2, 0.3, 0.9]])
    neg = -torch.rand(2, 5, generator=g) - 0.1
    neg[0, 0], neg[1, 4] = -3.0, -5.0                    # the largest magnitude is the smallest value
    return [
        Case("3 rows of 6 tokens, all allowed", (a, d, everything)),
        Case("the largest attribution and the largest drop on positions that are not allowed", (a2, d2, inputs_only)),
        Case("ties in the attribution", (ties, ties_d, torch.ones(2, 5, dtype=torch.bool))),
        Case("negative attributions, some drops negative", (neg, torch.randn(2, 5, generator=g),
                                                            torch.ones(2, 5, dtype=torch.bool))),
    ]


def _top1_variant(attribution, drops, allowed, kind):
    a, d = attribution.double(), drops.double()
    ok = torch.ones_like(allowed) if kind == "no mask" else allowed
    if kind == "argmin":
        a = -a
    if kind == "abs":
        a = a.abs()
    ranked = a.masked_fill(~ok, float("-inf"))
    if kind == "last tie":
        idx = ranked.shape[-1] - 1 - ranked.flip(-1).argmax(-1, keepdim=True)
    else:
        idx = ranked.argmax(-1, keepdim=True)
    best_ok = torch.ones_like(allowed) if kind in ("no mask", "best unmasked") else allowed
    best = d.masked_fill(~best_ok, float("-inf")).max(-1).values
    top = best if kind == "best twice" else d.gather(-1, idx)[:, 0]
    return top, best


def _top1_hint(case, got, expected):
    attribution, drops, allowed = case.args
    if not isinstance(got, (tuple, list)) or len(got) != 2 or not all(finite(g) for g in got):
        return None
    for kind, text in (
            ("argmin", "take the token with the LARGEST attribution, not the smallest."),
            ("abs", "rank by the attribution as given (signed); to rank by magnitude a caller passes "
                    "attribution.abs()."),
            ("no mask", "choose only among the allowed positions (allowed is True): mask the others out "
                        "before taking the largest."),
            ("best unmasked", "the best possible drop, too, is taken over the allowed positions only."),
            ("last tie", "break ties by the FIRST position, as torch.argmax does."),
            ("best twice", "the first value is the drop of the token the ATTRIBUTION ranks first, not the "
                           "largest drop.")):
        variant = _top1_variant(attribution, drops, allowed, kind)
        if all(close(g, v) for g, v in zip(got, variant)) and not all(
                close(v, e) for v, e in zip(variant, expected)):
            return text
    return None


EXERCISES = [
    Exercise("interpret.attention_rollout", "attention_rollout(weights: list of (L, L), first layer first) -> (L, L)",
             _rollout_cases, _rollout_expected, _rollout_solution, _rollout_hint),
    Exercise("interpret.rollout_with_residual",
             "rollout_with_residual(weights: list of (B, H, L, L), first layer first, residual: float) "
             "-> (B, L, L)",
             _rr_cases, _rr_expected, _rr_solution, _rr_hint),
    Exercise("interpret.leave_one_out",
             "leave_one_out(score: keep (B, L) bool -> (B,), keep: (B, L) bool) -> drops (B, L)",
             _loo_cases, _loo_expected, _loo_solution, _loo_hint),
    Exercise("interpret.gradient_times_input",
             "gradient_times_input(fn: x (B, L, d) -> (B,), inputs: (B, L, d)) -> (B, L)",
             _gxi_cases, _gxi_expected, _gxi_solution, _gxi_hint),
    Exercise("interpret.rank_correlation", "rank_correlation(a: (B, L), b: (B, L)) -> (B,)",
             _spearman_cases, _spearman_expected, _spearman_solution, _spearman_hint),
    Exercise("interpret.top1_drop",
             "top1_drop(attribution: (B, L), drops: (B, L), allowed: (B, L) bool) -> (top (B,), best (B,))",
             _top1_cases, _top1_expected, _top1_solution, _top1_hint),
]
