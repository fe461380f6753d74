"""Serving: the KV caches (contiguous, paged, shared-prefix, sink, quantised) and the attention that reads them.

References are independent of the code under test: torch's own scaled_dot_product_attention over keys
kept contiguously from the start (never read back from the cache under test), explicit masks, closed forms.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_course import multihead, serving
from attn_course.exercises._core import LargestTensor
from attn_course.serving import (
    ContiguousKVCache,
    KVCache,
    PagedKVCache,
    PrefixSharingKVCache,
    QuantizedKVCache,
    SinkKVCache,
    dequantize_kv,
    paged_attention,
    quantize_kv,
    split_kv_attention,
    streaming_mask,
)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def end_aligned(L_q, L_k):
    """Query i (the last L_q positions of L_k) reads keys j <= i + L_k - L_q."""
    return torch.ones(L_q, L_k, dtype=torch.bool).tril(L_k - L_q)


def with_sink_column(scores, sinks):
    """Softmax over the scores and one extra logit per head whose value is zero (gpt-oss), written out."""
    extra = sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.cat([scores, extra], -1).softmax(-1)[..., :-1]


def test_the_caches_chapter_four_imports_are_the_serving_ones():
    for name in ("KVCache", "PagedKVCache", "SinkKVCache", "kv_cache_bytes"):
        assert getattr(multihead, name) is getattr(serving, name)
    from attn_course.transformer import KVCache as used_by_the_transformer
    assert used_by_the_transformer is KVCache


# --- split-K decoding ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(L_k=st.integers(1, 70), L_q=st.integers(1, 3), splits=st.integers(1, 70), seed=st.integers(0, 99))
def test_split_kv_attention_equals_dense_attention(L_k, L_q, splits, seed):
    splits = min(splits, L_k)
    q, k, v = rand(2, 3, L_q, 8, seed=seed), rand(2, 3, L_k, 8, seed=seed + 1), rand(2, 3, L_k, 5, seed=seed + 2)
    torch.testing.assert_close(split_kv_attention(q, k, v, splits), sdpa(q, k, v), atol=1e-12, rtol=1e-10)


def test_split_kv_attention_with_large_scores_and_a_scale():
    q, k, v = rand(1, 2, 1, 16) * 40, rand(1, 2, 300, 16) * 40, rand(1, 2, 300, 4)
    out = split_kv_attention(q, k, v, 7, scale=0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.5), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_split_kv_attention_keeps_the_dtype(dtype):
    q, k, v = rand(1, 2, 1, 16), rand(1, 2, 100, 16), rand(1, 2, 100, 16)
    out = split_kv_attention(q.to(dtype), k.to(dtype), v.to(dtype), 4)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), sdpa(q, k, v), atol=2e-2, rtol=2e-2)


@settings(max_examples=25, deadline=None)
@given(L_k=st.integers(1, 40), splits=st.integers(1, 40), seed=st.integers(0, 99))
def test_learned_sinks_are_one_more_logit_with_a_zero_value(L_k, splits, seed):
    q, k, v = rand(2, 4, 2, 8, seed=seed), rand(2, 4, L_k, 8, seed=seed + 1), rand(2, 4, L_k, 3, seed=seed + 2)
    sinks = rand(4, seed=seed + 3) * 3
    ref = with_sink_column(q @ k.transpose(-2, -1) / math.sqrt(8), sinks) @ v
    torch.testing.assert_close(split_kv_attention(q, k, v, min(splits, L_k), sinks=sinks), ref,
                               atol=1e-12, rtol=1e-10)
    # a very negative sink changes nothing; a very large one takes all the weight: output 0
    torch.testing.assert_close(split_kv_attention(q, k, v, 1, sinks=torch.full((4,), -1e4, dtype=torch.float64)),
                               sdpa(q, k, v), atol=1e-12, rtol=1e-10)
    assert split_kv_attention(q, k, v, 1, sinks=torch.full((4,), 1e4, dtype=torch.float64)).abs().max() < 1e-12


def test_split_kv_attention_rejects_bad_input():
    q, k, v = rand(1, 1, 1, 4), rand(1, 1, 5, 4), rand(1, 1, 5, 4)
    for bad in (0, 6, -1):
        with pytest.raises(ValueError, match="num_splits"):
            split_kv_attention(q, k, v, bad)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="num_splits"):
            split_kv_attention(q, k, v, bad)
    with pytest.raises(ValueError, match="sinks"):
        split_kv_attention(q, k, v, 2, sinks=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="d_k|key"):
        split_kv_attention(q, rand(1, 1, 5, 3), v, 2)


# --- paged attention -------------------------------------------------------------------------------

def _paged_setup(lengths, block, G, d, seed, pad=2):
    """Sequences of keys and values written into a pool in a shuffled block order, plus the dense copies."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block) for n in lengths]
    N = sum(per_seq) + 3
    order = torch.randperm(N, generator=g).tolist()            # blocks taken in a scrambled order
    key_pool = torch.randn(N, G, block, d, generator=g, dtype=torch.float64)    # garbage in unused slots
    value_pool = torch.randn(N, G, block, d, generator=g, dtype=torch.float64)
    width = max(per_seq) + pad
    table = torch.full((len(lengths), width), -1, dtype=torch.long)
    keys, values = [], []
    for b, n in enumerate(lengths):
        k = torch.randn(G, n, d, generator=g, dtype=torch.float64)
        v = torch.randn(G, n, d, generator=g, dtype=torch.float64)
        keys.append(k)
        values.append(v)
        for j in range(per_seq[b]):
            blk = order.pop()
            table[b, j] = blk
            chunk = slice(j * block, min((j + 1) * block, n))
            key_pool[blk, :, :chunk.stop - chunk.start] = k[:, chunk]
            value_pool[blk, :, :chunk.stop - chunk.start] = v[:, chunk]
    return key_pool, value_pool, table, torch.tensor(lengths), keys, values


