"""Exercises of serving attention: KV bytes, a paged cache's attention, split-K decoding,
copy-on-write, the verification mask, and int8 quantisation of a block.

Expected answers come from the package functions bound here at import time, so a
learner who reassigns ``attn_course.serving.paged_attention`` cannot move the target.
Above each exercise, a comment lists the mistakes learners make; a case catches each one,
and a hint names it only when it fits the wrong answer.
"""

from __future__ import annotations

import math

import torch

from ..serving import _copy_on_write
from ..serving import kv_cache_bytes as _kv_cache_bytes
from ..serving import paged_attention as _paged_attention
from ..serving import quantize_kv as _quantize_kv
from ..serving import split_kv_attention as _split_kv_attention
from ._core import Case, Exercise, matches


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731


def _is_tensor(x, like) -> bool:
    return isinstance(x, torch.Tensor) and x.shape == like.shape


# --- serving.kv_bytes --------------------------------------------------------------------------------
# Mistakes: forgetting the factor 2 (keys and values); using the query heads instead of the KV heads
# (GQA), or num_heads // num_kv_heads; forgetting the batch or the bytes per value. The cases are
# chosen so that these give different numbers, and a hint is given only when one mistake fits.

def _kv_solution(num_layers, num_heads, num_kv_heads, head_dim, seq_len, batch_size, bytes_per_value):
    return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch_size * bytes_per_value


def _kv_expected(num_layers, num_heads, num_kv_heads, head_dim, seq_len, batch_size, bytes_per_value):
    return _kv_cache_bytes(num_layers, num_kv_heads, head_dim, seq_len, batch_size, bytes_per_value)


def _kv_cases():
    return [Case(f"layers {a}, heads {b}, kv heads {c}, head_dim {d}, L {e}, batch {f}, {g} bytes",
                 (a, b, c, d, e, f, g))
            for a, b, c, d, e, f, g in ((32, 32, 4, 128, 8192, 3, 1),     # GQA with 4 KV heads, an 8-bit cache: each mistake differs
                                        (12, 12, 12, 64, 1024, 3, 4),     # GPT-2-small-like, MHA, float32
                                        (24, 16, 1, 128, 32768, 2, 2),    # MQA
                                        (2, 4, 2, 16, 10, 3, 1))]


