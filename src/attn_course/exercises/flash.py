"""Exercises of exact attention in tiles: the log-sum-exp merge, one FlashAttention tile, the causal
tiled forward loop, one backward tile, the D = rowsum(dO * O) trick, the tile-skip rules (top-left
and end-aligned) and the IO count of FlashAttention-2's loop order.

Expected answers come from the package functions bound here at import time, so a
learner who reassigns ``attn_course.flash.merge_attention`` cannot move the target.
Above each exercise, a comment lists the mistakes learners make; a case catches each one.
The causal forward loop is also checked for what it computes and allocates: under a spy,
it must skip the tiles above the diagonal and never build an ``L_q x L_k`` tensor.
"""

from __future__ import annotations

import math

import torch

from ..flash import _backward_tile, _tile_kind
from ..flash import attention_with_lse as _attention_with_lse
from ..flash import flash2_hbm_bytes as _flash2_hbm_bytes
from ..flash import flash_attention as _flash_attention
from ..flash import flash_hbm_bytes as _flash_hbm_bytes
from ..flash import merge_attention as _merge_attention
from ._core import Case, Exercise, Footprint, matches


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
    q, k, v = r(3, 4), r(7, 4), r(7, 3)
    o1, s1 = _attention_with_lse(q, k[:3], v[:3])
    o2, s2 = _attention_with_lse(q, k[3:], v[3:])
    # part 2's scores are 150 larger (its output is unchanged, its lse grows by 150): in float32,
    # exp(lse2 - lse1) overflows, so a merge must shift by the larger lse, not by either part's
    cases.append(Case("float32, part 2's lse 150 above part 1's", (o1.float(), s1.float(), o2.float(),
                                                                   s2.float() + 150.0)))
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
            both = torch.isfinite(lse1) & torch.isfinite(lse2)
            if both.any() and (lse1 - lse2)[both].abs().max() > 80:
                return ("exp(lse2 - lse1) overflows when one part's lse is far above the other's (here by "
                        f"{(lse1 - lse2)[both].abs().max().item():.0f}): shifting by one part's lse is not "
                        "enough; subtract the merged lse (or the larger of the two) before exp.")
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
    # a row that has seen keys, then meets a tile where all its keys are masked (a causal diagonal tile
    # of an end-aligned mask): the tile's own max is -inf, the running one is finite
    s_old = r(3, 5)
    m = s_old.amax(-1)
    p_old = torch.exp(s_old - m[:, None])
    s = r(3, 4)
    s[1] = -math.inf
    cases.append(Case("a fully masked row after finite scores", (m, p_old.sum(-1), p_old @ r(5, 2), s, r(4, 2))))
    # a causal row that has seen no allowed key yet and whose tile is masked too
    s = r(3, 4)
    s[0] = -math.inf
    cases.append(Case("a row masked so far and in this tile (all -inf)",
                      (torch.full((3,), -math.inf, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                       torch.zeros(3, 2, dtype=torch.float64), s, r(4, 2))))
    # float32: exp(100) overflows float32 (max about 3.4e38 = e^88.7)
    big = (r(3, 6) + 100.0).float()
    cases.append(Case("float32, scores near 100", (torch.full((3,), -math.inf), torch.zeros(3),
                                                   torch.zeros(3, 2), big, r(6, 2).float())))
    return cases


def _tile_hint(case, got, expected):
    m, z, o, s, v = case.args
    if not (isinstance(got, (tuple, list)) and len(got) == 3 and all(isinstance(g, torch.Tensor) for g in got)):
        return None
    if any(torch.isnan(g).any() for g in got):
        if "after finite" in case.description:
            return ("this row's tile is all -inf but its running max is finite: subtracting the tile's own "
                    "max gives -inf - (-inf) = NaN. Subtract the new running max m_new = max(m, rowmax(s)).")
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


# --- flash.causal_flash_forward --------------------------------------------------------------------
# Mistakes: no mask at all (the non-causal loop); masking with tile indices instead of positions;
# not masking inside the diagonal tile; NaN in the first rows of a tile whose keys are all masked
# (block_q > 1 with an uneven split); not skipping the tiles above the diagonal (checked by counting the
# multiply-adds); building an L_q x L_k mask or score matrix (checked by the allocation spy).

def _causal_forward_solution(q, k, v, block_q, block_k):
    L_q, L_k = q.shape[0], k.shape[0]
    out = torch.zeros(L_q, v.shape[1], dtype=v.dtype)
    for q0 in range(0, L_q, block_q):
        q1 = min(q0 + block_q, L_q)
        qt = q[q0:q1] / math.sqrt(q.shape[1])
        m = torch.full((q1 - q0,), -math.inf, dtype=q.dtype)
        z = torch.zeros(q1 - q0, dtype=q.dtype)
        o = torch.zeros(q1 - q0, v.shape[1], dtype=q.dtype)
        for k0 in range(0, min(L_k, q1), block_k):             # keys after the last query: skipped
            k1 = min(k0 + block_k, L_k)
            s = qt @ k[k0:k1].T
            s = s.masked_fill(torch.arange(k0, k1)[None, :] > torch.arange(q0, q1)[:, None], -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[:, None])                   # m_new is finite: key 0 <= every query
            alpha = torch.exp(m - m_new)
            z = alpha * z + p.sum(-1)
            o = alpha[:, None] * o + p @ v[k0:k1]
            m = m_new
        out[q0:q1] = o / z[:, None]
    return out


def _causal_forward_expected(q, k, v, block_q, block_k):
    return _flash_attention(q, k, v, is_causal=True, block_q=block_q, block_k=block_k)


def _causal_forward_cases():
    r = _gen(72)
    cases = []
    for desc, (L_q, L_k, d, d_v, bq, bk) in (
            ("L 64, tiles of 8 (28 of 64 tiles skippable)", (64, 64, 4, 4, 8, 8)),
            ("L_q 10 < L_k 23, tiles 4 x 6", (10, 23, 8, 3, 4, 6)),
            ("L_q 23 > L_k 10, tiles 5 x 3", (23, 10, 8, 3, 5, 3)),
            ("tiles of 1", (6, 6, 2, 2, 1, 1)),
            ("one tile larger than the sequence", (5, 5, 3, 2, 8, 8))):
        cases.append(Case(desc, (r(L_q, d), r(L_k, d), r(L_k, d_v), bq, bk)))
    cases.append(Case("large scores (near 1000)", (r(9, 4) * 30, r(9, 4) * 30, r(9, 2), 4, 4)))
    cases.append(Case("float32", (r(12, 8).float(), r(12, 8).float(), r(12, 3).float(), 5, 4)))
    return cases


def _causal_forward_hint(case, got, expected):
    q, k, v, bq, bk = case.args
    scale = 1 / math.sqrt(q.shape[1])
    if matches(got, _flash_attention(q, k, v, is_causal=False, block_q=bq, block_k=bk), expected):
        return "the result is that of full attention: hide the keys j > i in every tile (causal)."
    L_q, L_k = q.shape[0], k.shape[0]
    tile_index = torch.zeros(L_q, L_k, dtype=torch.bool)
    for i in range(L_q):
        for j in range(L_k):
            tile_index[i, j] = j // bk <= i // bq
    s = (q.double() @ k.double().T * scale).masked_fill(~tile_index, -math.inf)
    if matches(got, (torch.softmax(s, -1) @ v.double()).to(v.dtype), expected):
        return ("you masked whole tiles (key tile <= query tile) but not the pairs inside the diagonal "
                "tiles: mask each pair, key position > query position, with -inf.")
    return None


def _causal_forward_verify(case, fn, got):
    q, k, v, bq, bk = case.args
    L_q, L_k = q.shape[0], k.shape[0]
    if (L_q, L_k) != (64, 64):
        return None
    with Footprint(host=False) as spy:
        fn(q.clone(), k.clone(), v.clone(), bq, bk)
    if spy.largest >= L_q * L_k // 2:
        return (f"the values are right, but your function created a tensor of shape {spy.shape} "
                f"({spy.largest:,} elements for L_q x L_k = {L_q * L_k:,}): build the mask of one tile "
                f"at a time, from the tile's positions, never an L x L mask or score matrix.")
    full = L_q * L_k * (q.shape[1] + v.shape[1])
    if spy.products > 0.75 * full:
        return (f"the values are right, but your loop did {spy.products:,} multiply-adds, as many as "
                f"full attention ({full:,}): skip the key tiles whose first key comes after the tile's last "
                f"query (they hold no allowed pair), instead of computing and masking them.")
    return None


# --- flash.backward_tile_step ----------------------------------------------------------------------
# Mistakes: forgetting D (dS = P * dP); forgetting the scale in dQ and dK; recomputing P as a softmax
# over this tile only (P = exp(S - lse) with the row's lse over ALL keys); not masking; exp(S) / exp(lse)
# (overflow, inf / inf = NaN); NaN for a query that sees no key at all (lse = -inf).

def _bwd_tile_solution(q, k, v, dout, lse, delta, scale, mask):
    s = (q @ k.T * scale).masked_fill(~mask, -math.inf)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, math.inf))   # no key: P = 0
    p = torch.exp(s - lse_safe[:, None])
    dv = p.T @ dout
    ds = p * (dout @ v.T - delta[:, None])
    return ds @ k * scale, ds.T @ q * scale, dv