@settings(max_examples=40, deadline=None)
@given(block=st.integers(1, 9), lengths=st.lists(st.integers(3, 40), min_size=1, max_size=4),
       L_q=st.integers(1, 3), group=st.sampled_from([1, 2, 4]), G=st.integers(1, 2), seed=st.integers(0, 99))
def test_paged_attention_equals_dense_causal_attention(block, lengths, L_q, group, G, seed):
    key_pool, value_pool, table, lens, keys, values = _paged_setup(lengths, block, G, 6, seed)
    H = G * group
    q = rand(len(lengths), H, L_q, 6, seed=seed + 7)
    out = paged_attention(q, key_pool, value_pool, table, lens)
    for b, n in enumerate(lengths):
        k, v = keys[b].repeat_interleave(group, 0), values[b].repeat_interleave(group, 0)   # (H, n, d)
        torch.testing.assert_close(out[b], sdpa(q[b], k, v, end_aligned(L_q, n)), atol=1e-12, rtol=1e-10)


def test_paged_attention_equals_the_paged_cache_read_as_a_contiguous_one():
    cache, contiguous = PagedKVCache(64, 4, 2, 8, dtype=torch.float64), {}
    g = torch.Generator().manual_seed(3)
    for step in range(24):                                     # three sequences written in turns
        s, n = step % 3, int(torch.randint(1, 6, (1,), generator=g))
        k, v = torch.randn(2, n, 8, generator=g, dtype=torch.float64), torch.randn(2, n, 8, generator=g,
                                                                                   dtype=torch.float64)
        cache.append(s, k, v)
        contiguous.setdefault(s, KVCache()).append(k[None], v[None])
    table, lengths = cache.tables([0, 1, 2])
    q = rand(3, 4, 1, 8, seed=5)
    out = paged_attention(q, cache.key_pool, cache.value_pool, table, lengths)
    for s in range(3):
        c = contiguous[s]
        ref = sdpa(q[s:s + 1], c.key.repeat_interleave(2, 1), c.value.repeat_interleave(2, 1))
        torch.testing.assert_close(out[s:s + 1], ref, atol=1e-12, rtol=1e-10)


