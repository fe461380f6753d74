"""Exercises: padding and causal masks, cross-attention, one step of an attentive decoder.

Expected answers come from package functions bound here at import time. Above each
exercise, a comment lists the mistakes learners make; a case catches each one, and a hint
names a mistake only when the answer is that mistake (``_core.Hint``). Each exercise's
``conditions`` list what its statement names; floating inputs run in float32 and float64.
"""

from __future__ import annotations

import math

import torch

from ..basics import scaled_dot_product_attention as _sdpa
from ..seq2seq import causal_mask as _causal_mask
from ..seq2seq import padding_mask as _padding_mask
from ._core import Case, Exercise, close, fact, finite, first_match, in_both_precisions

_INF = float("-inf")


def _bool_like(got, expected) -> bool:
    return isinstance(got, torch.Tensor) and got.dtype == torch.bool and got.shape == expected.shape


# --- seq2seq.padding_mask ----------------------------------------------------------------------------
# Mistakes: the convention inverted (True = padding); <= instead of < (one padding position
# counted as real); the mask transposed (L, B); a float or int tensor; a sequence of length 0 or
# of the full length.

def _pad_solution(lengths, max_length):
    positions = torch.arange(max_length)            # (L,)
    return positions[None, :] < lengths[:, None]    # (B, L): True at real tokens


def _pad_cases():
    return [Case(f"lengths {lst}, max_length {m}", (torch.tensor(lst), m))
            for lst, m in (([3, 1], 4), ([5, 5, 2], 5), ([0, 2], 3), ([1], 1), ([2, 7, 4], 9),
                           ([0, 6, 3], 6), ([0], 2))]


_PAD_CONDITIONS = {
    "a sequence of length 0": lambda n, m: bool((n == 0).any()),
    "a sequence of the full length": lambda n, m: bool((n == m).any()),
    "a batch of one": lambda n, m: len(n) == 1,
    "a batch of several": lambda n, m: len(n) > 1,
}
_PAD_EXCLUSIVE = (("a batch of one", "a batch of several"),)


def _pad_hint(case, got, expected):
    if not _bool_like(got, expected):
        return None
    lengths, m = case.args
    return first_match(got, expected, [
        (~expected, "True marks the real tokens (they may be attended to), False the padding."),
        (torch.arange(m)[None, :] <= lengths[:, None],
         "positions count from 0: a sequence of length n has real tokens 0 .. n - 1, so use <, not <=.")])


# --- seq2seq.causal_mask -----------------------------------------------------------------------------
# Mistakes: the upper triangle (keys j >= i: the future); the diagonal left out (a token may see
# itself); torch's convention (True = blocked, triu(1)); a float tensor from torch.tril(torch.ones).

def _causal_solution(length):
    i = torch.arange(length)
    return i[None, :] <= i[:, None]                 # key j allowed for query i when j <= i


def _causal_cases():
    return [Case(f"length {n}", (n,)) for n in (1, 2, 5, 9)]


_CAUSAL_CONDITIONS = {"length 1": lambda n: n == 1, "length above 1": lambda n: n > 1}
_CAUSAL_EXCLUSIVE = (("length 1", "length above 1"),)


def _causal_hint(case, got, expected):
    if not _bool_like(got, expected):
        return None
    return first_match(got, expected, [
        (expected & ~torch.eye(len(got), dtype=torch.bool), "a position may attend to itself: keep the diagonal."),
        (~expected, "True means 'may attend' in this course (torch's attn_mask uses the opposite)."),
        (expected.T, "rows are queries and columns keys: query i may see keys j <= i (lower triangle).")])


# --- seq2seq.cross_attention -------------------------------------------------------------------------
# Mistakes: queries from the context and keys/values from x (output of the context's length);
# scaling by sqrt(E) (x's width) instead of sqrt(d); no scaling; W used untransposed (x @ W_q:
# the square case E = C = d catches it); keys and values projected with each other's weights;
# the softmax over the queries.

def _cross_solution(x, context, W_q, W_k, W_v):
    q = x @ W_q.T                                   # (B, L_x, d): queries from x
    k, v = context @ W_k.T, context @ W_v.T         # (B, L_c, d): keys and values from the context
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def _cross_expected(x, context, W_q, W_k, W_v):
    return _sdpa(x @ W_q.T, context @ W_k.T, context @ W_v.T)[0]


