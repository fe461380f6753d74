"""Exercises: a dilated mask, counting the pairs a pattern keeps, top-k attention,
banded attention that never builds L x L, Performer's positive random features, Reformer's
LSH hash, and a FlexAttention ``mask_mod`` (also run through FlexAttention where torch has it).

Expected answers come from package functions bound here at import time. The two linear-
cost exercises are also checked for what they allocate and for the work they do: a case
with L = 512 runs the learner's function under a spy (``_core.Footprint``) that records the
largest torch tensor, the memory NumPy and Python take, and the multiply-adds and elements
computed by torch operations; a tensor (or NumPy array) of L * L numbers fails, and so does
work that grows like L^2 (the dense scores computed a block of queries at a time). The two
counting exercises must derive the count, not build the mask or layout and sum it. Above each
exercise, a comment lists the mistakes learners make; a case catches each one, and a hint
names a mistake only when the answer is that mistake (``_core.Hint``). Each exercise's
``conditions`` list what its statement names; floating inputs run in float32 and float64.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from ..sparse import _orthogonal_features
from ..sparse import bigbird_layout as _bigbird_layout
from ..sparse import dilated_window_mask as _dilated_window_mask
from ..sparse import flex_available as _flex_available
from ..sparse import lsh_buckets as _lsh_buckets
from ..sparse import performer_attention as _performer_attention
from ..sparse import sliding_window_attention as _sliding_window_attention
from ..sparse import sliding_window_mask as _sliding_window_mask
from ..sparse import topk_attention as _topk_attention
from ._core import (
    Case,
    Exercise,
    any_precision,
    as_number,
    builds_nothing,
    finite,
    first_match,
    generic,
    in_both_precisions,
    mistake,
    square_free,
)

_INF = float("-inf")


_number = as_number  # one definition, in _core


def _dense(q, k, v, mask=None, scale=None):
    """Dense attention in float64, for the hints (queries with no key get zeros)."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, _INF)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


# --- sparse.dilated_window_mask -------------------------------------------------------------------
# Mistakes: a window of `window` positions instead of window * dilation; every key in the span
# kept (no (i - j) % dilation test); one side only (0 <= i - j); < instead of <=.

def _dilated_solution(length, window, dilation):
    diff = torch.arange(length)[:, None] - torch.arange(length)[None, :]   # i - j
    return (diff.abs() <= window * dilation) & (diff % dilation == 0)


def _dilated_expected(length, window, dilation):
    return _dilated_window_mask(length, window, dilation)


def _dilated_cases():
    return [Case(f"length {L}, window {w}, dilation {r}", (L, w, r))
            for L, w, r in ((8, 1, 1), (10, 2, 2), (12, 1, 3), (20, 3, 4), (5, 0, 2), (6, 2, 3), (4, 0, 1),
                                (4, 3, 1))]


_DILATED_CONDITIONS = {
    "window 0 (the diagonal alone)": lambda L, w, r: w == 0,
    "dilation 1 (a plain band)": lambda L, w, r: r == 1,
    "dilation above 1": lambda L, w, r: r > 1,
    "a span that reaches past both ends (window * dilation >= L - 1)": lambda L, w, r: w * r >= L - 1,
}
_DILATED_EXCLUSIVE = (("dilation 1 (a plain band)", "dilation above 1"),
                      ("window 0 (the diagonal alone)", "a span that reaches past both ends (window * dilation >= L - 1)"))


def _dilated_hint(case, got, expected):
    L, w, r = case.args
    if not (isinstance(got, torch.Tensor) and got.dtype == torch.bool and got.shape == expected.shape):
        return None
    diff = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    return first_match(got, expected, [
        (_sliding_window_mask(L, w) & expected, "the window spans window * dilation positions on "
                                               "each side, not window."),
        (_sliding_window_mask(L, w * r), "keep only every dilation-th key: (i - j) % dilation == 0."),
        ((diff >= 0) & (diff <= w * r) & (diff % r == 0), "keys on both sides count: |i - j|."),
        ((diff.abs() < w * r) & (diff % r == 0), "the window includes its ends: <=, not <.")]) \
        or generic("the rule: mask[i, j] = |i - j| <= window * dilation and (i - j) % dilation == 0.")


# --- sparse.band_pairs ------------------------------------------------------------------------------
# Mistakes: L * (2w + 1) (rows near the ends have fewer keys); 2w per row (the query itself
# forgotten); the ends subtracted once instead of twice; no cap when the window is at least
# as wide as the sequence.

