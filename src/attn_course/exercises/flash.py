"""Exercises of exact attention in tiles: the log-sum-exp merge, one FlashAttention tile, causal tiles.

Expected answers come from the package functions bound here at import time, so a
learner who reassigns ``attn_course.flash.merge_attention`` cannot move the target.
"""

from __future__ import annotations

import math

import torch

from ..flash import _tile_kind
from ..flash import attention_with_lse as _attention_with_lse
from ..flash import merge_attention as _merge_attention
from ._core import Case, Exercise


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731


# --- flash.merge_attention -------------------------------------------------------------------------
# Mistakes: averaging the two outputs; weighting by exp(lse) without subtracting the max (overflow
# when scores are large); NaN when one part is empty (lse = -inf), or when both are; lse as a sum
# or a max.

def _merge_solution(out1, lse1, out2, lse2):
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1, w2 = torch.exp(lse1 - safe), torch.exp(lse2 - safe)
    return w1[..., None] * out1 + w2[..., None] * out2, lse


def _merge_expected(out1, lse1, out2, lse2):
    return _merge_attention([out1, out2], [lse1, lse2])


def _merge_cases():
    r = _gen(70)
    cases = []
    for desc, (Lq, L1, L2), scale in (("(2, 4) queries, 3 + 5 keys", (4, 3, 5), 1.0),
                                      ("1 query, 1 + 6 keys", (1, 1, 6), 1.0),
                                      ("large scores (lse near 1000)", (3, 4, 4), 300.0)):
        q, k, v = r(2, Lq, 4) * scale, r(2, L1 + L2, 4), r(2, L1 + L2, 3)
        o1, s1 = _attention_with_lse(q, k[:, :L1], v[:, :L1])
        o2, s2 = _attention_with_lse(q, k[:, L1:], v[:, L1:])
        cases.append(Case(desc, (o1, s1, o2, s2)))
    q, k, v = r(5, 4), r(6, 4), r(6, 2)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[1, :3] = False        # query 1 sees no key of part 1: lse1 = -inf there
    o1, s1 = _attention_with_lse(q, k[:3], v[:3], mask[:, :3])
    o2, s2 = _attention_with_lse(q, k[3:], v[3:], mask[:, 3:])
    cases.append(Case("part 1 empty for one query (lse = -inf)", (o1, s1, o2, s2)))
    mask[3] = False            # query 3 sees no key at all: zero output, lse = -inf
    o1, s1 = _attention_with_lse(q, k[:3], v[:3], mask[:, :3])
    o2, s2 = _attention_with_lse(q, k[3:], v[3:], mask[:, 3:])
    cases.append(Case("both parts empty for one query (zero output, lse = -inf)", (o1, s1, o2, s2)))
    return cases


def _merge_hint(case, got, expected):
    out1, lse1, out2, lse2 = case.args
    if isinstance(got, (tuple, list)) and len(got) == 2 and isinstance(got[0], torch.Tensor):
        if got[0].shape == out1.shape and torch.allclose(got[0], (out1 + out2) / 2):
            return "the parts are not equally important: weight each by exp(lse_i - lse)."
        if torch.isnan(got[0]).any() or torch.isinf(got[0]).any():
            return ("exp(lse_i) overflows for large scores, and -inf - (-inf) is NaN: subtract the merged "
                    "lse (or the max) before exp, and treat an empty part (lse = -inf) as weight 0.")
        if isinstance(got[1], torch.Tensor) and got[1].shape == lse1.shape and (
                torch.allclose(got[1], torch.maximum(lse1, lse2)) or torch.allclose(got[1], lse1 + lse2)):
            return "the merged lse is log(exp(lse1) + exp(lse2)): torch.logaddexp."
    return "lse = logaddexp(lse1, lse2); out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2."


# --- flash.flash_tile_step -------------------------------------------------------------------------
# Mistakes: not rescaling the old output or the old sum by exp(m_old - m_new); exp(s) without
# subtracting the max (overflow); NaN for a row whose keys are all masked so far (m = -inf).

def _tile_solution(m, z, o, scores, value):
    m_new = torch.maximum(m, scores.amax(-1))
    m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    p = torch.exp(scores - m_safe[..., None])
    alpha = torch.exp(m - m_safe)
    return m_new, alpha * z + p.sum(-1), alpha[..., None] * o + p @ value


def _tile_expected(m, z, o, scores, value):
    """The same state, derived independently: merge (o / z, m + log z) with this tile's attention."""
    finite = lambda x: torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # noqa: E731
    lse_old = torch.where(z > 0, m + torch.log(torch.where(z > 0, z, torch.ones_like(z))),
                          torch.full_like(z, -math.inf))
    out_old = o / torch.where(z > 0, z, torch.ones_like(z))[..., None]
    lse_tile = torch.logsumexp(scores, -1)
    out_tile = torch.exp(scores - finite(lse_tile)[..., None]) @ value
    out, lse = _merge_attention([out_old, out_tile], [lse_old, lse_tile])
    m_new = torch.maximum(m, scores.amax(-1))
    z_new = torch.exp(lse - finite(m_new))
    return m_new, z_new, out * z_new[..., None]