def _bwd_tile_expected(q, k, v, dout, lse, delta, scale, mask):
    return _backward_tile(q, k, v, dout, lse, delta, scale, ~mask)


def _bwd_problem(r, L_q, L_k, d, d_v, mask, scale, dtype=torch.float64, shift=0.0):
    """A whole attention problem with its saved (O, lse) and D, to cut tiles from."""
    q, k, v, dout = r(L_q, d) + shift, r(L_k, d) + shift, r(L_k, d_v), r(L_q, d_v)
    q, k, v, dout = (x.to(dtype) for x in (q, k, v, dout))
    out, lse = _attention_with_lse(q, k, v, mask, scale=scale)
    delta = (dout * out).sum(-1)
    return q, k, v, dout, lse, delta


def _bwd_tile_cases():
    r = _gen(73)
    cases = []
    L = 12
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    q, k, v, do, lse, dl = _bwd_problem(r, L, L, 6, 4, causal, 0.5)

    def tile(desc, qs, ks, mask):
        cases.append(Case(desc, (q[qs], k[ks], v[ks], do[qs], lse[qs], dl[qs], 0.5, mask[qs, ks])))

    tile("a tile below the diagonal (no key hidden), 4 x 4", slice(8, 12), slice(0, 4), causal)
    tile("a diagonal tile, 4 x 4", slice(4, 8), slice(4, 8), causal)
    tile("a diagonal tile, 3 queries x 5 keys", slice(3, 6), slice(2, 7), causal)
    # end-aligned, more queries than keys: queries 0..3 see no key at all (lse = -inf)
    br = torch.arange(5)[None, :] <= torch.arange(9)[:, None] + (5 - 9)
    q2, k2, v2, do2, lse2, dl2 = _bwd_problem(r, 9, 5, 4, 3, br, 0.5)
    cases.append(Case("queries that see no key (lse = -inf)", (q2[:6], k2, v2, do2[:6], lse2[:6], dl2[:6], 0.5,
                                                               br[:6])))
    # float32 with scores near 100: exp(S) overflows float32 (e^88.7), exp(S - lse) does not
    full = torch.ones(6, 8, dtype=torch.bool)
    q3, k3, v3, do3, lse3, dl3 = _bwd_problem(r, 6, 8, 4, 4, full, 1.0, torch.float32, shift=5.0)
    cases.append(Case("float32, scores near 100", (q3, k3[:4], v3[:4], do3, lse3, dl3, 1.0, full[:, :4])))
    return cases