def _band_solution(length, window):
    w = min(window, length - 1)
    # every row has 2w + 1 keys, minus those cut off at the two ends: 2 * (1 + 2 + ... + w)
    return length * (2 * w + 1) - w * (w + 1)


def _band_expected(length, window):
    return int(_sliding_window_mask(length, window).sum())


def _band_cases():
    return [Case(f"length {L}, window {w}", (L, w)) for L, w in ((10, 0), (10, 1), (16, 3), (100, 20), (5, 9),
                                                                 (7, 6), (1, 0), (1, 3))]


_BAND_CONDITIONS = {
    "window 0": lambda L, w: w == 0,
    "a window narrower than the sequence": lambda L, w: 0 < w < L - 1,
    "a window of L - 1 or more (every pair)": lambda L, w: w >= L - 1,
    "a window wider than the sequence": lambda L, w: w >= L,
    "a single position": lambda L, w: L == 1,
}
_BAND_EXCLUSIVE = (("window 0", "a window narrower than the sequence"), ("window 0", "a window wider than the sequence"),
                   ("a window narrower than the sequence", "a window of L - 1 or more (every pair)"),
                   ("a window narrower than the sequence", "a window wider than the sequence"),
                   ("a window narrower than the sequence", "a single position"))


def _band_hint(case, got, expected):
    L, w = case.args
    got = _number(got)
    if got is None:
        return None
    wc = min(w, L - 1)
    return first_match(got, expected, [
        (L * (2 * wc + 1), "rows near the start and the end have fewer than 2w + 1 keys: subtract what "
                           "falls outside."),
        (L * 2 * wc - wc * (wc + 1), "each query also attends to itself: 2w + 1 keys per full row."),
        (L * 2 * wc, "each query also attends to itself, and the rows near the ends have fewer keys: "
                     "2w + 1 keys per full row, minus what falls outside."),
        (L * (2 * wc + 1) - wc * (wc + 1) // 2, "both ends lose keys: 1 + 2 + ... + w at each end, "
                                                "w(w + 1) in all."),
        (L * (2 * w + 1) - w * (w + 1), "a window wider than the sequence keeps every pair: cap it at "
                                        "L - 1.")], atol=0, rtol=0)


# --- sparse.bigbird_kept_blocks ------------------------------------------------------------------
# Mistakes: the global rows and columns counted without their overlap (2gn instead of
# 2gn - g^2); the band counted over all n blocks, overlapping the global ones; the band's
# first and last rows given 3 blocks.

def _bigbird_solution(num_blocks, num_global_blocks):
    n, g = num_blocks, min(num_global_blocks, num_blocks)
    rows_and_cols = 2 * g * n - g * g             # g full rows and g full columns, overlap counted once
    m = n - g                                     # the band among the other blocks
    band = 3 * m - 2 if m >= 2 else m
    return rows_and_cols + band


def _bigbird_expected(num_blocks, num_global_blocks):
    return int(_bigbird_layout(num_blocks, num_random_blocks=0, num_global_blocks=num_global_blocks).sum())


def _bigbird_cases():
    return [Case(f"{n} blocks, {g} global", (n, g)) for n, g in ((8, 1), (16, 2), (4, 0), (10, 3), (2, 1), (64, 1),
                                                                  (1, 0), (5, 4), (1, 1))]


_BIGBIRD_CONDITIONS = {
    "no global blocks (the band alone)": lambda n, g: g == 0,
    "one global block": lambda n, g: g == 1,
    "several global blocks": lambda n, g: g > 1,
    "one block outside the global ones (no band to speak of)": lambda n, g: n - g == 1,
    "a single block": lambda n, g: n == 1,
}
_BIGBIRD_EXCLUSIVE = (("no global blocks (the band alone)", "one global block"),
                      ("no global blocks (the band alone)", "several global blocks"),
                      ("one global block", "several global blocks"),
                      ("several global blocks", "a single block"))


def _bigbird_hint(case, got, expected):
    n, g = case.args
    got = _number(got)
    if got is None:
        return None
    m = n - min(g, n)
    band_m = 3 * m - 2 if m >= 2 else m
    return first_match(got, expected, [
        (3 * n - 2 + 2 * g * n, "the band overlaps the global rows and columns: count the band among the "
                                "other blocks only."),
        (3 * n - 2 + 2 * g * n - g * g, "the band overlaps the global rows and columns: count the band "
                                        "among the other blocks only."),
        (2 * g * n + band_m, "the g global rows and g global columns share g * g blocks: 2gn - g^2."),
        (2 * g * n - g * g + 3 * m, "the first and last band rows have only 2 neighbours each: 3m - 2 "
                                    "blocks for m blocks.")], atol=0, rtol=0)