def _cross_cases():
    g = torch.Generator().manual_seed(20)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []
    for B, Lx, Lc, E, C, d in ((1, 3, 5, 4, 4, 4), (2, 4, 7, 6, 3, 5), (2, 6, 2, 8, 8, 16), (2, 4, 2, 5, 5, 5),
                               (1, 5, 2, 6, 3, 4)):
        cases.append(Case(f"x ({B}, {Lx}, {E}), context ({B}, {Lc}, {C}), d={d}",
                          (r(B, Lx, E), r(B, Lc, C), r(d, E), r(d, C), r(d, C))))
    return in_both_precisions(cases)


_CROSS_CONDITIONS = {
    "x and the context of different widths (E != C)": lambda x, c, Wq, Wk, Wv: x.shape[-1] != c.shape[-1],
    "projected width d != E": lambda x, c, Wq, Wk, Wv: Wq.shape[0] != x.shape[-1],
    "square weights (E = C = d)": lambda x, c, Wq, Wk, Wv: Wq.shape[0] == x.shape[-1] == c.shape[-1],
    "more context positions than queries": lambda x, c, Wq, Wk, Wv: c.shape[1] > x.shape[1],
    "fewer context positions than queries": lambda x, c, Wq, Wk, Wv: c.shape[1] < x.shape[1],
    "a batch of several": lambda x, c, Wq, Wk, Wv: x.shape[0] > 1,
}
_CROSS_EXCLUSIVE = (("x and the context of different widths (E != C)", "square weights (E = C = d)"),
                    ("projected width d != E", "square weights (E = C = d)"),
                    ("more context positions than queries", "fewer context positions than queries"))


def _attend(q, k, v, scale, dim=-1):
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=dim) @ v


def _cross_hint(case, got, expected):
    x, ctx, W_q, W_k, W_v = (t.double() for t in case.args)
    if not isinstance(got, torch.Tensor):
        return None
    if got.ndim == 3 and got.shape[1] == ctx.shape[1] != x.shape[1]:
        return fact("your output has one row per position of the context; it has one row per query, "
                    "i.e. per position of x.")
    if got.shape != expected.shape or not finite(got):
        return None
    q, k, v = x @ W_q.T, ctx @ W_k.T, ctx @ W_v.T
    d, E = q.shape[-1], x.shape[-1]
    variants = [
        (_attend(q, k, v, 1.0), "divide the scores by sqrt(d), the size of the projected queries."),
        (_attend(q, k, v, 1 / math.sqrt(E)), "scale by sqrt(d) = sqrt(W_q.shape[0]), the size of the "
                                             "projected queries, not by x's width."),
        (_attend(q, ctx @ W_v.T, ctx @ W_k.T, 1 / math.sqrt(d)), "keys use W_k and values use W_v."),
        (_attend(q, k, v, 1 / math.sqrt(d), dim=-2), "the softmax goes over the keys (the context "
                                                      "positions), the last axis."),
    ]
    if W_q.shape[0] == W_q.shape[1] and W_k.shape[0] == W_k.shape[1]:
        variants.append((_attend(x @ W_q, ctx @ W_k, ctx @ W_v, 1 / math.sqrt(d)),
                         "the weights are (d, E) as in nn.Linear: project with x @ W_q.T."))
    return first_match(got, expected, variants)


# --- seq2seq.attentive_decoder_step -----------------------------------------------------------------
# One step of an attentive decoder (Luong-style: the new decoder state queries the encoder).
# Mistakes: the source padding ignored (padding gets weight) or inverted; no scaling by
# sqrt(H); the softmax over the batch instead of the source positions; the concatenation in the
# wrong order ([context, state]); the bias left out; the weights returned as (B, 1, S);
# a uniform average of the encoder states instead of the attention-weighted one.

def _dec_solution(state, enc_states, src_mask, W_out, b_out):
    H = state.shape[-1]
    scores = (enc_states @ state[:, :, None])[:, :, 0] / math.sqrt(H)     # (B, S): one per source position
    scores = scores.masked_fill(~src_mask, _INF)                          # padding is not a key
    weights = torch.softmax(scores, dim=-1)                               # (B, S)
    context = (weights[:, :, None] * enc_states).sum(1)                   # (B, H)
    logits = torch.cat([state, context], dim=-1) @ W_out.T + b_out        # (B, V)
    return logits, weights


def _dec_expected(state, enc_states, src_mask, W_out, b_out):
    context, weights = _sdpa(state[:, None, :], enc_states, enc_states, src_mask[:, None, :])
    return torch.cat([state, context[:, 0]], dim=-1) @ W_out.T + b_out, weights[:, 0]


