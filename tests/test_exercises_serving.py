"""The serving chapter's exercises: each checker rejects the usual mistakes with a hint that names
the mistake, and accepts right answers written in another style."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attn_course.exercises import check, list_exercises, solution

SERVING = [n for n in list_exercises() if n.startswith("serving.")]


def test_the_chapter_has_six_auto_checked_exercises():
    assert sorted(SERVING) == sorted(["serving.kv_bytes", "serving.paged_attention", "serving.split_k_decode",
                                      "serving.copy_on_write", "serving.verification_mask",
                                      "serving.quantize_block"])


@pytest.mark.parametrize("name", SERVING)
def test_every_solution_passes(name, capsys):
    assert check(name, solution(name), strict=True) is True


# --- wrong answers ---------------------------------------------------------------------------------

def _gather(key_blocks, value_blocks, block_table, n_blocks):
    H, d = key_blocks.shape[1], key_blocks.shape[3]
    ids = block_table[:n_blocks]
    return (key_blocks[ids].transpose(0, 1).reshape(H, -1, d),
            value_blocks[ids].transpose(0, 1).reshape(H, -1, value_blocks.shape[-1]))


def _end_mask(L_q, L_k):
    return torch.ones(L_q, L_k, dtype=torch.bool).tril(L_k - L_q)


def _paged_all_slots(q, kb, vb, table, length):
    k, v = _gather(kb, vb, table, -(-length // kb.shape[2]))          # every slot of the blocks in use
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_end_mask(q.shape[1], k.shape[1]))


def _paged_pool_order(q, kb, vb, table, length):
    k, v = _gather(kb, vb, torch.arange(kb.shape[0]), -(-length // kb.shape[2]))
    return F.scaled_dot_product_attention(q, k[:, :length], v[:, :length], attn_mask=_end_mask(q.shape[1], length))


def _paged_whole_table(q, kb, vb, table, length):
    k, v = _gather(kb, vb, table, len(table))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_end_mask(q.shape[1], k.shape[1]))


def _paged_no_causal(q, kb, vb, table, length):
    k, v = _gather(kb, vb, table, -(-length // kb.shape[2]))
    return F.scaled_dot_product_attention(q, k[:, :length], v[:, :length])


def _paged_top_left(q, kb, vb, table, length):
    k, v = _gather(kb, vb, table, -(-length // kb.shape[2]))
    return F.scaled_dot_product_attention(q, k[:, :length], v[:, :length], is_causal=True)


def _paged_no_scale(q, kb, vb, table, length):
    k, v = _gather(kb, vb, table, -(-length // kb.shape[2]))
    return F.scaled_dot_product_attention(q, k[:, :length], v[:, :length], attn_mask=_end_mask(q.shape[1], length),
                                          scale=1.0)


def _split_chunks(query, key, value, lengths, S, size=None):
    T, d = key.shape[2], query.shape[-1]
    size = size or -(-T // S)
    valid = torch.arange(T)[None, :] < lengths[:, None]
    parts = []
    for a in range(0, size * S, size):
        s = (query @ key[:, :, a:a + size].transpose(-2, -1) / math.sqrt(d)).masked_fill(
            ~valid[:, None, None, a:a + size], -math.inf)
        parts.append((s, value[:, :, a:a + size], valid[:, a:a + size].sum(1)))
    return parts


def _split_mean(query, key, value, lengths, S):
    outs, live = [], []
    for s, v, n in _split_chunks(query, key, value, lengths, S):
        outs.append(torch.softmax(s, -1).nan_to_num() @ v)
        live.append((n > 0).double().view(-1, 1, 1, 1))
    return sum(outs) / sum(live)


def _split_by_size(query, key, value, lengths, S):
    total = 0
    for s, v, n in _split_chunks(query, key, value, lengths, S):
        total = total + (torch.softmax(s, -1).nan_to_num() @ v) * n.view(-1, 1, 1, 1)
    return total / lengths.view(-1, 1, 1, 1)


def _split_merge(parts):
    lse = torch.logsumexp(torch.stack([torch.logsumexp(s, -1) for s, _, _ in parts]), 0)
    return sum(torch.exp(torch.logsumexp(s, -1) - lse)[..., None] * (torch.softmax(s, -1).nan_to_num() @ v)
               for s, v, _ in parts)


def _split_ignores_lengths(query, key, value, lengths, S):
    return _split_merge(_split_chunks(query, key, value, torch.full_like(lengths, key.shape[2]), S))


def _split_drops_the_rest(query, key, value, lengths, S):
    return _split_merge(_split_chunks(query, key, value, lengths, S, size=key.shape[2] // S))


def _split_nan_on_empty(query, key, value, lengths, S):
    parts = _split_chunks(query, key, value, lengths, S)
    m = torch.stack([s.amax(-1) for s, _, _ in parts]).amax(0)
    num = sum(torch.exp(s - m[..., None]) @ v for s, v, _ in parts)
    den = sum(torch.exp(s - m[..., None]).sum(-1, keepdim=True) for s, _, _ in parts)
    outs = [torch.exp(s - s.amax(-1, keepdim=True)) for s, _, _ in parts]      # -inf - (-inf) in empty chunks
    return num / den + 0 * sum(o.sum(-1, keepdim=True) for o in outs)


def _split_exp_overflow(query, key, value, lengths, S):
    parts = _split_chunks(query, key, value, lengths, S)
    w = [torch.exp(torch.logsumexp(s, -1)) for s, _, _ in parts]              # overflows for large scores
    return sum(wi[..., None] * (torch.softmax(s, -1).nan_to_num() @ v) for wi, (s, v, _) in zip(w, parts)) / sum(w)[..., None]


def _cow(rule="count", move=True, new_count="one", index="div", take="first", in_place=False):
    def fn(tables, refs, writes, free, b):
        tables = tables.clone()
        refs = refs if in_place else refs.clone()
        free = free.tolist()
        for s, p in writes.tolist():
            j = p // b if index == "div" else p % b
            old = int(tables[s, j])
            if {"count": refs[old] > 1, "always": True, "never": False}[rule]:
                new = free.pop(0) if take == "first" else free.pop()
                if move:
                    refs[old] -= 1
                refs[new] = 1 if new_count == "one" else refs[old]
                tables[s, j] = new
        return tables
    return fn


def _quant(divide=127, rounding=True, per="axis", swap=False, as_float=False):
    def fn(x, axis):
        if swap:
            axis = "channel" if axis == "token" else "token"
        dim = -1 if axis == "token" else -2
        scale = x.abs().amax() * torch.ones(1, 1, dtype=x.dtype) if per == "block" else x.abs().amax(dim, keepdim=True)
        scale = scale / divide
        y = x / torch.where(scale > 0, scale, 1.0)
        q = (torch.round(y) if rounding else y).clamp(-127, 127)
        return (q * scale if as_float else q.to(torch.int8)), scale
    return fn


WRONG = [
    ("serving.paged_attention", _paged_all_slots, "first `length` slots"),
    ("serving.paged_attention", _paged_pool_order, "order block_table lists"),
    ("serving.paged_attention", _paged_whole_table, "padding|first `length` slots"),
    ("serving.paged_attention", _paged_no_causal, "end-aligned causal mask"),
    ("serving.paged_attention", _paged_top_left, "top left"),
    ("serving.paged_attention", _paged_no_scale, "1 / sqrt\\(d\\)"),
    ("serving.split_k_decode", _split_mean, "not equally important"),
    ("serving.split_k_decode", _split_by_size, "not by its number of keys"),
    ("serving.split_k_decode", _split_ignores_lengths, "padding"),
    ("serving.split_k_decode", _split_drops_the_rest, "ceil\\(T / num_splits\\)"),
    ("serving.split_k_decode", _split_nan_on_empty, "NaN"),
    ("serving.split_k_decode", _split_exp_overflow, "overflows|inf"),
    ("serving.copy_on_write", _cow(rule="always"), "written in place"),
    ("serving.copy_on_write", _cow(rule="never"), "Copy it first"),
    ("serving.copy_on_write", _cow(move=False), "decrease its count"),
    ("serving.copy_on_write", _cow(new_count="old"), "its count is 1"),
    ("serving.copy_on_write", _cow(index="mod"), "p // block_size"),
    ("serving.copy_on_write", _cow(take="last"), "from the front"),
    ("serving.copy_on_write", _cow(in_place=True), "changed its inputs in place"),
    ("serving.verification_mask", lambda q, k: torch.ones(q, k, dtype=torch.bool).tril(), "top left"),
    ("serving.verification_mask", lambda q, k: torch.ones(q, k, dtype=torch.bool), "must not see the drafts"),
    ("serving.verification_mask", lambda q, k: torch.ones(q, k, dtype=torch.bool).tril(k - q - 1), "its own position"),
    ("serving.verification_mask", lambda q, k: torch.ones(q, k, dtype=torch.bool).tril(k - q + 1), "one key too many"),
    ("serving.verification_mask", lambda q, k: torch.ones(k, q, dtype=torch.bool).tril(q - k).T.contiguous(),
     "True = may attend|has shape"),
    ("serving.quantize_block", _quant(divide=128), "\\[-127, 127\\]"),
    ("serving.quantize_block", _quant(divide=255), "\\[-127, 127\\]"),
    ("serving.quantize_block", _quant(rounding=False), "truncates"),
    ("serving.quantize_block", _quant(per="block"), "not one for the block"),
    ("serving.quantize_block", _quant(swap=True), "one scale per"),
    ("serving.quantize_block", _quant(as_float=True), "int8"),
]


@pytest.mark.parametrize("name, wrong, words", WRONG, ids=[f"{r[0]}-{i}" for i, r in enumerate(WRONG)])
def test_every_listed_mistake_is_rejected_with_a_hint_that_names_it(name, wrong, words, capsys):
    assert check(name, wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ " + name), out
    assert re.search(words, out), out


def test_every_serving_exercise_has_listed_mistakes():
    for name in SERVING:
        if name != "serving.kv_bytes":          # its mistakes are listed in test_exercises.py
            assert sum(row[0] == name for row in WRONG) >= 4, name


def test_a_hint_is_given_only_when_the_mistake_fits(capsys):
    # a wrong paged attention that is none of the listed mistakes gets no hint about them
    def shifted(q, kb, vb, table, length):
        return solution("serving.paged_attention")(q, kb, vb, table, length) + 0.5

    assert check("serving.paged_attention", shifted) is False
    assert "Hint" not in capsys.readouterr().out


# --- right answers in another style ----------------------------------------------------------------

def _paged_gathered(q, kb, vb, table, length):
    """Gather the blocks into one contiguous tensor, then torch's attention with the end-aligned mask."""
    k, v = _gather(kb, vb, table, -(-length // kb.shape[2]))
    return F.scaled_dot_product_attention(q, k[:, :length], v[:, :length], attn_mask=_end_mask(q.shape[1], length))


def _split_dense(query, key, value, lengths, S):
    """Not split at all: dense attention with the padding masked. Right values; the checker cannot see the split."""
    valid = torch.arange(key.shape[2])[None, :] < lengths[:, None]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=valid[:, None, None, :])


def _cow_lists(tables, refs, writes, free, b):
    tables, refs, free = tables.tolist(), refs.tolist(), free.tolist()
    for s, p in writes.tolist():
        blk = tables[s][p // b]
        if refs[blk] > 1:
            refs[blk] -= 1
            tables[s][p // b] = free.pop(0)
            refs[tables[s][p // b]] = 1
    return torch.tensor(tables)


def _verify_numpy(q, k):
    return torch.from_numpy(np.tril(np.ones((q, k), dtype=bool), k - q))


def _quant_numpy(x, axis):
    a = x.numpy()
    scale = np.abs(a).max(axis=1 if axis == "token" else 0, keepdims=True) / 127
    q = np.clip(np.rint(np.divide(a, scale, out=np.zeros_like(a), where=scale > 0)), -127, 127).astype(np.int8)
    return torch.from_numpy(q), torch.from_numpy(scale)


@pytest.mark.parametrize("name, fn", [("serving.paged_attention", _paged_gathered),
                                      ("serving.split_k_decode", _split_dense),
                                      ("serving.copy_on_write", _cow_lists),
                                      ("serving.verification_mask", _verify_numpy),
                                      ("serving.quantize_block", _quant_numpy)])
def test_a_right_answer_in_another_style_passes(name, fn, capsys):
    assert check(name, fn) is True, capsys.readouterr().out


def test_targets_do_not_move_when_the_package_is_patched(monkeypatch, capsys):
    import attn_course.serving

    monkeypatch.setattr(attn_course.serving, "paged_attention", lambda *a, **k: torch.zeros(1))
    monkeypatch.setattr(attn_course.serving, "quantize_kv", lambda *a, **k: (torch.zeros(1), torch.zeros(1)))
    for name in ("serving.paged_attention", "serving.quantize_block"):
        assert check(name, solution(name)) is True, capsys.readouterr().out