def _bwd_tile_hint(case, got, expected):
    q, k, v, dout, lse, delta, scale, mask = case.args
    if not (isinstance(got, (tuple, list)) and len(got) == 3 and all(isinstance(g, torch.Tensor) for g in got)):
        return None
    if any(torch.isnan(g).any() or torch.isinf(g).any() for g in got):
        if "no key" in case.description:
            return ("a query that sees no key has lse = -inf, and -inf - (-inf) is NaN: give its weights 0 "
                    "(e.g. subtract +inf instead of its lse).")
        return "compute P as exp(S - lse), never exp(S) / exp(lse): exp of large scores overflows."
    dq, dk, dv = (e.double() for e in expected)
    qd, kd, vd, dod, lsed, deltad = (x.double() for x in (q, k, v, dout, lse, delta))
    s = (qd @ kd.T * scale).masked_fill(~mask, -math.inf)
    lse_safe = torch.where(torch.isfinite(lsed), lsed, torch.full_like(lsed, math.inf))
    p = torch.exp(s - lse_safe[:, None])
    dp = dod @ vd.T
    ds_no_delta = p * dp
    if matches(got[0], ds_no_delta @ kd * scale, dq) or matches(got[1], ds_no_delta.T @ qd * scale, dk):
        return "softmax's backward is dS = P * (dP - D), with D = rowsum(dO * O): you left out D."
    if matches(got[0], dq / scale, dq) or matches(got[1], dk / scale, dk):
        return "S = scale * Q K^T, so dQ = scale * dS K and dK = scale * dS^T Q: multiply by the scale."
    p_tile = torch.softmax(s, -1).nan_to_num(0.0)
    if matches(got[2], p_tile.T @ dod, dv):
        return ("P must be the weights of the whole row, exp(S - lse) with the saved lse over ALL keys, "
                "not a softmax over this tile's keys.")
    p_nomask = torch.exp(qd @ kd.T * scale - lse_safe[:, None])
    if matches(got[2], p_nomask.T @ dod, dv):
        return "hidden keys (mask False) have weight 0: fill their scores with -inf before exp."
    return None