def _dec_cases():
    g = torch.Generator().manual_seed(21)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []
    for B, S, H, V, lengths in ((1, 4, 4, 5, [4]), (3, 6, 8, 10, [6, 3, 1]), (2, 5, 6, 7, [2, 5]),
                                (2, 1, 4, 5, [1, 1])):
        mask = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
        cases.append(Case(f"batch {B}, source lengths {lengths} padded to {S}, H = {H}, vocabulary {V}",
                          (r(B, H), r(B, S, H) * 2, mask, r(V, 2 * H), r(V))))
    return in_both_precisions(cases)


_DEC_CONDITIONS = {
    "no padding": lambda s, e, m, W, b: bool(m.all()),
    "padding": lambda s, e, m, W, b: bool((~m).any()),
    "a source of length 1 (one real token)": lambda s, e, m, W, b: bool((m.sum(-1) == 1).any()),
    "a batch of several": lambda s, e, m, W, b: s.shape[0] > 1,
}
_DEC_EXCLUSIVE = (("no padding", "padding"),)


def _logits_of(got):
    return got[0]


def _weights_of(got):
    return got[1]


def _dec_hint(case, got, expected):
    state, enc, mask, W_out, b_out = (t.double() if t.is_floating_point() else t for t in case.args)
    if not (isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
        return None
    logits, weights = got
    B, S, H = enc.shape
    if weights.shape == (B, 1, S):
        return fact("your weights are (B, 1, S): squeeze the query axis to return them as (B, S).")
    if weights.shape != (B, S) or logits.shape != expected[0].shape or not finite(weights):
        return None
    scores = (enc @ state[:, :, None])[:, :, 0]

    def soft(s, keep, dim=-1):
        return torch.softmax(s.masked_fill(~keep, _INF), dim=dim).nan_to_num(0.0)

    right_w = expected[1].double()
    hint = first_match(got, expected, [
        (soft(scores / math.sqrt(H), torch.ones_like(mask)), "padding got weight: fill the scores of "
                                                             "padded source positions with -inf."),
        (soft(scores / math.sqrt(H), ~mask), "the mask is inverted: True marks real source tokens."),
        (soft(scores, mask), "scale the scores by 1 / sqrt(H), H the state size."),
        (soft(scores / math.sqrt(H), mask, 0), "the softmax goes over the source positions "
                                               "(dim=-1), not over the batch.")], where=_weights_of)
    if hint:
        return hint
    if close(weights, right_w):
        context = (right_w[:, :, None] * enc).sum(1)
        return first_match(got, expected, [
            (torch.cat([context, state], -1) @ W_out.T + b_out,
             "concatenate [state, context] in that order: W_out's first H columns read the state."),
            (torch.cat([state, context], -1) @ W_out.T, "add the bias b_out."),
            (torch.cat([state, enc.mean(1)], -1) @ W_out.T + b_out,
             "the context is the attention-weighted sum of the encoder states, not their mean.")],
            where=_logits_of) or fact("the weights are right: context = weights-weighted sum of "
                                      "enc_states, then W_out [state; context] + b_out.")
    return None


EXERCISES = [
    Exercise("seq2seq.padding_mask", "padding_mask(lengths (B,), max_length) -> (B, max_length) bool, True = real",
             _pad_cases, _padding_mask, _pad_solution, _pad_hint,
             conditions=_PAD_CONDITIONS, exclusive=_PAD_EXCLUSIVE),
    Exercise("seq2seq.causal_mask", "causal_mask(length) -> (L, L) bool, True where key j <= query i",
             _causal_cases, _causal_mask, _causal_solution, _causal_hint,
             conditions=_CAUSAL_CONDITIONS, exclusive=_CAUSAL_EXCLUSIVE),
    Exercise("seq2seq.cross_attention",
             "cross_attention(x (B, L_x, E), context (B, L_c, C), W_q (d, E), W_k (d, C), W_v (d, C)) "
             "-> (B, L_x, d)",
             _cross_cases, _cross_expected, _cross_solution, _cross_hint,
             conditions=_CROSS_CONDITIONS, exclusive=_CROSS_EXCLUSIVE),
    Exercise("seq2seq.attentive_decoder_step",
             "attentive_decoder_step(state (B, H), enc_states (B, S, H), src_mask (B, S) bool, "
             "W_out (V, 2H), b_out (V,)) -> (logits (B, V), weights (B, S))",
             _dec_cases, _dec_expected, _dec_solution, _dec_hint,
             conditions=_DEC_CONDITIONS, exclusive=_DEC_EXCLUSIVE),
]