# --- sparse.topk_attention -----------------------------------------------------------------------
# Mistakes: attending to every key; keeping the k SMALLEST scores; > instead of >= (keeps k - 1);
# no 1/sqrt(d); topk(k) raising when k > L (a case has k = 20 > L = 12).

def _topk_solution(query, key, value, k):
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])   # (B, H, L, L): fine for a small L
    kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]
    scores = scores.masked_fill(scores < kth, _INF)
    return torch.softmax(scores, dim=-1) @ value


def _topk_cases():
    g = torch.Generator().manual_seed(60)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return in_both_precisions([Case(f"(B, H, L, d) = {s}, k = {k}", (r(*s), r(*s), r(*s), k))
                               for s, k in (((1, 1, 6, 4), 1), ((1, 2, 10, 8), 3), ((2, 2, 16, 8), 16),
                                            ((1, 1, 12, 4), 20))])


_TOPK_CONDITIONS = {
    "k = 1": lambda q, k, v, kk: kk == 1,
    "1 < k < L": lambda q, k, v, kk: 1 < kk < q.shape[-2],
    "k = L": lambda q, k, v, kk: kk == q.shape[-2],
    "k > L (dense)": lambda q, k, v, kk: kk > q.shape[-2],
}
_TOPK_EXCLUSIVE = tuple((a, b) for i, a in enumerate(_TOPK_CONDITIONS) for b in list(_TOPK_CONDITIONS)[i + 1:])


def _topk_hint(case, got, expected):
    q, key, v, k = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    s = q.double() @ key.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    kk = min(k, s.shape[-1])
    kth = s.topk(kk, dim=-1).values[..., -1:]
    low = s.topk(kk, dim=-1, largest=False).values[..., -1:]
    raw = q.double() @ key.double().transpose(-2, -1)
    return first_match(got, expected, [
            (_dense(q, key, v), "you attend to every key: keep only the k largest scores per query "
                                "(scores.topk)."),
            (_dense(q, key, v, s <= low), "keep the k LARGEST scores (topk's default), not the smallest."),
            (_dense(q, key, v, s > kth), "keep the k-th largest score too (>=): you keep only k - 1."),
            (_dense(q, key, v, raw >= raw.topk(kk, dim=-1).values[..., -1:], scale=1.0),
             "scale the scores by 1 / sqrt(d) before the softmax.")])


def _topk_raise_hint(case, message):
    if "out of range" in message or "selected index k" in message:
        return "k may exceed L: keep min(k, L) keys (k >= L is plain dense attention)."
    return None


# --- sparse.banded_attention -----------------------------------------------------------------------
# Query i attends to keys |i - j| <= window, in O(L * window) memory. Mistakes: building the
# (L, L) scores or mask (the L = 512 case fails on memory even when the values are right);
# the zero padding at the two ends treated as keys (a score of 0 instead of -inf: the classic
# F.pad + unfold slip); one side only (causal); |i - j| < window; no 1/sqrt(d); a window
# wider than the sequence (window = 20, L = 12).

def _band_attn_solution(query, key, value, window):
    B, H, L, d = query.shape
    w = min(window, L - 1)
    kp, vp = F.pad(key, (0, 0, w, w)), F.pad(value, (0, 0, w, w))  # (B, H, L + 2w, d): key j at row j + w
    # slot o of query i holds key i - w + o: rows o .. o + L - 1 of the padded keys. One slot at a
    # time, so no intermediate is larger than the keys (unfold + a product over d would build
    # (B, H, L, d, 2w + 1), d times the scores).
    scores = torch.stack([(query * kp[:, :, o:o + L]).sum(-1) for o in range(2 * w + 1)], -1) / math.sqrt(d)
    j = torch.arange(L)[:, None] + torch.arange(-w, w + 1)[None, :]  # the key index of each slot
    scores = scores.masked_fill((j < 0) | (j >= L), _INF)            # padding is not a key
    weights = torch.softmax(scores, dim=-1)                          # (B, H, L, 2w + 1)
    return sum(weights[..., o, None] * vp[:, :, o:o + L] for o in range(2 * w + 1))  # (B, H, L, d_v)


def _band_attn_expected(query, key, value, window):
    return _sliding_window_attention(query, key, value, window)


_BIG_L = 512