# --- flash.softmax_delta --------------------------------------------------------------------------
# Mistakes: the product dO * O in half precision (overflows past 65504); summing over the wrong axis;
# rowsum(dO) * rowsum(O) instead of the rowsum of the product; returning half precision.

def _delta_solution(dout, out):
    acc = torch.float32 if dout.dtype in (torch.float16, torch.bfloat16) else dout.dtype
    return (dout.to(acc) * out.to(acc)).sum(-1)


def _delta_expected(dout, out):
    acc = torch.float32 if dout.dtype in (torch.float16, torch.bfloat16) else dout.dtype
    return (dout.to(torch.float64) * out.to(torch.float64)).sum(-1).to(acc)


def _delta_cases():
    r = _gen(74)
    cases = [Case("(2, 3, 5, 4) float64", (r(2, 3, 5, 4), r(2, 3, 5, 4))),
             Case("one query, d_v 1", (r(1, 1), r(1, 1)))]
    out = r(4, 8)
    out[2] = 0.0                                               # a query that saw no key: output 0
    cases.append(Case("a zero output row (a query that saw no key)", (r(4, 8), out)))
    cases.append(Case("float16 with products past 65504", ((r(3, 16) * 300).half(), (r(3, 16) * 300).half())))
    cases.append(Case("bfloat16", (r(2, 5, 64).bfloat16(), r(2, 5, 64).bfloat16())))
    return cases


def _delta_hint(case, got, expected):
    dout, out = case.args
    if not isinstance(got, torch.Tensor):
        return None
    if torch.isinf(got).any() or torch.isnan(got).any():
        return ("dO * O overflows float16 (largest number 65504): convert to float32 before multiplying, "
                "as FlashAttention-2 does, and return float32.")
    if got.shape == expected.shape and matches(got, dout.double().sum(-1) * out.double().sum(-1), expected):
        return "D is the rowsum of the elementwise product dO * O, not the product of the two rowsums."
    if got.shape != expected.shape:
        return "sum over the last axis (the value features d_v): D has one number per query."
    if dout.dtype in (torch.float16, torch.bfloat16):
        return "accumulate in float32: the product and sum in half precision lose the digits D needs."
    return None


