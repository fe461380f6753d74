"""Chapter 6 exercises: a dilated mask, counting the pairs a pattern keeps, top-k attention."""

from __future__ import annotations

import math

import torch

from .. import sparse
from ._core import Case, Exercise

# --- ch06.dilated_window_mask -------------------------------------------------------------------

def _dilated_solution(length, window, dilation):
    diff = torch.arange(length)[:, None] - torch.arange(length)[None, :]   # i - j
    return (diff.abs() <= window * dilation) & (diff % dilation == 0)


def _dilated_expected(length, window, dilation):
    return sparse.dilated_window_mask(length, window, dilation)


def _dilated_cases():
    return [Case(f"length {L}, window {w}, dilation {r}", (L, w, r))
            for L, w, r in ((8, 1, 1), (10, 2, 2), (12, 1, 3), (20, 3, 4), (5, 0, 2))]


def _dilated_hint(case, got, expected):
    L, w, r = case.args
    if got.dtype == torch.bool and got.shape == expected.shape:
        if torch.equal(got, sparse.sliding_window_mask(L, w) & expected):
            return "the window spans window * dilation positions on each side, not window."
        if torch.equal(got, sparse.sliding_window_mask(L, w * r)):
            return "keep only every dilation-th key: (i - j) % dilation == 0."
    return "mask[i, j] = |i - j| <= window * dilation and (i - j) % dilation == 0."


# --- ch06.band_pairs ------------------------------------------------------------------------------

def _band_solution(length, window):
    w = min(window, length - 1)
    # every row has 2w + 1 keys, minus those cut off at the two ends: 2 * (1 + 2 + ... + w)
    return length * (2 * w + 1) - w * (w + 1)


def _band_expected(length, window):
    return int(sparse.sliding_window_mask(length, window).sum())


def _band_cases():
    return [Case(f"length {L}, window {w}", (L, w)) for L, w in ((10, 0), (10, 1), (16, 3), (100, 20), (5, 9))]


def _band_hint(case, got, expected):
    L, w = case.args
    if got == L * (2 * w + 1):
        return "rows near the start and the end have fewer than 2w + 1 keys: subtract what falls outside."
    if w >= L:
        return "a window wider than the sequence keeps every pair."
    return None


# --- ch06.bigbird_kept_blocks ------------------------------------------------------------------

def _bigbird_solution(num_blocks, num_global_blocks):
    n, g = num_blocks, min(num_global_blocks, num_blocks)
    rows_and_cols = 2 * g * n - g * g             # g full rows and g full columns, overlap counted once
    m = n - g                                     # the band among the other blocks
    band = 3 * m - 2 if m >= 2 else m
    return rows_and_cols + band


def _bigbird_expected(num_blocks, num_global_blocks):
    return int(sparse.bigbird_layout(num_blocks, num_random_blocks=0, num_global_blocks=num_global_blocks).sum())


def _bigbird_cases():
    return [Case(f"{n} blocks, {g} global", (n, g)) for n, g in ((8, 1), (16, 2), (4, 0), (10, 3), (2, 1), (64, 1))]


def _bigbird_hint(case, got, expected):
    n, g = case.args
    if got == 3 * n - 2 + 2 * g * n:
        return "global rows and columns overlap each other and the band: count every block once."
    return "count the g full rows and g full columns once (2gn - g^2), then the band among the other blocks."


# --- ch06.topk_attention -----------------------------------------------------------------------

def _topk_solution(query, key, value, k):
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])   # (B, H, L, L): fine for a small L
    kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]
    scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.softmax(scores, dim=-1) @ value


def _topk_cases():
    g = torch.Generator().manual_seed(60)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [Case(f"(B, H, L, d) = {s}, k = {k}", (r(*s), r(*s), r(*s), k))
            for s, k in (((1, 1, 6, 4), 1), ((1, 2, 10, 8), 3), ((2, 2, 16, 8), 16), ((1, 1, 12, 4), 20))]


def _topk_hint(case, got, expected):
    q, key, v, k = case.args
    dense = sparse.dense_attention(q, key, v)
    if got.shape == expected.shape and torch.allclose(got, dense, atol=1e-5) and k < q.shape[2]:
        return "you attend to every key: keep only the k largest scores per query (scores.topk)."
    return "per query: keep the k largest scores, set the others to -inf, softmax, then weight the values."


EXERCISES = [
    Exercise("ch06.dilated_window_mask", "dilated_window_mask(length, window, dilation) -> (L, L) bool",
             _dilated_cases, _dilated_expected, _dilated_solution, _dilated_hint),
    Exercise("ch06.band_pairs", "band_pairs(length, window) -> int: pairs kept by |i - j| <= window",
             _band_cases, _band_expected, _band_solution, _band_hint, atol=0, rtol=0),
    Exercise("ch06.bigbird_kept_blocks",
             "bigbird_kept_blocks(num_blocks, num_global_blocks) -> int (band + global, no random blocks)",
             _bigbird_cases, _bigbird_expected, _bigbird_solution, _bigbird_hint, atol=0, rtol=0),
    Exercise("ch06.topk_attention", "topk_attention(query, key, value, k) -> (B, H, L, d_v)",
             _topk_cases, sparse.topk_attention, _topk_solution, _topk_hint),
]
