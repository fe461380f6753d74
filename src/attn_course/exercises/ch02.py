"""Chapter 2 exercises: padding and causal masks, cross-attention from scaled dot products."""

from __future__ import annotations

import math

import torch

from .. import basics, seq2seq
from ._core import Case, Exercise


def _pad_solution(lengths, max_length):
    positions = torch.arange(max_length)            # (L,)
    return positions[None, :] < lengths[:, None]    # (B, L): True at real tokens


def _pad_cases():
    return [Case(f"lengths {lst}, max_length {m}", (torch.tensor(lst), m))
            for lst, m in (([3, 1], 4), ([5, 5, 2], 5), ([0, 2], 3), ([1], 1), ([2, 7, 4], 9))]


def _pad_hint(case, got, expected):
    if got.dtype == torch.bool and got.shape == expected.shape and torch.equal(got, ~expected):
        return "True marks the real tokens (they may be attended to), False the padding."
    if got.dtype == torch.bool and got.shape == expected.shape:
        return "position p of sequence b is real when p < lengths[b]: compare an arange with lengths[:, None]."
    return None


def _causal_solution(length):
    i = torch.arange(length)
    return i[None, :] <= i[:, None]                 # key j allowed for query i when j <= i


def _causal_cases():
    return [Case(f"length {n}", (n,)) for n in (1, 2, 5, 9)]


def _causal_hint(case, got, expected):
    if got.dtype == torch.bool and got.shape == expected.shape and torch.equal(got, expected.T):
        return "rows are queries and columns keys: query i may see keys j <= i (lower triangle)."
    if got.dtype == torch.bool and got.shape == expected.shape and torch.equal(got, expected & ~torch.eye(len(got), dtype=torch.bool)):
        return "a position may attend to itself: keep the diagonal."
    return None


def _cross_solution(x, context, W_q, W_k, W_v):
    q = x @ W_q.T                                   # (B, L_x, d): queries from x
    k, v = context @ W_k.T, context @ W_v.T         # (B, L_c, d): keys and values from the context
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def _cross_expected(x, context, W_q, W_k, W_v):
    return basics.scaled_dot_product_attention(x @ W_q.T, context @ W_k.T, context @ W_v.T)[0]


def _cross_cases():
    g = torch.Generator().manual_seed(20)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []
    for B, Lx, Lc, E, C, d in ((1, 3, 5, 4, 4, 4), (2, 4, 7, 6, 3, 5), (2, 6, 2, 8, 8, 16)):
        cases.append(Case(f"x ({B}, {Lx}, {E}), context ({B}, {Lc}, {C}), d={d}",
                          (r(B, Lx, E), r(B, Lc, C), r(d, E), r(d, C), r(d, C))))
    return cases


def _cross_hint(case, got, expected):
    x, ctx = case.args[:2]
    if got.ndim == 3 and got.shape[1] == ctx.shape[1] != x.shape[1]:
        return "the output has one row per query, i.e. per position of x, not of the context."
    return "q = x W_q^T, k = context W_k^T, v = context W_v^T, then softmax(q k^T / sqrt(d)) v."


EXERCISES = [
    Exercise("ch02.padding_mask", "padding_mask(lengths (B,), max_length) -> (B, max_length) bool, True = real",
             _pad_cases, seq2seq.padding_mask, _pad_solution, _pad_hint),
    Exercise("ch02.causal_mask", "causal_mask(length) -> (L, L) bool, True where key j <= query i",
             _causal_cases, seq2seq.causal_mask, _causal_solution, _causal_hint),
    Exercise("ch02.cross_attention",
             "cross_attention(x (B, L_x, E), context (B, L_c, C), W_q (d, E), W_k (d, C), W_v (d, C)) "
             "-> (B, L_x, d)",
             _cross_cases, _cross_expected, _cross_solution, _cross_hint),
]