def test_paged_attention_never_gathers_a_sequence():
    lengths = [512, 300]
    key_pool, value_pool, table, lens, _, _ = _paged_setup(lengths, 16, 2, 32, 0)
    q = rand(2, 4, 1, 32)
    with LargestTensor() as spy:
        paged_attention(q, key_pool, value_pool, table, lens)
    one_sequence = 2 * 512 * 32                                # the keys of the longest sequence, contiguous
    assert spy.largest < one_sequence / 4, (spy.largest, spy.shape)


def test_paged_attention_with_sinks_and_gqa():
    key_pool, value_pool, table, lens, keys, values = _paged_setup([11, 6], 4, 2, 8, 1)
    q, sinks = rand(2, 4, 2, 8, seed=9), rand(4, seed=10)
    out = paged_attention(q, key_pool, value_pool, table, lens, sinks=sinks)
    for b, n in enumerate([11, 6]):
        k, v = keys[b].repeat_interleave(2, 0), values[b].repeat_interleave(2, 0)
        scores = (q[b:b + 1] @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~end_aligned(2, n), -math.inf)
        torch.testing.assert_close(out[b:b + 1], with_sink_column(scores, sinks) @ v, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_paged_attention_keeps_the_dtype(dtype):
    key_pool, value_pool, table, lens, keys, values = _paged_setup([20, 9], 8, 1, 16, 2)
    q = rand(2, 2, 1, 16, seed=4)
    out = paged_attention(q.to(dtype), key_pool.to(dtype), value_pool.to(dtype), table.int(), lens.int())
    assert out.dtype == dtype
    ref = paged_attention(q, key_pool, value_pool, table, lens)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_paged_attention_rejects_bad_tables_and_lengths():
    key_pool, value_pool, table, lens, _, _ = _paged_setup([10, 6], 4, 1, 4, 0)   # 3 and 2 blocks in use
    q = rand(2, 1, 1, 4)
    bad = table.clone()
    bad[0, 1] = key_pool.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        paged_attention(q, key_pool, value_pool, bad, lens)
    bad[0, 1] = -1                                             # padding inside the used part
    with pytest.raises(ValueError, match="block_table"):
        paged_attention(q, key_pool, value_pool, bad, lens)
    with pytest.raises(ValueError, match="lengths"):
        paged_attention(q, key_pool, value_pool, table, torch.tensor([10, table.shape[1] * 4 + 1]))
    with pytest.raises(ValueError, match="lengths"):
        paged_attention(rand(2, 1, 3, 4), key_pool, value_pool, table, torch.tensor([10, 2]))   # fewer than L_q
    with pytest.raises(TypeError, match="block_table"):
        paged_attention(q, key_pool, value_pool, table.double(), lens)
    with pytest.raises(ValueError, match="block_table"):
        paged_attention(q, key_pool, value_pool, table[:1], lens)
    with pytest.raises(ValueError, match="H_kv"):
        paged_attention(rand(2, 3, 1, 4), key_pool.expand(-1, 2, -1, -1), value_pool.expand(-1, 2, -1, -1),
                        table, lens)
    with pytest.raises(TypeError, match="dtype"):
        paged_attention(q.float(), key_pool, value_pool, table, lens)


# --- the caches ------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(block=st.integers(1, 6), chunks=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 7)), min_size=1,
                                                   max_size=8))