def _kv_hint(case, got, expected):
    L_, H, G, d, T, B, nb = case.args
    if not isinstance(got, (int, float)) or isinstance(got, bool):
        return None
    mistakes = {   # what each usual mistake gives on this case: hint only when one of them matches
        "a cache stores keys AND values: twice the bytes of the keys.": expected / 2,
        "with grouped-query attention only num_kv_heads heads of keys and values are cached.": expected * H / G,
        "the number of KV heads is num_kv_heads itself, not num_heads // num_kv_heads.": expected * (H // G) / G,
        "every sequence in the batch has its own cache: multiply by batch_size.": expected / B,
        "count bytes, not values: multiply by bytes_per_value.": expected / nb,
    }
    matches_ = [hint for hint, value in mistakes.items() if value != expected and got == value]
    if len(matches_) == 1:
        return matches_[0]
    if matches_:
        return "this value fits several mistakes: " + " Or: ".join(matches_)
    return None


# --- serving.paged_attention -----------------------------------------------------------------------
# Mistakes: attending to every slot of the blocks in use (the end of the last block is garbage);
# reading the pool's blocks in pool order (0, 1, 2, ...) instead of the table's order; using every
# entry of the table (padding -1 wraps around to the pool's last block); no causal mask for several
# queries, or torch's top-left one (is_causal=True), where the queries are the LAST positions;
# forgetting the 1/sqrt(d) scale.

def _paged_solution(query, key_blocks, value_blocks, block_table, length):
    H, L_q, d = query.shape
    b = key_blocks.shape[2]
    q_pos = length - L_q + torch.arange(L_q)                               # the queries' positions
    out = torch.zeros(H, L_q, value_blocks.shape[-1], dtype=query.dtype)
    lse = torch.full((H, L_q), -math.inf, dtype=query.dtype)
    for j in range(-(-length // b)):                                       # the blocks in use, in table order
        blk = int(block_table[j])
        k_pos = j * b + torch.arange(b)
        allowed = (k_pos[None, :] < length) & (k_pos[None, :] <= q_pos[:, None])   # (L_q, b)
        s = (query @ key_blocks[blk].transpose(-2, -1) / math.sqrt(d)).masked_fill(~allowed, -math.inf)
        lse_j = torch.logsumexp(s, -1)                                     # (H, L_q)
        o_j = torch.exp(s - torch.where(torch.isfinite(lse_j), lse_j, 0.0)[..., None]) @ value_blocks[blk]
        new = torch.logaddexp(lse, lse_j)
        safe = torch.where(torch.isfinite(new), new, 0.0)
        out = torch.exp(lse - safe)[..., None] * out + torch.exp(lse_j - safe)[..., None] * o_j
        lse = new
    return out


def _paged_expected(query, key_blocks, value_blocks, block_table, length):
    return _paged_attention(query[None], key_blocks, value_blocks, block_table[None],
                            torch.tensor([length]))[0]


def _paged_variant(query, key_blocks, value_blocks, block_table, length, *, upto_length=True,
                   table_order=True, whole_table=False, causal="end", scale=True):
    """A (possibly wrong) reading of the cache: gather, then dense attention."""
    H, L_q, d = query.shape
    b = key_blocks.shape[2]
    n = block_table.shape[0] if whole_table else -(-length // b)
    ids = block_table[:n] if table_order else torch.arange(n)
    k = key_blocks[ids].transpose(0, 1).reshape(H, -1, d)
    v = value_blocks[ids].transpose(0, 1).reshape(H, -1, value_blocks.shape[-1])
    T = length if upto_length else k.shape[1]          # ignoring length: every slot read is a token
    k, v = k[:, :T], v[:, :T]
    s = query @ k.transpose(-2, -1) / (math.sqrt(d) if scale else 1.0)
    if causal == "end":
        s = s.masked_fill(~torch.ones(L_q, T, dtype=torch.bool).tril(T - L_q), -math.inf)
    elif causal == "top":
        s = s.masked_fill(~torch.ones(L_q, T, dtype=torch.bool).tril(0), -math.inf)
    return torch.softmax(s, -1) @ v


def _paged_cases():
    r = _gen(90)
    cases = []

    def pool(N, H, b, d, garbage=8.0):
        return r(N, H, b, d) * garbage, r(N, H, b, d) * garbage           # unused slots hold large garbage

    def fill(kb, vb, table, k, v, b):
        for t in range(k.shape[1]):
            kb[table[t // b], :, t % b] = k[:, t]
            vb[table[t // b], :, t % b] = v[:, t]

    for desc, N, b, table, length, L_q in (
            ("length 10 in blocks 5, 2, 7 of 4 (pool order differs)", 8, 4, [5, 2, 7], 10, 1),
            ("a table padded with -1 past the sequence's 2 full blocks", 6, 4, [3, 0, -1, -1], 8, 1),
            ("3 queries (2 drafted tokens) at the end of 11 tokens", 6, 4, [1, 4, 0], 11, 3),
            ("block_size 1, blocks in scrambled order, 2 queries", 8, 1, [6, 2, 7, 0, 5, 3], 6, 2),
            ("every position a query (prefill): 7 tokens in one block of 8", 3, 8, [2], 7, 7)):
        H, d = 2, 4
        kb, vb = pool(N, H, b, d)
        k, v = r(H, length, d), r(H, length, d)
        fill(kb, vb, table, k, v, b)
        cases.append(Case(desc, (r(H, L_q, d), kb, vb, torch.tensor(table), length)))
    return cases


def _paged_hint(case, got, expected):
    if not _is_tensor(got, expected):
        return None
    args = case.args
    variants = (
        (dict(upto_length=False), "only the first `length` slots hold tokens: the rest of the last block is "
                                  "left over from other sequences. Mask the keys at positions >= length."),
        (dict(table_order=False), "read the blocks in the order block_table lists them (token t is in block "
                                  "block_table[t // block_size]), not in the pool's order."),
        (dict(whole_table=True, upto_length=False), "use only the table's first ceil(length / block_size) entries: the rest is "
                                 "padding (-1 indexes the pool's last block)."),
        (dict(causal=None), "the L_q queries are the sequence's last L_q positions: query i may read keys up to "
                            "position length - L_q + i only (an end-aligned causal mask)."),
        (dict(causal="top"), "torch's is_causal=True aligns the mask to the top left (key j <= query i); here the "
                             "queries are the last positions, so allow j <= i + length - L_q."),
        (dict(scale=False), "scale the scores by 1 / sqrt(d)."),
    )
    for kwargs, hint in variants:
        try:
            wrong = _paged_variant(*args, **kwargs)
        except (IndexError, RuntimeError):
            continue
        if matches(got, wrong, expected, atol=1e-8):
            return hint
    return None


# --- serving.split_k_decode ------------------------------------------------------------------------
# Mistakes: averaging the chunks' outputs; weighting them by their number of keys; attending to the
# padding past lengths[b]; dropping the keys of a last, shorter chunk (chunks of T // num_splits);
# NaN for a chunk that is empty for a short sequence (lse = -inf); exp(lse) without subtracting the
# merged lse (overflow for large scores).

def _split_solution(query, key, value, lengths, num_splits):
    B, H, _, d = query.shape
    T = key.shape[2]
    size = -(-T // num_splits)
    valid = torch.arange(T)[None, :] < lengths[:, None]                  # (B, T): not padding
    out = torch.zeros(B, H, 1, value.shape[-1], dtype=query.dtype)
    lse = torch.full((B, H, 1), -math.inf, dtype=query.dtype)
    for a in range(0, T, size):                                           # each chunk on its own
        s = query @ key[:, :, a:a + size].transpose(-2, -1) / math.sqrt(d)        # (B, H, 1, chunk)
        s = s.masked_fill(~valid[:, None, None, a:a + size], -math.inf)
        lse_c = torch.logsumexp(s, -1)
        o_c = torch.exp(s - torch.where(torch.isfinite(lse_c), lse_c, 0.0)[..., None]) @ value[:, :, a:a + size]
        new = torch.logaddexp(lse, lse_c)                                 # merge with what came before
        safe = torch.where(torch.isfinite(new), new, 0.0)
        out = torch.exp(lse - safe)[..., None] * out + torch.exp(lse_c - safe)[..., None] * o_c
        lse = new
    return out


def _split_expected(query, key, value, lengths, num_splits):
    outs = []
    for b, n in enumerate(lengths.tolist()):
        outs.append(_split_kv_attention(query[b], key[b, :, :n], value[b, :, :n], 1))
    return torch.stack(outs)


def _split_parts(query, key, value, lengths, num_splits, size):
    """Per chunk: output, lse and number of valid keys, (B, H, 1, d_v), (B, H, 1), (B,)."""
    d, T = query.shape[-1], key.shape[2]
    valid = torch.arange(T)[None, :] < lengths[:, None]
    parts = []
    for a in range(0, size * num_splits, size):
        s = query @ key[:, :, a:a + size].transpose(-2, -1) / math.sqrt(d)
        s = s.masked_fill(~valid[:, None, None, a:a + size], -math.inf)
        lse = torch.logsumexp(s, -1)
        w = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        parts.append((w @ value[:, :, a:a + size], lse, valid[:, a:a + size].sum(1)))
    return parts


def _split_cases():
    r = _gen(91)
    cases = []
    for desc, lengths, T, splits, scale in (
            ("lengths 20 and 7, 4 chunks of 5: the short one has empty chunks", [20, 7], 20, 4, 1.0),
            ("T = 13 in 4 chunks (4, 4, 4 and 1 key)", [13, 13], 13, 4, 1.0),
            ("large scores (near 1000)", [16, 12], 16, 4, 1000.0),
            ("one chunk (num_splits 1)", [5, 9], 9, 1, 1.0),
            ("num_splits = T: one key per chunk; a sequence of length 1", [1, 6], 6, 6, 1.0)):
        B, H, d = len(lengths), 2, 8
        q, k = r(B, H, 1, d), r(B, H, T, d)
        if scale > 1:                                         # the largest score near 1000: exp overflows
            q = q * (1000 / (q @ k.transpose(-2, -1) / math.sqrt(d)).max())
        cases.append(Case(desc, (q, k, r(B, H, T, 3), torch.tensor(lengths), splits)))
    return cases


def _split_hint(case, got, expected):
    if not _is_tensor(got, expected):
        return None
    query, key, value, lengths, S = case.args
    if not torch.isfinite(got).all():
        return ("a chunk past a short sequence's end has no key: its lse is -inf and its weight must be 0. Subtract "
                "the merged lse (or a max that is finite) before exp, never -inf - (-inf); and exp(lse) itself "
                "overflows for large scores.")
    T = key.shape[2]
    size = -(-T // S)
    parts = [p for p in _split_parts(query, key, value, lengths, S, size)]
    nonempty = [(o, torch.isfinite(s)[..., None].to(o.dtype), n) for o, s, n in parts]
    mean = sum(o * f for o, f, _ in nonempty) / sum(f for _, f, _ in nonempty).clamp_min(1)
    by_size = sum(o * n.view(-1, 1, 1, 1).to(o.dtype) for o, _, n in nonempty) / lengths.view(-1, 1, 1, 1)
    if matches(got, mean, expected, atol=1e-8):
        return "the chunks are not equally important: weight chunk s by exp(lse_s - lse), lse the merged log-sum-exp."
    if matches(got, by_size, expected, atol=1e-8):
        return ("weight each chunk by exp(lse_s - lse), its share of the softmax's denominator, not by its number "
                "of keys: a chunk's keys can score higher than another's.")
    unpadded = _split_expected(query, key, value, torch.full_like(lengths, T), S)
    if matches(got, unpadded, expected, atol=1e-8):
        return "the keys past lengths[b] are padding: mask them out (scores -inf) before the softmax of each chunk."
    if T % S:
        short = T // S
        dropped = _split_expected(query, key[:, :, :short * S], value[:, :, :short * S],
                                  lengths.clamp(max=short * S), S)
        if matches(got, dropped, expected, atol=1e-8):
            return (f"chunks of T // num_splits = {short} leave the last {T - short * S} key(s) out: use chunks of "
                    f"ceil(T / num_splits) and let the last one be shorter.")
    return None


# --- serving.copy_on_write -------------------------------------------------------------------------
# Mistakes: copying on every write (ignoring the count); never copying; not moving the reference
# (the old block's count stays, so its last holder copies needlessly); giving the copy the old
# block's count (the writer then copies its own copy again); the block index as position % block_size;
# taking free blocks from the end of the list; modifying ref_counts (an input) in place.

def _cow_solution(block_tables, ref_counts, writes, free_blocks, block_size):
    tables, refs = block_tables.clone(), ref_counts.clone()     # the inputs stay as they were
    free = free_blocks.tolist()
    for s, p in writes.tolist():
        j = p // block_size
        old = int(tables[s, j])
        if refs[old] > 1:                                       # shared: write into a copy instead
            new = free.pop(0)
            refs[old] -= 1
            refs[new] = 1
            tables[s, j] = new
    return tables


def _cow_expected(block_tables, ref_counts, writes, free_blocks, block_size):
    tables = block_tables.tolist()
    refs = ref_counts.tolist()
    free = free_blocks.tolist()
    for s, p in writes.tolist():
        _copy_on_write(tables[s], p // block_size, refs, lambda: free.pop(0))
    return torch.tensor(tables, dtype=torch.long)


def _cow_variant(block_tables, ref_counts, writes, free_blocks, block_size, *, rule="count", move_ref=True,
                 new_count="one", index="div", take="first"):
    tables, refs, free = block_tables.clone(), ref_counts.clone(), free_blocks.tolist()
    for s, p in writes.tolist():
        j = p // block_size if index == "div" else p % block_size
        old = int(tables[s, j])
        copy = {"count": refs[old] > 1, "always": True, "never": False}[rule]
        if copy:
            new = free.pop(0) if take == "first" else free.pop()
            if move_ref:
                refs[old] -= 1
            refs[new] = 1 if new_count == "one" else refs[old] + (1 if move_ref else 0)
            tables[s, j] = new
    return tables


def _cow_cases():
    T = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return [
        Case("two sequences share a 6-token prompt (blocks of 4); each writes token 6, then sequence 0 token 7",
             (T([[0, 1], [0, 1]]), T([2, 2, 0, 0, 0, 0]), T([[0, 6], [1, 6], [0, 7]]), T([2, 3, 4]), 4)),
        Case("three sequences share a prompt; sequence 1 writes twice; free blocks listed as 4, 2, 3",
             (T([[0, 1], [0, 1], [0, 1]]), T([3, 3, 0, 0, 0]), T([[1, 5], [1, 6], [0, 7], [2, 5]]), T([4, 2, 3]), 4)),
        Case("a sequence writes into a block it holds alone",
             (T([[3, 5]]), T([0, 0, 0, 1, 0, 1]), T([[0, 5]]), T([0, 1, 2, 4]), 4)),
        Case("block_size 1: two sequences write into shared full blocks",
             (T([[0, 1, 2], [0, 1, 2]]), T([2, 2, 2, 0, 0, 0, 0]), T([[0, 1], [1, 2]]), T([5, 6, 3]), 1)),
        Case("blocks of 3: position 4 is in the table's second block, position 1 in its first",
             (T([[0, 1, 2], [0, 3, 4]]), T([2, 1, 1, 1, 1, 0, 0]), T([[0, 1], [1, 4]]), T([5, 6]), 3)),
    ]


def _cow_hint(case, got, expected):
    rule = ("the rule: the write (s, p) goes to block t = block_tables[s, p // block_size]; if ref_counts[t] > 1, "
            "take the next free block (the first of free_blocks not yet taken), put it in s's table in place of t, "
            "decrease ref_counts[t] by 1 and set the new block's count to 1; otherwise write into t in place.")
    if not (isinstance(got, torch.Tensor) and got.shape == expected.shape and not got.is_floating_point()):
        return rule
    variants = (
        (dict(rule="always"), "copy only a block that another sequence also holds (ref_counts > 1): a block a "
                              "sequence holds alone is written in place."),
        (dict(rule="never"), "a block with ref_counts > 1 is shared: writing into it would change the other "
                             "sequences' tokens. Copy it first."),
        (dict(move_ref=False), "after a copy the writer no longer holds the old block: decrease its count by 1, "
                               "so that its last holder writes in place."),
        (dict(new_count="old"), "the copy is held by the writer alone: its count is 1, so the writer's next write "
                                "goes into it in place."),
        (dict(index="mod"), "token position p is in the table's entry p // block_size (p % block_size is the slot "
                            "inside that block)."),
        (dict(take="last"), "take free blocks in the order free_blocks lists them, from the front."),
    )
    fits = []
    for kwargs, hint in variants:
        try:
            wrong = _cow_variant(*case.args, **kwargs)
        except IndexError:                                   # the mistake cannot even run on this case
            continue
        if torch.equal(got.to(torch.long), wrong) and not torch.equal(wrong, expected):
            fits.append(hint)
    if len(fits) == 1:
        return fits[0]
    if fits:
        return "this answer fits several mistakes: " + " Or: ".join(fits)
    return rule


def _cow_raise_hint(case, message):
    if "out of bounds" in message or "out of range" in message:
        return ("an index past the block table: the block of token position p is entry p // block_size of the "
                "sequence's table (p % block_size is the slot inside that block).")
    return None


# --- serving.verification_mask ---------------------------------------------------------------------
# Mistakes: torch's top-left causal mask (tril without offset); letting every draft see every other
# (all True); a strict inequality (a query not seeing its own token); an offset one too large.

def _verify_solution(num_queries, num_keys):
    i = torch.arange(num_queries)[:, None]
    j = torch.arange(num_keys)[None, :]
    return j <= i + (num_keys - num_queries)


def _verify_expected(num_queries, num_keys):
    return torch.ones(num_queries, num_keys, dtype=torch.bool).tril(num_keys - num_queries)


def _verify_cases():
    return [Case(f"{q} queries, {k} keys", (q, k)) for q, k in ((1, 6), (4, 4), (3, 8), (5, 12), (2, 3))]


def _verify_hint(case, got, expected):
    q, k = case.args
    generic = ("True = may attend, rows are queries: query i is token k - q + i of the sequence and may read keys "
               "j <= i + num_keys - num_queries.")
    if not (isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == torch.bool):
        return generic
    ones = torch.ones(q, k, dtype=torch.bool)
    variants = (
        (ones.tril(0), "torch's is_causal=True aligns the mask to the top left (key j <= query i); the drafted "
                       "tokens are the LAST positions: shift the diagonal by num_keys - num_queries."),
        (ones, "a drafted token must not see the drafts after it: verifying k drafts in one pass must give "
               "what k sequential decode steps give."),
        (ones.tril(k - q - 1), "each query may read its own position too (j <= i + offset, not j < ...)."),
        (ones.tril(k - q + 1), "one key too many: query i may read keys up to position i + num_keys - num_queries."),
    )
    for wrong, hint in variants:
        if torch.equal(got, wrong) and not torch.equal(wrong, expected):
            return hint
    return generic


# --- serving.quantize_block ------------------------------------------------------------------------
# Mistakes: dividing by 128 (or 255) instead of 127; truncating (.to(torch.int8) without rounding);
# one scale for the whole block; the scale over the wrong axis; NaN / garbage for a row of zeros;
# returning the dequantised floats instead of int8.

def _quant_solution(x, axis):
    dim = -1 if axis == "token" else -2                       # per token: the max over the channels
    scale = x.abs().amax(dim=dim, keepdim=True) / 127
    q = torch.round(x / torch.where(scale > 0, scale, 1.0)).clamp(-127, 127).to(torch.int8)
    return q, scale


def _quant_expected(x, axis):
    return _quantize_kv(x, axis=axis, bits=8)


def _quant_cases():
    r = _gen(92)
    outlier = r(6, 8)
    outlier[:, 3] *= 20                                       # one channel much larger, as in trained keys
    zero_row = r(5, 8)
    zero_row[2] = 0.0
    return [Case("per token, 6 tokens of 8 channels", (r(6, 8), "token")),
            Case("per channel, one outlier channel (x20)", (outlier.clone(), "channel")),
            Case("per token, the same outlier channel", (outlier.clone(), "token")),
            Case("per token, a row of zeros", (zero_row, "token")),
            Case("per channel, float32", (r(7, 4).float(), "channel"))]


def _quant_hint(case, got, expected):
    x, axis = case.args
    if not (isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(g, torch.Tensor) for g in got)):
        return "return a pair (q, scale): q an int8 tensor like x, scale with one entry per token or per channel."
    q, scale = got
    if q.dtype != torch.int8:
        return ("q must be an int8 tensor: round x / scale to the nearest integer, clamp to [-127, 127], then "
                ".to(torch.int8).")
    eq, es = expected
    dim = -1 if axis == "token" else -2
    other = -2 if axis == "token" else -1
    amax = x.abs().amax(dim=dim, keepdim=True)
    if _is_tensor(scale, es) and (matches(scale, amax / 128, es) or matches(scale, amax / 255, es)):
        return "the symmetric int8 range is [-127, 127]: scale = max|x| / 127, so the largest entry maps to 127."
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return f"one scale per {axis} (the max over the {'channels' if axis == 'token' else 'tokens'}), not one for the block."
    if isinstance(scale, torch.Tensor) and scale.shape == x.abs().amax(dim=other, keepdim=True).shape \
            and scale.shape != es.shape:
        return (f"axis='{axis}' means one scale per {axis}: take the max over "
                f"{'the channels (dim -1)' if axis == 'token' else 'the tokens (dim -2)'}.")
    if _is_tensor(scale, es) and torch.allclose(scale.double(), es.double(), atol=1e-12) and q.shape == eq.shape:
        safe = torch.where(es > 0, es, torch.ones_like(es))
        if torch.equal(q, (x / safe).clamp(-127, 127).to(torch.int8)):
            return "round to the nearest integer before casting: .to(torch.int8) truncates toward zero."
        if (es == 0).any() and torch.equal(q[(es > 0).expand_as(q)], eq[(es > 0).expand_as(eq)]):
            return "a row of zeros has max 0: divide by 1 there instead of 0 (q = 0 and scale = 0)."
    return None


def _quant_raise_hint(case, message):
    if "cannot be converted" in message or "int8" in message:
        return "an int8 tensor cannot hold NaN or values outside [-128, 127]: the scale of a row of zeros is 0."
    return None


EXERCISES = [
    Exercise("serving.kv_bytes",
             "kv_bytes(num_layers, num_heads, num_kv_heads, head_dim, seq_len, batch_size, bytes_per_value) -> int",
             _kv_cases, _kv_expected, _kv_solution, _kv_hint, atol=0, rtol=0),
    Exercise("serving.paged_attention",
             "paged_attention(query (H, L_q, d), key_blocks (N, H, b, d), value_blocks (N, H, b, d_v), "
             "block_table (n,) int64, length) -> (H, L_q, d_v)",
             _paged_cases, _paged_expected, _paged_solution, _paged_hint, atol=1e-8, rtol=1e-6),
    Exercise("serving.split_k_decode",
             "split_k_decode(query (B, H, 1, d), key (B, H, T, d), value (B, H, T, d_v), lengths (B,) int64, "
             "num_splits) -> (B, H, 1, d_v)",
             _split_cases, _split_expected, _split_solution, _split_hint, atol=1e-8, rtol=1e-6),
    Exercise("serving.copy_on_write",
             "copy_on_write(block_tables (B, n) int64, ref_counts (N,) int64, writes (W, 2) int64, "
             "free_blocks (F,) int64, block_size) -> block_tables (B, n) int64",
             _cow_cases, _cow_expected, _cow_solution, _cow_hint, raise_hint=_cow_raise_hint),
    Exercise("serving.verification_mask",
             "verification_mask(num_queries, num_keys) -> (num_queries, num_keys) bool, True = may attend",
             _verify_cases, _verify_expected, _verify_solution, _verify_hint),
    Exercise("serving.quantize_block",
             "quantize_block(x (T, d), axis 'token' or 'channel') -> (q (T, d) of dtype int8, scale (T, 1) or "
             "(1, d) of x's dtype)",
             _quant_cases, _quant_expected, _quant_solution, _quant_hint, atol=1e-12, rtol=1e-9,
             raise_hint=_quant_raise_hint),
]