def _band_attn_cases():
    g = torch.Generator().manual_seed(61)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []
    for (B, H, L, d, d_v), w in (((1, 1, 6, 4, 4), 1), ((2, 2, 10, 8, 3), 3), ((1, 2, 12, 4, 4), 20),
                                 ((2, 1, 5, 4, 2), 0), ((1, 1, 1, 4, 3), 2), ((1, 1, 1, 2, 2), 0)):
        cases.append(Case(f"(B, H, L, d) = {(B, H, L, d)}, d_v = {d_v}, window {w}",
                          (r(B, H, L, d), r(B, H, L, d), r(B, H, L, d_v), w)))
    cases.append(Case(f"L = {_BIG_L}, window 4: no tensor of L x L elements, work linear in L",
                      (r(1, 2, _BIG_L, 8), r(1, 2, _BIG_L, 8), r(1, 2, _BIG_L, 8), 4)))
    return in_both_precisions(cases, skip=_long)


def _long(case) -> bool:
    return case.args[0].shape[-2] >= _BIG_L


_BAND_ATTN_CONDITIONS = {
    "window 0 (each query sees itself)": lambda q, k, v, w: w == 0,
    "a window narrower than the sequence": lambda q, k, v, w: 0 < w < q.shape[-2] - 1,
    "a window wider than the sequence": lambda q, k, v, w: w >= q.shape[-2],
    "d_v differs from d": lambda q, k, v, w: v.shape[-1] != q.shape[-1],
    "a single position": lambda q, k, v, w: q.shape[-2] == 1,
    f"L = {_BIG_L} (memory and work counted)": any_precision(lambda q, k, v, w: q.shape[-2] >= _BIG_L),
}
_BAND_ATTN_EXCLUSIVE = (("window 0 (each query sees itself)", "a window narrower than the sequence"),
                        ("window 0 (each query sees itself)", "a window wider than the sequence"),
                        ("a window narrower than the sequence", "a window wider than the sequence"),
                        ("a single position", "a window narrower than the sequence"),
                        ("a single position", f"L = {_BIG_L} (memory and work counted)"),
                        ("window 0 (each query sees itself)", f"L = {_BIG_L} (memory and work counted)"),
                        ("a window wider than the sequence", f"L = {_BIG_L} (memory and work counted)"),
                        ("d_v differs from d", f"L = {_BIG_L} (memory and work counted)"))


def _band_attn_hint(case, got, expected):
    q, k, v, w = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    L = q.shape[2]
    diff = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    wc = min(w, L - 1)
    # zero-padded keys taking part in the softmax: score 0, value 0
    kp, vp = F.pad(k.double(), (0, 0, wc, wc)), F.pad(v.double(), (0, 0, wc, wc))
    ks, vs = kp.unfold(2, 2 * wc + 1, 1), vp.unfold(2, 2 * wc + 1, 1)
    padded = torch.softmax((q.double()[..., None] * ks).sum(-2) / math.sqrt(q.shape[-1]), -1)
    padded = (vs * padded[..., None, :]).sum(-1)
    return first_match(got, expected, [
        (padded, "the zero padding at the two ends is not a key: give those slots a score of -inf "
                 "(a zero vector has score 0, and takes weight)."),
        (_dense(q, k, v), "you attend to every key: only |i - j| <= window."),
        (_dense(q, k, v, (diff >= 0) & (diff <= w)), "the window has keys on both sides: |i - j| <= window."),
        (_dense(q, k, v, diff.abs() < w), "the window includes |i - j| = window: <=, not <."),
        (_dense(q, k, v, diff.abs() <= w, scale=1.0), "scale the scores by 1 / sqrt(d).")])


def _qkv_floor(case) -> int:
    """Torch arithmetic any answer does: it reads every query and every value at least once."""
    return case.args[0].numel() + case.args[2].numel()


def _band_work(case) -> int:
    """Work allowed: 16 times the window's multiply-adds (2w + 1 keys per query, for scores and output)."""
    q, k, v, w = case.args
    B, H, L, d = q.shape
    return 16 * B * H * L * (2 * min(w, L - 1) + 1) * (d + v.shape[-1])


_BAND_VERIFY = square_free(lambda case: case.args[0].shape[-2], min_length=_BIG_L, work=_band_work,
                           floor=_qkv_floor, what="Banded attention",
                           advice="Compute the 2w + 1 scores of each query only: pad the keys, take "
                                  "windows (unfold, or one slot at a time), mask the padding with -inf.")