def test_paged_cache_equals_a_contiguous_cache(block, chunks):
    paged = PagedKVCache(64, block, 2, 3, dtype=torch.float64)
    contiguous = {s: KVCache() for s in range(3)}
    for i, (seq, n) in enumerate(chunks):
        k, v = rand(1, 2, n, 3, seed=i), rand(1, 2, n, 3, seed=100 + i)
        paged.append(seq, k[0], v[0])
        contiguous[seq].append(k, v)
    for seq, c in contiguous.items():
        if c.length:
            pk, pv = paged.gather(seq)
            assert torch.equal(pk, c.key[0]) and torch.equal(pv, c.value[0])
    u = paged.usage()
    assert u["used_slots"] == sum(n for _, n in chunks)
    assert 0 <= u["allocated_slots"] - u["used_slots"] < block * 3


def test_paged_cache_frees_blocks_and_reports_a_full_pool():
    c = PagedKVCache(3, 4, 1, 2)
    c.append("a", torch.zeros(1, 9, 2), torch.zeros(1, 9, 2))
    with pytest.raises(ValueError, match="free blocks"):
        c.append("b", torch.zeros(1, 5, 2), torch.zeros(1, 5, 2))
    c.free("a")
    c.append("b", torch.ones(1, 12, 2), torch.ones(1, 12, 2))
    assert c.usage()["fragmentation"] == 0.0 and torch.equal(c.gather("b")[0], torch.ones(1, 12, 2))
    with pytest.raises(KeyError, match="unknown seq_id"):
        c.gather("a")
    with pytest.raises(ValueError, match="key must be"):
        c.append("b", torch.zeros(2, 1, 2), torch.zeros(2, 1, 2))
    assert c.slot_bytes == 2 * 1 * 2 * 4