def _tile_cases():
    r = _gen(71)
    cases = []
    # the first tile: nothing seen yet
    cases.append(Case("first tile (m = -inf, z = 0, o = 0)",
                      (torch.full((4,), -math.inf, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                       torch.zeros(4, 3, dtype=torch.float64), r(4, 5), r(5, 3))))
    # a later tile whose scores exceed the running max: the old part must be rescaled
    s_old = r(4, 6)
    m = s_old.amax(-1)
    p_old = torch.exp(s_old - m[:, None])
    v_old = r(6, 3)
    cases.append(Case("second tile with larger scores", (m, p_old.sum(-1), p_old @ v_old, r(4, 5) + 3.0, r(5, 3))))
    cases.append(Case("second tile with smaller scores", (m, p_old.sum(-1), p_old @ v_old, r(4, 5) - 3.0, r(5, 3))))
    # large scores: exp without the max overflows
    big = r(2, 4) * 400
    cases.append(Case("scores near 1000", (torch.full((2,), -math.inf, dtype=torch.float64),
                                           torch.zeros(2, dtype=torch.float64),
                                           torch.zeros(2, 3, dtype=torch.float64), big, r(4, 3))))
    # a causal row that has seen no allowed key yet and whose tile is masked too
    s = r(3, 4)
    s[0] = -math.inf
    cases.append(Case("a row masked so far and in this tile (all -inf)",
                      (torch.full((3,), -math.inf, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                       torch.zeros(3, 2, dtype=torch.float64), s, r(4, 2))))
    return cases


def _tile_hint(case, got, expected):
    m, z, o, s, v = case.args
    if not (isinstance(got, (tuple, list)) and len(got) == 3 and all(isinstance(g, torch.Tensor) for g in got)):
        return None
    if any(torch.isnan(g).any() for g in got):
        return ("a row with every score -inf gives -inf - (-inf) = NaN: subtract 0 instead of the max "
                "where the new max is -inf (torch.where(torch.isfinite(m_new), m_new, 0)).")
    if any(torch.isinf(g).any() for g in got[1:]):
        return "exp of large scores overflows: subtract the new running max before exp."
    m_new = expected[0]
    no_rescale = (z + torch.exp(s - m_new[:, None]).sum(-1), o + torch.exp(s - m_new[:, None]) @ v)
    if got[1].shape == z.shape and torch.allclose(got[1], no_rescale[0]) and not torch.allclose(got[1], expected[1]):
        return "the old sum z was computed with the old max: multiply it by exp(m_old - m_new)."
    if got[2].shape == o.shape and torch.allclose(got[2], no_rescale[1]) and not torch.allclose(got[2], expected[2]):
        return "the old output o was computed with the old max: multiply it by exp(m_old - m_new)."
    return None


# --- flash.causal_skipped_tiles -------------------------------------------------------------------
# Mistakes: skipping the diagonal tile (k0 >= q0); comparing tile indices, which is wrong when
# block_q != block_k; ignoring a last, shorter tile.

def _skip_solution(length, block_q, block_k):
    n_q, n_k = -(-length // block_q), -(-length // block_k)
    first_key = torch.arange(n_k)[None, :] * block_k                         # k0 of each key tile
    last_query = (torch.arange(n_q)[:, None] * block_q + block_q - 1).clamp(max=length - 1)
    return first_key > last_query


def _skip_expected(length, block_q, block_k):
    n_q, n_k = -(-length // block_q), -(-length // block_k)
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    for i in range(n_q):
        for j in range(n_k):
            q0, q1 = i * block_q, min((i + 1) * block_q, length)
            k0, k1 = j * block_k, min((j + 1) * block_k, length)
            out[i, j] = _tile_kind(q0, q1, k0, k1, True) == "skipped"
    return out


def _skip_cases():
    return [Case(f"L {L}, block_q {bq}, block_k {bk}", (L, bq, bk))
            for L, bq, bk in ((8, 2, 2), (16, 4, 4), (12, 4, 2), (12, 2, 4), (10, 4, 3), (5, 8, 8))]


def _skip_hint(case, got, expected):
    L, bq, bk = case.args
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == torch.bool:
        if (got & ~expected).any():
            return ("you skip a tile that holds allowed pairs: a tile can be skipped only when its first key "
                    "comes after its last query (k0 > q1 - 1); the diagonal tiles are needed.")
        if bq != bk:
            return "compare positions, not tile numbers: block_q and block_k differ here."
    return None


EXERCISES = [
    Exercise("flash.merge_attention",
             "merge_attention(out1 (..., L_q, d_v), lse1 (..., L_q), out2, lse2) -> (out, lse)",
             _merge_cases, _merge_expected, _merge_solution, _merge_hint, atol=1e-6, rtol=1e-5),
    Exercise("flash.flash_tile_step",
             "flash_tile_step(m (bq,), z (bq,), o (bq, d_v), scores (bq, bk), value (bk, d_v)) -> (m, z, o)",
             _tile_cases, _tile_expected, _tile_solution, _tile_hint, atol=1e-6, rtol=1e-5),
    Exercise("flash.causal_skipped_tiles",
             "causal_skipped_tiles(length, block_q, block_k) -> (n_q_tiles, n_k_tiles) bool, True = skip",
             _skip_cases, _skip_expected, _skip_solution, _skip_hint),
]