# --- sparse.performer_attention --------------------------------------------------------------------
# FAVOR+ with the given random features omega (F, d): scale q and k by d^(-1/4),
# phi(x) = exp(omega x - |x|^2 / 2) / sqrt(F), out = phi(Q) [phi(K)^T V] / phi(Q) [phi(K)^T 1].
# Mistakes: phi(Q) phi(K)^T first (L x L: quadratic; the L = 512 case fails on memory); no
# normaliser; the -|x|^2 / 2 term dropped (it cancels for queries, not for keys); no d^(-1/4)
# scaling, or 1/sqrt(d) on the queries only; omega used untransposed (the square case m = d).

def _favor_solution(query, key, value, omega):
    d, m = query.shape[-1], omega.shape[0]
    q, k = query * d**-0.25, key * d**-0.25                       # q.k / sqrt(d) = (q d^-1/4).(k d^-1/4)

    def phi(x):                                                   # positive random features
        return torch.exp(x @ omega.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    phi_q, phi_k = phi(q), phi(k)                                 # (B, H, L, m)
    kv = phi_k.transpose(-2, -1) @ value                          # (B, H, m, d_v): never L x L
    normaliser = phi_q @ phi_k.sum(-2)[..., None]                 # (B, H, L, 1)
    return (phi_q @ kv) / normaliser


def _favor_expected(query, key, value, omega):
    """The package's Performer, run with the seed that drew this omega."""
    (seed,) = {s for om, s in _FAVOR_OMEGAS if om.shape == omega.shape and torch.equal(om.double(), omega.double())}
    return _performer_attention(query, key, value, num_features=omega.shape[0], seed=seed)


_FAVOR_OMEGAS: list = []   # (omega, seed) of the cases


def _favor_cases():
    g = torch.Generator().manual_seed(62)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []
    for (B, H, L, d, d_v), m, seed, scale in (((1, 1, 6, 4, 4), 8, 0, 1.0), ((2, 2, 10, 8, 3), 8, 1, 1.0),
                                              ((1, 2, 16, 8, 8), 8, 2, 2.0), ((2, 1, 1, 4, 2), 4, 4, 3.0),
                                              ((1, 1, 12, 4, 3), 3, 5, 2.0), ((1, 1, _BIG_L, 8, 8), 16, 3, 1.0)):
        omega = _orthogonal_features(m, d, seed, "cpu", torch.float32)
        _FAVOR_OMEGAS.append((omega.clone(), seed))
        desc = (f"(B, H, L, d) = {(B, H, L, d)}, m = {m} features"
                + (", q and k twice as large" if scale != 1.0 else "")
                + (": no tensor of L x L elements, work linear in L" if L >= _BIG_L else ""))
        cases.append(Case(desc, (r(B, H, L, d) * scale, r(B, H, L, d) * scale, r(B, H, L, d_v), omega)))
    return in_both_precisions(cases, skip=_long)


def _large_norm(q) -> bool:
    """Queries 1.5 times longer than a standard normal vector's sqrt(d), on average."""
    return float(q.double().norm(dim=-1).mean()) > 1.5 * math.sqrt(q.shape[-1])


_FAVOR_CONDITIONS = {
    "q and k of large norm (peaked attention)": lambda q, k, v, om: _large_norm(q),
    "a square omega (F = d: omega and omega.T both fit)": lambda q, k, v, om: om.shape[0] == q.shape[-1],
    "d_v differs from d": lambda q, k, v, om: v.shape[-1] != q.shape[-1],
    "a single position": lambda q, k, v, om: q.shape[-2] == 1,
    f"L = {_BIG_L} (memory and work counted)": any_precision(lambda q, k, v, om: q.shape[-2] >= _BIG_L),
}
_FAVOR_EXCLUSIVE = tuple((c, f"L = {_BIG_L} (memory and work counted)") for c in _FAVOR_CONDITIONS
                         if not c.startswith("L = "))


def _favor_work(case) -> int:
    """Work allowed: 8 times the multiply-adds of phi(Q), phi(K), phi(K)^T V, phi(Q) [.] and the normaliser."""
    q, k, v, omega = case.args
    B, H, L, d = q.shape
    return 8 * B * H * L * omega.shape[0] * (2 * d + 2 * v.shape[-1] + 2)


_FAVOR_VERIFY = square_free(lambda case: case.args[0].shape[-2], min_length=_BIG_L, work=_favor_work,
                            floor=_qkv_floor, what="Performer attention",
                            advice="Multiply phi(K)^T V first (F x d_v per head), then phi(Q) by it.")


def _favor_variant(q, k, v, omega, *, scale="both", key_norm=True, normalise=True, transpose=True):
    q, k, v, om = q.double(), k.double(), v.double(), omega.double()
    d, m = q.shape[-1], om.shape[0]
    if scale == "both":
        q, k = q * d**-0.25, k * d**-0.25
    elif scale == "query":
        q = q / math.sqrt(d)
    W = om.T if transpose else om

    def phi(x, norm=True):
        return torch.exp(x @ W - ((x * x).sum(-1, keepdim=True) / 2 if norm else 0)) / math.sqrt(m)

    pq, pk = phi(q), phi(k, key_norm)
    out = pq @ (pk.transpose(-2, -1) @ v)
    return out / (pq @ pk.sum(-2)[..., None]) if normalise else out


def _favor_hint(case, got, expected):
    q, k, v, omega = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    variants = [
        ({"normalise": False}, "divide by the normaliser phi(Q) [phi(K)^T 1], the features' estimate of "
                               "each row's softmax denominator."),
        ({"key_norm": False}, "phi(x) = exp(omega x - |x|^2 / 2) / sqrt(F): keep the -|x|^2 / 2 term (it "
                              "cancels for the queries, not for the keys)."),
        ({"scale": "none"}, "scale q and k by d**-0.25 each, so that their dot product is q.k / sqrt(d)."),
        ({"scale": "query"}, "scale BOTH q and k by d**-0.25 (not q alone by 1 / sqrt(d)): the |x|^2 / 2 "
                             "term sees each scaled vector."),
    ]
    if omega.shape[0] == omega.shape[1]:
        variants.append(({"transpose": False}, "omega is (F, d): the projections are x @ omega.T."))
    return first_match(got, expected, [(_favor_variant(q, k, v, omega, **kwargs), text) for kwargs, text in variants],
                       atol=1e-4, rtol=1e-3)


def _favor_raise_hint(case, message):
    if "cannot be multiplied" in message:
        return "omega is (F, d), one random direction per row: project with x @ omega.T."
    return None


# --- sparse.lsh_buckets ------------------------------------------------------------------------------
# bucket = argmax of [x R, -x R]. Mistakes: argmax of x R alone (half the buckets, the opposite
# directions never used); the halves in the other order, [-x R, x R]; argmax of |x R| (the sign
# dropped); argmin instead of argmax; the bucket as a float. Edge cases: one column (two buckets,
# a sign test), more columns than d, vectors of very different lengths (length must not matter).

def _lsh_solution(x, rotations):
    proj = x @ rotations
    return torch.cat([proj, -proj], dim=-1).argmax(dim=-1)


def _lsh_cases():
    g = torch.Generator().manual_seed(63)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []
    for shape, n in (((10, 8), 4), ((6, 4), 1), ((2, 3, 12, 8), 8), ((1, 2, 16, 4), 6), ((2, 2, 6, 4), 1),
                     ((7, 2), 3)):
        x = r(*shape) * torch.exp(2 * r(*shape[:-1], 1))               # lengths from about 0.01 to 100
        cases.append(Case(f"x {tuple(shape)}, {n} rotation column(s): {2 * n} buckets", (x, r(shape[-1], n))))
    return in_both_precisions(cases)


_LSH_CONDITIONS = {
    "one column (two buckets: a sign test)": lambda x, R: R.shape[1] == 1,
    "several columns": lambda x, R: R.shape[1] > 1,
    "more columns than dimensions": lambda x, R: R.shape[1] > R.shape[0],
    "leading batch and head dimensions": lambda x, R: x.ndim == 4,
}
_LSH_EXCLUSIVE = (("one column (two buckets: a sign test)", "several columns"),
                  ("one column (two buckets: a sign test)", "more columns than dimensions"))


def _lsh_hint(case, got, expected):
    x, R = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return None
    if got.is_floating_point():
        return mistake("bucket ids are integers: return the arg-max itself (int64), not a float tensor.",
                       expected.double(), atol=0, rtol=0)
    proj = x.double() @ R.double()
    both = torch.cat([proj, -proj], dim=-1)
    return first_match(got, expected, [
        (proj.argmax(-1), "hash with both signs: argmax of [x R, -x R]. With x R alone the opposite "
                          "directions (buckets n .. 2n - 1) are never used."),
        (torch.cat([-proj, proj], dim=-1).argmax(-1), "the halves go in the order [x R, -x R]: bucket j for "
                                                      "column j, bucket j + n for its opposite."),
        (proj.abs().argmax(-1), "the sign matters: x and -x must land in different buckets "
                                "(argmax of [x R, -x R], not of |x R|)."),
        (both.argmin(-1), "the bucket is the best-aligned direction: argmax, not argmin.")], atol=0, rtol=0)


# --- sparse.causal_window_mask_mod -----------------------------------------------------------------
# A FlexAttention mask_mod(b, h, q_idx, kv_idx) with one more argument, the window: True where
# query q_idx may see key kv_idx, 0 <= q_idx - kv_idx <= window. FlexAttention calls it on 0-d
# index tensors under vmap; the checker calls it on broadcasting index tensors (a block of
# queries against all keys). Mistakes: Python `and`/`abs`/`if` (fail on tensors); both sides
# (|i - j| <= w, not causal); i - j < w (one key short); kv_idx - q_idx (looks at the future);
# causal without the window. Edge cases: window 0 (the diagonal), a window longer than the
# sequence (plain causal), a block of queries that does not start at 0.

def _mask_mod_solution(b, h, q_idx, kv_idx, window):
    diff = q_idx - kv_idx
    return (diff >= 0) & (diff <= window)


def _mask_mod_expected(b, h, q_idx, kv_idx, window):
    L = int(max(q_idx.max(), kv_idx.max())) + 1
    return _sliding_window_mask(L, window, is_causal=True)[q_idx.flatten()][:, kv_idx.flatten()]


def _mask_mod_cases():
    b, h = torch.tensor(0), torch.tensor(1)
    cases = []
    for (q0, q1), L, w in (((0, 8), 8, 2), ((0, 12), 12, 0), ((4, 12), 16, 3), ((0, 6), 6, 10), ((5, 6), 9, 4),
                           ((0, 16), 16, 1), ((3, 9), 10, 0), ((7, 8), 8, 0), ((2, 8), 8, 20), ((4, 5), 5, 9)):
        cases.append(Case(f"queries {q0}..{q1 - 1} against keys 0..{L - 1}, window {w}",
                          (b, h, torch.arange(q0, q1)[:, None], torch.arange(L)[None, :], w)))
    return cases


_MASK_MOD_CONDITIONS = {
    "window 0 (the diagonal alone)": lambda b, h, q, k, w: w == 0,
    "a window longer than the sequence (plain causal)": lambda b, h, q, k, w: w >= k.shape[-1],
    "a block of queries that does not start at 0": lambda b, h, q, k, w: int(q.min()) > 0,
    "a single query": lambda b, h, q, k, w: q.numel() == 1,
}
_MASK_MOD_EXCLUSIVE = (("window 0 (the diagonal alone)", "a window longer than the sequence (plain causal)"),)


def _mask_mod_hint(case, got, expected):
    b, h, q, k, w = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return None
    diff = q - k
    return first_match(got, expected, [
        (diff.abs() <= w, "causal: a query must not see later keys, so keep 0 <= q_idx - kv_idx (not |q_idx - "
                          "kv_idx|)."),
        ((diff >= 0) & (diff < w), "a window of w keeps w + 1 keys, the query's own and w before it: "
                                   "q_idx - kv_idx <= window."),
        (((k - q) >= 0) & ((k - q) <= w), "the difference is q_idx - kv_idx: with kv_idx - q_idx each query "
                                          "sees the keys after it."),
        (diff >= 0, "also drop the keys more than `window` positions back: q_idx - kv_idx <= window.")],
        atol=0, rtol=0)


def _mask_mod_raise_hint(case, message):
    if "ambiguous" in message:
        return ("mask_mod receives tensors: combine conditions with & and |, not `and`/`or`, and use no "
                "`if` on them (FlexAttention traces the function).")
    return None


def _mask_mod_verify(case, fn, got):
    """Where FlexAttention exists (torch >= 2.5), also run the mask_mod through it on a small input."""
    b, h, q, k, w = case.args
    if not _flex_available() or int(q.min()) != 0 or q.numel() != k.numel():
        return None
    from functools import partial

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    L = k.numel()
    g = torch.Generator().manual_seed(64)
    qq, kk, vv = (torch.randn(1, 1, L, 8, generator=g) for _ in range(3))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")               # eager flex_attention warns that it is unfused
            block_mask = create_block_mask(partial(fn, window=w), None, None, L, L, device="cpu", BLOCK_SIZE=L)
            out = flex_attention(qq, kk, vv, block_mask=block_mask)
    except Exception as exc:  # noqa: BLE001 - reported as the learner's problem
        return (f"the values are right on index tensors, but FlexAttention could not use your mask_mod "
                f"({type(exc).__name__}: {str(exc)[:200]}). It calls mask_mod on 0-d tensors under vmap: "
                f"no `if`, `and`, `or` or .item() on them.")
    ref = _dense(qq, kk, vv, _sliding_window_mask(L, w, is_causal=True))
    if not torch.allclose(out.double(), ref, atol=1e-4):
        return "FlexAttention with your mask_mod does not equal dense attention under the causal window."
    return None


EXERCISES = [
    Exercise("sparse.dilated_window_mask", "dilated_window_mask(length, window, dilation) -> (L, L) bool",
             _dilated_cases, _dilated_expected, _dilated_solution, _dilated_hint,
             conditions=_DILATED_CONDITIONS, exclusive=_DILATED_EXCLUSIVE),
    Exercise("sparse.band_pairs", "band_pairs(length, window) -> int: pairs kept by |i - j| <= window, "
                                  "derived without building the mask",
             _band_cases, _band_expected, _band_solution, _band_hint, atol=0, rtol=0,
             verify=builds_nothing(lambda case: max(4, case.args[0] ** 2), what="the mask"),
             conditions=_BAND_CONDITIONS, exclusive=_BAND_EXCLUSIVE),
    Exercise("sparse.bigbird_kept_blocks",
             "bigbird_kept_blocks(num_blocks, num_global_blocks) -> int (band + global, no random blocks), "
             "derived without building the layout",
             _bigbird_cases, _bigbird_expected, _bigbird_solution, _bigbird_hint, atol=0, rtol=0,
             verify=builds_nothing(lambda case: max(4, case.args[0] ** 2), what="the layout"),
             conditions=_BIGBIRD_CONDITIONS, exclusive=_BIGBIRD_EXCLUSIVE),
    Exercise("sparse.topk_attention", "topk_attention(query, key, value, k) -> (B, H, L, d_v)",
             _topk_cases, _topk_attention, _topk_solution, _topk_hint, raise_hint=_topk_raise_hint,
             conditions=_TOPK_CONDITIONS, exclusive=_TOPK_EXCLUSIVE),
    Exercise("sparse.banded_attention",
             "banded_attention(query (B, H, L, d), key (B, H, L, d), value (B, H, L, d_v), window) -> "
             "(B, H, L, d_v), keys |i - j| <= window, with torch operations, never an L x L tensor, "
             "work linear in L",
             _band_attn_cases, _band_attn_expected, _band_attn_solution, _band_attn_hint,
             verify=_BAND_VERIFY, conditions=_BAND_ATTN_CONDITIONS, exclusive=_BAND_ATTN_EXCLUSIVE),
    Exercise("sparse.performer_attention",
             "performer_attention(query (B, H, L, d), key (B, H, L, d), value (B, H, L, d_v), omega (F, d)) "
             "-> (B, H, L, d_v), FAVOR+ with positive features, with torch operations, never an L x L "
             "tensor, work linear in L",
             _favor_cases, _favor_expected, _favor_solution, _favor_hint, atol=1e-4, rtol=1e-3,
             verify=_FAVOR_VERIFY, raise_hint=_favor_raise_hint,
             conditions=_FAVOR_CONDITIONS, exclusive=_FAVOR_EXCLUSIVE),
    Exercise("sparse.lsh_buckets",
             "lsh_buckets(x (..., L, d), rotations (d, n)) -> (..., L) int64 bucket ids in [0, 2n): "
             "argmax of [x R, -x R]",
             _lsh_cases, _lsh_buckets, _lsh_solution, _lsh_hint, atol=0, rtol=0,
             conditions=_LSH_CONDITIONS, exclusive=_LSH_EXCLUSIVE),
    Exercise("sparse.causal_window_mask_mod",
             "causal_window_mask_mod(b, h, q_idx, kv_idx, window) -> bool tensor, True where "
             "0 <= q_idx - kv_idx <= window (a FlexAttention mask_mod with the window bound by partial)",
             _mask_mod_cases, _mask_mod_expected, _mask_mod_solution, _mask_mod_hint, atol=0, rtol=0,
             verify=_mask_mod_verify, raise_hint=_mask_mod_raise_hint, conditions=_MASK_MOD_CONDITIONS,
             exclusive=_MASK_MOD_EXCLUSIVE),
]