def _delta_verify(case, fn, got):
    dout, _ = case.args
    if dout.dtype in (torch.float16, torch.bfloat16) and isinstance(got, torch.Tensor) \
            and got.dtype != torch.float32:
        return (f"the values are close, but D has dtype {got.dtype}: keep it in float32 for half-precision "
                f"inputs, like the lse (FlashAttention-2 stores both in float32).")
    return None


# --- flash.end_aligned_skipped_tiles --------------------------------------------------------------
# Mistakes: the top-left rule (forgetting the offset L_k - L_q); the offset with the wrong sign
# (L_q - L_k); skipping the diagonal tile (>= instead of >); tile numbers instead of positions.

def _end_skip_solution(length_q, length_k, block_q, block_k):
    n_q, n_k = -(-length_q // block_q), -(-length_k // block_k)
    first_key = torch.arange(n_k)[None, :] * block_k
    last_query = (torch.arange(n_q)[:, None] * block_q + block_q - 1).clamp(max=length_q - 1)
    return first_key > last_query + (length_k - length_q)


def _end_skip_expected(length_q, length_k, block_q, block_k):
    n_q, n_k = -(-length_q // block_q), -(-length_k // block_k)
    out = torch.zeros(n_q, n_k, dtype=torch.bool)
    for i in range(n_q):
        for j in range(n_k):
            q0, q1 = i * block_q, min((i + 1) * block_q, length_q)
            k0, k1 = j * block_k, min((j + 1) * block_k, length_k)
            out[i, j] = _tile_kind(q0, q1, k0, k1, True, length_k - length_q) == "skipped"
    return out


def _end_skip_cases():
    return [Case(f"L_q {lq}, L_k {lk}, block_q {bq}, block_k {bk}" + note, (lq, lk, bq, bk))
            for lq, lk, bq, bk, note in ((4, 20, 2, 4, ": a chunk of 4 new queries after 16 cached keys"),
                                         (16, 16, 4, 4, ": equal lengths"),
                                         (1, 50, 1, 8, ": one decoding query"),
                                         (20, 6, 4, 3, ": more queries than keys"),
                                         (10, 37, 3, 5, ""), (7, 7, 8, 8, ""), (12, 30, 4, 2, ""))]


def _end_skip_hint(case, got, expected):
    lq, lk, bq, bk = case.args
    if not (isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == torch.bool):
        return None
    n_q, n_k = expected.shape
    first_key = torch.arange(n_k)[None, :] * bk
    last_query = (torch.arange(n_q)[:, None] * bq + bq - 1).clamp(max=lq - 1)
    if torch.equal(got, first_key > last_query) and not torch.equal(got, expected):
        return ("that is the top-left rule: with the ends aligned, query i sees keys j <= i + (L_k - L_q), so "
                "a tile is skipped when its first key comes after last query + L_k - L_q.")
    if torch.equal(got, first_key > last_query + (lq - lk)) and not torch.equal(got, expected):
        return "the offset is L_k - L_q (the keys before the first query), not L_q - L_k."
    if (got & ~expected).any():
        return ("you skip a tile that holds allowed pairs: skip only when the first key comes after the last "
                "query's last allowed key (k0 > q_last + L_k - L_q); the diagonal tiles are needed.")
    if bq != bk:
        return "compare positions, not tile numbers: block_q and block_k differ here."
    return None


# --- flash.io_bytes --------------------------------------------------------------------------------
# Mistakes: the paper's loop order (Q and O once per key tile) instead of FA2's; floor instead of
# ceil for the number of query tiles; M taken as elements (forgetting bytes_per_value in the tile
# size); the count in elements instead of bytes; forgetting that K AND V are both read.

def _io_solution(length, head_dim, sram_bytes, bytes_per_value):
    block = max(1, sram_bytes // bytes_per_value // (4 * head_dim))
    query_tiles = -(-length // block)
    return (2 * length * head_dim + 2 * length * head_dim * query_tiles) * bytes_per_value


def _io_expected(length, head_dim, sram_bytes, bytes_per_value):
    return _flash2_hbm_bytes(length, head_dim, sram_bytes, bytes_per_value=bytes_per_value)


def _io_cases():
    return [Case(f"N {n}, d {d}, M {m // 1024} KB, {b} bytes per value", (n, d, m, b))
            for n, d, m, b in ((4096, 64, 192 * 1024, 2), (4096, 128, 100 * 1024, 2), (1000, 64, 100 * 1024, 2),
                               (2048, 256, 228 * 1024, 2), (512, 64, 16 * 1024, 4), (100, 16, 64 * 1024, 2))]


def _io_hint(case, got, expected):
    n, d, m, b = case.args
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if type(got) not in (int, float):
        return None
    block = max(1, m // b // (4 * d))
    wrong = {
        "that is the paper's first loop order (key tiles outside, Q and O read and written once per key "
        "tile); count FlashAttention-2's: Q read and O written once, K and V read once per query tile.":
            _flash_hbm_bytes(n, d, m, bytes_per_value=b),
        "the last query tile may be shorter but is still a tile: T_r = ceil(N / B), not floor.":
            (2 * n * d + 2 * n * d * (n // block)) * b,
        "the tile size counts elements: B = M / (bytes_per_value * 4 d), with M in bytes.":
            (2 * n * d + 2 * n * d * -(-n // max(1, m // (4 * d)))) * b,
        "return bytes: multiply the number of elements by bytes_per_value.": expected // b,
        "both K and V are read once per query tile (and Q read, O written once).":
            (2 * n * d + n * d * -(-n // block)) * b,
    }
    for text, value in wrong.items():
        if value != expected and math.isclose(float(got), float(value), rel_tol=1e-9):
            return text
    return None


EXERCISES = [
    Exercise("flash.merge_attention",
             "merge_attention(out1 (..., L_q, d_v), lse1 (..., L_q), out2, lse2) -> (out, lse)",
             _merge_cases, _merge_expected, _merge_solution, _merge_hint, atol=1e-6, rtol=1e-5),
    Exercise("flash.flash_tile_step",
             "flash_tile_step(m (bq,), z (bq,), o (bq, d_v), scores (bq, bk), value (bk, d_v)) -> (m, z, o)",
             _tile_cases, _tile_expected, _tile_solution, _tile_hint, atol=1e-6, rtol=1e-5),
    Exercise("flash.causal_flash_forward",
             "causal_flash_forward(q (L_q, d), k (L_k, d), v (L_k, d_v), block_q, block_k) -> (L_q, d_v)",
             _causal_forward_cases, _causal_forward_expected, _causal_forward_solution, _causal_forward_hint,
             atol=1e-6, rtol=1e-5, verify=_causal_forward_verify),
    Exercise("flash.backward_tile_step",
             "backward_tile_step(q (bq, d), k (bk, d), v (bk, d_v), dout (bq, d_v), lse (bq,), delta (bq,), "
             "scale, mask (bq, bk) bool) -> (dq (bq, d), dk (bk, d), dv (bk, d_v))",
             _bwd_tile_cases, _bwd_tile_expected, _bwd_tile_solution, _bwd_tile_hint, atol=5e-5, rtol=5e-4),
    Exercise("flash.softmax_delta",
             "softmax_delta(dout (..., L_q, d_v), out (..., L_q, d_v)) -> D (..., L_q), float32 for half inputs",
             _delta_cases, _delta_expected, _delta_solution, _delta_hint, atol=1e-4, rtol=1e-4,
             verify=_delta_verify),
    Exercise("flash.causal_skipped_tiles",
             "causal_skipped_tiles(length, block_q, block_k) -> (n_q_tiles, n_k_tiles) bool, True = skip",
             _skip_cases, _skip_expected, _skip_solution, _skip_hint),
    Exercise("flash.end_aligned_skipped_tiles",
             "end_aligned_skipped_tiles(length_q, length_k, block_q, block_k) -> (n_q_tiles, n_k_tiles) bool, "
             "True = skip",
             _end_skip_cases, _end_skip_expected, _end_skip_solution, _end_skip_hint),
    Exercise("flash.io_bytes",
             "io_bytes(length, head_dim, sram_bytes, bytes_per_value) -> int, bytes moved by FA2's forward",
             _io_cases, _io_expected, _io_solution, _io_hint, atol=0, rtol=0),
]