def test_kv_cache_counts_the_bytes_it_copies_to_grow():
    c = KVCache()
    for _ in range(5):                                         # 5 appends of 3 tokens of (1, 2, ., 4) float32
        c.append(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    per_token = 2 * 2 * 4 * 4
    assert c.copied_bytes == per_token * 3 * (1 + 2 + 3 + 4)   # the old cache is written again every time


def test_contiguous_cache_reserves_or_doubles():
    r = ContiguousKVCache(2, 4, 10)
    r.append(rand(2, 6, 4), rand(2, 6, 4))
    assert r.nbytes == 2 * 2 * 10 * 4 * 4 and r.used_bytes == 2 * 2 * 6 * 4 * 4 and r.copied_bytes == 0
    with pytest.raises(ValueError, match="capacity"):
        r.append(rand(2, 5, 4), rand(2, 5, 4))
    d, ref = ContiguousKVCache(2, 4, 2, growth="double", dtype=torch.float64), KVCache()
    for i in range(9):                                         # 9 single tokens: capacity 2 -> 4 -> 8 -> 16
        k, v = rand(2, 1, 4, seed=i), rand(2, 1, 4, seed=50 + i)
        d.append(k, v)
        ref.append(k[None], v[None])
    assert d.capacity == 16 and d.length == 9
    assert torch.equal(d.key, ref.key[0]) and torch.equal(d.value, ref.value[0])
    assert d.copied_bytes == 2 * 2 * 4 * 8 * (2 + 4 + 8)      # copied what it held at each doubling
    with pytest.raises(ValueError, match="growth"):
        ContiguousKVCache(1, 1, 1, growth="triple")


@settings(max_examples=30, deadline=None)
@given(block=st.integers(1, 8), prefix=st.integers(1, 30), suffixes=st.lists(st.integers(0, 12), min_size=1,
                                                                                  max_size=4))
def test_prefix_sharing_equals_unshared_caches_and_saves_blocks(block, prefix, suffixes):
    shared = PrefixSharingKVCache(200, block, 1, 4, dtype=torch.float64)
    alone = PagedKVCache(200, block, 1, 4, dtype=torch.float64)
    pk, pv = rand(1, prefix, 4, seed=1), rand(1, prefix, 4, seed=2)
    shared.append("prompt", pk, pv)
    for r, n in enumerate(suffixes):
        shared.fork("prompt", r)
        alone.append(r, pk, pv)
        for t in range(n):                                     # decode token by token
            k, v = rand(1, 1, 4, seed=100 * r + t), rand(1, 1, 4, seed=100 * r + t + 50)
            shared.append(r, k, v)
            alone.append(r, k, v)
    ids = list(range(len(suffixes)))
    for r in ids:
        a, b = shared.gather(r), alone.gather(r)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    q = rand(len(ids), 2, 1, 4, seed=7)
    out_shared = paged_attention(q, shared.key_pool, shared.value_pool, *shared.tables(ids))
    out_alone = paged_attention(q, alone.key_pool, alone.value_pool, *alone.tables(ids))
    assert torch.equal(out_shared, out_alone)
    # blocks: the prompt's once, plus each request's own (one copy when it wrote into a shared, partial block)
    prompt_blocks, partial = -(-prefix // block), prefix % block != 0
    copies = sum(1 for n in suffixes if partial and n)
    expected = prompt_blocks + sum(-(-(prefix + n) // block) - prompt_blocks for n in suffixes) + copies
    used_blocks = shared.num_blocks - len(shared.free_blocks)
    assert used_blocks == expected
    assert shared.copied_blocks == copies
    assert used_blocks <= alone.num_blocks - len(alone.free_blocks) + 1
    # freeing everything returns every block exactly once
    for r in ids:
        shared.free(r)
    shared.free("prompt")
    assert sorted(shared.free_blocks) == list(range(200)) and set(shared.ref_counts) == {0}


def test_copy_on_write_copies_only_a_shared_block_and_only_once():
    c = PrefixSharingKVCache(10, 4, 1, 1)
    c.append("p", torch.arange(6.0).view(1, 6, 1), torch.zeros(1, 6, 1))   # blocks [0, 1], block 1 half full
    c.fork("p", "a")
    c.fork("p", "b")
    assert c.ref_counts[:2] == [3, 3]
    c.append("a", torch.full((1, 1, 1), 60.0), torch.zeros(1, 1, 1))       # writes into shared block 1: copy
    assert c.block_tables["a"] == [0, 2] and c.ref_counts[:3] == [3, 2, 1] and c.copied_blocks == 1
    c.append("a", torch.full((1, 1, 1), 70.0), torch.zeros(1, 1, 1))       # block 2 is its own now: no copy
    assert c.copied_blocks == 1
    assert c.gather("a")[0].flatten().tolist() == [0, 1, 2, 3, 4, 5, 60, 70]
    assert c.gather("p")[0].flatten().tolist() == [0, 1, 2, 3, 4, 5]       # the prompt is untouched
    c.free("p")
    c.append("b", torch.full((1, 1, 1), 80.0), torch.zeros(1, 1, 1))       # b holds block 1 alone: no copy
    assert c.block_tables["b"] == [0, 1] and c.copied_blocks == 1
    with pytest.raises(ValueError, match="already"):
        c.fork("a", "b")
    full = PrefixSharingKVCache(2, 4, 1, 1)
    full.append("p", torch.zeros(1, 6, 1), torch.zeros(1, 6, 1))
    full.fork("p", "a")
    with pytest.raises(ValueError, match="free blocks"):                   # the copy needs a free block
        full.append("a", torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))


def test_sink_cache_keeps_sinks_and_the_window():
    c = SinkKVCache(num_sinks=2, window=3)
    for t in range(10):
        c.append(torch.full((1, 1, 1, 1), float(t)), torch.full((1, 1, 1, 1), float(t)))
    assert c.key.flatten().tolist() == [0, 1, 7, 8, 9] and c.seen == 10 and c.length == 5
    with pytest.raises(ValueError, match="num_sinks"):
        SinkKVCache(num_sinks=-1)


@pytest.mark.parametrize("sinks, window", [(0, 4), (1, 4), (4, 6), (3, 30)])
def test_decoding_with_a_sink_cache_equals_one_pass_under_the_streaming_mask(sinks, window):
    L = 24
    q, k, v = rand(1, 2, L, 8, seed=1), rand(1, 2, L, 8, seed=2), rand(1, 2, L, 8, seed=3)
    cache, steps = SinkKVCache(sinks, window), []
    for t in range(L):
        kc, vc = cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        steps.append(sdpa(q[:, :, t:t + 1], kc, vc))
    masked = sdpa(q, k, v, streaming_mask(L, sinks, window))
    torch.testing.assert_close(torch.cat(steps, 2), masked, atol=1e-12, rtol=1e-10)
    m = streaming_mask(L, sinks, window)
    assert m.sum(1).max() == min(L, sinks + window) and not m.triu(1).any()


def test_streaming_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="num_sinks"):
        streaming_mask(4, -1, 2)
    with pytest.raises(ValueError, match="window"):
        streaming_mask(4, 1, 0)


# --- quantisation ----------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(axis=st.sampled_from(["token", "channel"]), bits=st.integers(2, 8), T=st.integers(1, 20),
       d=st.integers(1, 16), seed=st.integers(0, 99))
def test_quantisation_round_trips_within_half_a_step(axis, bits, T, d, seed):
    x = rand(2, T, d, seed=seed) * torch.exp(rand(1, 1, d, seed=seed + 1))   # channels of different sizes
    q, scale = quantize_kv(x, axis=axis, bits=bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() <= qmax
    assert scale.shape == ((2, T, 1) if axis == "token" else (2, 1, d))
    dim = -1 if axis == "token" else -2
    torch.testing.assert_close(scale, x.abs().amax(dim, keepdim=True) / qmax)
    assert ((dequantize_kv(q, scale) - x).abs() <= scale / 2 + 1e-12).all()
    assert (q.abs().amax(dim) == qmax).all()                  # the largest entry of each group uses the full range


def test_quantisation_of_zeros_and_bad_input():
    q, scale = quantize_kv(torch.zeros(3, 4))
    assert (q == 0).all() and (scale == 0).all() and (dequantize_kv(q, scale) == 0).all()
    with pytest.raises(ValueError, match="axis"):
        quantize_kv(torch.zeros(3, 4), axis="head")
    with pytest.raises(ValueError, match="bits"):
        quantize_kv(torch.zeros(3, 4), bits=16)
    with pytest.raises(TypeError, match="x"):
        quantize_kv(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="q"):
        dequantize_kv(torch.zeros(3, 4), torch.ones(3, 1))


def test_quantized_cache_holds_a_quarter_of_float32_plus_scales_and_attends_closely():
    cache, ref = QuantizedKVCache(bits=8), KVCache()
    for t in range(0, 64, 16):
        k, v = rand(1, 2, 16, 32, seed=t), rand(1, 2, 16, 32, seed=100 + t)
        kq, vq = cache.append(k.float(), v.float())
        ref.append(k.float(), v.float())
    assert cache.length == 64
    assert cache.nbytes == 2 * (2 * 64 * 32 * 1 + 2 * 64 * 4)  # int8 entries + one float32 scale per token
    q = rand(1, 2, 1, 32, seed=9).float()
    rel = (sdpa(q, kq, vq) - sdpa(q, ref.key, ref.value)).norm() / sdpa(q, ref.key, ref.value).norm()
    assert rel < 0.02


# --- arithmetic intensity --------------------------------------------------------------------------

def test_decode_intensity_closed_forms():
    assert serving.decode_intensity(32, 32) == 1.0           # MHA in 16-bit: one FLOP per byte read
    assert serving.decode_intensity(32, 8) == 4.0
    assert serving.decode_intensity(32, 1, bytes_per_value=1) == 64.0
    assert serving.decode_intensity(32, 8, num_queries=5) == 20.0
    with pytest.raises(ValueError, match="num_kv_heads"):
        serving.decode_intensity(32, 5)
